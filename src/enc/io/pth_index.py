"""The index of a plain ``torch.save`` state dict (zip format), read without torch.

For a file that is a mapping of names to tensors (a Mistral ``consolidated.00.pth``), this returns
each tensor's shape, dtype, and where its bytes are (file offset, size, zip CRC-32), reading only
the zip directory, the local headers and ``data.pkl``. Nothing is executed: the pickle is read by
:mod:`enc.io.torch_meta`'s restricted unpickler (a fixed set of names, each mapped to an inert record;
any other global makes it give up), the one Megatron's torch-free reader uses too.

It is a fast path only: whenever the file is anything but the plain case (another global, a
non-tensor value, a compressed member, a tensor that is a view into part of a storage, legacy
format, big-endian data) :func:`read_index` returns None and the caller reads the file the
ordinary way, which owns every error message and the security checks of the full format.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

from enc.io.dtypes import DType
from enc.io.torch_meta import Decline, RefStorages, TensorRef

MAX_PICKLE = 64 * 2**20


@dataclass(frozen=True)
class IndexedTensor:
    shape: tuple[int, ...]
    dtype: DType
    offset: int  # of the bytes in the file
    nbytes: int
    crc32: int  # the zip member's CRC-32 (the tensor is its whole storage)
    key: str  # storage key (member data/KEY)


def _data_offset(f, info: zipfile.ZipInfo, size: int) -> int:
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise Decline("bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > size:
        raise Decline("member past the end of the file")
    return start


def read_index(path: str | Path) -> dict[str, IndexedTensor] | None:
    """name -> :class:`IndexedTensor` for a plain state dict, or None (read it the ordinary way)."""
    path = Path(path)
    try:
        return _read(path)
    except (Decline, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, RecursionError, struct.error, MemoryError, RuntimeError,
            NotImplementedError, OverflowError):
        return None


def _read(path: Path) -> dict[str, IndexedTensor] | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            return None
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pkl) != 1:
                return None
            prefix = pkl[0].filename[: -len("data.pkl")]
            members = {i.filename[len(prefix):]: i for i in infos if i.filename.startswith(prefix)}
            if any(i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size or i.flag_bits & 0x1
                   for i in infos):
                return None
            order = members.get("byteorder")
            if order is not None and zf.read(order).strip() != b"little":
                return None
            if pkl[0].file_size > MAX_PICKLE:
                return None
            obj = RefStorages.unpickle(zf.open(pkl[0]), RefStorages(), str(path))
        if not isinstance(obj, dict) or not obj:
            return None
        out: dict[str, IndexedTensor] = {}
        for name, t in obj.items():
            if not isinstance(name, str) or not isinstance(t, TensorRef) or t.storage.view_offset:
                return None
            dt = t.storage.dtype
            n = prod(t.shape)
            contiguous = all(s == prod(t.shape[i + 1:]) for i, s in enumerate(t.stride) if t.shape[i] > 1)
            if t.offset != 0 or n != t.storage.numel or not contiguous or len(t.stride) != len(t.shape):
                return None  # a view into part of a storage: the ordinary reader handles it
            info = members.get(f"data/{t.storage.key}")
            if info is None or info.file_size != n * dt.itemsize:
                return None
            off = _data_offset(f, info, size)
            out[name] = IndexedTensor(t.shape, dt, off, info.file_size, info.CRC, t.storage.key)
        return out
