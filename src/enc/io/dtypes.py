"""Element types by name, without importing torch.

A :class:`DType` stands for the torch dtype of the same name where a reader or the planner needs
only facts (size, floating point, safetensors code) and torch may never be loaded (see
``enc.lazytorch``). It compares equal to that torch dtype (``DType("bfloat16") == torch.bfloat16``,
both ways round), prints like it (``torch.bfloat16``) and gives the real one as :attr:`DType.torch`;
:func:`as_torch` turns either kind into a torch dtype where torch is called.

Do not mix the two kinds as keys of one dict: equal objects of the two kinds do not hash alike
(:func:`st_code` is the lookup for safetensors codes).
"""

from __future__ import annotations

from typing import Any

# name -> (itemsize, floating point, safetensors code)
_INFO: dict[str, tuple[int, bool, str]] = {
    "float64": (8, True, "F64"), "float32": (4, True, "F32"), "float16": (2, True, "F16"),
    "bfloat16": (2, True, "BF16"), "int64": (8, False, "I64"), "int32": (4, False, "I32"),
    "int16": (2, False, "I16"), "int8": (1, False, "I8"), "uint8": (1, False, "U8"), "bool": (1, False, "BOOL"),
}
_BY_CODE = {code: name for name, (_, _, code) in _INFO.items()}


class DType:
    __slots__ = ("name", "itemsize", "is_floating_point", "st")

    def __init__(self, name: str):
        if name not in _INFO:
            raise ValueError(f"unknown dtype {name!r}")
        self.name = name
        self.itemsize, self.is_floating_point, self.st = _INFO[name]

    @classmethod
    def from_st(cls, code: str) -> DType | None:
        """The dtype of a safetensors header code (``BF16``), or None if unknown."""
        name = _BY_CODE.get(code)
        return cls(name) if name else None

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, DType):
            return other.name == self.name
        return type(other).__name__ == "dtype" and str(other) == f"torch.{self.name}"

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(("enc.DType", self.name))

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__


def dtype_name(dt: Any) -> str:
    """'bfloat16' for DType('bfloat16') and for torch.bfloat16."""
    return str(dt).replace("torch.", "")


def st_code(dt: Any) -> str | None:
    """The safetensors code of a DType or torch dtype (None if safetensors cannot store it)."""
    info = _INFO.get(dtype_name(dt))
    return info[2] if info else None


def as_torch(dt: Any):
    """The torch dtype for a DType (a torch dtype is returned as it is)."""
    return dt.torch if isinstance(dt, DType) else dt
