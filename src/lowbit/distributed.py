"""Work split across processes with torch.distributed (torchrun: gloo on CPU, NCCL on GPU).

Under ``torchrun --nproc_per_node N -m lowbit ...`` every rank runs the same command; the
parts that take long (evaluation windows and batches, sensitivity candidates) are dealt out by
index, ``rank::world``, and the per-item results are gathered and put back in the original
order, so the reduction (a sum over windows, a concatenation of embeddings) runs in the same
order as in one process and gives the same result. Calibration batches are dealt out in whole
blocks of an ordered reduction tree (lowbit.reduction), so statistics summed across ranks equal
the single-process sums to the bit. Only rank 0 prints and writes files.
Without torchrun's environment everything here is a no-op for a single process.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init() -> None:
    """Join the process group torchrun set up (once); gloo on CPU, NCCL when CUDA is present."""
    if _launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_shutdown)


def _shutdown() -> None:
    """At exit: wait for every rank, then close the group, so no rank's exit tears down a
    connection another rank's communication thread still uses (that aborts it with SIGABRT)."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(minutes=5))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # a rank already failed; torchrun reports that one
    dist.destroy_process_group()


def rank() -> int:
    init()
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    init()
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that prints and writes (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote a file the others will read)."""
    if world() > 1:
        dist.barrier()


def mine(count: int) -> list[int]:
    """The item indices this rank handles: ``rank, rank + world, ...``."""
    return list(range(rank(), count, world()))


def gather(local: dict[int, T], count: int) -> list[T]:
    """Every rank's {index: result} merged into one list in index order (on every rank)."""
    if world() == 1:
        return [local[i] for i in range(count)]
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, {i: _cpu(v) for i, v in local.items()})
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    missing = [i for i in range(count) if i not in merged]
    if missing:
        raise RuntimeError(f"distributed gather: items {missing[:5]} were computed by no rank")
    return [merged[i] for i in range(count)]


def all_objects(local: Any) -> list[Any]:
    """Every rank's ``local`` object, in rank order (on every rank)."""
    if world() == 1:
        return [local]
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, _cpu_tree(local))
    return parts


def _cpu_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _cpu_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_tree(v) for v in value)
    return _cpu(value)


def _cpu(value: Any) -> Any:
    return value.cpu() if torch.is_tensor(value) else value
