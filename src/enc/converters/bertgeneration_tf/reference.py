"""bert2bert as the original TF code computes it, on the module's own variables (TF names, [in, out]
kernels), independent of enc.models: post-LN BERT layers, TF's layer norm (epsilon 1e-12), the
tanh (google-research/bert ``modeling.gelu``) or erf GELU, additive -10000 attention masks, the
decoder's causal self-attention followed by the ``encdec`` attention over the encoder output, and
logits against the word embeddings (no transform, no bias variable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from enc.converters.base import Activation

Var = Callable[[str], "torch.Tensor"]


def tf_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def tf_gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


TF_ACT = {"gelu_new": tf_gelu_tanh, "gelu": tf_gelu_erf, "relu": lambda x: torch.relu(x)}


def tf_layer_norm(x: torch.Tensor, var: Var, scope: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    v = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(v + 1e-12) * var(scope + "/gamma") + var(scope + "/beta")


def _dense(x: torch.Tensor, var: Var, scope: str) -> torch.Tensor:
    return x @ var(scope + "/kernel") + var(scope + "/bias")


def _attention(x, mem, var: Var, scope: str, heads: int, adder: torch.Tensor) -> torch.Tensor:
    B, T, H = x.shape
    S = mem.shape[1]
    d = H // heads
    q = _dense(x, var, scope + "/query").view(B, T, heads, d).permute(0, 2, 1, 3)
    k = _dense(mem, var, scope + "/key").view(B, S, heads, d).permute(0, 2, 1, 3)
    v = _dense(mem, var, scope + "/value").view(B, S, heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + adder, -1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(B, T, H)


def _embed(var: Var, ids: torch.Tensor) -> torch.Tensor:
    x = var("embeddings/word_embeddings")[ids] + var("embeddings/position_embeddings")[: ids.shape[1]][None]
    return tf_layer_norm(x, var, "embeddings/LayerNorm")


def _layer(x, var: Var, scope: str, act, heads: int, adder, mem=None, mem_adder=None, cross: str | None = None):
    a = _attention(x, x, var, scope + "/attention/self", heads, adder)
    x = tf_layer_norm(x + _dense(a, var, scope + "/attention/output/dense"), var, scope + "/attention/output/LayerNorm")
    if cross is not None:
        c = _attention(x, mem, var, cross + "/attention/encdec", heads, mem_adder)
        x = tf_layer_norm(x + _dense(c, var, cross + "/attention/encdec_output/dense"), var,
                          cross + "/attention/encdec_output/LayerNorm")
    f = _dense(act(_dense(x, var, scope + "/intermediate/dense")), var, scope + "/output/dense")
    return tf_layer_norm(x + f, var, scope + "/output/LayerNorm")


def tf_encoder(var: Var, dims: dict, act_name: str, stack: str, ids: torch.Tensor, mask: torch.Tensor,
               out: list) -> Iterator[Activation]:
    """The encoder; yields ``encoder.embeddings``, ``encoder.layer.N`` and appends the output to ``out``."""
    act = TF_ACT[act_name]
    valid = mask.bool()
    adder = (1.0 - mask[:, None, None, :].float()) * -10000.0
    x = _embed(var, ids)
    yield Activation("encoder.embeddings", x, mask=valid)
    for i in range(dims["L"]):
        x = _layer(x, var, f"{stack}/layer_{i}", act, dims["N"], adder)
        yield Activation(f"encoder.layer.{i}", x, mask=valid)
    out.append(x)


def tf_decoder(var: Var, dims: dict, act_name: str, stack: str, ids: torch.Tensor, memory: torch.Tensor,
               mem_mask: torch.Tensor) -> Iterator[Activation]:
    """The decoder over ``memory``; yields ``decoder.embeddings``, ``decoder.layer.N`` and ``logits``."""
    act = TF_ACT[act_name]
    T = ids.shape[1]
    causal = torch.tril(torch.ones(T, T))
    adder = (1.0 - causal[None, None]) * -10000.0
    mem_adder = (1.0 - mem_mask[:, None, None, :].float()) * -10000.0
    x = _embed(var, ids)
    yield Activation("decoder.embeddings", x)
    for i in range(dims["L"]):
        x = _layer(x, var, f"{stack}/layer_{i}", act, dims["N"], adder, memory, mem_adder, f"decoder/layer_{i}")
        yield Activation(f"decoder.layer.{i}", x)
    yield Activation("logits", x @ var("embeddings/word_embeddings").t(), "logits")
