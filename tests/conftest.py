"""Shared fixtures: seeded generators and the real MiniLM weights (installed by scripts/setup.sh)."""

from __future__ import annotations

import os

import pytest
import torch


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (`-n N`), split the cores between the workers: N processes each running
    all-core OpenMP loops would oversubscribe the CPU. Subprocesses (CLI tests) inherit the limit."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_cores_between_workers()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    from lowbit.evaluation.weights import linear_weights
    from lowbit.io import read_safetensors
    from lowbit.models import builtin_path

    tensors, _ = read_safetensors(builtin_path("minilm") / "model.safetensors")
    return linear_weights(tensors)
