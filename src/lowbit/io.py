"""Safe tensor-file I/O: safetensors only (never unpickling), atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def refuse_pickle(path: Path) -> None:
    """Pickle files can run code on load; lowbit never opens them."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle-based checkpoints are refused (loading them can run arbitrary code); "
            "convert it to .safetensors with the tool that made it"
        )


def _header_check(path: Path) -> dict:
    """Check the safetensors header before handing the file to the library; return it."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is too short to be safetensors ({size} bytes); it is truncated")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has {size}; truncated or corrupt"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc}); file is corrupt") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a mapping; file is corrupt")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry; file is corrupt") from exc
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: tensors need {8 + n + end} bytes but the file has {size}; it is truncated, re-create it"
        )
    return header


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, with clear errors for bad files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path")
    _header_check(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc}); the file is corrupt") from exc
    return tensors, meta


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_parent(target: Path) -> None:
    """Create ``target``'s parent directories, or say which part of the path is in the way."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir()), None)
        raise CheckpointError(
            f"cannot write {target}: {blocker or target.parent} is a file, not a directory; choose another output path"
        ) from None
    except PermissionError as err:
        raise CheckpointError(f"cannot create {target.parent}: {err.strerror}; choose a writable output path") from None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it into place only on success."""
    target = Path(target)
    if target.is_dir():
        raise CheckpointError(f"{target} is a directory; give a file path for this output")
    make_parent(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``, on
    failure it is deleted. An existing ``target`` is swapped out in one atomic step where the
    OS allows it, so a crash at any moment leaves the old or the new directory in place."""
    target = Path(target)
    make_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.is_dir() and _exchange(tmp, target):
            return  # tmp now holds the old directory and is removed below
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target: Path, marker: str, what: str) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty directory, or a directory
    holding ``marker`` (an earlier output of the same kind): never overwrite user data."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is a file; choose a new output path for the {what}")
    if any(target.iterdir()) and not (target / marker).exists():
        raise CheckpointError(
            f"{target} exists and is not a {what} (no {marker}); refusing to replace it, choose a new output path"
        )


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
