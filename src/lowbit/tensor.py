"""QTensor: packed codes plus everything needed to turn them back into numbers.

It is what algorithms return, what modules hold and what checkpoints store. Any torch op
without a registered kernel sees the dequantized tensor instead (a fallback, not a crash).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from . import packing, sparse
from .errors import CheckpointError, LowbitError, SpecError
from .formats import Binary, Codebook, Float, Format, Int, format_from_dict, format_to_dict
from .granularity import Granularity, PerGroup, granularity_from_dict, granularity_to_dict
from .primitives import QParams, choose_qparams, dequantize, quantize
from .spec import QuantSpec

_TORCH_HANDLERS: dict[Callable, Callable] = {}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register_torch_handler(func: Callable) -> Callable[[Callable], Callable]:
    """Route ``func`` (e.g. torch.nn.functional.linear) to a handler when a QTensor is an argument."""

    def wrap(handler: Callable) -> Callable:
        _TORCH_HANDLERS[func] = handler
        return handler

    return wrap


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _codes_numel(fmt: Format, shape: torch.Size) -> int:
    """How many codes a tensor of ``shape`` has (one per element, or per sub-vector)."""
    if not isinstance(fmt, Codebook):
        return shape.numel()
    rows, cols = (1, shape.numel()) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))
    return rows * -(-cols // fmt.dim)


class QTensor:
    """A quantized tensor: ``data`` (bit-packed uint8 codes, or the fp16/bf16 tensor itself),
    ``scale``/``zero_point``/``codebook`` in compact shape, and its format, granularity,
    logical shape and original dtype."""

    def __init__(
        self,
        data: torch.Tensor,
        fmt: Format,
        granularity: Granularity,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
        codebook: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        sparsity: str | None = None,
    ) -> None:
        self.data, self.fmt, self.granularity = data, fmt, granularity
        self.shape, self.dtype = torch.Size(shape), dtype
        self.scale, self.zero_point, self.codebook = scale, zero_point, codebook
        self.mask, self.sparsity = mask, sparsity  # pruned weights: packed keep-mask, only kept codes stored

    @classmethod
    def quantize(cls, x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> QTensor:
        """Quantize ``x`` per ``spec`` (round to nearest with the spec's range estimator)."""
        qp = choose_qparams(x, spec.format, spec.granularity, spec.range, spec.torch_scale_dtype, name)
        return cls.from_codes(quantize(x, spec.format, qp, spec.granularity), qp, spec, x.shape, x.dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        qp: QParams,
        spec: QuantSpec,
        shape: torch.Size,
        dtype: torch.dtype,
        keep: torch.Tensor | None = None,
        sparsity: str | None = None,
    ) -> QTensor:
        """Pack unpacked codes (as returned by ``primitives.quantize``) into a QTensor; with a
        boolean ``keep`` mask (and its ``sparsity`` layout) only the kept codes are stored."""
        fmt = spec.format
        plain = isinstance(fmt, Float) and not fmt.scaled
        mask = None
        if keep is not None:
            if plain or isinstance(fmt, Codebook):
                raise SpecError(f"sparse storage needs an integer-coded format, not {fmt.name}")
            mask = sparse.encode(keep, sparsity)
            codes = codes.reshape(-1)[keep.reshape(-1)]
        data = codes.contiguous() if plain else packing.pack(codes.reshape(-1), fmt.bits)
        return cls(data, fmt, spec.granularity, shape, dtype, qp.scale, qp.zero_point, qp.codebook, mask, sparsity)

    def keep_mask(self) -> torch.Tensor | None:
        """Boolean [shape] mask of kept (non-pruned) weights, or None for a dense tensor."""
        return None if self.mask is None else sparse.decode(self.mask, self.sparsity, self.shape)

    # -- views -------------------------------------------------------------------------
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.codebook)

    def codes(self) -> torch.Tensor:
        """Unpacked codes (uint8; fp16/bf16 formats return the stored tensor)."""
        if isinstance(self.fmt, Float) and not self.fmt.scaled:
            return self.data
        if self.mask is not None:  # pruned positions read as code 0: their value is zero anyway
            keep = self.keep_mask().reshape(-1)
            dense = torch.zeros(self.shape.numel(), dtype=torch.uint8)
            dense[keep] = packing.unpack(self.data, self.fmt.bits, int(keep.sum()))
            return dense.view(self.shape)
        codes = packing.unpack(self.data, self.fmt.bits, _codes_numel(self.fmt, self.shape))
        return codes if isinstance(self.fmt, Codebook) else codes.view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values the codes stand for, in ``dtype`` (default: the original dtype)."""
        out = dequantize(self.codes(), self.fmt, self.qparams(), self.granularity, self.shape, dtype or self.dtype)
        return out if self.mask is None else out * self.keep_mask()

    @property
    def nbytes(self) -> int:
        """True storage: codes + scales + zero points + codebooks + sparsity mask."""
        parts = (self.data, self.scale, self.zero_point, self.codebook, self.mask)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.shape.numel())

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return (
            f"QTensor(shape={tuple(self.shape)}, format={self.fmt.name}, "
            f"granularity={self.granularity.name}, bits/weight={self.bits_per_weight:.3f})"
        )

    # -- torch fallback -------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _TORCH_HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)

        def plain(a):
            return a.dequantize() if isinstance(a, QTensor) else a

        return func(*_map(args, plain), **_map(kwargs, plain))

    # -- serialization -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """JSON-able description stored next to the tensors (lowbit.json / safetensors metadata)."""
        meta = {
            "format": format_to_dict(self.fmt),
            "granularity": granularity_to_dict(self.granularity),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.sparsity is not None:
            meta["sparsity"] = self.sparsity
        return meta

    def to_dict(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors for safetensors under ``prefix`` + (qdata, scale, zero_point, codebook), and meta."""
        tensors = {f"{prefix}qdata": self.data.contiguous()}
        for key in ("scale", "zero_point", "codebook", "mask"):
            value = getattr(self, key)
            if value is not None:
                tensors[f"{prefix}{key}"] = value.contiguous()
        return tensors, self.meta()

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "") -> QTensor:
        """Rebuild from ``to_dict`` output, validating every field against the metadata."""
        where = prefix.rstrip(".") or "tensor"
        try:
            fmt = format_from_dict(meta["format"])
            gran = granularity_from_dict(meta["granularity"])
            shape = torch.Size([int(d) for d in meta["shape"]])
            dtype = _DTYPES[meta["dtype"]]
            pattern = meta.get("sparsity")
            if pattern is not None and pattern not in sparse.PATTERNS:
                raise ValueError(f"sparsity {pattern!r}")
        except (KeyError, TypeError, ValueError, LowbitError) as exc:
            raise CheckpointError(f"{where}: quantization metadata is invalid ({exc}); re-save the checkpoint") from exc
        get = lambda key: tensors.get(f"{prefix}{key}")  # noqa: E731
        qt = cls(
            get("qdata"),
            fmt,
            gran,
            shape,
            dtype,
            get("scale"),
            get("zero_point"),
            get("codebook"),
            get("mask"),
            pattern,
        )
        validate(qt, where)
        return qt

    def state_json(self) -> str:
        return json.dumps(self.meta(), sort_keys=True)


def _expect(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {problem}; the checkpoint is corrupt or was edited, re-create it")


def validate(qt: QTensor, where: str = "tensor") -> None:
    """Check that a QTensor's tensors agree with its format, granularity and shape."""
    fmt, shape = qt.fmt, qt.shape
    _expect(qt.data is not None, where, "codes ('qdata') are missing")
    if isinstance(fmt, Float) and not fmt.scaled:
        _expect(
            qt.data.dtype == fmt.torch_dtype and qt.data.shape == shape,
            where,
            f"expected {fmt.dtype} data of shape {tuple(shape)}, got {qt.data.dtype} {tuple(qt.data.shape)}",
        )
        return
    n_codes = _codes_numel(fmt, shape)
    if qt.sparsity is not None:
        mask = qt.mask
        _expect(
            mask is not None
            and mask.dtype == torch.uint8
            and mask.dim() == 1
            and mask.numel() == sparse.meta_size(qt.sparsity, shape),
            where,
            f"the {qt.sparsity} sparsity mask is missing or has the wrong size",
        )
        try:
            n_codes = int(qt.keep_mask().sum())
        except LowbitError as exc:
            raise CheckpointError(f"{where}: sparsity mask is invalid ({exc})") from exc
    need = packing.packed_size(n_codes, fmt.bits)
    _expect(
        qt.data.dtype == torch.uint8 and qt.data.dim() == 1 and qt.data.numel() == need,
        where,
        f"packed codes must be {need} uint8 bytes, got {qt.data.dtype} {tuple(qt.data.shape)}",
    )
    if isinstance(fmt, Codebook):
        book = qt.codebook
        _expect(
            book is not None and book.dim() == 3 and tuple(book.shape[1:]) == (fmt.entries, fmt.dim),
            where,
            f"codebook must be [n, {fmt.entries}, {fmt.dim}]",
        )
        n_books = qt.granularity.num_groups(shape) if isinstance(qt.granularity, PerGroup) else 1
        _expect(
            book.shape[0] == max(1, n_books) and bool(torch.isfinite(book).all()),
            where,
            f"expected {n_books} finite codebooks",
        )
        _expect(qt.data.numel() == 0 or int(qt.codes().max()) < fmt.entries, where, "a code points past the codebook")
        return
    expected = tuple(qt.granularity.param_shape(shape))
    scale = qt.scale
    _expect(
        scale is not None and tuple(scale.shape) == expected and scale.is_floating_point(),
        where,
        f"scale must be a float tensor of shape {expected}",
    )
    positive = (scale >= 0) if isinstance(fmt, Binary) else (scale > 0)  # binary: 0 for all-zero groups
    _expect(bool(torch.isfinite(scale).all()) and bool(positive.all()), where, "scales must be finite and > 0")
    if isinstance(fmt, Int) and fmt.needs_zero_point:
        zero = qt.zero_point
        _expect(zero is not None and tuple(zero.shape) == expected, where, f"zero_point must have shape {expected}")
    if not isinstance(fmt, (Int, Float)) and qt.data.numel():
        _expect(int(qt.codes().max()) < fmt.levels().numel(), where, "a code points past the format's levels")
