"""Lazy tensors: (shape, dtype, load()) with nothing materialised until asked.

A source reader exposes its tensors as :class:`LazyTensor`; a converter derives HF tensors
from them with :meth:`LazyTensor.apply` (transpose, permute, split...) or :func:`combine`
(merge tensor-parallel shards, stack experts). The writer knows every shape and dtype
before any byte is read, so it can write the safetensors header first and then stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

import torch

from enc.io.dtypes import as_torch

if TYPE_CHECKING:
    from enc.io.fastcopy import RawOp, RawTensor

MAX_ELEMENTS = 2**62  # torch computes strides in int64: a shape whose non-zero dims multiply past this cannot exist


def impossible_shape(shape) -> bool:
    """True for a shape no tensor can have, even an empty one (``(0, 3e9, 3e9)`` overflows torch's strides)."""
    return prod(d for d in shape if d) > MAX_ELEMENTS


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype  # or an enc.io.dtypes.DType (equal to the torch dtype of its name)
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    sources: tuple[str, ...] = ()
    recipe: str = ""
    # where the exact bytes are (and how to rearrange them) when the source reader knows: the writer
    # then moves bytes without making a tensor (enc.io.fastcopy); None = load() is the only way
    raw: RawTensor | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        t = self.loader()
        if tuple(t.shape) != tuple(self.shape):
            raise ValueError(f"lazy tensor {self.sources} produced shape {tuple(t.shape)}, declared {self.shape}")
        if t.dtype != self.dtype:
            t = t.to(as_torch(self.dtype))
        return t

    def apply(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        shape: Sequence[int] | None = None,
        name: str = "",
        dtype: torch.dtype | None = None,
        raw_op: Callable[[tuple[int, ...]], RawOp | None] | None = None,
    ) -> LazyTensor:
        """A new lazy tensor computing ``fn(self.load())``; ``shape`` defaults to unchanged.

        ``raw_op(input shape)`` gives the same rearrangement on raw bytes (a ``fastcopy.RawOp``, or None
        when it has none for that shape); with it the byte recipe, if any, carries over.
        """
        parent = self
        raw = None
        if self.raw is not None and raw_op is not None and (dtype is None or dtype == self.dtype):
            op = raw_op(self.shape)
            raw = self.raw.then(op) if op is not None else None
        return LazyTensor(
            shape=tuple(shape) if shape is not None else self.shape,
            dtype=dtype or self.dtype,
            loader=lambda: fn(parent.load()),
            sources=self.sources,
            recipe=f"{self.recipe}|{name}" if self.recipe else name,
            raw=raw,
        )

    def to(self, dtype: torch.dtype) -> LazyTensor:
        if dtype == self.dtype or not self.dtype.is_floating_point:
            return self
        parent = self
        return LazyTensor(self.shape, dtype, lambda: parent.load().to(as_torch(dtype)), self.sources, self.recipe)


def combine(
    parts: Sequence[LazyTensor],
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    shape: Sequence[int],
    name: str = "",
    dtype: torch.dtype | None = None,
) -> LazyTensor:
    """A lazy tensor built from several (e.g. tensor-parallel shards concatenated)."""
    parts = list(parts)
    sources: tuple[str, ...] = tuple(s for p in parts for s in p.sources)
    return LazyTensor(
        shape=tuple(shape),
        dtype=dtype or parts[0].dtype,
        loader=lambda: fn([p.load() for p in parts]),
        sources=sources,
        recipe=name,
    )


def from_tensor(t: torch.Tensor, source: str = "") -> LazyTensor:
    """Wrap an in-memory tensor (tests, tiny derived tensors)."""
    return LazyTensor(tuple(t.shape), t.dtype, lambda: t, (source,) if source else ())
