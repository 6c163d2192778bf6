"""Sparsity: compact storage, magnitude / N:M / SparseGPT masks, with quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import sparse
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.errors import SpecError
from lowbit.formats import Int
from lowbit.granularity import PerGroup
from lowbit.io import read_safetensors, write_safetensors
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor


@pytest.mark.parametrize("pattern", ["bitmask", "2:4"])
def test_mask_encoding_round_trips(pattern):
    w = torch.randn(6, 40)
    keep = sparse.n_m_mask(w) if pattern == "2:4" else sparse.magnitude_mask(w, 0.3)
    meta = sparse.encode(keep, pattern)
    assert meta.numel() == sparse.meta_size(pattern, w.shape)
    assert torch.equal(sparse.decode(meta, pattern, w.shape), keep)


def test_masks_keep_the_largest():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, 1.0]])
    assert sparse.n_m_mask(w).tolist() == [[False, True, True, False, True, False, False, True]]
    keep = sparse.magnitude_mask(w, 0.75)
    assert keep.sum() == 2 and keep[0, 1] and keep[0, 4]
    with pytest.raises(SpecError, match="divisible by 4"):
        sparse.n_m_mask(torch.randn(2, 6))
    with pytest.raises(SpecError, match="exactly 2 kept"):
        sparse.encode(torch.ones(2, 8, dtype=torch.bool), "2:4")


def test_sparse_qtensor_storage_shrinks_and_round_trips(tmp_path):
    w = torch.randn(64, 256)
    spec = QuantSpec(Int(4), PerGroup(128), scale_dtype="float16")
    keep = sparse.n_m_mask(w)
    from lowbit.primitives import choose_qparams, quantize

    qp = choose_qparams(w * keep, spec.format, spec.granularity, scale_dtype=torch.float16)
    codes = quantize(w * keep, spec.format, qp, spec.granularity)
    qt = QTensor.from_codes(codes, qp, spec, w.shape, w.dtype, keep=keep, sparsity="2:4")
    dense = QTensor.quantize(w * keep, spec)
    # Half the codes plus 2-bit positions: 2 + 1 bits per weight instead of 4 (scales aside).
    assert qt.data.numel() == 64 * 256 // 4 and qt.mask.numel() == 64 * 256 // 8
    assert qt.nbytes < 0.8 * dense.nbytes
    assert torch.equal(qt.dequantize(), dense.dequantize() * keep)
    assert torch.all(qt.dequantize()[~keep] == 0)
    tensors, meta = qt.to_dict("l.")
    write_safetensors(tmp_path / "s.safetensors", tensors)
    back = QTensor.from_dict(read_safetensors(tmp_path / "s.safetensors")[0], meta, "l.")
    assert torch.equal(back.dequantize(), qt.dequantize())
    tensors["l.mask"] = tensors["l.mask"][:-1]
    with pytest.raises(Exception, match="sparsity mask"):
        QTensor.from_dict(tensors, meta, "l.")


def test_sparsegpt_beats_magnitude_at_2_4():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen) @ torch.randn(32, 128, generator=gen) + 0.2 * torch.randn(2048, 128)
    w = torch.randn(64, 128, generator=gen)
    hessian = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec(Int(8), PerGroup(128))
    sgpt, _ = gptq_quantize(w, hessian, spec, prune=("2:4", 0.5), block_size=32)
    mag, _ = gptq_quantize(w, torch.eye(128), spec, damp=0.0, keep=sparse.n_m_mask(w), block_size=32)
    assert sgpt.sparsity == "2:4" and mag.sparsity == "2:4"

    def err(qt):
        return float(((x @ w.T - x @ qt.dequantize().T) ** 2).mean())

    assert err(sgpt) < 0.7 * err(mag)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize(
    "sparsity",
    [
        {"pattern": "2:4"},
        {"pattern": "unstructured", "ratio": 0.6},
        {"pattern": "unstructured", "ratio": 0.5, "scope": "global"},
        {"pattern": "2:4", "method": "sparsegpt"},
    ],
)
def test_quantize_with_sparsity_end_to_end(sparsity, tmp_path):
    model = _mlp()
    x = torch.randn(32, 64)
    algorithm = "gptq" if sparsity.get("method") == "sparsegpt" else "rtn"
    recipe = Recipe.from_dict(
        {
            "rules": [
                {"weight": {"format": "int8", "granularity": "channel"}, "algorithm": algorithm, "sparsity": sparsity}
            ]
        }
    )
    lowbit.quantize(model, recipe, calib=[x])
    kept = [model[i].qweight.keep_mask() for i in (0, 2)]
    fraction = float(sum(k.sum() for k in kept) / sum(k.numel() for k in kept))
    assert abs(fraction - (1 - sparsity.get("ratio", 0.5))) < 0.01
    assert model[0].layout.endswith("+2:4" if sparsity["pattern"] == "2:4" else "+bitmask")
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q", module=_mlp())
    assert torch.equal(back.model(x), model(x))


def test_bad_sparsity_recipes():
    with pytest.raises(SpecError, match="exactly half"):
        Recipe.from_dict({"rules": [{"weight": "int8", "sparsity": {"pattern": "2:4", "ratio": 0.3}}]})
    with pytest.raises(SpecError, match="works with algorithm"):
        Recipe.from_dict({"rules": [{"weight": "int8", "algorithm": "rtn", "sparsity": {"method": "sparsegpt"}}]})
    with pytest.raises(SpecError, match="ratio"):
        Recipe.from_dict({"rules": [{"weight": "int8", "sparsity": {"pattern": "unstructured", "ratio": 1.5}}]})
