"""Decode weights on 2 MiB transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``), same bytes.

Why (issue 16, measured here with benchmarks/bench_mistral_decode.py and by hand): batch-1 decode
streams every weight once per token, and on this machine (a KVM guest: every TLB miss is a
two-level page walk) the stream is slower through 4 KiB pages than through 2 MiB ones: a 1 GiB
``sum`` on one core reads 26 GB/s from 4 KiB pages and 32-34 GB/s from 2 MiB pages (two threads:
21-25 vs 36 GB/s), and MKL's float32 matrix-vector kernel on one core goes from ~20 to ~22.5 GB/s.
The system's THP mode here is ``madvise`` (nothing is huge unless asked), so the weights the
decode loop streams are copied, once, into memory advised for huge pages before its first touch.

Numerics: the copy is ``copy_`` / ``torch.cat(out=)`` of the same values; every product reads the
same bytes (tested bit for bit). Where the advice is not available (not Linux, THP ``never``,
``ENC_HUGEPAGES=0``, a small tensor) the functions return ordinary tensors with the same values.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman-common.h
_MIN_BYTES = 2 * _HUGE  # smaller tensors may reuse already-touched heap memory: not worth a copy
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            fn = lib.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def available() -> bool:
    """Huge-page advice can be given here (Linux, THP not ``never``, not disabled by ENC_HUGEPAGES=0)."""
    if os.environ.get("ENC_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return False
    except OSError:
        return False
    return _madvise() is not None


def advise(t: torch.Tensor) -> bool:
    """Ask for huge pages over the 2 MiB-aligned interior of ``t``'s memory (untouched pages fault in huge)."""
    fn = _madvise()
    if fn is None:
        return False
    a = t.data_ptr()
    start = (a + _HUGE - 1) & ~(_HUGE - 1)
    end = (a + t.numel() * t.element_size()) & ~(_HUGE - 1)
    return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` on the CPU, advised for huge pages before any page is touched."""
    t = torch.empty(tuple(shape), dtype=dtype)
    if t.numel() * t.element_size() >= _MIN_BYTES and available():
        advise(t)
    return t


def _wanted(nbytes: int, device: torch.device) -> bool:
    return device.type == "cpu" and nbytes >= _MIN_BYTES and available()


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` on huge pages (``t`` itself where they are not available or not worth it)."""
    if not _wanted(t.numel() * t.element_size(), t.device):
        return t
    return empty(t.shape, t.dtype).copy_(t)


def cat(ts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat(ts, dim)``, written straight into huge-page memory where available."""
    shape = list(ts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    n = 1
    for s in shape:
        n *= s
    if not _wanted(n * ts[0].element_size(), ts[0].device) or any(t.dtype != ts[0].dtype for t in ts):
        return torch.cat(list(ts), dim)
    return torch.cat(list(ts), dim, out=empty(shape, ts[0].dtype))
