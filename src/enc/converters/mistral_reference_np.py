"""The Mistral / Mixtral parity reference in numpy float32, on a helper thread, without torch.

The same math as :func:`enc.converters.mistral_reference.reference_forward` (mistral-inference on
the un-permuted checkpoint: interleaved complex RoPE, top-k of the gate logits then a softmax over
those k), in the same order of operations, in float32: the rows it yields differ from the torch
reference's at float32 rounding level only (a test holds them within 1e-6 relative).

Why numpy: nothing here touches torch, so ``enc parity`` starts the reference before it imports
torch (1-1.5 s of one core) and the reference's float32 matrix products (about 2 s of one core for
the 4-layer Mistral-7B geometry) run on the second core meanwhile; numpy's BLAS, its ufuncs and the
zip CRC release the GIL. Each weight's bytes are mapped read-only from the page cache; a 16-bit
weight is made float32 a block of rows at a time (bf16 -> float32 is a 16-bit shift) in a reused
buffer per worker, and its blocks are shared between workers (:data:`WORKERS`, one per core),
single-threaded BLAS each, so the product uses every core once the import has finished.

Checks are those of the torch reference: every tensor's zip CRC (or CRC32C) is verified on the bytes
used, before anything computed from it is published (unless :class:`enc.parity_weights.ChecksumsAhead`
verified it in this run already); a failure is raised where the activations are read, naming the
file. A tensor without a byte recipe (tensor-parallel shards joined) is loaded the ordinary way
(torch, on this thread).

:func:`probe_arrays` gives :func:`enc.parity.make_probes`' probes as numpy arrays without torch
(torch's CPU generator is MT19937 seeded like numpy's legacy ``RandomState``; ``randint`` over a
range up to :data:`MAX_SPAN` takes ``low + raw32 % range``); a test holds the two equal. :meth:`ReferenceRun.matches`
compares them with the probes the run is finally asked for, so a mismatch is recomputed, never used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


WORKERS = max(1, min(8, _cores()))  # threads sharing the blocks of one matrix product (one per core, up to 8)
BLOCK = 2**20  # elements of a weight made float32 at a time per worker (4 MB: stays in the L3 cache)


# --------------------------------------------------------------------------- probes without torch

MAX_SPAN = 2**24  # token ranges probe_arrays draws (tested against torch up to here)


def probe_arrays(vocab_size: int, max_len: int, *, lengths: Sequence[int] = (48, 17, 6), low: int = 0,
                 bos_id: int | None = None, pad_id: int = 0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids int64 [B, T], attention_mask int64 [B, T]) exactly as ``make_probes`` builds them
    (its arguments used by Mistral: no cls/sep/type ids); None for a token range over :data:`MAX_SPAN`
    (torch may draw those another way: the reference then starts once torch has drawn them)."""
    rs = np.random.RandomState(seed)  # MT19937, init_genrand(seed): torch's CPU generator's seeding
    lengths = [max(2, min(n, max_len)) for n in lengths]
    T = max(lengths)
    ids = np.full((len(lengths), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), T), dtype=np.int64)
    span = vocab_size - low
    if not 0 < span <= MAX_SPAN:
        return None
    for r, n in enumerate(lengths):
        raw = rs.randint(0, 2**32, size=n, dtype=np.uint32).astype(np.int64)
        row = low + raw % span
        if bos_id is not None:
            row[0] = bos_id
        ids[r, :n] = row
        mask[r, :n] = 1
    return ids, mask


# --------------------------------------------------------------------------- BLAS threads


def _openblas():
    """numpy's OpenBLAS (its thread-count calls), or None where numpy uses another BLAS."""
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sfx in ("64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{sfx}", None)
            put = getattr(lib, f"scipy_openblas_set_num_threads{sfx}", None)
            if get is not None and put is not None:
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


class _OneBlasThread:
    """numpy's BLAS single-threaded while a run lasts (the workers split the products themselves; BLAS
    threads of their own would spin against the torch import and the other side), restored after."""

    _lock = threading.Lock()
    _users = 0
    _saved: int | None = None
    _calls = None

    def __enter__(self):
        with self._lock:
            cls = type(self)
            if cls._calls is None:
                cls._calls = _openblas() or False
            if cls._calls and cls._users == 0:
                cls._saved = cls._calls[0]()
                cls._calls[1](1)
            cls._users += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            cls = type(self)
            cls._users -= 1
            if cls._calls and cls._users == 0 and cls._saved:
                cls._calls[1](cls._saved)


# --------------------------------------------------------------------------- weights


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _plain(t) -> bool:
    """``t`` is its source bytes (maybe rearranged) in a float dtype read here."""
    r = t.raw
    return r is not None and t.nbytes > 0 and r.itemsize == t.dtype.itemsize and \
        _dtype(t) in ("bfloat16", "float16", "float32")


class Weights:
    """Source tensors as numpy arrays in their own dtype (16-bit: raw uint16), checksum verified.

    ``checks``: the run's :class:`enc.parity_weights.ChecksumsAhead` (or a stand-in with ``checked`` and
    ``mark``); a tensor it has verified is not checked again.
    """

    def __init__(self, ref: dict, checks=None) -> None:
        self.ref = ref
        self.checks = checks if checks is not None else _Checked()

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """(array, dtype name): 16-bit floats as their uint16 bit patterns (convert with :func:`f32`)."""
        t = self.ref[name]
        if not _plain(t):
            return self._load(t)
        r = t.raw
        done = r.check is None or self.checks.checked(t)
        buf = r.source_bytes(populate=not done)  # a read-only mapping (kept alive by the array)
        if buf is None:  # mapping off (ENC_FASTCOPY_MMAP=0) or impossible: the ordinary path
            return self._load(t)
        if not done:
            from enc.io.fastcopy import check_bytes

            check_bytes(r, buf)
            self.checks.mark(t)
        a = r.arrange(buf)
        if _dtype(t) == "float32":
            a = a.view(np.float32)
        if tuple(a.shape) != tuple(t.shape):  # a recipe that is not the tensor: the ordinary path
            return self._load(t)
        return a, _dtype(t)

    @staticmethod
    def _load(t) -> tuple[np.ndarray, str]:
        w = t.load()  # the ordinary path (torch, imported on this thread if need be): its own checks
        return w.float().numpy(), "float32"


class _Checked:
    """The tensors verified in this run (when no ChecksumsAhead is given)."""

    def __init__(self) -> None:
        self._done: set = set()
        self._lock = threading.Lock()

    @staticmethod
    def _key(t):
        r = t.raw
        return (r.path, r.offset, r.nbytes, r.check)

    def checked(self, t) -> bool:
        with self._lock:
            return self._key(t) in self._done

    def mark(self, t) -> None:
        with self._lock:
            self._done.add(self._key(t))


def f32(a: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """``a`` (bit patterns of ``dtype``) as float32, into ``out`` (float32, a.shape, C order) if given."""
    if out is None:
        out = np.empty(a.shape, dtype=np.float32)
    if dtype == "bfloat16":
        np.left_shift(a, 16, out=out.view(np.uint32), dtype=np.uint32)  # exact: bf16 is float32's top half
    elif dtype == "float16":
        np.copyto(out, a.view(np.float16), casting="unsafe")
    else:
        np.copyto(out, a.view(np.float32) if a.dtype != np.float32 else a)
    return out


class _Linear:
    """``h @ W.T`` in float32 with W made float32 a block of rows at a time, blocks shared by the workers."""

    def __init__(self, pool: ThreadPoolExecutor | None) -> None:
        self.pool = pool
        self._local = threading.local()

    def _buf(self, n: int, dtype: str) -> np.ndarray:
        """This worker's float32 buffer for ``dtype`` (bfloat16: one whose low 16-bit halves stay zero)."""
        key = "bf16" if dtype == "bfloat16" else "other"
        b = getattr(self._local, key, None)
        if b is None or b.size < n:
            b = np.zeros(max(n, BLOCK), dtype=np.float32)
            setattr(self._local, key, b)
        return b

    def _block(self, hT: np.ndarray, w: np.ndarray, dtype: str, outT: np.ndarray, r0: int, r1: int) -> None:
        blk = w[r0:r1]
        buf = self._buf(blk.size, dtype)
        wf = buf[: blk.size].reshape(blk.shape)
        if dtype == "bfloat16" and blk.ndim == 2:
            # bf16 is the top half of a float32: only the high 16-bit halves are written (little-endian:
            # the second uint16 of each float32); the low halves of this buffer are zero and stay zero
            rows, cols = blk.shape
            high = np.ndarray((rows, cols), dtype=np.uint16, buffer=buf, offset=2, strides=(cols * 4, 4))
            np.copyto(high, blk)
        else:
            f32(blk, dtype, wf)
        np.matmul(wf, hT, out=outT[r0:r1])  # W h^T: about 15% less CPU than h W^T in OpenBLAS here

    def __call__(self, h: np.ndarray, w: np.ndarray, dtype: str) -> np.ndarray:
        """[M, N] float32 (a transposed view of an [N, M] array)."""
        n, k = w.shape
        hT = np.ascontiguousarray(h.T)
        if dtype == "float32" and w.dtype == np.float32:
            return np.matmul(w, hT).T
        outT = np.empty((n, h.shape[0]), dtype=np.float32)
        rows = max(1, BLOCK // max(1, k))
        spans = [(r, min(n, r + rows)) for r in range(0, n, rows)]
        if self.pool is None or len(spans) == 1:
            for r0, r1 in spans:
                self._block(hT, w, dtype, outT, r0, r1)
        else:
            for f in [self.pool.submit(self._block, hT, w, dtype, outT, r0, r1) for r0, r1 in spans]:
                f.result()
        return outT.T


# --------------------------------------------------------------------------- the forward pass


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x * (np.float32(1) / np.sqrt((x * x).mean(-1, keepdims=True, dtype=np.float32) + np.float32(eps))) * w


def _freqs(head_dim: int, end: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    exps = np.arange(0, head_dim, 2)[: head_dim // 2].astype(np.float32) / np.float32(head_dim)
    freqs = np.float32(1.0) / (np.float32(theta) ** exps)
    angles = np.outer(np.arange(end, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def _rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved pairs (2j, 2j+1) rotated as complex numbers; x [B, T, heads, hd]."""
    p = x.reshape(*x.shape[:-1], -1, 2)
    a, b = p[..., 0], p[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = np.empty_like(p)
    out[..., 0] = a * c - b * s
    out[..., 1] = a * s + b * c
    return out.reshape(x.shape)


def _silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis, keepdims=True)


def forward(ref: dict, p, tied: bool, ids: np.ndarray, mask: np.ndarray, checks=None,
            pool: ThreadPoolExecutor | None = None, stop: threading.Event | None = None):
    """Yields ``(name, kind, padded float32 array, topk or None, base or None)`` as the torch reference's
    Activations (``padded``: [B, T, ...], zeros at padded positions; ``topk``: int64 [B, T, k])."""
    wts = Weights(ref, checks)
    lin = _Linear(pool)
    B, T = ids.shape
    H, KV, hd = p.n_heads, p.n_kv_heads, p.head_dim
    where = np.flatnonzero(mask.reshape(-1) != 0)

    def padded(t: np.ndarray) -> np.ndarray:
        out = np.zeros((B * T, *t.shape[1:]), dtype=t.dtype)
        out[where] = t
        return out.reshape(B, T, *t.shape[1:])

    def vec(name: str) -> np.ndarray:
        a, dt = wts.raw(name)
        return f32(a, dt) if a.dtype != np.float32 else a

    def linear(h: np.ndarray, name: str) -> np.ndarray:
        if stop is not None and stop.is_set():
            raise _Stopped
        a, dt = wts.raw(name)
        return lin(h, a, dt)

    tokens = ids.reshape(-1)[where]
    emb, dt = wts.raw("tok_embeddings.weight")
    x = f32(emb[tokens], dt)  # only the probe's rows become float32
    del emb
    yield "embeddings", "hidden", padded(x), None, None
    cos, sin = _freqs(hd, T, p.rope_theta)
    i_ = np.arange(T)[:, None]
    j_ = np.arange(T)[None, :]
    allowed = j_ <= i_
    if p.sliding_window is not None:
        allowed &= j_ > i_ - p.sliding_window
    amask = np.where(allowed, np.float32(0), np.float32(-np.inf)).astype(np.float32)
    scale = np.float32(hd**-0.5)
    G = H // KV
    for layer in range(p.n_layers):
        L = f"layers.{layer}."
        h = _rms(x, vec(L + "attention_norm.weight"), p.norm_eps)
        xq = padded(linear(h, L + "attention.wq.weight")).reshape(B, T, H, hd)
        xk = padded(linear(h, L + "attention.wk.weight")).reshape(B, T, KV, hd)
        xv = padded(linear(h, L + "attention.wv.weight")).reshape(B, T, KV, hd)
        xq, xk = _rotary(xq, cos, sin), _rotary(xk, cos, sin)
        q = xq.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
        k = xk.transpose(0, 2, 3, 1)[:, :, None]  # [B, KV, 1, hd, T]
        v = xv.transpose(0, 2, 1, 3)[:, :, None]  # [B, KV, 1, T, hd]
        scores = np.matmul(np.ascontiguousarray(q), np.ascontiguousarray(k)) * scale + amask
        probs = _softmax(scores)
        attn = np.matmul(probs, np.ascontiguousarray(v))  # [B, KV, G, T, hd]
        attn = attn.transpose(0, 3, 1, 2, 4).reshape(B * T, H * hd)[where]
        x = x + linear(attn, L + "attention.wo.weight")
        h = _rms(x, vec(L + "ffn_norm.weight"), p.norm_eps)
        if p.is_moe:
            gate = linear(h, L + "feed_forward.gate.weight")
            k_ = p.num_experts_per_tok
            sel = np.argsort(-gate, axis=1, kind="stable")[:, :k_]  # top-k, largest first
            weights = np.take_along_axis(gate, sel, 1)
            yield f"layer.{layer}.router", "router", padded(gate), padded(sel.astype(np.int64)), None
            x = x + _moe(h, weights, sel, L, linear, p)
        else:
            x = x + _ffn(h, linear, L + "feed_forward.")
        yield f"layer.{layer}", "hidden", padded(x), None, "embeddings" if layer == 0 else f"layer.{layer - 1}"
    x = _rms(x, vec("norm.weight"), p.norm_eps)
    yield "final_norm", "hidden", padded(x), None, None
    logits = linear(x, "tok_embeddings.weight" if tied else "output.weight")
    yield "logits", "logits", padded(logits), None, None


def _ffn(h: np.ndarray, linear, prefix: str) -> np.ndarray:
    return linear(_silu(linear(h, prefix + "w1.weight")) * linear(h, prefix + "w3.weight"), prefix + "w2.weight")


def _moe(flat: np.ndarray, weights: np.ndarray, selected: np.ndarray, L: str, linear, p) -> np.ndarray:
    """mistral-inference MoeLayer after the gate: softmax over the k chosen logits; experts one at a time."""
    weights = _softmax(weights, axis=1)
    results = np.zeros_like(flat)
    for e in range(p.num_experts):
        rows, nth = np.nonzero(selected == e)
        if rows.size == 0:
            continue
        results[rows] += weights[rows, nth, None] * _ffn(flat[rows], linear, f"{L}feed_forward.experts.{e}.")
    return results


class _Stopped(Exception):
    pass


# --------------------------------------------------------------------------- a run on a helper thread


class ReferenceRun:
    """:func:`forward` on a helper thread, started at once; :meth:`next` hands out its results in order.

    An exception of the forward pass (a CRC mismatch, a truncated file) is raised by :meth:`next` when
    the consumer reaches the activation it stopped before. :meth:`close` stops the thread (between
    matrix products) and waits for it.
    """

    def __init__(self, ref: dict, p, tied: bool, ids: np.ndarray, mask: np.ndarray, checks=None) -> None:
        self.ids, self.mask = ids, mask
        self._cond = threading.Condition()
        self._items: list = []
        self._error: BaseException | None = None
        self._done = False
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="enc-parity-ref") if WORKERS > 1 else None
        self._thread = threading.Thread(target=self._run, args=(ref, p, tied, checks), name="enc-parity-reference",
                                        daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._done

    def matches(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        return (ids.shape == self.ids.shape and mask.shape == self.mask.shape and bool((ids == self.ids).all())
                and bool(((mask != 0) == (self.mask != 0)).all()))

    def _run(self, ref, p, tied, checks) -> None:
        try:
            with _OneBlasThread():
                for item in forward(ref, p, tied, self.ids, self.mask, checks, self._pool, self._stop):
                    with self._cond:
                        self._items.append(item)
                        self._cond.notify_all()
        except _Stopped:
            pass
        except BaseException as e:  # handed to the consumer
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self._items) and not self._done:
                    self._cond.wait()
                if i < len(self._items):
                    item = self._items[i]
                    self._items[i] = None  # handed out once
                elif self._error is not None:
                    raise self._error
                else:
                    return
            i += 1
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
