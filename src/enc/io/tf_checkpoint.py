"""Read TensorFlow V2 checkpoints (tensor bundles) with numpy and the standard library only.

A bundle with prefix ``P`` is ``P.index``, a LevelDB-style SSTable mapping tensor names to
``BundleEntryProto`` messages, plus ``P.data-SSSSS-of-NNNNN`` shards holding raw tensor bytes at
``offset``/``size``. Every index block and every tensor read is checked against its masked CRC32C.
Partitioned variables are assembled from their slices; big-endian bundles are byte-swapped.
See ``albert_tf.md`` §3 for the format.

No TensorFlow and no protobuf library: the few messages involved are decoded by hand.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from math import prod
from pathlib import Path

import numpy as np
import torch

from enc.errors import CorruptCheckpoint, FormatError, MissingFile, UnsafeInput
from enc.io.dtypes import DType
from enc.io.lazy import LazyTensor, impossible_shape

__all__ = ["CRC32C_BACKEND", "TFCheckpoint", "crc32c", "mask_crc", "unmask_crc"]

# --------------------------------------------------------------------------------------------- CRC32C

_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """TensorFlow/LevelDB ``crc32c::Mask``: rotate right by 15 and add a constant."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def unmask_crc(masked: int) -> int:
    """Inverse of :func:`mask_crc`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()
_TABLE_LIST: list[int] = _TABLE.tolist()


def _crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Byte-at-a-time CRC32C; for short inputs."""
    reg = crc ^ _U32
    table = _TABLE_LIST
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ _U32


# The numpy fallback computes the raw CRC register (initial value 0, no final xor) of many
# equal-length lanes at once, then folds neighbouring lanes pairwise with the linear operator
# "append n zero bytes". Leading zero bytes leave a zero register unchanged, so the input is
# front-padded to whole blocks; the initial register is folded into the first four message bytes.
_LANE = 64  # bytes per lane
_LANES = 1 << 13  # lanes per block
_BLOCK = _LANE * _LANES  # 512 KiB


def _apply_cols(cols: list[int], x: int) -> int:
    out, i = 0, 0
    while x:
        if x & 1:
            out ^= cols[i]
        x >>= 1
        i += 1
    return out


@cache
def _zero_shift_tables() -> dict[int, np.ndarray]:
    """{n: (4, 256) uint32 tables of the operator "append n zero bytes"} for n = lane * 2**k."""
    # Columns of the one-zero-byte operator: images of each basis register bit.
    cols = [_TABLE_LIST[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
    out: dict[int, np.ndarray] = {}
    n = 1
    while n <= _BLOCK:
        if n >= _LANE:
            tables = np.zeros((4, 256), dtype=np.uint32)
            for j in range(4):
                for bit in range(8):
                    sel = (np.arange(256) >> bit) & 1 == 1
                    tables[j, sel] ^= np.uint32(cols[8 * j + bit])
            out[n] = tables
        cols = [_apply_cols(cols, c) for c in cols]  # square: operator for 2n zero bytes
        n *= 2
    return out


def _shift(tables: np.ndarray, reg: np.ndarray) -> np.ndarray:
    return (
        tables[0][reg & 0xFF]
        ^ tables[1][(reg >> 8) & 0xFF]
        ^ tables[2][(reg >> 16) & 0xFF]
        ^ tables[3][reg >> 24]
    )


def _raw_block(block: np.ndarray, shifts: dict[int, np.ndarray]) -> int:
    cols = np.ascontiguousarray(block.reshape(_LANES, _LANE).T)
    reg = np.zeros(_LANES, dtype=np.uint32)
    for j in range(_LANE):
        reg = _TABLE[(reg ^ cols[j]) & 0xFF] ^ (reg >> 8)
    n = _LANE
    while len(reg) > 1:
        reg = _shift(shifts[n], reg[0::2]) ^ reg[1::2]
        n *= 2
    return int(reg[0])


def _crc32c_numpy(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Vectorised CRC32C (a few hundred MB/s); used when no compiled package is installed."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf)
    if n < 4096:
        return _crc32c_python(data, crc)
    shifts = _zero_shift_tables()
    pad = (-n) % _BLOCK
    head_len = _BLOCK if _BLOCK - pad >= 4 else 2 * _BLOCK  # the first 4 data bytes must lie in the head
    head = np.zeros(head_len, dtype=np.uint8)
    head[pad:] = buf[: head_len - pad]
    head[pad : pad + 4] ^= np.frombuffer((crc ^ _U32).to_bytes(4, "little"), dtype=np.uint8)
    reg = np.zeros(1, dtype=np.uint32)
    blocks = [head[i : i + _BLOCK] for i in range(0, head_len, _BLOCK)]
    blocks += [buf[i : i + _BLOCK] for i in range(head_len - pad, n, _BLOCK)]
    for block in blocks:
        reg = _shift(shifts[_BLOCK], reg) ^ np.uint32(_raw_block(block, shifts))
    return int(reg[0]) ^ _U32


def _select_backend() -> tuple[Callable[[bytes | bytearray | memoryview, int], int], str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns when falling back to its pure-Python code
            import google_crc32c
        if google_crc32c.implementation == "c":
            extend = google_crc32c.extend
            chunk = 1 << 22

            def _google(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
                if isinstance(data, bytes):
                    return extend(crc, data)
                # extend() refuses a memoryview but takes a numpy array over the same bytes (no copy);
                # 4 MiB at a time, so other threads get the GIL between pieces
                arr = np.frombuffer(data, dtype=np.uint8)
                for i in range(0, len(arr), chunk):
                    crc = extend(crc, arr[i : i + chunk])
                return crc

            return _google, "google-crc32c"
    except ImportError:
        pass
    try:
        from crc32c import crc32c as _crc32c_fn  # ICRAR's crc32c package: crc32c(data, value)

        return (lambda data, crc=0: _crc32c_fn(data, crc)), "crc32c"
    except ImportError:
        pass
    return _crc32c_numpy, "numpy"


_crc32c_impl, CRC32C_BACKEND = _select_backend()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (the checksum of what came before)."""
    return _crc32c_impl(data, crc)


# ------------------------------------------------------------------------------------ wire decoding


class _Bad(Exception):
    """Internal decoding failure; re-raised as CorruptCheckpoint with the file's path."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Bad("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Bad("varint longer than 10 bytes")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of a protobuf message; LEN values as bytes."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
            yield num, wt, val
        elif wt == 1 or wt == 5:
            width = 8 if wt == 1 else 4
            if pos + width > len(buf):
                raise _Bad("fixed-width field runs past the end of its message")
            yield num, wt, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > len(buf):
                raise _Bad("length-delimited field runs past the end of its message")
            yield num, wt, buf[pos : pos + ln]
            pos += ln
        else:
            raise _Bad(f"unsupported protobuf wire type {wt}")


def _ints(wt: int, val: int | bytes) -> list[int]:
    """Values of a repeated integer field, packed or not."""
    if wt != 2:
        return [int(val)]  # type: ignore[arg-type]
    out, pos = [], 0
    assert isinstance(val, bytes)
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(v)
    return out


@dataclass(frozen=True)
class _Header:
    num_shards: int = 1
    big_endian: bool = False
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()


def _parse_header(buf: bytes) -> _Header:
    num_shards, endianness, producer, min_consumer, bad = 0, 0, 0, 0, []
    for num, wt, val in _fields(buf):
        if num == 1 and wt == 0:
            num_shards = _signed(int(val))  # type: ignore[arg-type]
        elif num == 2 and wt == 0:
            endianness = int(val)  # type: ignore[arg-type]
        elif num == 3 and wt == 2:
            for vnum, vwt, vval in _fields(val):  # type: ignore[arg-type]
                if vnum == 1 and vwt == 0:
                    producer = _signed(int(vval))  # type: ignore[arg-type]
                elif vnum == 2 and vwt == 0:
                    min_consumer = _signed(int(vval))  # type: ignore[arg-type]
                elif vnum == 3:
                    bad += _ints(vwt, vval)
    if endianness not in (0, 1):
        raise _Bad(f"unknown endianness {endianness} in bundle header")
    return _Header(num_shards, endianness == 1, producer, min_consumer, tuple(bad))


Extent = tuple[int, int]  # (start, length); length -1 = the whole dimension


@dataclass(frozen=True)
class _Entry:
    dtype: int = 0
    shape: tuple[int, ...] = ()
    unknown_rank: bool = False
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()


def _parse_shape(buf: bytes) -> tuple[tuple[int, ...], bool]:
    dims: list[int] = []
    unknown = False
    for num, wt, val in _fields(buf):
        if num == 2 and wt == 2:
            size = 0
            for dnum, dwt, dval in _fields(val):  # type: ignore[arg-type]
                if dnum == 1 and dwt == 0:
                    size = _signed(int(dval))  # type: ignore[arg-type]
            dims.append(size)
        elif num == 3 and wt == 0:
            unknown = bool(val)
    return tuple(dims), unknown


def _parse_slice(buf: bytes) -> tuple[Extent, ...]:
    extents: list[Extent] = []
    for num, wt, val in _fields(buf):
        if num == 1 and wt == 2:
            start, length = 0, -1  # no "length" (oneof has_length) = full extent
            for enum, ewt, evalue in _fields(val):  # type: ignore[arg-type]
                if enum == 1 and ewt == 0:
                    start = _signed(int(evalue))  # type: ignore[arg-type]
                elif enum == 2 and ewt == 0:
                    length = _signed(int(evalue))  # type: ignore[arg-type]
            extents.append((start, length))
    return tuple(extents)


def _parse_entry(buf: bytes) -> _Entry:
    f: dict[str, object] = {}
    slices: list[tuple[Extent, ...]] = []
    for num, wt, val in _fields(buf):
        if num == 1 and wt == 0:
            f["dtype"] = int(val)  # type: ignore[arg-type]
        elif num == 2 and wt == 2:
            f["shape"], f["unknown_rank"] = _parse_shape(val)  # type: ignore[arg-type]
        elif num in (3, 4, 5) and wt == 0:
            f[("shard_id", "offset", "size")[num - 3]] = _signed(int(val))  # type: ignore[arg-type]
        elif num == 6 and wt == 5:
            f["crc32c"] = int(val)  # type: ignore[arg-type]
        elif num == 7 and wt == 2:
            slices.append(_parse_slice(val))  # type: ignore[arg-type]
    return _Entry(slices=tuple(slices), **f)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ snappy


def _snappy_decompress(src: bytes) -> bytes:
    """Raw Snappy (no framing), as LevelDB stores compressed blocks."""
    expected, pos = _varint(src, 0)
    n = len(src)
    if expected > 22 * n + 64:  # a snappy copy op turns 3 bytes into at most 64: no real block expands more
        raise _Bad(f"snappy block claims {expected} bytes from {n}: corrupt")
    out = bytearray()
    while pos < n:
        if len(out) > expected:
            raise _Bad(f"snappy block decompresses past the {expected} bytes its header says")
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            ln = tag >> 2
            if ln >= 60:
                width = ln - 59
                ln = int.from_bytes(src[pos : pos + width], "little")
                pos += width
            ln += 1
            if pos + ln > n:
                raise _Bad("snappy literal runs past the end of the block")
            out += src[pos : pos + ln]
            pos += ln
            continue
        if kind == 1:
            ln, off = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | (src[pos] if pos < n else 0)
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            ln, off = (tag >> 2) + 1, int.from_bytes(src[pos : pos + width], "little")
            pos += width
        if pos > n or off == 0 or off > len(out):
            raise _Bad("snappy copy refers outside the decompressed data")
        start = len(out) - off
        if off >= ln:
            out += out[start : start + ln]
        else:  # overlapping copy repeats the last `off` bytes
            chunk = out[start:]
            out += (chunk * (ln // off + 1))[:ln]
    if len(out) != expected:
        raise _Bad(f"snappy block decompressed to {len(out)} bytes, header says {expected}")
    return bytes(out)


# ------------------------------------------------------------------------------------------ sstable

_TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")
_FOOTER_LEN = 48
_TRAILER_LEN = 5


def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    end = offset + size + _TRAILER_LEN
    if end > len(data) - _FOOTER_LEN:
        raise _Bad(f"truncated: {what} block at [{offset}, {end}) runs past the table")
    ctype = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if mask_crc(crc32c(data[offset : offset + size + 1])) != stored:
        raise _Bad(f"CRC32C mismatch in {what} block at offset {offset}")
    contents = data[offset : offset + size]
    if ctype == 1:
        return _snappy_decompress(contents)
    if ctype != 0:
        raise _Bad(f"unknown compression type {ctype} in {what} block at offset {offset}")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise _Bad("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (1 + num_restarts)
    if limit < 0:
        raise _Bad(f"block claims {num_restarts} restart points, more than fit in {len(block)} bytes")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise _Bad("block entry runs past the end of its block")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + vlen]
        pos += vlen


def _read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable held in memory, in stored order."""
    if len(data) < _FOOTER_LEN:
        raise _Bad(f"truncated: {len(data)} bytes, shorter than the {_FOOTER_LEN}-byte table footer")
    footer = data[-_FOOTER_LEN:]
    if footer[-8:] != _TABLE_MAGIC:
        raise _Bad("bad magic number: not a TensorFlow checkpoint index, or truncated")
    _, _, pos = _block_handle(footer)  # metaindex: always empty in bundles, not read (as TF)
    index_offset, index_size, _ = _block_handle(footer, pos)
    index = _read_block(data, index_offset, index_size, "index")
    for _, handle in _block_entries(index):
        offset, size, _ = _block_handle(handle)
        yield from _block_entries(_read_block(data, offset, size, "data"))


# ----------------------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class _DType:
    name: str
    numpy: str  # little-endian numpy dtype of the stored bytes
    torch_name: str  # by name: reading the index does not import torch (enc.lazytorch)

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.torch_name)


_BF16 = 14
_DTYPES: dict[int, _DType] = {
    1: _DType("DT_FLOAT", "<f4", "float32"),
    2: _DType("DT_DOUBLE", "<f8", "float64"),
    3: _DType("DT_INT32", "<i4", "int32"),
    4: _DType("DT_UINT8", "u1", "uint8"),
    5: _DType("DT_INT16", "<i2", "int16"),
    6: _DType("DT_INT8", "i1", "int8"),
    9: _DType("DT_INT64", "<i8", "int64"),
    10: _DType("DT_BOOL", "?", "bool"),
    _BF16: _DType("DT_BFLOAT16", "<u2", "bfloat16"),
    17: _DType("DT_UINT16", "<u2", "uint16"),
    19: _DType("DT_HALF", "<f2", "float16"),
    22: _DType("DT_UINT32", "<u4", "uint32"),
    23: _DType("DT_UINT64", "<u8", "uint64"),
}
_OTHER_DTYPES = {
    0: "DT_INVALID",
    7: "DT_STRING",
    8: "DT_COMPLEX64",
    18: "DT_COMPLEX128",
    20: "DT_RESOURCE",
    21: "DT_VARIANT",
}


def _dtype_name(code: int) -> str:
    if code in _DTYPES:
        return _DTYPES[code].name
    return _OTHER_DTYPES.get(code, f"DataType({code})")


# ------------------------------------------------------------------------------------ slice keys


def _ordered_num(v: int) -> bytes:
    """OrderedCode WriteNumIncreasing: a length byte, then big-endian bytes."""
    body = v.to_bytes((v.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def _ordered_signed(v: int) -> bytes:
    """OrderedCode WriteSignedNumIncreasing."""
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([0x80 ^ (v & 0xFF)])
    length = (x.bit_length() + 7) // 7  # bytes for a value of that many bits plus sign
    buf = bytearray(v.to_bytes(10, "big", signed=True)[10 - length :])
    headers = {
        2: (0xC0, 0),
        3: (0xE0, 0),
        4: (0xF0, 0),
        5: (0xF8, 0),
        6: (0xFC, 0),
        7: (0xFE, 0),
        8: (0xFF, 0),
        9: (0xFF, 0x80),
        10: (0xFF, 0xC0),
    }
    buf[0] ^= headers[length][0]
    buf[1] ^= headers[length][1]
    return bytes(buf)


def slice_key(name: str, extents: tuple[Extent, ...]) -> bytes:
    """``checkpoint::EncodeTensorNameSlice``: the index key of one slice of a partitioned variable."""
    escaped = re.sub(
        rb"[\x00\xff]",
        lambda m: m.group() + (b"\xff" if m.group() == b"\x00" else b"\x00"),
        name.encode("utf-8"),
    )
    out = bytearray(_ordered_num(0) + escaped + b"\x00\x01" + _ordered_num(len(extents)))
    for start, length in extents:
        out += _ordered_signed(start) + _ordered_signed(length)
    return bytes(out)


def _slice_spec(extents: tuple[Extent, ...]) -> str:
    """TF's text form of a slice, e.g. ``0,4:-``."""
    return ":".join("-" if ln == -1 else f"{s},{ln}" for s, ln in extents)


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _q(name: str) -> str:
    return name if name.isprintable() and name else repr(name)


# ------------------------------------------------------------------------------------- the reader

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_STATE_LINE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)


class TFCheckpoint:
    """A TensorFlow V2 checkpoint (tensor bundle), read lazily and verified.

    ``read`` returns numpy arrays; bfloat16 has no numpy dtype, so ``read`` widens it to float32
    (exactly) while ``read_torch`` returns true ``torch.bfloat16``. String, variant and resource
    entries (e.g. TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH``) are listed only by
    ``keys(include_non_numeric=True)``; reading them raises :class:`FormatError`.
    """

    def __init__(self, prefix: str | Path):
        self.prefix: Path = self.resolve(prefix)
        self.index_path: Path = Path(f"{self.prefix}.index")
        self._entries: dict[str, _Entry] = {}
        self._slices: dict[bytes, _Entry] = {}
        self._header = self._load_index()
        n = self._header.num_shards
        self._data_paths = [Path(f"{self.prefix}.data-{i:05d}-of-{n:05d}") for i in range(n)]
        self.files: list[Path] = [self.index_path, *self._data_paths]
        self._validate()

    # ------------------------------------------------------------------------------- locating

    @staticmethod
    def resolve(path: str | Path, confine: bool = False, notes: list[str] | None = None) -> Path:
        """The checkpoint prefix meant by ``path``: a prefix, ``*.index``/``*.data-*`` file or a directory.

        For a directory with a ``checkpoint`` state file, a checkpoint named inside the directory
        wins; one outside it (an absolute ``model_checkpoint_path`` or ``../``) is followed only
        when ``confine`` is false (never inside an archive), and then a sentence saying so is
        appended to ``notes``.
        """
        p = Path(path)
        if p.is_dir():
            return TFCheckpoint._resolve_dir(p, confine, notes)
        if p.name.endswith(".index"):
            if not p.is_file():
                raise MissingFile(p, "checkpoint index not found")
            return p.with_name(p.name[: -len(".index")])
        if Path(f"{p}.index").is_file():
            return p
        stem = _DATA_SUFFIX.sub("", p.name) if _DATA_SUFFIX.search(p.name) else None
        if stem is None and p.name.endswith(".meta"):
            stem = p.name[: -len(".meta")]
        if stem is not None and p.with_name(stem + ".index").is_file():
            return p.with_name(stem)
        if p.is_file():
            raise FormatError(p, f"not a TensorFlow V2 checkpoint: no {p.name}.index beside it")
        raise MissingFile(p, f"no such checkpoint: neither {p.name} nor {p.name}.index exists")

    @staticmethod
    def _resolve_dir(d: Path, confine: bool = False, notes: list[str] | None = None) -> Path:
        state = d / "checkpoint"
        if state.is_file():
            m = _STATE_LINE.search(state.read_text(encoding="utf-8", errors="replace"))
            if m is None:
                raise FormatError(state, "checkpoint state file has no model_checkpoint_path")
            ref = Path(re.sub(r"\\(.)", r"\1", m.group(1)))
            root = d.resolve()
            # Inside the directory first (a copied or moved release keeps its own files), then the name as written.
            inside = [c for c in ((d / ref) if not ref.is_absolute() else None, d / ref.name)
                      if c is not None and ref.name not in ("", ".", "..")
                      and _within(Path(f"{c}.index").resolve(), root)]
            for c in inside:
                if Path(f"{c}.index").is_file():
                    return c
            target = ref if ref.is_absolute() else d / ref
            if not _within(Path(f"{target}.index").resolve(), root):
                if confine:
                    raise UnsafeInput(state, f"model_checkpoint_path {str(ref)!r} points outside the archive; "
                                             "refusing to read files from elsewhere")
                if Path(f"{target}.index").is_file():
                    if notes is not None:
                        notes.append(f"{state}: model_checkpoint_path points outside {d} and no checkpoint of that "
                                     f"name is inside it; reading {Path(f'{target}.index').resolve()} and its data "
                                     "(recorded in enc_provenance.json)")
                    return target
            raise MissingFile(state, f"model_checkpoint_path {ref} has no .index file")
        if (d / "variables" / "variables.index").is_file():  # TF-Hub module / SavedModel
            return d / "variables" / "variables"
        found = sorted(d.glob("*.index"))
        if len(found) == 1:
            return found[0].with_name(found[0].name[: -len(".index")])
        if not found:
            raise MissingFile(
                d, "no TensorFlow checkpoint in directory (no *.index, checkpoint or variables/)"
            )
        names = ", ".join(f.name for f in found)
        raise FormatError(d, f"several checkpoints in directory and no 'checkpoint' state file: {names}")

    # ---------------------------------------------------------------------------------- index

    def _load_index(self) -> _Header:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            raise MissingFile(self.index_path, "checkpoint index not found") from None
        header: _Header | None = None
        prev: bytes | None = None
        try:
            for key, value in _read_table(data):
                if prev is not None and key <= prev:
                    raise _Bad(f"keys out of order at {key!r}")
                prev = key
                if key == b"":
                    header = _parse_header(value)
                elif key[0] == 0:
                    self._slices[key] = _parse_entry(value)
                else:
                    self._entries[key.decode("utf-8")] = _parse_entry(value)
        except _Bad as e:
            raise CorruptCheckpoint(self.index_path, str(e)) from None
        except UnicodeDecodeError:
            raise CorruptCheckpoint(self.index_path, f"tensor name is not UTF-8: {prev!r}") from None
        if header is None:
            raise CorruptCheckpoint(self.index_path, "bundle header entry missing")
        if header.num_shards < 1:
            raise CorruptCheckpoint(self.index_path, f"bundle header says {header.num_shards} data shards")
        if header.min_consumer > 1 or 1 in header.bad_consumers:
            raise FormatError(self.index_path, f"bundle format too new (min_consumer={header.min_consumer})")
        return header

    def _validate(self) -> None:
        """Fail early on missing shards, unknown shapes, bad sizes and entries past the end of a shard."""
        sizes: list[int] = []
        for p in self._data_paths:
            if not p.is_file():
                raise MissingFile(p, f"data shard missing (the index lists {len(self._data_paths)})")
            sizes.append(p.stat().st_size)
        for name, e in self._entries.items():
            if e.unknown_rank:
                raise FormatError(self.index_path, f"tensor {_q(name)} has unknown rank")
            if any(d < 0 for d in e.shape) or impossible_shape(e.shape):
                raise CorruptCheckpoint(self.index_path, f"tensor {_q(name)} has shape {list(e.shape)}")
            parts = [(name, e)]
            if e.slices:
                parts = [(f"{name}[{_slice_spec(s)}]", self._slice_entry(name, e, s)) for s in e.slices]
                if sum(prod(p.shape) for _, p in parts) != prod(e.shape):
                    raise CorruptCheckpoint(self.index_path, f"slices of tensor {_q(name)} do not cover it")
            for label, part in parts:
                if not 0 <= part.shard_id < len(sizes):
                    raise CorruptCheckpoint(
                        self.index_path,
                        f"tensor {_q(label)} in shard {part.shard_id}, but the bundle has {len(sizes)}",
                    )
                if part.dtype in _DTYPES:
                    need = prod(part.shape) * np.dtype(_DTYPES[part.dtype].numpy).itemsize
                    if part.size != need:
                        raise CorruptCheckpoint(
                            self.index_path,
                            f"size mismatch for tensor {_q(label)}: entry "
                            f"says {part.size} bytes, {_DTYPES[part.dtype].name} "
                            f"{list(part.shape)} needs {need}",
                        )
                end = part.offset + part.size
                if part.offset < 0 or end > sizes[part.shard_id]:
                    raise CorruptCheckpoint(
                        self._data_paths[part.shard_id],
                        f"truncated: tensor {_q(label)} "
                        f"needs bytes [{part.offset}, {end}), file has {sizes[part.shard_id]}",
                    )

    def _slice_entry(self, name: str, full: _Entry, extents: tuple[Extent, ...]) -> _Entry:
        spec = _slice_spec(extents)
        if len(extents) != len(full.shape):
            raise CorruptCheckpoint(self.index_path, f"slice {spec} of tensor {_q(name)} has the wrong rank")
        part = self._slices.get(slice_key(name, extents))
        if part is None:
            raise CorruptCheckpoint(
                self.index_path, f"slice {spec} of tensor {_q(name)} missing from the index"
            )
        want = tuple(d if ln == -1 else ln for (_, ln), d in zip(extents, full.shape, strict=True))
        inside = all(0 <= s and s + w <= d for (s, _), w, d in zip(extents, want, full.shape, strict=True))
        if part.shape != want or not inside or part.dtype != full.dtype:
            raise CorruptCheckpoint(
                self.index_path,
                f"slice {spec} of tensor {_q(name)} does not fit "
                f"{_dtype_name(full.dtype)} {list(full.shape)}",
            )
        return part

    # ------------------------------------------------------------------------------- metadata

    def keys(self, include_non_numeric: bool = False) -> list[str]:
        """Tensor names, sorted; without strings/variants/resources unless asked for."""
        return sorted(n for n, e in self._entries.items() if include_non_numeric or e.dtype in _DTYPES)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"TFCheckpoint({str(self.prefix)!r}, {len(self._entries)} tensors)"

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.index_path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def tf_dtype(self, name: str) -> str:
        """TensorFlow's name for the stored type, e.g. ``DT_FLOAT``."""
        return _dtype_name(self._entry(name).dtype)

    def _numeric(self, name: str) -> _DType:
        e = self._entry(name)
        if e.dtype not in _DTYPES:
            what = "string" if e.dtype == 7 else _dtype_name(e.dtype)
            raise FormatError(
                self.index_path, f"{what} tensor {_q(name)} not supported (numeric tensors only)"
            )
        return _DTYPES[e.dtype]

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of the stored type; an ``enc.io.dtypes.DType`` (equal to it, and torch-free:
        listing a bundle's tensors does not import torch) where it has one."""
        dt = self._numeric(name)
        try:
            return DType(dt.torch_name)
        except ValueError:  # unsigned 16-64 bit: no enc DType
            return dt.torch

    @property
    def big_endian(self) -> bool:
        return self._header.big_endian

    # ---------------------------------------------------------------------------------- bytes

    def _read_entry(self, label: str, e: _Entry, dt: _DType, verify: bool) -> np.ndarray:
        """Seek to one entry's bytes, read exactly those, check the CRC; a native-order array."""
        path = self._data_paths[e.shard_id]
        buf = np.empty(e.size, dtype=np.uint8)  # not bytearray: no zero-filling pass over the bytes
        view = memoryview(buf)
        got = 0
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(e.offset)
                while got < e.size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            raise MissingFile(path, "data shard missing") from None
        if got < e.size:
            raise CorruptCheckpoint(
                path,
                f"truncated: tensor {_q(label)} needs bytes "
                f"[{e.offset}, {e.offset + e.size}), file ends at {e.offset + got}",
            )
        if verify:
            actual, stored = crc32c(buf), unmask_crc(e.crc32c)
            if actual != stored:
                raise CorruptCheckpoint(
                    path,
                    f"CRC32C mismatch for tensor {_q(label)} "
                    f"(stored {stored:#010x}, computed {actual:#010x})",
                )
        arr = buf.view(dt.numpy).reshape(e.shape)
        if self._header.big_endian and arr.dtype.itemsize > 1:
            arr.byteswap(inplace=True)
        return arr

    def _read_array(self, name: str, verify: bool) -> np.ndarray:
        dt = self._numeric(name)
        e = self._entries[name]
        if not e.slices:
            return self._read_entry(name, e, dt, verify)
        out = np.empty(e.shape, dtype=dt.numpy)
        for extents in e.slices:
            part = self._slice_entry(name, e, extents)
            index = tuple(slice(s, s + w) for (s, _), w in zip(extents, part.shape, strict=True))
            out[index] = self._read_entry(f"{name}[{_slice_spec(extents)}]", part, dt, verify)
        return out

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 widened exactly to float32; see :meth:`read_torch`)."""
        arr = self._read_array(name, verify)
        if self._entries[name].dtype == _BF16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def read_torch(self, name: str, verify: bool = True) -> torch.Tensor:
        """The tensor as a torch tensor of :meth:`dtype` (bfloat16 included), sharing the read buffer."""
        arr = self._read_array(name, verify)
        if self._entries[name].dtype == _BF16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def lazy_tensors(self) -> dict[str, LazyTensor]:
        """One lazy tensor per numeric key; loading one reads only that tensor's bytes."""
        return {
            name: LazyTensor(self.shape(name), self.dtype(name), partial(self.read_torch, name), (name,),
                             raw=self.raw_tensor(name))
            for name in self.keys()
        }

    def raw_tensor(self, name: str):
        """Where the tensor's bytes are, with their CRC32C (enc.io.fastcopy); None if sliced or big-endian."""
        from enc.io.fastcopy import raw_source

        e = self._entries[name]
        if e.slices or self._header.big_endian or e.dtype not in _DTYPES:
            return None
        itemsize = np.dtype(_DTYPES[e.dtype].numpy).itemsize
        return raw_source(self._data_paths[e.shard_id], e.offset, e.size, e.shape, itemsize,
                          ("crc32c", unmask_crc(e.crc32c)), label=f"tensor {_q(name)}")
