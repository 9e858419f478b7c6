"""Lazy, safe reading of ``torch.save`` files (Megatron's ``model_optim_rng.pt``).

The pickle is read by torch's weights-only unpickler with an explicit allow-list: plain containers,
tensors, ``argparse.Namespace`` / ``types.SimpleNamespace`` and inert stand-ins for the few classes a real Megatron checkpoint
names (its enums, old fp16 loss scalers, numpy RNG state). A stand-in records the arguments it is
given and runs nothing. Any other global is refused with :class:`~enc.errors.UnsafeInput` before
anything is called.

Tensors are not read while unpickling: each storage becomes a meta-device placeholder, and every
tensor of the tree comes back as a :class:`StoredTensor` (where its bytes are in the file). Bytes are
read one tensor at a time, straight from the file, with the zip CRC checked when a tensor spans its
whole storage. Both formats torch writes are handled: the zip format (torch >= 1.6) and the legacy
format (a pickle followed by the raw storages, what the 2019-2020 Megatron releases contain).

The file may be a byte range of a larger file (a member STORED in an outer zip): see
:class:`ByteRange`, so an NGC zip is read in place without extraction.

``load_lazy(..., torch_free=True)`` (Megatron's reader, unless ``ENC_FASTCOPY=0``) first unpickles with
:mod:`enc.io.torch_meta`, a restricted ``pickle.Unpickler`` that needs no torch (same allow-list, same
checks, the same tree with :class:`~enc.io.dtypes.DType` dtypes); whatever it declines is read here.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import struct
import types
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from enc.errors import CorruptCheckpoint, FormatError, UnsafeInput
from enc.io.crc import crc32
from enc.io.dtypes import as_torch
from enc.io.lazy import LazyTensor

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# --------------------------------------------------------------------------- allow-list


class InertStandIn:
    """Stands in for a class named by a checkpoint's pickle. Stores its inputs; executes nothing."""

    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The enum value (``ModelType(1)`` pickles as the class called with its value)."""
        return self.args[0] if self.args else None

    @property
    def name(self) -> str:
        return f"{self.qualname}({self.value!r})"

    def __repr__(self) -> str:
        return f"<stand-in {self.qualname} args={self.args!r}>"


def _stand_in(qualname: str) -> type:
    short = qualname.rsplit(".", 1)[1]
    return type(short, (InertStandIn,), {"qualname": qualname, "__module__": __name__})


# Classes a real Megatron checkpoint holds (argparse args, enums in args, fp16 loss scalers of 2019-2020
# optimizer state, numpy RNG state, rerun-state-machine and TE extra state in recent ones).
STAND_IN_NAMES: tuple[str, ...] = (
    "megatron.model.enums.ModelType",
    "megatron.model.enums.LayerType",
    "megatron.model.enums.AttnType",
    "megatron.model.enums.AttnMaskType",
    "megatron.model.enums.PositionEmbeddingType",
    "megatron.legacy.model.enums.LayerType",
    "megatron.legacy.model.enums.AttnType",
    "megatron.legacy.model.enums.AttnMaskType",
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.fp16.loss_scaler.LossScaler",
    "megatron.fp16.loss_scaler.DynamicLossScaler",
    "megatron.fp16_deprecated.loss_scaler.LossScaler",
    "megatron.fp16_deprecated.loss_scaler.DynamicLossScaler",
    "fp16.loss_scaler.LossScaler",
    "fp16.loss_scaler.DynamicLossScaler",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "io.BytesIO",
    "_io.BytesIO",
    "pathlib.PosixPath",
    "pathlib._local.PosixPath",
    "signal.Signals",
    "torch._C.Generator",
)
STAND_INS: dict[str, type] = {name: _stand_in(name) for name in STAND_IN_NAMES}


def allow_list() -> list:
    """Entries for ``torch.serialization.safe_globals``: the real (inert) namespaces plus the stand-ins."""
    return [argparse.Namespace, types.SimpleNamespace, *((cls, name) for name, cls in STAND_INS.items())]


# --------------------------------------------------------------------------- byte ranges


@dataclass(frozen=True)
class ByteRange:
    """A file, or a byte range of one (a member STORED uncompressed in a zip)."""

    path: Path
    offset: int
    size: int
    label: str  # how errors name it, e.g. "ckpt.zip:release/mp_rank_00/model_optim_rng.pt"
    crc32: int | None = None  # a STORED zip member's CRC-32 (the whole range), from the zip's directory

    @classmethod
    def whole_file(cls, path: Path, label: str | None = None) -> ByteRange:
        return cls(Path(path), 0, Path(path).stat().st_size, label or str(path))

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(_RangeReader(self), buffer_size=1 << 16)


class _RangeReader(io.RawIOBase):
    def __init__(self, rng: ByteRange):
        self._f = open(rng.path, "rb")  # noqa: SIM115 - closed by close()
        self._start, self._size, self._pos = rng.offset, rng.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        self._f.close()
        super().close()


def zip_member_offset(f: io.BufferedIOBase, info: zipfile.ZipInfo) -> int:
    """Offset of a zip member's data: its local header is 30 bytes + name + extra field."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


# --------------------------------------------------------------------------- stored tensors


@dataclass(frozen=True)
class Storage:
    """Where one torch storage's bytes are: ``nbytes`` at ``offset`` within ``file``'s range (CRC when known)."""

    file: ByteRange
    offset: int
    nbytes: int
    crc32: int | None
    key: str


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a checkpoint, not yet read: its storage, offset (elements), shape and stride."""

    storage: Storage
    dtype: torch.dtype  # or an enc.io.dtypes.DType (the torch-free reader's)
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def span(self) -> int:
        """Elements of storage the tensor touches, from its offset."""
        if prod(self.shape) == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))

    def read(self) -> torch.Tensor:
        dtype = as_torch(self.dtype)
        if prod(self.shape) == 0:
            return torch.empty(self.shape, dtype=dtype)
        isz = self.dtype.itemsize
        start, n = self.offset * isz, self.span * isz
        st = self.storage
        if start + n > st.nbytes:
            raise CorruptCheckpoint(st.file.label, f"tensor in storage {st.key} runs past its end")
        buf = bytearray(n)
        whole = start == 0 and n == st.nbytes
        with st.file.open() as f:
            if st.crc32 is not None and not whole:  # a view: check its storage's CRC once, streaming
                _verify_storage(f, st)
            f.seek(st.offset + start)
            if f.readinto(buf) != n:
                raise CorruptCheckpoint(st.file.label, f"truncated checkpoint: storage {st.key} is cut short")
        if st.crc32 is not None and whole and crc32(buf) != st.crc32:
            raise CorruptCheckpoint(st.file.label, f"corrupted checkpoint: CRC mismatch in storage {st.key}")
        flat = torch.frombuffer(buf, dtype=dtype)
        t = flat.as_strided(self.shape, self.stride, 0)
        return t if t.is_contiguous() and t.numel() == flat.numel() else t.clone()

    def raw(self, name: str):
        """Where the bytes are (enc.io.fastcopy), if the tensor is C-contiguous in its storage; the zip CRC
        comes along when it spans the whole storage (as :meth:`read` checks it)."""
        from enc.io.fastcopy import raw_source

        n = prod(self.shape)
        isz = self.dtype.itemsize
        contiguous = all(st == prod(self.shape[i + 1:]) for i, st in enumerate(self.stride) if self.shape[i] > 1)
        start, nbytes = self.offset * isz, n * isz
        st = self.storage
        if not n or not contiguous or self.offset < 0 or start + nbytes > st.nbytes \
                or st.offset + st.nbytes > st.file.size:
            return None
        check = ("crc32", st.crc32) if st.crc32 is not None and start == 0 and nbytes == st.nbytes else None
        return raw_source(st.file.path, st.file.offset + st.offset + start, nbytes, self.shape, isz, check,
                          label=f"{st.file.label}: {name}")

    def lazy(self, name: str) -> LazyTensor:
        return LazyTensor(self.shape, self.dtype, self.read, (name,), raw=self.raw(name))


_VERIFIED: set[tuple[str, int, int, int]] = set()  # storages whose CRC was checked in full


def _verify_storage(f: io.BufferedReader, st: Storage) -> None:
    """The zip CRC32 of a whole storage, read in 4 MiB blocks (memory stays bounded)."""
    key = (str(st.file.path), st.file.offset + st.offset, st.nbytes, st.crc32 or 0)
    if key in _VERIFIED:
        return
    f.seek(st.offset)
    crc, left = 0, st.nbytes
    while left:
        block = f.read(min(left, 1 << 22))
        if not block:
            raise CorruptCheckpoint(st.file.label, f"truncated checkpoint: storage {st.key} is cut short")
        crc = crc32(block, crc)
        left -= len(block)
    if crc != st.crc32:
        raise CorruptCheckpoint(st.file.label, f"corrupted checkpoint: CRC mismatch in storage {st.key}")
    _VERIFIED.add(key)


def check_layout(label: str, what: str, shape: tuple[int, ...], stride: tuple[int, ...], offset: int,
                 storage_numel: int) -> None:
    """Refuse a tensor that reads outside its storage or whose elements overlap (stride 0, ``expand``):
    such a tensor would turn a few stored bytes into an arbitrarily large output."""
    from enc.io.lazy import impossible_shape

    if len(stride) != len(shape) or any(s < 0 for s in stride) or offset < 0 or impossible_shape(shape):
        raise CorruptCheckpoint(label, f"{what}: invalid layout (shape {list(shape)}, stride {list(stride)})")
    if prod(shape) == 0:
        return
    reach = 0  # highest element offset reachable through the dimensions seen so far
    for st, size in sorted((s, n) for s, n in zip(stride, shape, strict=True) if n > 1):
        if st <= reach:
            raise UnsafeInput(label, f"{what}: shape {list(shape)} with stride {list(stride)} repeats stored "
                                     "elements (an expanded/stride-0 tensor); refusing it, its output could be far "
                                     "larger than the file")
        reach += (size - 1) * st
    if offset + reach + 1 > storage_numel:
        raise CorruptCheckpoint(label, f"{what}: shape {list(shape)} needs {offset + reach + 1} elements of its "
                                       f"storage, which holds {storage_numel}")


# --------------------------------------------------------------------------- unpickling


class _MetaStorages:
    """persistent_load for the weights-only unpickler: meta placeholders, remembered by identity."""

    def __init__(self) -> None:
        self.by_cdata: dict[int, tuple[str, torch.dtype, int, int]] = {}  # -> key, dtype, numel, view offset
        self._keep: list = []

    def __call__(self, pid: Any):
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        stype, key, numel = pid[1], str(pid[2]), int(pid[4])
        dtype = getattr(stype, "dtype", torch.uint8)
        view_offset = 0
        if len(pid) > 5 and pid[5] is not None:  # legacy storage view: (view_key, offset, view_size)
            _view_key, view_offset, numel = pid[5]
        us = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
        self._keep.append(us)
        self.by_cdata[us._cdata] = (key, dtype, int(numel), int(view_offset))
        return torch.storage.TypedStorage(wrap_storage=us, dtype=dtype, _internal=True)

    unpickle = staticmethod(lambda f, persistent_load, label: _unpickle(f, persistent_load, label))

    @staticmethod
    def is_tensor(obj: Any) -> bool:
        return isinstance(obj, torch.Tensor)

    def describe(self, t: torch.Tensor):
        """(storage entry or None, dtype, shape, stride, storage offset) of a meta tensor."""
        return (self.by_cdata.get(t.untyped_storage()._cdata), t.dtype, tuple(t.shape), tuple(t.stride()),
                t.storage_offset())


def _unpickle(f: io.BufferedIOBase, persistent_load: Any, label: str) -> Any:
    from torch import _weights_only_unpickler

    try:
        with torch.serialization.safe_globals(allow_list()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below if it matters
            u = _weights_only_unpickler.Unpickler(f, encoding="utf-8")
            u.persistent_load = persistent_load
            return u.load()
    except pickle.UnpicklingError as e:
        if not f.read(1):  # the stream ran out mid-pickle: truncation, whatever the last opcode said
            raise CorruptCheckpoint(label, "truncated checkpoint: the pickle ends early") from None
        raise _pickle_error(label, str(e)) from None
    except (EOFError, struct.error, UnicodeDecodeError, IndexError, KeyError, ValueError, TypeError,
            RuntimeError, AttributeError) as e:
        raise CorruptCheckpoint(label, f"truncated or corrupted pickle ({type(e).__name__}: {_first_line(e)})") from None


def _pickle_error(label: str, msg: str) -> Exception:
    refused = ("Unsupported global", "unrecognized function", "blocked", "Can only build", "Can only create",
               "persistent_load")
    if any(s in msg for s in refused):
        m = re.search(r"GLOBAL (\S+)|function (\S+)|got (\S+)", msg)
        what = next((g for g in m.groups() if g), "a disallowed global").rstrip(".,") if m else "a disallowed global"
        return UnsafeInput(label, f"pickle refers to {what}, which is not on enc's allow-list; refusing to load it "
                                  "(nothing was executed)")
    return CorruptCheckpoint(label, f"corrupted pickle: {msg.strip().splitlines()[0][:160] if msg.strip() else '?'}")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:160] if s else "unreadable"


def _replace_tensors(obj: Any, make, is_tensor=lambda o: isinstance(o, torch.Tensor)) -> Any:
    """Rebuild containers with every (meta) tensor replaced by ``make(tensor)``."""
    if is_tensor(obj):
        return make(obj)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = _replace_tensors(v, make, is_tensor)
        return out
    if isinstance(obj, list):
        return [_replace_tensors(v, make, is_tensor) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_tensors(v, make, is_tensor) for v in obj)
    return obj


def load_lazy(src: ByteRange, torch_free: bool = False) -> Any:
    """The object tree of a ``torch.save`` file, tensors as :class:`StoredTensor` (nothing read yet).

    ``torch_free``: unpickle with :mod:`enc.io.torch_meta` (no torch import; tensors' dtypes are
    :class:`~enc.io.dtypes.DType`) when it can; anything it declines, and every error, is read again
    by torch's weights-only unpickler below, which owns the messages and the refusals.
    """
    if torch_free:
        from enc.io.torch_meta import Decline, RefStorages

        try:
            return _load(src, RefStorages)
        except (Decline, Exception):  # noqa: BLE001 - the torch path reads it again and reports
            pass
    return _load(src, _MetaStorages)


def _load(src: ByteRange, mode) -> Any:
    with src.open() as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"PK":
            return _load_zip_format(src, f, mode)
        if magic[:1] == b"\x80":
            return _load_legacy_format(src, f, mode)
    if not magic:
        raise CorruptCheckpoint(src.label, "empty file")
    raise CorruptCheckpoint(src.label, "not a torch checkpoint (neither torch's zip format nor its legacy pickle format)")


def _load_zip_format(src: ByteRange, f: io.BufferedReader, mode=_MetaStorages) -> Any:
    try:
        zf = zipfile.ZipFile(f)
        infos = {i.filename: i for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CorruptCheckpoint(src.label, f"truncated or corrupted torch checkpoint: {_first_line(e)}") from None
    pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CorruptCheckpoint(src.label, "torch zip checkpoint without a (single) data.pkl record")
    if any(i.flag_bits & 0x1 for i in infos.values()):
        raise CorruptCheckpoint(src.label, "a zip member is marked encrypted (damaged, or not written by torch)")
    if infos[pkls[0]].compress_type != zipfile.ZIP_STORED:
        raise UnsafeInput(src.label, f"{pkls[0]} is compressed; torch never writes that (a decompression bomb?), "
                                     "refusing it")
    prefix = pkls[0][: -len("data.pkl")]
    from enc.io.archives import ZIP_ERRORS, zip_reason

    order = infos.get(prefix + "byteorder")
    try:
        if order is not None and zf.read(order).strip() == b"big":
            raise FormatError(src.label, "big-endian torch checkpoints are not supported")
        pkl_bytes = zf.read(pkls[0])
    except ZIP_ERRORS as e:
        raise CorruptCheckpoint(src.label, f"corrupted torch checkpoint: {zip_reason(e)}") from None
    metas = mode()
    tree = mode.unpickle(io.BufferedReader(io.BytesIO(pkl_bytes)), metas, src.label)  # type: ignore[arg-type]

    storages: dict[str, Storage] = {}
    for key, dtype, numel, _ in metas.by_cdata.values():
        if key in storages:
            continue
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CorruptCheckpoint(src.label, f"storage {key} is missing from the checkpoint")
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(src.label, f"storage {key} is compressed; torch never writes that")
        if info.file_size < numel * dtype.itemsize:
            raise CorruptCheckpoint(src.label, f"storage {key} holds {info.file_size} bytes, needs {numel * dtype.itemsize}")
        try:
            off = zip_member_offset(f, info)
        except ZIP_ERRORS as e:
            raise CorruptCheckpoint(src.label, f"corrupted torch checkpoint: {zip_reason(e)}") from None
        if off + info.file_size > src.size:
            raise CorruptCheckpoint(src.label, f"truncated checkpoint: storage {key} runs past the end of the file")
        storages[key] = Storage(src, off, info.file_size, info.CRC, key)
    return _with_stored(tree, metas, storages, src.label)


def _load_legacy_format(src: ByteRange, f: io.BufferedReader, mode=_MetaStorages) -> Any:
    def plain() -> Any:
        return mode.unpickle(f, _no_persistent, src.label)

    magic = plain()
    if magic != LEGACY_MAGIC:
        raise CorruptCheckpoint(src.label, "not a torch checkpoint (bad magic number)")
    protocol = plain()
    if protocol != 1001:
        raise FormatError(src.label, f"unsupported legacy torch protocol {protocol!r}")
    sys_info = plain()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise FormatError(src.label, "big-endian torch checkpoints are not supported")
    metas = mode()
    tree = mode.unpickle(f, metas, src.label)
    keys = plain()
    if not isinstance(keys, list):
        raise CorruptCheckpoint(src.label, "corrupted legacy checkpoint: no storage key list")
    dtypes = {key: (dtype, numel) for key, dtype, numel, view in metas.by_cdata.values() if view == 0}
    for key, dtype, _numel, _view in metas.by_cdata.values():
        dtypes.setdefault(key, (dtype, -1))
    storages: dict[str, Storage] = {}
    pos = f.tell()
    # each storage's 8-byte length is read unbuffered: a buffered read would fill 64 KiB to return 8 bytes,
    # once per storage (400 storages for BERT-345M: 26 MB read, ~50 ms)
    raw = getattr(f, "raw", f)
    for key in keys:
        key = str(key)
        if key not in dtypes:
            raise CorruptCheckpoint(src.label, f"storage {key} is listed but no tensor uses it")
        dtype, _ = dtypes[key]
        if pos + 8 > src.size:
            raise CorruptCheckpoint(src.label, "truncated checkpoint: storages end early")
        raw.seek(pos)
        head = raw.read(8)
        if head is None or len(head) != 8:
            raise CorruptCheckpoint(src.label, "truncated checkpoint: storages end early")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * dtype.itemsize
        if numel < 0 or pos + 8 + nbytes > src.size:
            raise CorruptCheckpoint(src.label, f"truncated checkpoint: storage {key} runs past the end of the file")
        storages[key] = Storage(src, pos + 8, nbytes, None, key)
        pos += 8 + nbytes
    return _with_stored(tree, metas, storages, src.label)


def _no_persistent(pid: Any):
    raise pickle.UnpicklingError("unsupported persistent id encountered")


def _with_stored(tree: Any, metas: _MetaStorages, storages: dict[str, Storage], label: str) -> Any:
    def make(t) -> StoredTensor:
        entry, dtype, shape, stride, t_offset = metas.describe(t)
        if entry is None:
            raise CorruptCheckpoint(label, "tensor without a storage in the checkpoint")
        key, _dtype, _numel, view_offset = entry
        if key not in storages:
            raise CorruptCheckpoint(label, f"storage {key} is missing from the checkpoint")
        st = StoredTensor(storages[key], dtype, shape, stride, view_offset + t_offset)
        check_layout(label, f"a tensor in storage {key}", st.shape, st.stride, st.offset,
                     storages[key].nbytes // max(1, dtype.itemsize))
        return st

    return _replace_tensors(tree, make, metas.is_tensor)


def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, StoredTensor]]:
    """(dotted path, tensor) for every tensor of a tree; list items are numbered."""
    if isinstance(tree, StoredTensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))
