"""Weights for a parity run, read into reused buffers instead of fresh memory.

A parity run reads every weight twice (the source for the reference, the output for enc's runtime)
and turns the reference's 16-bit weights into float32. Read into newly allocated memory, each of
those gigabytes is first page-faulted and zeroed by the kernel, which costs more CPU than the copy
itself. Here the bytes go into buffers that live for the whole run and are reused weight after
weight (reference) or layer after layer (converted side): the same bytes, the same checks, far
fewer page faults.

- :class:`LayerArena` hands out consecutive slices of one buffer for the weights of one layer
  (:meth:`LayerArena.wrap` makes a LazyTensor load into it); :meth:`LayerArena.reset` starts the
  next layer over the same memory, so no tensor of the previous layer may be used after it.
- :class:`Float32Weights` gives one float32 weight at a time (the reference's ``get``), valid until
  its next call: read into a reused staging buffer (zip CRC-32 / CRC32C checked as
  :meth:`enc.io.fastcopy.RawTensor.materialize` checks it), converted into a reused float32 buffer.

A tensor whose bytes need rearranging (``raw.ops``) or that has no byte recipe is loaded the
ordinary way (``LazyTensor.load``).
"""

from __future__ import annotations

from math import prod

import numpy as np
import torch

from enc.errors import CorruptCheckpoint
from enc.io.dtypes import as_torch
from enc.io.lazy import LazyTensor


def _plain(t: LazyTensor) -> bool:
    """The tensor is exactly its raw bytes (no rearrangement), in a dtype torch reads directly."""
    r = t.raw
    return r is not None and not r.ops and tuple(r.shape) == tuple(t.shape) and r.itemsize == t.dtype.itemsize


def read_into(t: LazyTensor, out: np.ndarray) -> torch.Tensor:
    """``t``'s bytes read into ``out`` (uint8, at least ``t.nbytes``), checked; a tensor viewing ``out``."""
    from enc.io.fastcopy import _checksum

    r = t.raw
    view = memoryview(out)[: r.nbytes]
    got = 0
    with open(r.path, "rb", buffering=0) as f:
        f.seek(r.offset)
        while got < r.nbytes:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    if got != r.nbytes:
        raise CorruptCheckpoint(r.path, f"truncated: {r.label} needs bytes [{r.offset}, {r.offset + r.nbytes}), "
                                        f"file ends at {r.offset + got}")
    if r.check is not None:
        kind, want = r.check
        have = _checksum(kind, view)
        if have != want:
            what = "CRC32C" if kind == "crc32c" else "CRC"
            raise CorruptCheckpoint(r.path, f"{what} mismatch for {r.label} (stored {want:#010x}, computed {have:#010x})")
    if r.nbytes == 0:
        return torch.empty(t.shape, dtype=as_torch(t.dtype))
    return torch.frombuffer(view, dtype=as_torch(t.dtype)).reshape(t.shape)


def _bytes(n: int) -> np.ndarray:
    return np.empty(max(n, 1), dtype=np.uint8)


class LayerArena:
    """One buffer handed out in consecutive slices; :meth:`reset` reuses it from the start."""

    def __init__(self) -> None:
        self._buf = _bytes(0)
        self._used = 0

    def reset(self, need: int = 0) -> None:
        """Start over at the beginning; ``need``: the bytes the next layer will take (one allocation, not several)."""
        self._used = 0
        if need > self._buf.size:
            self._buf = _bytes(0)  # the old buffer goes first (peak memory: one layer, not two)
            self._buf = _bytes(need)

    def need(self, tensors) -> int:
        """Bytes :meth:`load` takes for ``tensors`` (LazyTensors) in that order."""
        used = 0
        for t in tensors:
            if _plain(t):
                used = -(-used // 64) * 64 + t.nbytes
        return used

    def _take(self, nbytes: int) -> np.ndarray:
        start = -(-self._used // 64) * 64  # 64-byte aligned slices
        if start + nbytes > self._buf.size:
            # a bigger buffer; slices handed out before keep the old one alive until they are dropped
            self._buf = _bytes(max(start + nbytes, 2 * self._buf.size))
        self._used = start + nbytes
        return self._buf[start:start + nbytes]

    def load(self, t: LazyTensor) -> torch.Tensor:
        if not _plain(t):
            return t.load()
        return read_into(t, self._take(t.nbytes))

    def wrap(self, t: LazyTensor) -> LazyTensor:
        """``t`` loading into this arena (valid until the next :meth:`reset`)."""
        if not _plain(t):
            return t
        return LazyTensor(t.shape, t.dtype, lambda: self.load(t), t.sources, t.recipe, t.raw)


class Float32Weights:
    """``get(t)``: ``t`` as float32 in a reused buffer, valid until the next call."""

    def __init__(self) -> None:
        self._stage = _bytes(0)
        self._f32 = torch.empty(0, dtype=torch.float32)

    def raw(self, t: LazyTensor) -> torch.Tensor:
        """``t`` in its own dtype (in the staging buffer when it can be read there), valid until the next call."""
        if not _plain(t):
            return t.load()
        if self._stage.size < t.nbytes:
            self._stage = _bytes(t.nbytes)
        return read_into(t, self._stage)

    def get(self, t: LazyTensor) -> torch.Tensor:
        w = self.raw(t)
        if w.dtype == torch.float32:
            return w
        return self.to_float32(w)

    def to_float32(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (any float dtype) converted into the reused float32 buffer, valid until the next call."""
        n = prod(w.shape)
        if self._f32.numel() < n:
            self._f32 = torch.empty(n, dtype=torch.float32)
        out = self._f32[:n].view(w.shape)
        out.copy_(w)
        return out
