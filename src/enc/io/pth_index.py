"""The index of a plain ``torch.save`` state dict (zip format), read without torch.

For a file that is a mapping of names to tensors (a Mistral ``consolidated.00.pth``), this returns
each tensor's shape, dtype, and where its bytes are (file offset, size, zip CRC-32), reading only
the zip directory, the local headers and ``data.pkl``. Nothing is executed: the pickle is read by
``pickle.Unpickler`` whose ``find_class`` resolves exactly three names to inert local functions
(``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter``,
``collections.OrderedDict``) and the ``torch.*Storage`` type names to records; any other global
makes it give up.

It is a fast path only: whenever the file is anything but the plain case (another global, a
non-tensor value, a compressed member, a tensor that is a view into part of a storage, legacy
format, big-endian data) :func:`read_index` returns None and the caller reads the file the
ordinary way, which owns every error message and the security checks of the full format.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from enc.io.dtypes import DType

_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
MAX_PICKLE = 64 * 2**20


@dataclass(frozen=True)
class IndexedTensor:
    shape: tuple[int, ...]
    dtype: DType
    offset: int  # of the bytes in the file
    nbytes: int
    crc32: int  # the zip member's CRC-32 (the tensor is its whole storage)
    key: str  # storage key (member data/KEY)


class _Decline(Exception):
    pass


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int and i >= 0 for i in x):
        raise _Decline(f"{what} is not a tuple of non-negative ints")
    return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage) or type(storage_offset) is not int:
        raise _Decline("unexpected tensor arguments")
    if backward_hooks not in (None,) and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise _Decline("tensor with backward hooks")
    if metadata not in (None,) and not (isinstance(metadata, dict) and not metadata):
        raise _Decline("tensor with metadata")
    return _TensorRef(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise _Decline("parameter of a non-tensor")
    return data


def _ordered_dict(*args):
    if args:
        raise _Decline("OrderedDict with arguments")
    return collections.OrderedDict()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise _Decline(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Decline("unexpected persistent id")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Decline("unexpected storage record")
        return _Storage(key, stype.dtype, numel)


def _data_offset(f, info: zipfile.ZipInfo, size: int) -> int:
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise _Decline("bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > size:
        raise _Decline("member past the end of the file")
    return start


def read_index(path: str | Path) -> dict[str, IndexedTensor] | None:
    """name -> :class:`IndexedTensor` for a plain state dict, or None (read it the ordinary way)."""
    path = Path(path)
    try:
        return _read(path)
    except (_Decline, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
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
            obj = _Unpickler(zf.open(pkl[0])).load()
        if not isinstance(obj, dict) or not obj:
            return None
        out: dict[str, IndexedTensor] = {}
        for name, t in obj.items():
            if not isinstance(name, str) or not isinstance(t, _TensorRef):
                return None
            dt = DType(t.storage.dtype)
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
