"""Small pieces shared by the runtimes: activations and attention masks."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (TF/original BERT and ALBERT "gelu"; HF "gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form, as HF means it
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def activation(name: str):
    from enc.errors import ConfigError

    if name not in ACTIVATIONS:
        raise ConfigError(None, f"unsupported activation {name!r} (supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, T] 1/0 mask -> additive [B, 1, 1, T] mask for SDPA (0 where attended, -inf-ish where not)."""
    if attention_mask is None:
        return None
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


_INIT_FNS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def no_init():
    """Skip weight initialisation while modules are built (the weights are loaded right after).

    Besides saving the time of random init, this avoids torch importing its compiler stack
    (~1 s) when init runs on the meta device.
    """
    from torch.nn import init

    saved = {n: getattr(init, n) for n in _INIT_FNS}
    for n in _INIT_FNS:
        setattr(init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def build(cls, config, device: str = "cpu"):
    """Instantiate ``cls(config)`` with uninitialised weights on ``device`` ("meta" for shapes only)."""
    with no_init(), torch.device(device):
        return cls(config)


# --------------------------------------------------------------------------- config.json checking

_TYPE_NAMES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
               "dict": (dict,), "list": (list,)}


class ConfigDict(dict):
    """A config.json's contents, remembering the file it came from (for one-line errors naming it)."""

    path = None


def _accepts(annotation: str, value) -> bool:
    ok = False
    for part in annotation.split("|"):
        part = part.strip()
        base = part.split("[", 1)[0]
        types = _TYPE_NAMES.get(base)
        if types is None:
            return True  # an annotation this check does not know: leave it to the class
        if isinstance(value, bool) and base in ("int", "float"):
            continue  # true/false is not a number here
        ok = ok or isinstance(value, types)
    return ok


def config_errors(from_dict):
    """Decorate a config dataclass's ``from_dict``: each known key must have its field's JSON type
    (``"hidden_size": "16"`` is an error, not a crash later), and every problem becomes one
    :class:`~enc.errors.ConfigError` naming config.json when the dict came from one."""
    import functools
    from dataclasses import fields

    from enc.errors import ConfigError

    @functools.wraps(from_dict)
    def wrapper(cls, d):
        path = getattr(d, "path", None)
        if not isinstance(d, dict):
            raise ConfigError(path, "expected a JSON object")
        for f in fields(cls):
            if f.name in d and isinstance(f.type, str) and not _accepts(f.type, d[f.name]):
                raise ConfigError(path, f"{f.name} must be {f.type.replace(' | None', '').replace('|', 'or')}, "
                                        f"got {d[f.name]!r}")
        try:
            return from_dict.__func__(cls, d) if hasattr(from_dict, "__func__") else from_dict(cls, d)
        except ConfigError as e:
            if e.path is None and path is not None:
                raise ConfigError(path, e.message) from None
            raise
        except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError) as e:
            raise ConfigError(path, f"invalid {cls.__name__.replace('Config', '')} config: {e}") from None

    return wrapper
