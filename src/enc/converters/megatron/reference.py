"""Megatron-LM's forward pass in its ORIGINAL layout, for parity. Independent of enc.models.

Works on the checkpoint's own tensors under Megatron's (legacy) names, rank by rank, as Megatron
runs under tensor parallelism: each rank computes its slice of heads from its fused
``query_key_value`` rows, read in the order its ``checkpoint_version`` stores them; row-parallel
outputs (attention ``dense``, ``dense_4h_to_h``) are summed over ranks (the all-reduce) before the
bias is added once; vocab-parallel embedding lookups mask the ids outside a rank's rows and are
summed; logits are computed per rank and gathered. Pre-LN layers, attention scores
``q.k / (sqrt(hd) * coeff) * coeff`` with query-key layer scaling, masked with -10000, softmax in
float32 (megatron/model/transformer.py, bert_model.py, gpt2_model.py, language_model.py, 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from enc.converters.base import Activation, Probe

Get = Callable[[str, int], "torch.Tensor"]  # (Megatron key, tensor-parallel rank) -> float32 tensor
_L = "language_model.transformer.layers.{}."


@dataclass(frozen=True)
class RefSpec:
    kind: str  # "bert" or "gpt2"
    hidden: int
    heads: int
    layers: int
    tp: int
    version: float
    eps: float
    gelu_mlp: str  # "erf" or "tanh" (Megatron's openai_gelu, or the fused bias_gelu of --bias-gelu-fusion)
    gelu_head: str  # BERT's LM head: "tanh" only with openai_gelu (bias_gelu fusion is MLP-only)
    layer_scaling: bool  # apply_query_key_layer_scaling
    binary_head: bool
    logits_from: str  # key of the matrix the logits use (word embeddings, head copy, or output layer)
    vocab_out: Callable[[], int]  # logits columns kept (GPT-2 may be trimmed to the tokenizer)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # megatron/model/utils.py openai_gelu / fused_bias_gelu.bias_gelu
    return x * 0.5 * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def vocab_parallel_embedding(ids: torch.Tensor, shards: list[torch.Tensor]) -> torch.Tensor:
    """VocabParallelEmbedding: each rank looks up the ids in its row range, zeros the rest; all-reduce."""
    out = torch.zeros(*ids.shape, shards[0].shape[1])
    start = 0
    for e in shards:
        end = start + e.shape[0]
        outside = (ids < start) | (ids >= end)
        local = (ids - start).masked_fill(outside, 0)
        out += e[local].masked_fill(outside[..., None], 0.0)
        start = end
    return out


def _split_heads(mixed: torch.Tensor, version: float, heads: int, hd: int) -> tuple[torch.Tensor, ...]:
    """One rank's [B, T, 3*heads*hd] projection -> q, k, v [B, T, heads, hd], per the stored order."""
    B, T, _ = mixed.shape
    if version == 0:  # [3, heads, hd]
        return tuple(p.reshape(B, T, heads, hd) for p in mixed.chunk(3, -1))
    if version == 1.0:  # [heads, hd, 3]
        m = mixed.view(B, T, heads, hd, 3)
        return m[..., 0], m[..., 1], m[..., 2]
    m = mixed.view(B, T, heads, 3 * hd)  # [heads, 3, hd]
    return tuple(m.split(hd, -1))


def attention(x: torch.Tensor, get: Get, i: int, s: RefSpec, masked: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    hd = s.hidden // s.heads
    heads_local = s.heads // s.tp
    coeff = float(i + 1) if s.layer_scaling else 1.0
    out = torch.zeros_like(x)
    for r in range(s.tp):
        mixed = x @ get(_L.format(i) + "attention.query_key_value.weight", r).t() \
            + get(_L.format(i) + "attention.query_key_value.bias", r)
        q, k, v = (t.permute(0, 2, 1, 3) for t in _split_heads(mixed, s.version, heads_local, hd))
        scores = (q @ k.transpose(-1, -2)) / (math.sqrt(hd) * coeff)
        scores = (scores * coeff).masked_fill(masked, -10000.0)
        ctx = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(B, T, heads_local * hd)
        out += ctx @ get(_L.format(i) + "attention.dense.weight", r).t()  # row parallel: partial sums
    return out + get(_L.format(i) + "attention.dense.bias", 0)


def mlp(x: torch.Tensor, get: Get, i: int, s: RefSpec) -> torch.Tensor:
    act = gelu_tanh if s.gelu_mlp == "tanh" else gelu_erf
    out = torch.zeros_like(x)
    for r in range(s.tp):
        h = act(x @ get(_L.format(i) + "mlp.dense_h_to_4h.weight", r).t() + get(_L.format(i) + "mlp.dense_h_to_4h.bias", r))
        out += h @ get(_L.format(i) + "mlp.dense_4h_to_h.weight", r).t()
    return out + get(_L.format(i) + "mlp.dense_4h_to_h.bias", 0)


def parallel_logits(h: torch.Tensor, get: Get, s: RefSpec, bias_key: str | None) -> torch.Tensor:
    """parallel_lm_logits: each rank multiplies by its vocab rows (+ its bias slice); gathered."""
    parts = []
    for r in range(s.tp):
        part = h @ get(s.logits_from, r).t()
        if bias_key is not None:
            part = part + get(bias_key, r)
        parts.append(part)
    return torch.cat(parts, -1)[..., : s.vocab_out()]


def megatron_forward(get: Get, s: RefSpec, probe: Probe) -> Iterator[Activation]:
    ids, mask = probe.input_ids, probe.attention_mask
    valid = mask.bool()
    T = ids.shape[1]
    x = vocab_parallel_embedding(ids, [get("language_model.embedding.word_embeddings.weight", r) for r in range(s.tp)])
    x = x + get("language_model.embedding.position_embeddings.weight", 0)[:T][None]
    if s.kind == "bert":
        types = probe.token_type_ids if probe.token_type_ids is not None else torch.zeros_like(ids)
        x = x + get("language_model.embedding.tokentype_embeddings.weight", 0)[types]
        # bert_extended_attention_mask: masked where either the query or the key is padding
        masked = (valid[:, None, :, None] & valid[:, None, None, :]).logical_not()
    else:
        masked = torch.ones(T, T, dtype=torch.bool).tril().logical_not()[None, None]  # causal (ltor) mask
    yield Activation("embeddings", x, mask=valid)

    for i in range(s.layers):
        ln = layer_norm(x, get(_L.format(i) + "input_layernorm.weight", 0), get(_L.format(i) + "input_layernorm.bias", 0),
                        s.eps)
        x = x + attention(ln, get, i, s, masked)
        ln = layer_norm(x, get(_L.format(i) + "post_attention_layernorm.weight", 0),
                        get(_L.format(i) + "post_attention_layernorm.bias", 0), s.eps)
        x = x + mlp(ln, get, i, s)
        yield Activation(f"layer.{i}", x, mask=valid)

    h = layer_norm(x, get("language_model.transformer.final_layernorm.weight", 0),
                   get("language_model.transformer.final_layernorm.bias", 0), s.eps)
    yield Activation("final_norm", h, mask=valid)

    if s.kind == "gpt2":
        yield Activation("logits", parallel_logits(h, get, s, None), "logits", valid)
        return
    act = gelu_tanh if s.gelu_head == "tanh" else gelu_erf
    t = act(h @ get("lm_head.dense.weight", 0).t() + get("lm_head.dense.bias", 0))
    t = layer_norm(t, get("lm_head.layernorm.weight", 0), get("lm_head.layernorm.bias", 0), s.eps)
    yield Activation("mlm_logits", parallel_logits(t, get, s, "lm_head.bias"), "logits", valid)
    if s.binary_head:
        pooled = torch.tanh(h[:, 0] @ get("language_model.pooler.dense.weight", 0).t()
                            + get("language_model.pooler.dense.bias", 0))
        yield Activation("nsp_logits", pooled @ get("binary_head.weight", 0).t() + get("binary_head.bias", 0), "logits")
