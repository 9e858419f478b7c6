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
- :class:`Float32Weights` gives one float32 weight at a time (the reference's ``get``/``linear``),
  valid until its next call: mapped from the page cache one ahead by a helper thread (or read into a
  reused staging buffer), zip CRC-32 / CRC32C checked as :meth:`enc.io.fastcopy.RawTensor.materialize`
  checks it, made float32 in a reused buffer a block of rows at a time.
- :class:`ChecksumsAhead` verifies the source's checksums on a helper thread while torch imports.
- :class:`LayerArena` with ``mapped=True`` maps unchecked (safetensors) weights instead of copying.

A tensor whose bytes need rearranging (``raw.ops``) or that has no byte recipe is loaded the
ordinary way (``LazyTensor.load``).
"""

from __future__ import annotations

import threading
import warnings
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


# --------------------------------------------------------------------------- checksums ahead of use


def _key(r) -> tuple:
    return (r.path, r.offset, r.nbytes, r.check)


class ChecksumsAhead:
    """The checksums of a run's source tensors, verified on a helper thread ahead of their reads.

    Torch-free: started before torch is imported, it checks the source's bytes in the page cache (a
    mapped window at a time, as ``enc convert`` does before copying them) while the import runs on
    the other core. A read that finds its tensor verified skips the check; one that comes first
    checks the bytes it read itself. A failure is raised by the read of that tensor, as before.
    One object per run: nothing carries over to a later run (the file may have changed).
    """

    def __init__(self, tensors=()) -> None:
        self._lock = threading.Lock()
        self._done: dict[tuple, BaseException | None] = {}  # None: verified
        self._stop = False
        todo = [t for t in tensors if _plain(t) and t.raw.check is not None and t.nbytes]
        self._thread = threading.Thread(target=self._run, args=(todo,), name="enc-parity-checksums", daemon=True)
        if todo:
            self._thread.start()

    def _run(self, todo) -> None:
        from enc.io.fastcopy import verify

        for t in todo:
            with self._lock:
                if self._stop or _key(t.raw) in self._done:
                    continue
            try:
                verify(t.raw)
                err = None
            except Exception as e:  # handed to the read of this tensor
                err = e
            with self._lock:
                self._done.setdefault(_key(t.raw), err)

    def checked(self, t: LazyTensor) -> bool:
        """True when ``t``'s checksum has been verified already (raises what verifying it found, if bad)."""
        with self._lock:
            k = _key(t.raw)
            if k not in self._done:
                return False
            err = self._done[k]
        if err is not None:
            raise err
        return True

    def mark(self, t: LazyTensor) -> None:
        with self._lock:
            self._done.setdefault(_key(t.raw), None)

    def close(self) -> None:
        with self._lock:
            self._stop = True
        if self._thread.is_alive():
            self._thread.join()


def read_into(t: LazyTensor, out: np.ndarray, checks: ChecksumsAhead | None = None) -> torch.Tensor:
    """``t``'s bytes read into ``out`` (uint8, at least ``t.nbytes``), checked (unless ``checks`` has
    verified them already); a tensor viewing ``out``."""
    from enc.io.fastcopy import check_bytes

    r = t.raw
    done = r.check is not None and checks is not None and checks.checked(t)
    view = memoryview(out)[: r.nbytes]
    r.read_into(view)
    if r.check is not None and not done:
        check_bytes(r, view)
        if checks is not None:
            checks.mark(t)
    if r.nbytes == 0:
        return torch.empty(t.shape, dtype=as_torch(t.dtype))
    return torch.frombuffer(view, dtype=as_torch(t.dtype)).reshape(t.shape)


def map_tensor(t: LazyTensor, checks: ChecksumsAhead | None = None) -> torch.Tensor:
    """A tensor mapped from the file (page cache) instead of copied, its checksum (if any) verified on
    the mapped bytes unless ``checks`` has verified it in this run already.

    A read-only, pre-faulted mapping of just its bytes; unmapped when the last view of it is dropped.
    Only for tensors that are read, never written (a write would fault).
    """
    import mmap
    import os

    r = t.raw
    if r.nbytes == 0:
        return read_into(t, _bytes(0), checks)
    base = r.offset - r.offset % mmap.ALLOCATIONGRANULARITY
    with open(r.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if r.offset + r.nbytes > size:
            raise CorruptCheckpoint(r.path, f"truncated: {r.label} needs bytes [{r.offset}, {r.offset + r.nbytes}), "
                                            f"file ends at {size}")
        # read-only: a writable private mapping would be pre-faulted by copying every page
        m = mmap.mmap(f.fileno(), r.offset + r.nbytes - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                      prot=mmap.PROT_READ, offset=base)
    if r.check is not None and not (checks is not None and checks.checked(t)):
        from enc.io.fastcopy import _checksum

        kind, want = r.check
        with memoryview(m) as view:
            have = _checksum(kind, view[r.offset - base:])
        if have != want:
            what = "CRC32C" if kind == "crc32c" else "CRC"
            raise CorruptCheckpoint(r.path, f"{what} mismatch for {r.label} (stored {want:#010x}, computed {have:#010x})")
        if checks is not None:
            checks.mark(t)
    dt = as_torch(t.dtype)
    with warnings.catch_warnings():  # "not writable": nothing writes to these weights
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(m, dtype=dt, count=r.nbytes // dt.itemsize, offset=r.offset - base).reshape(t.shape)


def _bytes(n: int) -> np.ndarray:
    return np.empty(max(n, 1), dtype=np.uint8)


class LayerArena:
    """One buffer handed out in consecutive slices; :meth:`reset` reuses it from the start."""

    def __init__(self, mapped: bool = False) -> None:
        self._buf = _bytes(0)
        self._used = 0
        self.mapped = mapped  # unchecked tensors (safetensors) are mapped from the page cache, not copied


    def reset(self, need: int = 0) -> None:
        """Start over at the beginning; ``need``: the bytes the next layer will take (one allocation, not several)."""
        self._used = 0
        if need > self._buf.size:
            self._buf = _bytes(0)  # the old buffer goes first (peak memory: one layer, not two)
            self._buf = _bytes(need)

    def need(self, tensors) -> int:
        """Bytes :meth:`load` takes for ``tensors`` (LazyTensors) in that order."""
        if self.mapped:
            tensors = [t for t in tensors if t.raw is None or t.raw.check is not None or not t.nbytes]
        return sum(t.nbytes + 64 for t in tensors if _plain(t))  # + alignment, in any order

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
        if self.mapped and t.raw.check is None and t.nbytes:
            return map_tensor(t)
        return read_into(t, self._take(t.nbytes))

    def wrap(self, t: LazyTensor) -> LazyTensor:
        """``t`` loading into this arena (valid until the next :meth:`reset`)."""
        if not _plain(t):
            return t
        return LazyTensor(t.shape, t.dtype, lambda: self.load(t), t.sources, t.recipe, t.raw)


F32_BLOCK = 16 * 2**20  # elements of a weight made float32 at a time by Float32Weights.linear (64 MB)


class Float32Weights:
    """``get(t)``: ``t`` as float32 in a reused buffer, valid until the next call.

    ``schedule``: the tensors in the order ``get`` will ask for them (dense models); a helper thread
    maps the next one from the page cache (pre-faulted, checksum verified on the mapped bytes) while
    the caller computes with this one. A ``get`` off the schedule ends the read-ahead (the rest is
    read into a reused staging buffer when asked for).
    """

    def __init__(self, schedule: list[LazyTensor] | None = None, checks: ChecksumsAhead | None = None) -> None:
        self._checks = checks
        self._stage = _bytes(0)
        self._f32 = torch.empty(0, dtype=torch.float32)
        self._ahead: _ReadAhead | None = None
        plain = [t for t in schedule or () if _plain(t)]
        if len(plain) > 1:
            self._ahead = _ReadAhead(plain, checks)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def raw(self, t: LazyTensor) -> torch.Tensor:
        """``t`` in its own dtype (in a staging buffer when it can be read there), valid until the next call."""
        if self._ahead is not None:
            got = self._ahead.take(t)
            if got is not None:
                return got
            self.close()  # off the schedule
        if not _plain(t):
            return t.load()
        if self._stage.size < t.nbytes:
            self._stage = _bytes(0)
            self._stage = _bytes(t.nbytes)
        return read_into(t, self._stage, self._checks)

    def get(self, t: LazyTensor) -> torch.Tensor:
        w = self.raw(t)
        if w.dtype == torch.float32:
            return w
        out = self.to_float32(w)
        if self._ahead is not None:
            self._ahead.release()  # its staging buffer can take the next tensor now
        return out

    def linear(self, h: torch.Tensor, t: LazyTensor) -> torch.Tensor:
        """``h @ t.T`` in float32 with ``t`` made float32 a block of rows at a time (one buffer of
        :data:`F32_BLOCK` elements, not a float32 copy of the whole weight)."""
        w = self.raw(t)
        if w.dtype == torch.float32 or w.dim() != 2:
            out = h @ (w if w.dtype == torch.float32 else self.to_float32(w)).t()
        else:
            rows = max(1, F32_BLOCK // max(1, w.shape[1]))
            if rows >= w.shape[0]:
                out = h @ self.to_float32(w).t()
            else:
                out = h.new_empty(*h.shape[:-1], w.shape[0])
                for r in range(0, w.shape[0], rows):
                    out[..., r:r + rows] = h @ self.to_float32(w[r:r + rows]).t()
        if self._ahead is not None:
            self._ahead.release()
        return out

    def rows(self, t: LazyTensor, rows: int):
        """``t`` in its own dtype, ``rows`` rows at a time as ``(first row, tensor)``, through one small buffer.

        The checksum covers the whole tensor: it is verified after the last chunk (CorruptCheckpoint
        then), so use nothing computed from the chunks before the iteration has ended.
        """
        if not _plain(t) or len(t.shape) < 2:
            w = t.load()
            for r in range(0, w.shape[0], rows):
                yield r, w[r:r + rows]
            return
        from enc.io.fastcopy import _checksum

        r0 = t.raw
        row_bytes = prod(t.shape[1:]) * r0.itemsize
        step = max(1, rows) * row_bytes
        if self._stage.size < min(step, r0.nbytes):
            self._stage = _bytes(0)
            self._stage = _bytes(min(step, r0.nbytes))
        crc = 0
        check = r0.check is not None and not (self._checks is not None and self._checks.checked(t))
        with open(r0.path, "rb", buffering=0) as f:
            for r in range(0, t.shape[0], rows):
                n = min(rows, t.shape[0] - r)
                view = memoryview(self._stage)[: n * row_bytes]
                got = 0
                f.seek(r0.offset + r * row_bytes)
                while got < len(view):
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
                if got != len(view):
                    raise CorruptCheckpoint(r0.path, f"truncated: {r0.label} needs bytes [{r0.offset}, "
                                                     f"{r0.offset + r0.nbytes}), file ends at "
                                                     f"{r0.offset + r * row_bytes + got}")
                if check:
                    crc = _checksum(r0.check[0], view, crc)
                yield r, torch.frombuffer(view, dtype=as_torch(t.dtype)).reshape(n, *t.shape[1:])
        if check and crc != r0.check[1]:
            what = "CRC32C" if r0.check[0] == "crc32c" else "CRC"
            raise CorruptCheckpoint(r0.path, f"{what} mismatch for {r0.label} (stored {r0.check[1]:#010x}, "
                                             f"computed {crc:#010x})")

    def to_float32(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (any float dtype) converted into the reused float32 buffer, valid until the next call."""
        n = prod(w.shape)
        if self._f32.numel() < n:
            self._f32 = torch.empty(0, dtype=torch.float32)
            self._f32 = torch.empty(n, dtype=torch.float32)
        out = self._f32[:n].view(w.shape)
        out.copy_(w)
        return out


class _ReadAhead:
    """A helper thread mapping (and checking) ``schedule`` in order, at most two tensors ahead."""

    def __init__(self, schedule: list[LazyTensor], checks: ChecksumsAhead | None = None) -> None:
        import queue

        self._checks = checks
        self._schedule = schedule
        self._next = 0
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):  # tensors mapped ahead at most (mapped pages count as memory in use)
            self._free.put(object())
        self._held: np.ndarray | None = None
        self._thread = threading.Thread(target=self._run, name="enc-parity-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for t in self._schedule:
            buf = self._free.get()
            if buf is None:
                return
            try:
                self._ready.put((buf, map_tensor(t, self._checks), None))
            except BaseException as e:  # handed to the caller when it asks for this tensor
                self._ready.put((buf, None, e))
                return

    def take(self, t: LazyTensor) -> torch.Tensor | None:
        """The next scheduled tensor if it is ``t`` (raising what reading it raised), else None."""
        if self._next >= len(self._schedule) or self._schedule[self._next] is not t:
            return None
        self._next += 1
        self.release()
        buf, w, err = self._ready.get()
        self._held = buf
        if err is not None:
            raise err
        return w

    def release(self) -> None:
        """The tensor last taken is no longer used: the next one can be mapped."""
        if self._held is not None:
            self._free.put(self._held)
            self._held = None

    def close(self) -> None:
        self._free.put(None)
        self._free.put(None)
        self._thread.join()
