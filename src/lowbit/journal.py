"""Block journal of a sequential quantization: every finished block is saved to a directory, so
that a run killed midway continues after the last saved block (``quantize(..., journal=DIR,
resume=True)``, ``lowbit quantize --resume``) and gives the bytes an uninterrupted run gives.

Per finished block ``i`` the journal holds ``block-i.safetensors`` (the block's tensors, quantized
layers included), ``hidden-(i+1).safetensors`` (the next block's input for every calibration
batch) and ``journal.json``, written last as the commit point: a crash between the writes leaves
the previous consistent state. A fingerprint of the float model, the recipe and the calibration
data guards against resuming with other inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SpecError
from .io import read_safetensors, write_json, write_safetensors
from .nn import QModule

JOURNAL = "journal.json"
JOURNAL_FORMAT = "lowbit-journal"


def hash_value(digest: Any, value: Any) -> None:
    """Feed a calibration batch (tensors in dicts, lists and tuples) into ``digest``."""
    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"D")
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            hash_value(digest, item)
    else:
        digest.update(repr(value).encode())


def fingerprint(module: nn.Module, recipe: dict[str, Any], batches: Iterable[Any]) -> str:
    """SHA-256 of everything a quantization's result depends on: float weights, recipe,
    calibration batches and the lowbit/torch versions."""
    digest = hashlib.sha256()
    versions = {pkg: _version(pkg) for pkg in ("lowbit", "torch")}
    digest.update(json.dumps({"recipe": recipe, "versions": versions}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        hash_value(digest, tensor)
    hash_value(digest, list(batches))
    return digest.hexdigest()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def _journal_file(name: str) -> bool:
    return name == JOURNAL or name.startswith(("block-", "hidden-", "."))


class BlockJournal:
    """Saves and restores the finished blocks of one sequential run (see the module docstring)."""

    def __init__(self, directory: str | Path, digest: str, resume: bool) -> None:
        self.directory = Path(directory)
        self.digest = digest
        self.state: dict[str, Any] = {"format": JOURNAL_FORMAT, "fingerprint": digest, "done": 0, "layers": {}}
        path = self.directory / JOURNAL
        if self.directory.exists():
            if not self.directory.is_dir():
                raise SpecError(f"journal {self.directory} is a file; remove it or choose another output")
            foreign = [p.name for p in self.directory.iterdir() if not _journal_file(p.name)]
            if foreign:
                raise SpecError(f"journal {self.directory} holds other files ({foreign[:3]}); move them away")
        if resume and path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                done = state["done"]
                valid = state.get("format") == JOURNAL_FORMAT and isinstance(done, int) and done >= 0
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: the journal is corrupt ({exc}); run without --resume") from exc
            if not valid or not isinstance(state.get("layers"), dict):
                raise CheckpointError(f"{path}: not a lowbit journal; run without --resume to start over")
            if state.get("fingerprint") != digest:
                raise SpecError(
                    f"{self.directory}: the unfinished run was made with another model, recipe, calibration "
                    "data or lowbit version; run without --resume to start over"
                )
            self.state = state
        elif self.directory.exists():
            shutil.rmtree(self.directory)  # a stale journal of an earlier run: start over

    @property
    def done(self) -> int:
        """Number of blocks already quantized and saved."""
        return int(self.state["done"])

    def restore(self, module: nn.Module, blocks_name: str, record: Any) -> None:
        """Put the saved blocks back into ``module`` (quantized layers, folded norms) and their
        layers into ``record`` (which later saves also read); ``saved_hidden`` becomes the saved
        input of the first block still to do."""
        from .export.checkpoint import restore_layer

        self.record = record
        blocks = module.get_submodule(blocks_name)
        if self.done > len(blocks):
            raise CheckpointError(f"{self.directory}: journal has {self.done} blocks, the model {len(blocks)}")
        for index in range(self.done):
            prefix = f"{blocks_name}.{index}."
            tensors, _ = read_safetensors(self.directory / f"block-{index}.safetensors")
            full = {prefix + key: value for key, value in tensors.items()}
            for name, entry in self.state["layers"].items():
                if name.startswith(prefix):
                    record.schemes[name] = restore_layer(module, name, entry, full, self.directory)
                    record.seconds[name] = float(self.state.get("seconds", {}).get(name, 0.0))
            try:
                blocks[index].load_state_dict(tensors, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{self.directory}: block {index} does not fit the model ({exc})") from exc
        for norm, members in self.state.get("folded", {}).items():
            record.folded[norm] = list(members)
        self.saved_hidden: list[torch.Tensor] = []
        if self.done:
            hidden, _ = read_safetensors(self.directory / f"hidden-{self.done}.safetensors")
            try:
                self.saved_hidden = [hidden[f"h{i}"] for i in range(len(hidden))]
            except KeyError as exc:
                raise CheckpointError(f"{self.directory}: saved block inputs are incomplete ({exc})") from exc

    def save(self, index: int, block: nn.Module, prefix: str, hidden: list[torch.Tensor]) -> None:
        """Record that block ``index`` is finished; ``hidden`` is the next block's input per batch."""
        from .export.checkpoint import layer_entry

        record = self.record
        self.directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(self.directory / f"block-{index}.safetensors", block.state_dict())
        write_safetensors(
            self.directory / f"hidden-{index + 1}.safetensors", {f"h{i}": h for i, h in enumerate(hidden)}
        )
        for name, module in block.named_modules(prefix=prefix.rstrip(".")):
            if isinstance(module, QModule) and name in record.schemes:
                self.state["layers"][name] = layer_entry(module, record.schemes[name])
                self.state.setdefault("seconds", {})[name] = record.seconds.get(name, 0.0)
        self.state["folded"] = {k: list(v) for k, v in record.folded.items()}
        self.state["done"] = index + 1
        write_json(self.directory / JOURNAL, self.state)
        (self.directory / f"hidden-{index}.safetensors").unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the journal (its checkpoint is saved)."""
        shutil.rmtree(self.directory, ignore_errors=True)
