"""MobileBERT as google-research/mobilebert computes it, on the TF-named tensors.

Independent of :mod:`enc.models.mobilebert`: TF names, [in, out] kernels, the original bottleneck
wiring of ``transformer_model``, ``no_norm`` as x * gamma + beta, TF's layer norm (epsilon 1e-12),
TF's tanh "gelu", the quantization-friendly attention mask (``scores * mask - 6 * (1 - mask)``),
and the LM head's ``concat([word_embeddings, extra_output_weights], 1)`` output matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from enc.converters.base import Activation, Probe
from enc.lazytorch import F  # torch.nn.functional on first use (detection imports this module)


def tf_gelu(x: torch.Tensor) -> torch.Tensor:
    # modeling.gelu: the tanh approximation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


TF_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": tf_gelu, "relu": lambda x: torch.relu(x), "relu6": lambda x: F.relu6(x),
    "tanh": lambda x: torch.tanh(x), "linear": lambda x: x,
}


def tf_layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # tf.contrib.layers.layer_norm over the last axis, variance_epsilon 1e-12
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-12) * gamma + beta


@dataclass(frozen=True)
class RefSpec:
    """The original config (google-research BertConfig fields) the forward needs."""

    hidden: int
    layers: int
    heads: int
    embedding: int
    bottleneck: int
    trigram: bool
    use_bottleneck: bool
    bottleneck_attention: bool
    shared_qk: bool
    ffns: int
    no_norm: bool
    act: str
    pooler: bool


def mobilebert_forward(var: Callable[[str], torch.Tensor], s: RefSpec, probe: Probe) -> Iterator[Activation]:
    act = TF_ACT[s.act]
    norm_scope = "FakeLayerNorm" if s.no_norm else "LayerNorm"
    ids, mask = probe.input_ids, probe.attention_mask
    types = probe.token_type_ids if probe.token_type_ids is not None else torch.zeros_like(ids)
    valid = mask.bool()

    def norm(x: torch.Tensor, scope: str) -> torch.Tensor:
        gamma, beta = var(f"{scope}/{norm_scope}/gamma"), var(f"{scope}/{norm_scope}/beta")
        return x * gamma + beta if s.no_norm else tf_layer_norm(x, gamma, beta)

    def dense(x: torch.Tensor, scope: str) -> torch.Tensor:
        return x @ var(scope + "/kernel") + var(scope + "/bias")

    # embeddings
    word = var("bert/embeddings/word_embeddings")
    x = word[ids]
    if s.trigram:
        x = torch.cat([F.pad(x[:, 1:], (0, 0, 0, 1)), x, F.pad(x[:, :-1], (0, 0, 1, 0))], dim=2)
    if s.trigram or s.embedding != s.hidden:
        x = dense(x, "bert/embeddings/embedding_transformation")
    x = x + var("bert/embeddings/token_type_embeddings")[types] + var("bert/embeddings/position_embeddings")[
        : ids.shape[1]][None]
    x = norm(x, "bert/embeddings")
    yield Activation("embeddings", x, mask=valid)

    width = s.bottleneck if s.use_bottleneck else s.hidden
    for i in range(s.layers):
        x = _layer(x, mask, f"bert/encoder/layer_{i}/", s, s.heads, width // s.heads, width, norm, dense, act)
        yield Activation(f"layer.{i}", x, mask=valid)

    # run_pretraining.py heads: MLM at every position, NSP on the pooled [CLS]
    t = act(dense(x, "cls/predictions/transform/dense"))
    t = tf_layer_norm(t, var("cls/predictions/transform/LayerNorm/gamma"), var("cls/predictions/transform/LayerNorm/beta"))
    out_w = word
    if s.hidden != s.embedding:
        out_w = torch.cat([word, var("cls/predictions/extra_output_weights")], dim=1)
    yield Activation("mlm_logits", t @ out_w.t() + var("cls/predictions/output_bias"), "logits", valid)
    pooled = x[:, 0]
    if s.pooler:
        pooled = torch.tanh(dense(pooled, "bert/pooler/dense"))
    yield Activation("nsp_logits", pooled @ var("cls/seq_relationship/output_weights").t()
                     + var("cls/seq_relationship/output_bias"), "logits")


def _layer(prev: torch.Tensor, mask: torch.Tensor, p: str, s: RefSpec, N: int, D: int, width: int,
           norm, dense, act) -> torch.Tensor:
    """One ``transformer_model`` layer: bottlenecks, attention (with the -6 mask), stacked FFNs."""
    B, T, _ = prev.shape
    if s.use_bottleneck:
        layer_input = norm(dense(prev, p + "bottleneck/input/dense"), p + "bottleneck/input")
        if s.bottleneck_attention:
            q_in = k_in = v_in = layer_input
        elif s.shared_qk:
            q_in = k_in = norm(dense(prev, p + "bottleneck/attention/dense"), p + "bottleneck/attention")
            v_in = prev
        else:
            q_in = k_in = v_in = prev
    else:
        layer_input = q_in = k_in = v_in = prev
    q = dense(q_in, p + "attention/self/query").view(B, T, N, D)
    k = dense(k_in, p + "attention/self/key").view(B, T, N, D)
    v = dense(v_in, p + "attention/self/value").view(B, T, N, D)
    m = mask[:, None, None, :].to(prev.dtype)
    scores = torch.einsum("bfnh,btnh->bnft", q, k) * (1.0 / math.sqrt(D))
    scores = scores * m + (1.0 - m) * -6.0
    ctx = torch.einsum("bnft,btnh->bfnh", torch.softmax(scores, -1), v).reshape(B, T, width)
    h = norm(dense(ctx, p + "attention/output/dense") + layer_input, p + "attention/output")
    for j in range(s.ffns - 1):
        f = p + f"ffn_layer_{j}/"
        h = norm(dense(act(dense(h, f + "intermediate/dense")), f + "output/dense") + h, f + "output")
    out = norm(dense(act(dense(h, p + "intermediate/dense")), p + "output/dense") + h, p + "output")
    if s.use_bottleneck:
        out = norm(dense(out, p + "output/bottleneck/dense") + prev, p + "output/bottleneck")
    return out
