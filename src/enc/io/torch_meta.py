"""The pickle of a ``torch.save`` file read without torch: the metadata pass of ``enc convert``.

:func:`enc.io.megatron_pickle.load_lazy` with ``torch_free=True`` unpickles with :class:`RefStorages`
instead of torch's weights-only unpickler, so a conversion that only moves bytes never imports torch
(1.3 s of CPU here, twice the time it takes to copy a 0.7 GB checkpoint).

Nothing is executed: Python's ``pickle.Unpickler`` resolves every global through :meth:`_Unpickler.
find_class`, which knows a fixed set of names and maps each to something inert:

- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``: a :class:`TensorRef` record (storage,
  element offset, shape, stride), checked against the storage the pickle declared;
- ``torch.<Type>Storage``, the torch dtypes: :class:`~enc.io.dtypes.DType` records;
- ``collections.OrderedDict``, ``argparse.Namespace``, ``types.SimpleNamespace``; ``_codecs.encode`` for
  the latin-1 ``bytes`` protocol 2 writes (nothing else);
- the inert stand-ins of :data:`enc.io.megatron_pickle.STAND_INS` (Megatron enums, loss scalers,
  numpy RNG state): they record their arguments and run nothing.

Persistent ids must be torch's storage records. Any other global, any odd value, any error: the
reader gives up (:class:`Decline`) and ``load_lazy`` reads the file again with torch's weights-only
unpickler, which owns every refusal and error message. So this is a fast path that accepts a subset of
what the torch path accepts, and produces the same tree (tests compare them), with :class:`DType` where
the torch path has torch dtypes.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pickle
import types
from dataclasses import dataclass
from math import prod
from typing import Any

from enc.io.dtypes import DType

_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}
_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


class Decline(Exception):
    """Not the plain case: read the file the torch way."""


@dataclass(frozen=True)
class StorageType:
    dtype: DType


@dataclass(frozen=True, eq=False)
class StorageRef:
    """One persistent-id record: storage ``key``, its element type and size (legacy views: the view's)."""

    key: str
    dtype: DType
    numel: int
    view_offset: int


@dataclass(frozen=True, eq=False)
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int and i >= 0 for i in x):
        raise Decline(f"{what} is not a tuple of non-negative ints")
    return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, StorageRef) or type(storage_offset) is not int or storage_offset < 0:
        raise Decline("unexpected tensor arguments")
    if type(requires_grad) is not bool:
        raise Decline("unexpected requires_grad")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise Decline("tensor with backward hooks")
    if metadata is not None and not (isinstance(metadata, dict) and not metadata):
        raise Decline("tensor with metadata")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise Decline("size and stride disagree")
    if prod(shape):  # within the storage the pickle declared (torch's set_ refuses the rest)
        if storage_offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) > storage.numel:
            raise Decline("tensor outside its storage")
    return TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, TensorRef):
        raise Decline("parameter of a non-tensor")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise Decline("parameter with backward hooks")
    return data


def _encode(text, encoding="utf-8"):
    """``_codecs.encode``, as protocol 2 pickles ``bytes``: ``encode(str, "latin1")`` only."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Decline("_codecs.encode of something other than latin-1 text")
    return codecs.encode(text, "latin1")


def _globals() -> dict[tuple[str, str], Any]:
    from enc.io.megatron_pickle import STAND_INS

    found: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("types", "SimpleNamespace"): types.SimpleNamespace,
        ("_codecs", "encode"): _encode,
    }
    found.update({("torch", n): StorageType(DType(d)) for n, d in _STORAGES.items()})
    found.update({("torch", n): DType(n) for n in _DTYPES})
    for name, cls in STAND_INS.items():
        found[tuple(name.rsplit(".", 1))] = cls  # type: ignore[index]
    return found


_GLOBALS: dict[tuple[str, str], Any] | None = None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        global _GLOBALS
        if _GLOBALS is None:
            _GLOBALS = _globals()
        try:
            found = _GLOBALS[(module, name)]
        except KeyError:
            raise Decline(f"global {module}.{name}") from None
        # a fresh one each time: a pickle may BUILD (set attributes of) what it gets, never a shared record
        return DType(found.name) if isinstance(found, DType) else found


class RefStorages:
    """persistent_load for :class:`_Unpickler` (the torch-free twin of ``megatron_pickle._MetaStorages``):
    a :class:`StorageRef` per persistent id; ``by_cdata`` keeps them all, as the torch path's does."""

    def __init__(self) -> None:
        self.by_cdata: dict[int, tuple[str, DType, int, int]] = {}
        self._refs: list[StorageRef] = []

    def __call__(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise Decline("unexpected persistent id")
        stype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(stype, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise Decline("unexpected storage record")
        view_offset = 0
        if len(pid) == 6 and pid[5] is not None:  # legacy storage view: (view_key, offset, view_size)
            view = pid[5]
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
                raise Decline("unexpected storage view")
            view_offset, numel = view[1], view[2]
        ref = StorageRef(key, stype.dtype, numel, view_offset)
        self._refs.append(ref)
        self.by_cdata[id(ref)] = (key, stype.dtype, numel, view_offset)
        return ref

    @staticmethod
    def unpickle(f: io.BufferedIOBase, persistent_load: Any, label: str) -> Any:
        try:
            u = _Unpickler(f, encoding="utf-8")
            u.persistent_load = persistent_load
            return u.load()
        except Decline:
            raise
        except Exception as e:  # noqa: BLE001 - whatever it is, the torch path reports it
            raise Decline(f"{type(e).__name__}: {e}") from None

    @staticmethod
    def is_tensor(obj: Any) -> bool:
        return isinstance(obj, TensorRef)

    def describe(self, t: TensorRef):
        return self.by_cdata.get(id(t.storage)), t.storage.dtype, t.shape, t.stride, t.offset
