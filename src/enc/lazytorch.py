"""Import torch when it is first used, not when a module says ``import torch``.

``enc`` is a tool that mostly moves bytes: converting a checkpoint needs torch only for tensors
that need arithmetic, for the strict key check against the model definition and for parity.
Importing torch costs 1.5-2 s of one core, as long as copying a 2 GB checkpoint. The CLI therefore
installs torch as a lazy module: ``import torch`` binds the module object, and the first attribute
read (from any thread) runs the real import. Modules that do not touch torch at import time (no
``torch.float32`` in a module-level table) then cost nothing until used, and a conversion moves
bytes while torch loads (``enc.convert``).

Thread safety: the first reader runs the import under a lock; a reader on another thread waits for
it to finish (the standard library's ``LazyLoader`` would let it see a half-initialised module). The
importing thread itself sees the module as it is being built, as any import does.

Code imported after torch has loaded sees no difference. Without :func:`install` (a library user
importing ``enc``), torch is imported the ordinary way.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

_lock = threading.RLock()
_owner: list[int | None] = [None]  # the thread running the import


class _LazyModule(types.ModuleType):
    def __getattribute__(self, attr: str):
        if attr != "__spec__" and _owner[0] != threading.get_ident():
            with _lock:
                if object.__getattribute__(self, "__class__") is _LazyModule:
                    _load(self)
        return types.ModuleType.__getattribute__(self, attr)


def _load(module: types.ModuleType) -> None:
    spec = object.__getattribute__(module, "__spec__")
    _owner[0] = threading.get_ident()
    try:
        spec.loader.exec_module(module)
    finally:
        _owner[0] = None
    object.__setattr__(module, "__class__", types.ModuleType)


def install(name: str = "torch") -> None:
    """Make ``name`` (torch) a lazily loaded module (no-op if it is already imported or not installed)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LazyModule
    sys.modules[name] = module


class LazySubmodule:
    """A stand-in for a torch submodule, imported on first attribute use: ``F = LazySubmodule(
    "torch.nn.functional")`` where a module-level ``import torch.nn.functional as F`` would load torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


F = LazySubmodule("torch.nn.functional")


def loaded() -> bool:
    """Whether torch has really been imported (its C extension is loaded)."""
    return "torch._C" in sys.modules
