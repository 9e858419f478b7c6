"""Tensors a conversion makes rather than reads (zeros, an identity matrix), with a torch-free byte recipe.

Some HF layouts hold a tensor the original has no variable for: ALBERT's ``embedding_hidden_mapping_in``
when the embedding size equals the hidden size (TF applies no projection: the identity and zero bias
are written), MobileBERT's unused ``embedding_transformation``, BertGeneration's LM bias (zeros). The
torch path makes them with ``torch.eye`` / ``torch.zeros``; the byte path writes the same bytes from
numpy: every element zero, or for the identity the bit pattern of the dtype's 1 on the diagonal
(``+0.0`` is all zero bits in every float format, and ``1`` has one fixed pattern per dtype, so the
files are identical: tests compare them with the torch path's).

:class:`GeneratedTensor` is a :class:`~enc.io.fastcopy.RawTensor` with no source range: the writer's
"rearranged" path asks for :meth:`materialize` (``byte_range``/``source_bytes`` are None), which builds
the array. Nothing here imports torch (the lazy tensors' loaders do, on the torch path only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import numpy as np

from enc.io.dtypes import as_torch, dtype_name
from enc.io.fastcopy import _UINT, RawOp, RawTensor
from enc.io.lazy import LazyTensor

# the bit pattern of 1 in each dtype (read as an unsigned integer of its size)
ONE_BITS = {"float64": 0x3FF0000000000000, "float32": 0x3F800000, "float16": 0x3C00, "bfloat16": 0x3F80,
            "int64": 1, "int32": 1, "int16": 1, "int8": 1, "uint8": 1, "bool": 1}
KINDS = ("zeros", "identity")


@dataclass(frozen=True)
class GeneratedTensor(RawTensor):
    """``kind`` ("zeros" or "identity") of ``shape``, elements of ``itemsize`` bytes; ``one`` is the bit
    pattern of the dtype's 1 (identity only)."""

    kind: str = "zeros"
    one: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in KINDS or (self.kind == "identity" and (len(self.shape) != 2 or self.shape[0] != self.shape[1])):
            raise ValueError(f"inconsistent generated tensor {self.label}: {self.kind} of shape {self.shape}")

    def then(self, op: RawOp) -> GeneratedTensor:
        return dataclasses.replace(self, ops=(*self.ops, op))

    def byte_range(self) -> None:
        return None  # no source bytes: never a kernel copy

    def source_bytes(self) -> None:
        return None

    def read_into(self, view: memoryview) -> None:
        view[:] = self._array().reshape(-1).view(np.uint8)

    def materialize(self, last_view: bool = False) -> np.ndarray:
        return self.arrange(self._array().reshape(-1).view(np.uint8), last_view)

    def _array(self) -> np.ndarray:
        a = np.zeros(self.shape, dtype=_UINT[self.itemsize])
        if self.kind == "identity":
            np.fill_diagonal(a, self.one)
        return a


def generated_raw(kind: str, shape: Sequence[int], dtype, label: str = "") -> GeneratedTensor | None:
    """The byte recipe of ``kind`` for a DType or torch dtype; None where it has none (torch makes it)."""
    name = dtype_name(dtype)
    if name not in ONE_BITS or kind not in KINDS:
        return None
    shape = tuple(int(s) for s in shape)
    itemsize = int(dtype.itemsize)
    try:
        return GeneratedTensor("", 0, prod(shape) * itemsize, shape, itemsize, None, label or kind,
                               kind=kind, one=ONE_BITS[name])
    except (ValueError, KeyError):
        return None


def zeros(shape: Sequence[int], dtype, recipe: str) -> LazyTensor:
    """A lazy tensor of zeros: ``torch.zeros`` on the torch path, numpy's bytes on the byte path."""
    shape = tuple(int(s) for s in shape)

    def load():
        import torch

        return torch.zeros(shape, dtype=as_torch(dtype))

    return LazyTensor(shape, dtype, load, (), recipe, generated_raw("zeros", shape, dtype, recipe))


def identity(n: int, dtype, recipe: str) -> LazyTensor:
    """A lazy ``n x n`` identity matrix: ``torch.eye`` on the torch path, numpy's bytes on the byte path."""
    n = int(n)

    def load():
        import torch

        return torch.eye(n, dtype=as_torch(dtype))

    return LazyTensor((n, n), dtype, load, (), recipe, generated_raw("identity", (n, n), dtype, recipe))
