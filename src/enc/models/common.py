"""Small pieces shared by the runtimes: activations and attention masks."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from enc.models.config import ConfigDict, config_errors  # noqa: F401 - re-exported: config.json checks, torch-free


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
