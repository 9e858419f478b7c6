"""Keras 3 ``.weights.h5`` files (``model.save_weights`` / keras-hub presets), read with h5py.

Keras 3 stores each variable as an H5 dataset at ``<layer path>/vars/<i>`` (``i`` = the position
in ``layer.weights``: Dense 0 kernel, 1 bias; LayerNormalization 0 gamma, 1 beta; Embedding 0).
Layers held in a container are named by class (``dense``, ``dense_1``, ...), not by their Keras
``name``; since Keras 3.x the ``vars`` group carries the layer name as an attribute ``name``.

Nothing here imports Keras or TensorFlow. Shapes, dtypes and storage sizes are checked against
the file before a tensor is read, and a damaged file is reported as :class:`CorruptCheckpoint`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from enc.errors import CorruptCheckpoint, FormatError
from enc.io.dtypes import DType
from enc.io.fastcopy import RawTensor, raw_source
from enc.io.lazy import LazyTensor

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# by name (enc.io.dtypes): listing a file's variables does not import torch
_DTYPES = {np.dtype("float32"): DType("float32"), np.dtype("float16"): DType("float16"),
           np.dtype("float64"): DType("float64"), np.dtype("int32"): DType("int32"), np.dtype("int64"): DType("int64")}
MAX_DIMS = 8


@dataclass(frozen=True)
class H5Var:
    path: str           # "layers/dense/vars/0"
    shape: tuple[int, ...]
    dtype: DType        # equal to the torch dtype of its name
    layer_name: str | None  # the ``name`` attribute of the enclosing ``vars`` group, when Keras wrote one
    raw: RawTensor | None = None  # where its bytes lie in the file, when they simply lie there (see _raw)


def is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _open(path: Path):
    import h5py

    if not is_hdf5(path):
        raise FormatError(path, "not an HDF5 file (a Keras .weights.h5 starts with the HDF5 signature)")
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(path, f"unreadable HDF5 file ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def list_vars(path: Path) -> dict[str, H5Var]:
    """Every dataset of a Keras weights file, by its H5 path."""
    import h5py

    path = Path(path)
    out: dict[str, H5Var] = {}
    with _open(path) as f:
        def visit(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            np_dtype = obj.dtype
            if np_dtype not in _DTYPES:
                raise FormatError(path, f"dataset {name} has dtype {np_dtype}, which enc does not read")
            shape = tuple(int(d) for d in obj.shape)
            if len(shape) > MAX_DIMS:
                raise CorruptCheckpoint(path, f"dataset {name} has {len(shape)} dimensions")
            attr = obj.parent.attrs.get("name")
            if isinstance(attr, bytes):
                attr = attr.decode("utf-8", "replace")
            out[name] = H5Var(name, shape, _DTYPES[np_dtype], attr if isinstance(attr, str) else None,
                              _raw(path, name, obj, shape, size, no_userblock))

        try:
            size = os.stat(path).st_size if f.driver == "sec2" else -1  # the default driver: one plain file
            no_userblock = f.id.get_create_plist().get_userblock() == 0
            f.visititems(visit)
        except (OSError, RuntimeError, KeyError) as e:
            raise CorruptCheckpoint(path, f"damaged HDF5 structure ({_reason(e)})") from None
    return out


def _raw(path: Path, name: str, ds, shape: tuple[int, ...], file_size: int, no_userblock: bool) -> RawTensor | None:
    """A byte recipe for a dataset whose elements lie in the file as they are: contiguous layout (not
    chunked, not compact), no filter (no compression, no checksum, no shuffle), little-endian, allocated,
    its storage exactly the shape's bytes and inside the file, and no user block before HDF5's base
    address. Anything else is read by h5py (None)."""
    import h5py

    if sys.byteorder != "little" or file_size < 0 or not no_userblock:
        return None
    try:
        dcpl = ds.id.get_create_plist()
        if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters() != 0:
            return None
        if ds.chunks is not None or ds.compression is not None or ds.dtype.byteorder not in ("<", "|", "="):
            return None
        offset = ds.id.get_offset()  # None: never written (no storage allocated)
        storage = ds.id.get_storage_size()
    except (OSError, RuntimeError, KeyError, ValueError, TypeError):
        return None
    nbytes = prod(shape) * ds.dtype.itemsize
    if nbytes == 0:  # nothing to read (HDF5 allocates no storage for it)
        return raw_source(path, 0, 0, shape, ds.dtype.itemsize, None, name)
    if offset is None or not isinstance(offset, int) or offset < 0 or storage != nbytes \
            or offset + nbytes > file_size:
        return None
    # HDF5 itself reads the first and the last element (it checks them against the file's end of
    # allocation and resolves the address as it does for the whole read): they must be the bytes there
    item = ds.dtype.itemsize
    with open(path, "rb") as fh:
        for k in {0, prod(shape) - 1}:
            try:
                got = np.asarray(ds[np.unravel_index(k, shape) if shape else ()], dtype=ds.dtype).tobytes()
            except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError):
                return None
            if os.pread(fh.fileno(), item, offset + k * item) != got:
                return None
    return raw_source(path, offset, nbytes, shape, item, None, name)


def group_attr(path: Path, group: str, attr: str = "name") -> str | None:
    """An attribute of a group (``layers/transformer_encoder/vars`` -> its ``name``), or None."""
    with _open(Path(path)) as f:
        try:
            obj = f.get(group)
            value = None if obj is None else obj.attrs.get(attr)
        except (OSError, RuntimeError, KeyError) as e:
            raise CorruptCheckpoint(path, f"damaged HDF5 structure ({_reason(e)})") from None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _load(path: Path, var: H5Var) -> torch.Tensor:
    with _open(path) as f:
        try:
            ds = f[var.path]
            if tuple(ds.shape) != var.shape:
                raise CorruptCheckpoint(path, f"dataset {var.path} changed shape while converting")
            storage = ds.id.get_storage_size()
            need = prod(var.shape) * ds.dtype.itemsize
            if ds.chunks is None and ds.compression is None and storage < need:
                raise CorruptCheckpoint(path, f"dataset {var.path} holds {storage} bytes, its shape needs {need}")
            arr = np.empty(var.shape, dtype=ds.dtype)
            if arr.size:
                ds.read_direct(arr)
        except CorruptCheckpoint:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CorruptCheckpoint(path, f"cannot read dataset {var.path} ({_reason(e)})") from None
    return torch.from_numpy(arr)


def lazy_tensors(path: Path, prefix: str = "") -> dict[str, LazyTensor]:
    """Every dataset as a LazyTensor named ``prefix + h5 path``."""
    path = Path(path)
    return {prefix + name: LazyTensor(v.shape, v.dtype, (lambda v=v: _load(path, v)), (prefix + name,), raw=v.raw)
            for name, v in list_vars(path).items()}
