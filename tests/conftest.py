"""Shared fixtures: seeded generators and the real MiniLM weights (installed by scripts/setup.sh)."""

from __future__ import annotations

import pytest
import torch


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
