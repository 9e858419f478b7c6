"""Moving tensor bytes without making tensors: the byte path of the safetensors writer.

Most tensors of a conversion are the same bytes at another offset (Mistral: everything but wq/wk;
Megatron BERT: everything, q/k/v being row ranges of the fused tensor). A source reader that knows
where a tensor's exact bytes lie attaches a :class:`RawTensor` to its lazy tensor: the file, the
byte offset, the element size and an optional checksum. Transforms that only rearrange elements
(transpose, row slices, the rotary row permutation, Megatron's q/k/v row order) add a
:class:`RawOp`, a numpy rearrangement applied to the bytes viewed as unsigned integers of the
element size (bf16 is uint16: no arithmetic, so every bit pattern, NaN payloads included, is kept).

The writer then moves the bytes one of two ways:

- **kernel copy**: only row slices: ``os.copy_file_range`` from the source file into the output
  (falling back to ``os.sendfile``, then to 8 MiB buffered copies). The bytes never enter this
  process. A checksum (the CRC32C of a TensorFlow bundle entry, the zip CRC-32 of a torch storage) is
  verified meanwhile on a helper thread, over a read-only mapping of the source range (no copy), and
  the file is not finished (:meth:`RawWriter.finish`), so nothing is published, until all agree.
- **map, check, rearrange, write**: the source range is mapped read-only (no read pass into fresh
  memory; ``ENC_FASTCOPY_MMAP=0`` reads it into one buffer instead) and its checksum verified on the
  mapping, the ops are applied as numpy views, and the result is written in C order a bounded block
  of rows at a time. A transposed matrix's 16 MiB blocks are made in cache-line column strips by two
  helper threads, and each helper writes the block it made at its own offset (``pwrite``) while the
  block is still in its core's cache; one transposes while the other's write holds the file. While
  one tensor is written, the next one (if small) is mapped and checked on a helper thread; a big one's
  checksum is verified there while it is written (the file is not finished until it agrees). Numpy copies and writes release the GIL, so
  these overlap.

The result is byte-identical to loading the tensor with torch and writing it (tests compare the
files); ``ENC_FASTCOPY=0`` in the environment turns the byte path off.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from enc.errors import CorruptCheckpoint
from enc.io.crc import crc32

CHUNK_BYTES = 16 * 2**20  # rows per block of a rearranged tensor
# A transposed matrix is made a block of CHUNK_BYTES of output rows at a time, each block in column
# strips TILE_COLS wide: a strip reads TILE_COLS source rows sequentially and fills one cache line of
# each output row (fp32: ~3.4 GB/s a core here, against 0.5 GB/s for numpy's whole-block copy).
TILE_COLS = 16
TRANSPOSE_THREADS = min(2, os.cpu_count() or 1)  # blocks made in parallel (numpy copies release the GIL)
COPY_BYTES = 1 << 30  # largest single copy_file_range / sendfile request
PREFETCH_MAX = 64 * 2**20  # the next tensor is prepared ahead only if its source is at most this big

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def enabled() -> bool:
    """The byte path is on unless ``ENC_FASTCOPY=0`` (and only on little-endian hosts: sources are LE)."""
    return sys.byteorder == "little" and \
        os.environ.get("ENC_FASTCOPY", "1").strip().lower() not in ("0", "false", "no", "off")


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class RawOp:
    """An element rearrangement: ``fn`` maps an array of the input shape to one of the output shape.

    ``rows`` marks a row slice ``[start, stop)`` of the first dimension: on C-contiguous bytes that is
    a byte sub-range, which the kernel copy can take without reading anything.
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    rows: tuple[int, int] | None = None
    same_bytes: bool = False  # the op leaves the bytes as they are (copy)
    # the writer's form of ``fn`` as the last op: the same elements in the same C order, as a view with
    # more dimensions where ``fn`` would have to copy (the writer makes blocks of it without a full copy)
    view: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)


def keep() -> RawOp:
    return RawOp("copy", lambda a: a, same_bytes=True)


def row_slice(start: int, stop: int) -> RawOp:
    return RawOp(f"rows[{start}:{stop}]", lambda a: a[start:stop], (start, stop))


def transpose2d() -> RawOp:
    return RawOp("transpose", lambda a: a.T)


def permute_rope(n_heads: int) -> RawOp:
    """Rows of each head from (pairs, 2) order to (2, pairs) order (see converters.base.permute_rope)."""

    def view(a: np.ndarray) -> np.ndarray:  # (heads, 2, pairs, columns): C order is the permuted rows
        d1, d2 = a.shape
        return a.reshape(n_heads, d1 // n_heads // 2, 2, d2).transpose(0, 2, 1, 3)

    def fn(a: np.ndarray) -> np.ndarray:
        return view(a).reshape(a.shape)  # a copy: the rows move

    return RawOp(f"permute_rope({n_heads})", fn, view=view)


@dataclass(frozen=True)
class RawTensor:
    """Where a tensor's exact bytes are, and the rearrangements that make the output tensor.

    ``offset``/``nbytes`` locate the source bytes (C order, little-endian, ``shape`` of elements of
    ``itemsize`` bytes) in ``path``. ``check`` (if any) is verified on exactly those bytes before use:
    ``("crc32c", value)`` (TensorFlow bundles) or ``("crc32", value)`` (zip members).
    """

    path: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    itemsize: int
    check: tuple[str, int] | None = None
    label: str = ""
    ops: tuple[RawOp, ...] = ()

    def __post_init__(self) -> None:
        if self.offset < 0 or self.nbytes != prod(self.shape) * self.itemsize or self.itemsize not in _UINT:
            raise ValueError(f"inconsistent raw tensor {self.label}: {self.nbytes} bytes at {self.offset}, "
                             f"shape {self.shape} x {self.itemsize}")

    def then(self, op: RawOp) -> RawTensor:
        return RawTensor(self.path, self.offset, self.nbytes, self.shape, self.itemsize, self.check, self.label,
                         (*self.ops, op))

    def byte_range(self) -> tuple[int, int] | None:
        """(offset, nbytes) of the output in the source file, when the ops are only row slices."""
        off, shape = self.offset, self.shape
        for op in self.ops:
            if op.same_bytes:
                continue
            if op.rows is None or not shape:
                return None
            start, stop = op.rows
            if not 0 <= start <= stop <= shape[0]:
                return None
            row = prod(shape[1:]) * self.itemsize
            off += start * row
            shape = (stop - start, *shape[1:])
        return off, prod(shape) * self.itemsize

    def mapped(self, check: bool = True, last_view: bool = False) -> np.ndarray:
        """As :meth:`materialize`, but over a read-only mapping of the source range instead of a copy
        (no read pass, no fresh pages to fault in); the checksum is verified on the mapping unless
        ``check`` is false (the caller then verifies :meth:`source_bytes` itself before finishing).
        The mapping lives as long as the returned array."""
        buf = self.source_bytes()
        if buf is None:
            return self.materialize(last_view)
        if check:
            check_bytes(self, buf)
        return self.arrange(buf, last_view)

    def source_bytes(self, populate: bool = False) -> np.ndarray | None:
        """The source range as a read-only uint8 array over a mapping of it (checked against the file's
        size, not against the checksum); None where mapping is off or impossible (read it instead).
        ``populate``: the mapping is made resident in one go (the caller reads all of it at once)."""
        if self.nbytes == 0 or not enabled_mapping():
            return None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if self.offset + self.nbytes > size:
                raise CorruptCheckpoint(self.path, f"truncated: {self.label} needs bytes [{self.offset}, "
                                                   f"{self.offset + self.nbytes}), file ends at {size}")
            base = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
            try:
                m = mmap.mmap(f.fileno(), self.offset + self.nbytes - base, offset=base, prot=mmap.PROT_READ,
                              flags=mmap.MAP_SHARED | (_POPULATE if populate else 0))
            except (OSError, ValueError):  # a file that cannot be mapped
                return None
        return np.frombuffer(m, dtype=np.uint8, count=self.nbytes, offset=self.offset - base)  # keeps m alive

    def arrange(self, buf: np.ndarray, last_view: bool = False) -> np.ndarray:
        """The output (maybe a non-contiguous view) from the source bytes ``buf``. ``last_view``: the last
        op's :attr:`RawOp.view` if it has one (the writer's form: the output's elements in C order, maybe
        with more dimensions, see :meth:`written_shape_ok`)."""
        a = buf.view(_UINT[self.itemsize]).reshape(self.shape)
        for k, op in enumerate(self.ops):
            a = op.view(a) if last_view and k == len(self.ops) - 1 and op.view is not None else op.fn(a)
        return a

    def written_shape_ok(self, a: np.ndarray, planned: Sequence[int]) -> bool:
        """``a`` (from ``arrange(..., last_view=True)``) holds the planned tensor's elements in C order."""
        if tuple(a.shape) == tuple(planned):
            return True
        return bool(self.ops) and self.ops[-1].view is not None and a.size == prod(planned) and \
            a.shape[-1] == planned[-1]

    def materialize(self, last_view: bool = False) -> np.ndarray:
        """Read (and check) the source bytes; return the output as an array (maybe a non-contiguous view)."""
        buf = np.empty(self.nbytes, dtype=np.uint8)  # no zero-filling pass
        self.read_into(memoryview(buf))
        check_bytes(self, buf)
        return self.arrange(buf, last_view)

    def read_into(self, view: memoryview) -> None:
        """Read exactly the source bytes into ``view`` (``nbytes`` long; not checked against the checksum)."""
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while got < self.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != self.nbytes:
            raise CorruptCheckpoint(self.path, f"truncated: {self.label} needs bytes [{self.offset}, "
                                               f"{self.offset + self.nbytes}), file ends at {self.offset + got}")


def check_bytes(r: RawTensor, buf: np.ndarray) -> None:
    """Check ``r``'s source bytes, already in ``buf`` (read or mapped), against its checksum."""
    if r.check is None:
        return
    kind, want = r.check
    have = _checksum(kind, buf)
    if have != want:
        what = "CRC32C" if kind == "crc32c" else "CRC"
        raise CorruptCheckpoint(r.path, f"{what} mismatch for {r.label} (stored {want:#010x}, computed {have:#010x})")


def verify(r: RawTensor) -> None:
    """Check ``r``'s source bytes against its checksum without copying them out of the page cache
    (a read-only mapping of just that range, unmapped after)."""
    if r.check is None or r.nbytes == 0:
        return
    kind, want = r.check
    with open(r.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if r.offset + r.nbytes > size:
            raise CorruptCheckpoint(r.path, f"truncated: {r.label} needs bytes [{r.offset}, {r.offset + r.nbytes}), "
                                            f"file ends at {size}")
        have = 0
        for view in _mapped(f.fileno(), r.offset, r.offset + r.nbytes):
            have = _checksum(kind, view, have)
    if have != want:
        what = "CRC32C" if kind == "crc32c" else "CRC"
        raise CorruptCheckpoint(r.path, f"{what} mismatch for {r.label} (stored {want:#010x}, computed {have:#010x})")


MAP_WINDOW = 64 * 2**20  # bytes mapped at a time to checksum or hash (bounds what becomes resident)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux


def _mapped(fd: int, start: int, end: int):
    """Read-only views of bytes [start, end) of ``fd``, one mapped window at a time (each unmapped after)."""
    pos = start
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        stop = min(end, base + MAP_WINDOW)
        # MAP_POPULATE: the kernel maps the (cached) window in one go instead of one page fault per
        # 64 KiB: about 30% less CPU per byte hashed or checksummed
        with mmap.mmap(fd, stop - base, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=base) as m:
            view = memoryview(m)[pos - base:]
            try:
                yield view
            finally:
                view.release()
        pos = stop


def enabled_mapping() -> bool:
    """Rearranged tensors are read through a mapping unless ``ENC_FASTCOPY_MMAP=0``."""
    return os.environ.get("ENC_FASTCOPY_MMAP", "1").strip().lower() not in ("0", "false", "no", "off")


def _checksum(kind: str, buf, crc: int = 0) -> int:
    if kind == "crc32":
        return crc32(buf, crc)
    if kind == "crc32c":
        from enc.io.tf_checkpoint import crc32c  # the project's one CRC32C (C backend when installed)

        return crc32c(memoryview(buf), crc)
    raise ValueError(f"unknown checksum {kind!r}")


# --------------------------------------------------------------------------- moving bytes


def _copy_kernel(src_fd: int, offset: int, nbytes: int, dst_fd: int, label: str = "") -> None:
    """Append ``nbytes`` of ``src_fd`` from ``offset`` at ``dst_fd``'s position, in the kernel if it can."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, min(COPY_BYTES, nbytes - done), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # EXDEV on old kernels, EINVAL on some filesystems: fall through with what is left
    if done < nbytes and hasattr(os, "sendfile"):
        try:
            while done < nbytes:
                n = os.sendfile(dst_fd, src_fd, offset + done, min(COPY_BYTES, nbytes - done))
                if n == 0:
                    break
                done += n
        except OSError:
            pass
    if done < nbytes:
        buf = bytearray(8 * 2**20)
        view = memoryview(buf)
        while done < nbytes:
            want = min(len(buf), nbytes - done)
            n = os.preadv(src_fd, [view[:want]], offset + done) if hasattr(os, "preadv") else \
                _pread_into(src_fd, view[:want], offset + done)
            if n == 0:
                break
            _write_all(dst_fd, view[:n])
            done += n
    if done != nbytes:
        raise CorruptCheckpoint(None, f"truncated: {label} source ended after {done} of {nbytes} bytes "
                                      f"at offset {offset}")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def _fill_block(buf: np.ndarray, a: np.ndarray, start: int, rows: int) -> np.ndarray:
    """Rows [start, start + rows) of the view ``a`` (rows: its first axis) made contiguous in ``buf`` (a 2-D
    view: in column strips)."""
    out = buf[:rows]
    src = a[start:start + rows]
    if a.ndim != 2 or abs(a.strides[1]) <= a.itemsize:  # rows already run along memory: one copy
        out[...] = src
        return out
    for j in range(0, a.shape[1], TILE_COLS):
        out[:, j:j + TILE_COLS] = src[:, j:j + TILE_COLS]
    return out


def _blocks_by_workers(fd: int, a: np.ndarray, pool: ThreadPoolExecutor, starts: range, step: int,
                       bufs: list[np.ndarray]) -> None:
    """Each block is made and written (``pwrite`` at its own offset) by the same helper thread, from a
    buffer that is still in that core's cache; the helpers transpose while another one's write holds the
    file. Blocks take the ``bufs`` in turn (one per block in flight), so memory stays ``len(bufs)`` blocks."""
    rows = a.shape[0]
    row_bytes = prod(a.shape[1:]) * a.itemsize
    start = os.lseek(fd, 0, os.SEEK_CUR)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for b in bufs:
        free.put(b)

    def job(i: int) -> None:
        buf = free.get()
        try:
            block = _fill_block(buf, a, i, min(step, rows - i)).reshape(-1).view(np.uint8)
            view, pos = memoryview(block), start + i * row_bytes
            while len(view):
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            free.put(buf)

    futs = [pool.submit(job, i) for i in starts]
    try:
        for fut in futs:
            fut.result()
    finally:
        for fut in futs:  # an error: let no helper write after this returns
            if not fut.cancel():
                fut.exception()
    os.lseek(fd, start + rows * row_bytes, os.SEEK_SET)


def _write_blocks(fd: int, a: np.ndarray, pool: ThreadPoolExecutor | None, on_block: Callable[[], None] | None,
                  scratch: list[np.ndarray] | None = None) -> None:
    """Write the non-contiguous view ``a`` (a transposed matrix, rows of heads reordered) in C order,
    CHUNK_BYTES of rows (its first axis) at a time: on ``pool``'s threads if given (each writes the blocks
    it makes, :func:`_blocks_by_workers`), else here. Memory: one block per thread, whatever the tensor's
    size. ``scratch`` keeps the buffers for the next tensor (fresh pages cost a fault each, and here a
    zero-fill too). ``on_block()`` runs once the tensor is written."""
    rows, inner = a.shape[0], a.shape[1:]
    row_bytes = prod(inner) * a.itemsize
    step = max(1, min(rows, CHUNK_BYTES // max(1, row_bytes)))
    starts = range(0, rows, step)
    nbuf = min(max(1, TRANSPOSE_THREADS), len(starts)) if pool is not None else 1
    need = step * row_bytes
    scratch = [] if scratch is None else scratch
    for n in range(nbuf):
        if n == len(scratch):
            scratch.append(np.empty(need, dtype=np.uint8))
        elif scratch[n].nbytes < need:
            scratch[n] = np.empty(need, dtype=np.uint8)
    bufs = [scratch[n][:need].view(a.dtype).reshape(step, *inner) for n in range(nbuf)]
    if pool is not None:
        _blocks_by_workers(fd, a, pool, starts, step, bufs)
    else:
        for i in starts:
            _write_all(fd, _fill_block(bufs[0], a, i, min(step, rows - i)).reshape(-1).view(np.uint8))
    if on_block:
        on_block()


def _write_array(fd: int, a: np.ndarray, pool: ThreadPoolExecutor | None = None,
                 on_block: Callable[[], None] | None = None, scratch: list[np.ndarray] | None = None) -> None:
    """Write ``a`` in C order; a non-contiguous view is made contiguous a block of rows at a time
    (on ``pool``'s threads if given, ``on_block()`` after the blocks are written)."""
    if a.size == 0:
        return
    if a.ndim == 0:
        a = a.reshape(1)
    if a.flags.c_contiguous:
        _write_all(fd, a.reshape(-1).view(np.uint8))
        return
    _write_blocks(fd, a, pool, on_block, scratch)


class _Sources:
    """Open source files, one descriptor each, for the kernel copies."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class RawWriter:
    """Writes the byte-path tensors of one safetensors file, in the file's order, with one-ahead prefetch.

    ``raws`` holds each tensor's :class:`RawTensor` or None (that tensor goes the torch way);
    :meth:`write` returns False for those so the caller writes them itself.
    """

    stats = {"kernel": 0, "rearranged": 0}  # tensors moved each way in this process (tests read this)
    _lock = threading.Lock()

    def __init__(self, raws: Sequence[RawTensor | None], out_shapes: Sequence[tuple[int, ...]],
                 hash_output: bool = True):
        self.raws = [r if enabled() else None for r in raws]
        self.shapes = list(out_shapes)
        self.sources = _Sources()
        self.pool: ThreadPoolExecutor | None = None
        self.hash_pool: ThreadPoolExecutor | None = None
        self.block_pool: ThreadPoolExecutor | None = None  # makes the blocks of transposed matrices
        self.scratch: list[np.ndarray] = []  # their buffers, reused from matrix to matrix
        self.pending: dict[int, Future] = {}
        self.checks: list[Future] = []
        # the file's sha256 as it is written (for enc_provenance.json); off when the caller records no hash
        self.sha = hashlib.sha256() if hash_output and any(r is not None for r in self.raws) else None
        self.hashed = 0

    def _needs_read(self, i: int) -> bool:
        r = self.raws[i]
        return r is not None and r.byte_range() is None

    def _submit(self, fn, *args) -> Future:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="enc-bytes")
        return self.pool.submit(fn, *args)

    def _submit_hash(self, path: str, end: int) -> None:
        """The sha256 runs on its own thread (in file order): it is the slowest pass (~1 GB/s)."""
        if self.hash_pool is None:
            self.hash_pool = ThreadPoolExecutor(1, thread_name_prefix="enc-sha256")
        self.checks.append(self.hash_pool.submit(self._hash_upto, path, end))

    def _prefetch(self, i: int) -> None:
        if i >= len(self.raws) or i in self.pending or not self._needs_read(i):
            return
        if self.raws[i].nbytes > PREFETCH_MAX:  # type: ignore[union-attr]
            return
        self.pending[i] = self._submit(self.raws[i].mapped, True, True)  # type: ignore[union-attr]

    def write(self, f, i: int) -> bool:
        r = self.raws[i]
        if r is None:
            return False
        f.flush()
        fd = f.fileno()
        if not self._needs_read(i):
            off, n = r.byte_range()  # type: ignore[misc]
            if r.check is not None:  # verified on the helper thread, from the page cache, while the kernel copies
                self.checks.append(self._submit(verify, r))
            self._prefetch(i + 1)
            _copy_kernel(self.sources.fd(r.path), off, n, fd, f"{r.path}: {r.label}")
            kind = "kernel"
        else:
            fut = self.pending.pop(i, None)
            if fut is not None:
                a = fut.result()
            else:  # a big one: its checksum is verified on the helper thread (over the same mapping) while
                buf = r.source_bytes()  # it is rearranged and written; the file is not finished until it agrees
                if buf is None:
                    a = r.materialize(last_view=True)
                else:
                    self.checks.append(self._submit(check_bytes, r, buf))
                    a = r.arrange(buf, last_view=True)
                    del buf
            if not r.written_shape_ok(a, self.shapes[i]):
                raise RuntimeError(f"{r.label}: byte recipe produced shape {tuple(a.shape)}, planned {self.shapes[i]}")
            self._prefetch(i + 1)
            if self.block_pool is None and TRANSPOSE_THREADS > 1 and a.ndim >= 2 and not a.flags.c_contiguous:
                self.block_pool = ThreadPoolExecutor(TRANSPOSE_THREADS, thread_name_prefix="enc-blocks")
            # the output's sha256 follows each block written, not each tensor
            on_block = (lambda: self._submit_hash(f.name, os.lseek(fd, 0, os.SEEK_CUR))) if self.sha is not None \
                else None
            _write_array(fd, a, self.block_pool, on_block, self.scratch)
            del a
            kind = "rearranged"
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        f.seek(pos)  # the buffered writer resumes where the descriptor is
        if self.sha is not None:  # everything up to here (header and torch-written tensors included)
            self._submit_hash(f.name, pos)
        with self._lock:
            RawWriter.stats[kind] += 1
        return True

    def _hash_upto(self, path: str, end: int) -> None:
        """sha256 of the output, in file order, from a read-only mapping of what is written so far."""
        if end > self.hashed:
            with open(path, "rb") as f:
                for view in _mapped(f.fileno(), self.hashed, end):
                    self.sha.update(view)
            self.hashed = end

    def finish(self, f=None) -> None:
        """Wait for the checksums of kernel-copied tensors (a mismatch raises: the file is not finished)
        and, given the output file, for its sha256 (computed on the helper thread as the file grew; see
        :func:`known_sha256`)."""
        if f is not None and self.sha is not None and self.hash_pool is not None:
            f.flush()
            self._submit_hash(f.name, os.fstat(f.fileno()).st_size)
        for fut in self.checks:
            fut.result()
        self.checks.clear()
        if f is not None and self.sha is not None and self.hash_pool is not None:
            st = os.fstat(f.fileno())
            if self.hashed == st.st_size:
                _DIGESTS[os.path.realpath(f.name)] = (st.st_size, st.st_mtime_ns, self.sha.hexdigest())

    def close(self) -> None:
        for fut in [*self.pending.values(), *self.checks]:
            fut.cancel()
        for pool in (self.pool, self.hash_pool, self.block_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self.pending.clear()
        self.scratch.clear()
        self.sources.close()


_DIGESTS: dict[str, tuple[int, int, str]] = {}  # output file -> (size, mtime_ns, sha256) computed while writing


def known_sha256(path: str | Path) -> str | None:
    """The sha256 of a safetensors file this process wrote with the byte path, if the file is unchanged
    since (same size and modification time); None otherwise (hash it yourself)."""
    key = os.path.realpath(path)
    rec = _DIGESTS.get(key)
    if rec is None:
        return None
    try:
        st = os.stat(key)
    except OSError:
        return None
    return rec[2] if (st.st_size, st.st_mtime_ns) == rec[:2] else None


def raw_source(path: str | Path, offset: int, nbytes: int, shape: Sequence[int], itemsize: int,
               check: tuple[str, int] | None = None, label: str = "") -> RawTensor | None:
    """A :class:`RawTensor`, or None when the numbers do not describe one (the torch path then reads it)."""
    try:
        return RawTensor(str(path), int(offset), int(nbytes), tuple(int(s) for s in shape), int(itemsize), check,
                         label)
    except (ValueError, TypeError):
        return None
