"""Write TensorFlow V2 checkpoints (tensor bundles) without TensorFlow. Test-only.

``write_bundle(prefix, {"name": array, ...})`` writes ``prefix.index`` and
``prefix.data-0000i-of-0000N`` the way TensorFlow's ``BundleWriter``/``MergeBundles`` and its
LevelDB-style ``TableBuilder`` do (same block layout, restart points, index separators, proto field
order and checksums); ``tests/fixtures/tf/make_fixtures.py`` checks that real TensorFlow
(``tf.train.load_checkpoint``) reads what this writes, bit for bit.

Values: numpy arrays of any numeric dtype (bool, int8-64, uint8-64, float16/32/64); bfloat16 as a
``torch.bfloat16`` tensor (other torch tensors are accepted too); strings as a numpy array of
``bytes``/``str`` (``DT_STRING``); :class:`Partitioned` for a variable saved in slices.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from enc.io.tf_checkpoint import crc32c, mask_crc, slice_key

__all__ = ["DTYPE_CODES", "Partitioned", "snappy_compress", "write_bundle"]

DTYPE_CODES: dict[str, int] = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "int64": 9, "bool": 10,
    "bfloat16": 14, "uint16": 17, "float16": 19, "uint32": 22, "uint64": 23,
}  # fmt: skip
_STRING = 7
_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")


@dataclass(frozen=True)
class Partitioned:
    """A variable saved in ``num_parts`` slices along ``axis``, like ``tf.fixed_size_partitioner``.

    ``full_extent_other_dims`` writes the unsliced dimensions as TF's "full extent" (no length),
    which ``tf.train.Saver`` never does but the format allows.
    """

    value: np.ndarray | torch.Tensor
    num_parts: int
    axis: int = 0
    full_extent_other_dims: bool = False


# --------------------------------------------------------------------------------------- encoding


def _varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _tag(num: int, wire_type: int) -> bytes:
    return _varint(num << 3 | wire_type)


def _int_field(num: int, v: int) -> bytes:
    """proto3 scalar: omitted when zero."""
    return _tag(num, 0) + _varint(v) if v else b""


def _msg_field(num: int, body: bytes) -> bytes:
    """A set sub-message: always present, even when empty."""
    return _tag(num, 2) + _varint(len(body)) + body


def _shape_proto(shape: tuple[int, ...]) -> bytes:
    return b"".join(_msg_field(2, _int_field(1, d)) for d in shape)


def _slice_proto(extents: tuple[tuple[int, int], ...]) -> bytes:
    out = b""
    for start, length in extents:  # length -1: full extent, written as an empty Extent
        body = b"" if length == -1 else _int_field(1, start) + _tag(2, 0) + _varint(length)
        out += _msg_field(1, body)
    return out


def _entry_proto(
    dtype: int,
    shape: tuple[int, ...],
    shard_id: int = 0,
    offset: int = 0,
    size: int = 0,
    crc: int | None = None,
    slices: tuple[tuple[tuple[int, int], ...], ...] = (),
) -> bytes:
    out = _int_field(1, dtype) + _msg_field(2, _shape_proto(shape))
    out += _int_field(3, shard_id) + _int_field(4, offset) + _int_field(5, size)
    if crc:
        out += _tag(6, 5) + struct.pack("<I", crc)
    return out + b"".join(_msg_field(7, _slice_proto(s)) for s in slices)


def _header_proto(num_shards: int, big_endian: bool) -> bytes:
    version = _int_field(1, 1)  # producer = kTensorBundleVersion; min_consumer 0 omitted
    return _int_field(1, num_shards) + _int_field(2, int(big_endian)) + _msg_field(3, version)


# ----------------------------------------------------------------------------------------- values


@dataclass
class _Record:
    key: bytes
    dtype: int
    shape: tuple[int, ...]
    data: bytes | None = None  # None: the metadata-only entry of a partitioned variable
    crc: int = 0  # unmasked CRC32C of data
    slices: tuple[tuple[tuple[int, int], ...], ...] = ()


def _as_numpy(value: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
    """(little-endian-or-byte array, dtype code); bfloat16 becomes its uint16 bit pattern."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), DTYPE_CODES["bfloat16"]
        value = t.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind in "SOU":
        return arr, _STRING
    if arr.dtype.name not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {arr.dtype}")
    return arr, DTYPE_CODES[arr.dtype.name]


def _string_bytes(arr: np.ndarray, big_endian: bool) -> tuple[bytes, int]:
    """``WriteStringTensor``: varint lengths, masked CRC of the lengths, the bytes; and the entry CRC.

    The lengths are checksummed as uint32 (uint64 above 4 GiB) in the writer's byte order.
    """
    order = ">" if big_endian else "<"
    items = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in arr.reshape(-1).tolist()]
    crc = 0
    for s in items:
        crc = crc32c(struct.pack(order + ("I" if len(s) <= 0xFFFFFFFF else "Q"), len(s)), crc)
    length_crc = struct.pack(order + "I", mask_crc(crc))
    body = b"".join(items)
    return b"".join(_varint(len(s)) for s in items) + length_crc + body, crc32c(body, crc32c(length_crc, crc))


def _raw(arr: np.ndarray, big_endian: bool) -> bytes:
    arr = np.ascontiguousarray(arr)
    order = ">" if big_endian else "<"
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(order))
    return arr.tobytes()


def _partition_extents(shape: tuple[int, ...], p: Partitioned) -> list[tuple[tuple[int, int], ...]]:
    n = shape[p.axis]
    sizes = [n // p.num_parts + (1 if i < n % p.num_parts else 0) for i in range(p.num_parts)]
    out, start = [], 0
    for size in sizes:
        ext = []
        for d, dim in enumerate(shape):
            if d == p.axis:
                ext.append((start, size))
            else:
                ext.append((0, -1) if p.full_extent_other_dims else (0, dim))
        out.append(tuple(ext))
        start += size
    return out


def _records(name: str, value: object, big_endian: bool) -> list[_Record]:
    key = name.encode("utf-8")
    if isinstance(value, Partitioned):
        arr, code = _as_numpy(value.value)
        if code == _STRING:
            raise TypeError("partitioned string tensors are not supported")
        extents = _partition_extents(arr.shape, value)
        recs = [_Record(key, code, arr.shape, slices=tuple(extents))]
        for ext in extents:
            index = tuple(
                slice(s, s + (dim if ln == -1 else ln)) for (s, ln), dim in zip(ext, arr.shape, strict=True)
            )
            part = arr[index]
            raw = _raw(part, big_endian)
            recs.append(_Record(slice_key(name, ext), code, part.shape, raw, crc32c(raw)))
        return recs
    arr, code = _as_numpy(value)  # type: ignore[arg-type]
    if code == _STRING:
        return [_Record(key, code, arr.shape, *_string_bytes(arr, big_endian))]
    raw = _raw(arr, big_endian)
    return [_Record(key, code, arr.shape, raw, crc32c(raw))]


# ------------------------------------------------------------------------------------ SSTable


class _BlockBuilder:
    """LevelDB ``BlockBuilder``: prefix-compressed entries with a restart point every N keys."""

    def __init__(self, restart_interval: int):
        self.interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def empty(self) -> bool:
        return not self.buf

    def finish(self) -> bytes:
        return (
            bytes(self.buf)
            + b"".join(struct.pack("<I", r) for r in self.restarts)
            + struct.pack("<I", len(self.restarts))
        )


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def _table(
    items: list[tuple[bytes, bytes]], restart_interval: int, block_size: int, compression: str
) -> bytes:
    """LevelDB/TF ``TableBuilder`` output for sorted ``items``."""
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        ctype = 0
        if compression == "snappy":
            contents, ctype = snappy_compress(contents), 1
        handle = _varint(len(out)) + _varint(len(contents))
        trailer = bytes([ctype]) + struct.pack("<I", mask_crc(crc32c(contents + bytes([ctype]))))
        out.extend(contents + trailer)
        return handle

    data = _BlockBuilder(restart_interval)
    index = _BlockBuilder(1)
    pending: bytes | None = None
    last_key = b""
    for key, value in items:
        if pending is not None:
            index.add(_shortest_separator(last_key, key), pending)
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending = write_block(data.finish())
            data = _BlockBuilder(restart_interval)
    if not data.empty():
        pending = write_block(data.finish())
    metaindex = write_block(_BlockBuilder(restart_interval).finish())
    if pending is not None:
        index.add(_short_successor(last_key), pending)
    index_handle = write_block(index.finish())
    footer = (metaindex + index_handle).ljust(40, b"\x00") + _MAGIC
    return bytes(out + footer)


# ------------------------------------------------------------------------------------- snappy


def _snappy_literal(data: bytes) -> bytes:
    n = len(data) - 1
    if n < 60:
        return bytes([n << 2]) + data
    width = (n.bit_length() + 7) // 8
    return bytes([(59 + width) << 2]) + n.to_bytes(width, "little") + data


def snappy_compress(data: bytes) -> bytes:
    """A small greedy raw-Snappy compressor using literals, 1-byte and 2-byte-offset copies."""
    out = bytearray(_varint(len(data)))
    seen: dict[bytes, int] = {}
    i = lit = 0
    while i + 4 <= len(data):
        cand = seen.get(data[i : i + 4])
        seen[data[i : i + 4]] = i
        if cand is None or i - cand > 0xFFFF:
            i += 1
            continue
        length = 4
        while i + length < len(data) and length < 64 and data[cand + length] == data[i + length]:
            length += 1
        if lit < i:
            out += _snappy_literal(data[lit:i])
        offset = i - cand
        if length <= 11 and offset < 2048:
            out += bytes([(offset >> 8) << 5 | (length - 4) << 2 | 1, offset & 0xFF])
        else:
            out += bytes([(length - 1) << 2 | 2]) + struct.pack("<H", offset)
        i += length
        lit = i
    if lit < len(data):
        out += _snappy_literal(data[lit:])
    return bytes(out)


# -------------------------------------------------------------------------------------- writer


def write_bundle(
    prefix: str | Path,
    tensors: Mapping[str, np.ndarray | torch.Tensor | Partitioned],
    num_shards: int = 1,
    restart_interval: int = 16,
    block_size: int = 262144,
    *,
    shard_of: Callable[[int, bytes], int] | None = None,
    big_endian: bool = False,
    compression: str = "none",
) -> list[Path]:
    """Write a bundle; return its files (index first). Defaults match ``tf.train.Saver``.

    Data entries go to shard ``shard_of(i, key)`` (default: round-robin ``i % num_shards`` over the
    sorted keys), each shard in key order. ``compression="snappy"`` stores every index block as
    raw Snappy (TF never writes that, but reads it).
    """
    if compression not in ("none", "snappy"):
        raise ValueError(f"compression must be 'none' or 'snappy', not {compression!r}")
    if not 1 <= num_shards <= 99999:
        raise ValueError("num_shards must be in 1..99999")
    for name in tensors:
        if not name or not re.fullmatch(r"[^\x00]+", name):
            raise ValueError(f"bad tensor name {name!r}")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Data goes out in tensor-name order, a partitioned variable's slices together (as tf.train.Saver).
    records = [r for name in sorted(tensors) for r in _records(name, tensors[name], big_endian)]
    assign = shard_of or (lambda i, key: i % num_shards)
    shards = [bytearray() for _ in range(num_shards)]
    entries = {b"": _header_proto(num_shards, big_endian)}
    data_index = 0
    for rec in records:
        if rec.data is None:
            entries[rec.key] = _entry_proto(rec.dtype, rec.shape, slices=rec.slices)
            continue
        shard = assign(data_index, rec.key)
        data_index += 1
        offset = len(shards[shard])
        shards[shard] += rec.data
        entries[rec.key] = _entry_proto(rec.dtype, rec.shape, shard, offset, len(rec.data), mask_crc(rec.crc))
    items = sorted(entries.items())
    files = [Path(f"{prefix}.index")]
    files[0].write_bytes(_table(items, restart_interval, block_size, compression))
    for i, blob in enumerate(shards):
        files.append(Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}"))
        files[-1].write_bytes(bytes(blob))
    return files
