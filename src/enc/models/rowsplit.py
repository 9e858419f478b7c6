"""Batch-1 float32 matrix-vector products split by rows over the calling thread and a helper thread.

Why (issue 16, measured by benchmarks/bench_mistral_decode.py and reported there): decode is
memory-bandwidth bound, and on this 2-core machine one core streams float32 weights through MKL's
matrix-vector kernel at ~20 GB per CPU-second while oneDNN's blocked fp32 kernel at 2 threads gets
~13 GB per CPU-second. On a quiet machine the 2-thread kernels win on wall time; on a busy one the
process gets a fraction of the cores and every OpenMP barrier waits for the thread that was
descheduled, so wall time swings 2-3x from run to run. Here every product is cut into row blocks
that the two threads take from a shared counter: a thread that is not scheduled simply takes
fewer blocks (no barrier waits on it), both threads stream when both cores are free, and torch's
own intra-op threads are 1 for the duration (no OpenMP spinning between the small ops of a step).

Numerics: each output row is the same ``torch.mv`` dot product over the same columns as the
unsplit product (row blocks do not change any reduction), so the result equals ``torch.mv`` and
``F.linear`` at one thread bit for bit (tested).

Use::

    with decode_threads():          # torch intra-op threads = 1, helper thread started on demand
        y = matvec(w, x)            # w [out, in] contiguous float32, x [in] -> [out]

Outside ``decode_threads`` (or on another thread while one decode holds the helper), ``matvec`` is
plain ``torch.mv``.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_BLOCK_BYTES = 8 << 20  # rows per block: ~8 MiB of weights (14336 x 4096 fp32: 28 blocks; ~270 a token here)


class _Job:
    """Row blocks taken from a shared counter by the caller and the helper.

    The caller never waits for the helper: once no block is left to take, it computes any block the
    helper has taken but not yet delivered (the helper may have been descheduled) itself. The helper
    computes into its own buffer and delivers under the lock only if the block is still open, so
    ``y`` is written once per block, and nothing is written after the caller returns (a late helper
    finds its block delivered and drops its copy; the job keeps ``w``, ``x`` and ``y`` alive).
    """

    __slots__ = ("w", "x", "y", "blocks", "next", "delivered", "lock", "inference")

    def __init__(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, blocks: Sequence[tuple[int, int]]):
        self.w, self.x, self.y, self.blocks = w, x, y, blocks
        self.next = 0
        self.delivered = [False] * len(blocks)
        self.lock = threading.Lock()
        self.inference = torch.is_inference_mode_enabled()  # thread-local in torch: the helper copies it

    def help(self) -> None:
        """The helper's part: take blocks until none is left; deliver each unless the caller already did."""
        n = len(self.blocks)
        while True:
            with self.lock:
                i = self.next
                self.next += 1
            if i >= n:
                return
            r0, r1 = self.blocks[i]
            try:
                part = torch.mv(self.w[r0:r1], self.x)
            except Exception:  # the caller computes this block itself and raises there
                return
            with self.lock:
                if not self.delivered[i]:
                    self.y[r0:r1].copy_(part)
                    self.delivered[i] = True

    def run(self) -> None:
        """The caller's part: take blocks, then finish whatever the helper has not delivered."""
        n = len(self.blocks)
        while True:
            with self.lock:
                if self.next < n:
                    i, own = self.next, True
                    self.next += 1
                else:
                    i = next((j for j in range(n) if not self.delivered[j]), -1)
                    own = False
            if i < 0:
                return
            r0, r1 = self.blocks[i]
            if own:  # nobody else writes a block the caller took
                torch.mv(self.w[r0:r1], self.x, out=self.y[r0:r1])
                with self.lock:
                    self.delivered[i] = True
            else:
                part = torch.mv(self.w[r0:r1], self.x)
                with self.lock:
                    if not self.delivered[i]:
                        self.y[r0:r1].copy_(part)
                        self.delivered[i] = True


class _Helper:
    """One daemon thread that joins the current job; idle, it blocks on a condition (no spinning)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.job: _Job | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="enc-rowsplit", daemon=True)
        self.thread.start()
        # at exit, end the thread before the interpreter finalizes: a daemon thread that is still inside
        # torch when it does is ended by pthread_exit in C++ frames, which can abort the process
        atexit.register(self.stop)

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            with self.cv:
                while self.job is None and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                job, self.job = self.job, None
            with torch.inference_mode(job.inference), torch.no_grad():
                job.help()
            del job  # hold no weights between products

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (after the block it is computing, if any)."""
        with self.cv:
            self.stopping = True
            self.job = None
            self.cv.notify()
        self.thread.join(timeout)

    def clear(self) -> None:
        with self.cv:
            self.job = None

    def submit(self, job: _Job) -> None:
        with self.cv:
            self.job = job
            self.cv.notify()


_state = threading.local()
_owner = threading.Lock()  # one decode at a time uses the helper
_helper: _Helper | None = None


def _blocks(rows: int, row_bytes: int) -> tuple[tuple[int, int], ...]:
    """Row blocks of ~_BLOCK_BYTES, shrinking to a quarter of that over the last quarter of the rows.

    A product ends when its last block is in: with smaller blocks at the end the two threads finish
    closer together, and the block the caller computes again when the helper has not delivered it
    yet (see _Job.run) costs a quarter as much.
    """
    return _blocks_for(rows, row_bytes, _BLOCK_BYTES)


@functools.lru_cache(maxsize=256)
def _blocks_for(rows: int, row_bytes: int, block_bytes: int) -> tuple[tuple[int, int], ...]:
    big = max(16, block_bytes // max(row_bytes, 1))
    small = max(16, big // 4)
    out, r = [], 0
    while r < rows:
        step = min(big, max(small, (rows - r) // 4))
        out.append((r, min(r + step, rows)))
        r += step
    return tuple(out)  # cached: shared, never modified


def active() -> bool:
    return getattr(_state, "on", False)


# --------------------------------------------------------------------------- when the helper joins
#
# Measured here (benchmarks/bench_mistral_decode.py, issue 16): with the cores free, two threads stream
# more bytes per second than one; with other processes on the cores, one thread alone is faster, because
# two concurrent streams each stall longer (~0.2 CPU-s a token instead of ~0.15 for one) and the process
# gets no more CPU for it. So the helper joins only while the rest of the machine leaves cores idle,
# judged from /proc/stat every _POLL_S: CPU time of all processes minus this process's own (without
# /proc/stat, e.g. not Linux, it always joins).

_POLL_S = 0.5
# Break-even, from the rates measured here: one stream ~20 GB/s on one core; two streams ~31 GB/s on two
# (~15.5 GB/s per core): two threads sharing c free cores give ~15.5 c GB/s, more than 20 once c > 1.3.
_SPARE = 1.25  # the helper joins while the other processes leave more than this many cores (/proc/stat's) free
_poll = {"at": 0.0, "busy": 0.0, "own": 0.0, "helper": True}  # kept across decodes; both threads until measured


def _busy_seconds() -> float | None:
    """Seconds all CPUs have been busy since boot (user+nice+system+irq+softirq+steal), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            v = f.readline().split()
        hz = os.sysconf("SC_CLK_TCK")
        return (int(v[1]) + int(v[2]) + int(v[3]) + int(v[6]) + int(v[7]) + int(v[8])) / hz
    except (OSError, ValueError, IndexError):
        return None


def helper_joins(busy_delta: float, own_delta: float, wall: float, cpus: int) -> bool:
    """True when, over ``wall`` seconds, the other processes left more than _SPARE of ``cpus`` cores free
    (``busy_delta``: CPU-seconds of the whole machine, ``own_delta``: of this process)."""
    others = (busy_delta - own_delta) / max(wall, 1e-9)
    return cpus - others > _SPARE


def _helper_wanted() -> bool:
    now = time.monotonic()
    if now - _poll["at"] < _POLL_S:
        return _poll["helper"]
    busy, t = _busy_seconds(), os.times()
    own = t.user + t.system
    if busy is not None and _poll["at"] > 0.0:
        _poll["helper"] = helper_joins(busy - _poll["busy"], own - _poll["own"], now - _poll["at"], os.cpu_count() or 1)
    _poll.update(at=now, busy=busy or 0.0, own=own)
    return _poll["helper"]


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for a contiguous CPU matrix [out, in] and vector [in]; split over two threads inside
    :func:`decode_threads`, ``torch.mv`` otherwise."""
    if not active() or w.shape[0] < 2 * 16 or not _helper_wanted():
        return torch.mv(w, x)
    y = torch.empty(w.shape[0], dtype=torch.result_type(w, x), device=w.device)
    job = _Job(w, x.contiguous(), y, _blocks(w.shape[0], w.shape[1] * w.element_size()))
    assert _helper is not None
    _helper.submit(job)
    job.run()
    return y


@contextmanager
def decode_threads() -> Iterator[bool]:
    """Within: torch intra-op threads 1 and :func:`matvec` split over this thread and the helper.

    Yields whether the split is on (False when another thread's decode holds the helper: then
    nothing changes). torch's thread count is restored on exit.
    """
    global _helper
    if active() or not _owner.acquire(blocking=False):
        yield False
        return
    before = torch.get_num_threads()
    try:
        if _helper is None:
            _helper = _Helper()
        torch.set_num_threads(1)
        _state.on = True
        yield True
    finally:
        _state.on = False
        if _helper is not None:
            _helper.clear()  # a job the helper never woke up for keeps nothing alive
        torch.set_num_threads(before)
        _owner.release()
