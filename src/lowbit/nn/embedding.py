"""QEmbedding: an embedding table whose rows are quantized; only looked-up rows are decoded."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedError
from ..formats import Codebook, Float
from ..granularity import PerChannel, PerGroup, PerTensor
from ..packing import unpack
from ..primitives import QParams, dequantize
from ..recipe import ActivationSpec
from ..tensor import QTensor
from .base import QModule


class QEmbedding(QModule):
    """Embedding lookup from a quantized table [num_embeddings, dim]."""

    op = "embedding"

    def __init__(self, qweight: QTensor, activation: ActivationSpec, bias=None, padding_idx: int | None = None):
        super().__init__(qweight, activation, None)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_float(cls, module: nn.Embedding, qweight: QTensor, activation: ActivationSpec, name: str = ""):
        if type(module).forward is not nn.Embedding.forward:
            raise UnsupportedError(
                f"{name}: {type(module).__name__} overrides Embedding.forward, so swapping it would change the "
                "model; skip it in the recipe (a rule with skip: true)"
            )
        if activation.mode != "none":
            raise UnsupportedError(f"{name}: embeddings take integer ids; use a weight-only scheme for them")
        if module.max_norm is not None:
            raise UnsupportedError(f"{name}: embeddings with max_norm renormalise their weights; skip the layer")
        return cls(qweight, activation, padding_idx=module.padding_idx)

    def _rows_are_byte_aligned(self) -> bool:
        fmt, gran = self.weight_format, self.weight_granularity
        if isinstance(fmt, Codebook) or (isinstance(fmt, Float) and not fmt.scaled):
            return False
        by_row = isinstance(gran, (PerTensor, PerGroup)) or (isinstance(gran, PerChannel) and gran.axis in (0, -2))
        return by_row and (self.embedding_dim * fmt.bits) % 8 == 0

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode only the rows ``ids`` (a 1-D index tensor) when rows are byte-aligned."""
        qt = self.qweight
        if not self._rows_are_byte_aligned():
            return qt.dequantize()[ids]
        bits, dim, n = qt.fmt.bits, self.embedding_dim, ids.numel()
        packed = qt.data.view(self.num_embeddings, dim * bits // 8)[ids]
        codes = unpack(packed.reshape(-1), bits, n * dim).view(n, dim)
        per_row = not isinstance(qt.granularity, PerTensor)
        pick = (lambda t: None if t is None else t[ids]) if per_row else (lambda t: t)
        qp = QParams(pick(qt.scale), pick(qt.zero_point))
        return dequantize(codes, qt.fmt, qp, qt.granularity, (n, dim), qt.dtype)
