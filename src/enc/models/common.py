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


class MaskedLMHeads(torch.nn.Module):
    """Base of a BERT-style model with masked-LM heads (Megatron-BERT, MobileBERT): the encoder under the
    attribute ``backbone_attr`` names (the state dict's prefix: ``bert.``, ``mobilebert.``), the heads
    under ``cls`` (``cls.predictions`` and, for pre-training, ``cls.seq_relationship``)."""

    backbone_attr = "bert"
    cls: torch.nn.Module

    def _attach(self, config, backbone: torch.nn.Module, heads: torch.nn.Module) -> None:
        self.config = config
        setattr(self, self.backbone_attr, backbone)
        self.cls = heads
        self.tie_weights()

    @property
    def backbone(self) -> torch.nn.Module:
        return getattr(self, self.backbone_attr)

    def tie_weights(self) -> None:
        if self.backbone.config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.backbone.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> dict:
        """``logits`` (MLM) and ``hidden_states``; with the pre-training heads also ``prediction_logits``
        (the same tensor) and ``seq_relationship_logits``."""
        out = self.backbone(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.mlm_logits(out["last_hidden_state"])
        if not hasattr(self.cls, "seq_relationship"):
            return {"logits": logits, "hidden_states": out["hidden_states"]}
        return {"logits": logits, "prediction_logits": logits,
                "seq_relationship_logits": self.cls.seq_relationship(out["pooler_output"]),
                "hidden_states": out["hidden_states"]}
