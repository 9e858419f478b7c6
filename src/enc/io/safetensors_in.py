"""Read safetensors files tensor by tensor, with every header field checked before use.

The header is ``u64 n`` then ``n`` bytes of JSON: ``{name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {...}}`` with offsets relative to the end of the header. Nothing is trusted:
the header must be an object of objects; dtypes known; shapes lists of non-negative integers;
offsets integers with ``0 <= b <= e <= data size``, ``e - b`` exactly the bytes the shape needs,
and no two tensors sharing bytes (so output can never be larger than the input). Every
failure is a one-line :class:`~enc.errors.CorruptCheckpoint` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from enc.errors import CorruptCheckpoint, MissingFile
from enc.io.dtypes import DType, as_torch
from enc.io.lazy import LazyTensor, impossible_shape

# header dtype codes -> enc.io.dtypes.DType (equal to the torch dtype; reading a header needs no torch)
DTYPES = {code: DType.from_st(code)
          for code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")}
MAX_HEADER = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: DType  # compares equal to the torch dtype; as_torch() gives it
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


def _q(name: str) -> str:
    return name if name.isprintable() and name else repr(name)


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict]:
    """(entries by name in header order, ``__metadata__``), all validated against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CorruptCheckpoint(path, "truncated safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise CorruptCheckpoint(path, f"safetensors header length {n} is larger than the file allows "
                                              "(truncated or not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise MissingFile(path, "file not found") from None
    except IsADirectoryError:
        raise CorruptCheckpoint(path, "is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptCheckpoint(path, f"invalid safetensors header: {type(e).__name__ if isinstance(e, RecursionError) else e}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(path, f"safetensors header is a JSON {type(header).__name__}, not an object")
    base, data_size = 8 + n, size - 8 - n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(path, "safetensors __metadata__ is not an object")
    entries: dict[str, Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {_q(name)}"
        if not isinstance(info, dict):
            raise CorruptCheckpoint(path, f"{where}: header entry is not an object")
        dt = info.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CorruptCheckpoint(path, f"{where}: unsupported dtype {dt!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CorruptCheckpoint(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if impossible_shape(shape):
            raise CorruptCheckpoint(path, f"{where}: shape {shape} is impossibly large")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise CorruptCheckpoint(path, f"{where}: data_offsets {offs!r} is not a pair of integers")
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise CorruptCheckpoint(path, f"{where}: data_offsets [{b}, {e}] lie outside the data section "
                                          f"([0, {data_size}] after the header)")
        need = prod(shape) * DTYPES[dt].itemsize
        if e - b != need:
            raise CorruptCheckpoint(path, f"{where}: {e - b} bytes at data_offsets, but {dt} {shape} needs {need}")
        entries[name] = Entry(name, DTYPES[dt], tuple(shape), base + b, e - b)
        if e > b:
            spans.append((b, e, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise CorruptCheckpoint(path, f"tensors {_q(n1)} and {_q(n2)} share bytes (overlapping data_offsets)")
    return entries, meta


def read_entry(path: Path, e: Entry) -> torch.Tensor:
    """One tensor's bytes, read with a single ``readinto`` (the file may have changed since the header)."""
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=as_torch(e.dtype))
    buf = bytearray(e.nbytes)
    with open(path, "rb") as f:
        f.seek(e.offset)
        got = f.readinto(buf)
    if got != e.nbytes:
        raise CorruptCheckpoint(path, f"truncated: tensor {_q(e.name)} needs {e.nbytes} bytes at {e.offset}, got {got}")
    return torch.frombuffer(buf, dtype=as_torch(e.dtype)).reshape(e.shape)


def lazy_tensors(path: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a LazyTensor; loading one reads only its bytes."""
    path = Path(path)
    entries, _ = read_header(path)
    from enc.io.fastcopy import raw_source  # where the bytes are: the writer may copy them file-to-file

    return {name: LazyTensor(e.shape, as_torch(e.dtype), (lambda e=e: read_entry(path, e)), (name,),
                             raw=raw_source(path, e.offset, e.nbytes, e.shape, e.dtype.itemsize, label=f"tensor {name}"))
            for name, e in entries.items()}
