"""LUKE's forward pass in its ORIGINAL layout, from the checkpoint's own tensors (no enc.models).

Follows ``luke/model.py`` and ``luke/pretraining/model.py``: RoBERTa word embeddings (positions from
padding_idx + 1), ``EntityEmbeddings`` (the entity table through the bias-free
``entity_embedding_dense``; position embeddings averaged over the mention's tokens, -1 = padding;
token type; LayerNorm), the BERT encoder over [words; entities] with the extended attention mask
``(1 - mask) * -10000`` (plain self-attention, or ``EntityAwareSelfAttention``'s four query matrices
when the checkpoint has them), then ``lm_head`` (RobertaLMHead, decoder = the word embeddings) and
``entity_predictions`` (decoder = the entity table). Original key names, original vocabularies
(no <ent>/<ent2>/[MASK2] rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from enc.converters.base import Activation, Probe
from enc.lazytorch import F  # torch.nn.functional on first use (detection imports this module)

Get = Callable[[str], "torch.Tensor"]


@dataclass
class LukeProbe(Probe):
    """Words (as :class:`Probe`) plus entities: ids in the ORIGINAL entity vocabulary and in the converted one."""

    entity_ids: torch.Tensor | None = None  # [B, N] original ids
    converted_entity_ids: torch.Tensor | None = None  # [B, N] ids in the converted vocabulary
    entity_position_ids: torch.Tensor | None = None  # [B, N, M], -1 = padding
    entity_attention_mask: torch.Tensor | None = None  # [B, N]


@dataclass(frozen=True)
class RefSpec:
    layers: int
    heads: int
    eps: float
    act: str  # hidden_act: "gelu" (erf) or "gelu_new" (tanh)
    pad_id: int
    entity_aware: bool  # the checkpoint has its own w2e/e2w/e2e queries
    dense: bool  # entity_emb_size != hidden_size


def _ln(x: torch.Tensor, get: Get, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], get(prefix + ".weight"), get(prefix + ".bias"), eps)


def _lin(x: torch.Tensor, get: Get, prefix: str) -> torch.Tensor:
    return x @ get(prefix + ".weight").t() + get(prefix + ".bias")


def _act(name: str):
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return torch.relu
    return lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # transformers' "gelu"


def word_embeddings(get: Get, s: RefSpec, ids: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
    mask = ids.ne(s.pad_id).long()
    positions = torch.cumsum(mask, 1) * mask + s.pad_id  # fairseq make_positions
    types = torch.zeros_like(ids) if types is None else types
    x = (get("embeddings.word_embeddings.weight")[ids] + get("embeddings.position_embeddings.weight")[positions]
         + get("embeddings.token_type_embeddings.weight")[types])
    return _ln(x, get, "embeddings.LayerNorm", s.eps)


def entity_embeddings(get: Get, s: RefSpec, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    e = get("entity_embeddings.entity_embeddings.weight")[ids]
    if s.dense:
        e = e @ get("entity_embeddings.entity_embedding_dense.weight").t()
    pos = get("entity_embeddings.position_embeddings.weight")[positions.clamp(min=0)]
    keep = (positions != -1).float().unsqueeze(-1)
    pos = (pos * keep).sum(-2) / keep.sum(-2).clamp(min=1e-7)
    e = e + pos + get("entity_embeddings.token_type_embeddings.weight")[torch.zeros_like(ids)]
    return _ln(e, get, "entity_embeddings.LayerNorm", s.eps)


def attention(x: torch.Tensor, get: Get, s: RefSpec, i: int, ext_mask: torch.Tensor, n_words: int) -> torch.Tensor:
    p = f"encoder.layer.{i}.attention.self."
    B, T, C = x.shape
    d = C // s.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], s.heads, d).permute(0, 2, 1, 3)

    k, v = heads(_lin(x, get, p + "key")), heads(_lin(x, get, p + "value"))
    if s.entity_aware:  # EntityAwareSelfAttention: one query matrix per (query kind, key kind)
        w, e = x[:, :n_words], x[:, n_words:]
        kw, ke = k[:, :, :n_words], k[:, :, n_words:]
        scores = torch.cat([
            torch.cat([heads(_lin(w, get, p + "query")) @ kw.transpose(-1, -2),
                       heads(_lin(w, get, p + "w2e_query")) @ ke.transpose(-1, -2)], 3),
            torch.cat([heads(_lin(e, get, p + "e2w_query")) @ kw.transpose(-1, -2),
                       heads(_lin(e, get, p + "e2e_query")) @ ke.transpose(-1, -2)], 3)], 2)
    else:  # BertSelfAttention over the concatenation
        scores = heads(_lin(x, get, p + "query")) @ k.transpose(-1, -2)
    probs = torch.softmax(scores / math.sqrt(d) + ext_mask, -1)
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    return _ln(_lin(ctx, get, f"encoder.layer.{i}.attention.output.dense") + x, get,
               f"encoder.layer.{i}.attention.output.LayerNorm", s.eps)


def layer(x: torch.Tensor, get: Get, s: RefSpec, i: int, ext_mask: torch.Tensor, n_words: int) -> torch.Tensor:
    a = attention(x, get, s, i, ext_mask, n_words)
    h = _act(s.act)(_lin(a, get, f"encoder.layer.{i}.intermediate.dense"))
    return _ln(_lin(h, get, f"encoder.layer.{i}.output.dense") + a, get, f"encoder.layer.{i}.output.LayerNorm", s.eps)


def luke_forward(get: Get, s: RefSpec, probe: LukeProbe) -> Iterator[Activation]:
    ids, wmask = probe.input_ids, probe.attention_mask
    T = ids.shape[1]
    x = word_embeddings(get, s, ids, probe.token_type_ids)
    yield Activation("embeddings", x, mask=wmask.bool())
    has_entities = probe.entity_ids is not None and probe.entity_ids.shape[1] > 0
    mask = wmask
    emask = None
    if has_entities:
        emask = probe.entity_attention_mask.bool()
        e = entity_embeddings(get, s, probe.entity_ids, probe.entity_position_ids)
        yield Activation("entity_embeddings", e, mask=emask)
        x = torch.cat([x, e], 1)
        mask = torch.cat([wmask, probe.entity_attention_mask], 1)
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # _compute_extended_attention_mask
    for i in range(s.layers):
        x = layer(x, get, s, i, ext, T)
        yield Activation(f"layer.{i}", x[:, :T], mask=wmask.bool())
        if has_entities:
            yield Activation(f"entity_layer.{i}", x[:, T:], mask=emask)
    h = F.gelu(_lin(x[:, :T], get, "lm_head.dense"))  # RobertaLMHead: erf GELU
    h = _ln(h, get, "lm_head.layer_norm", s.eps)
    yield Activation("mlm_logits", h @ get("embeddings.word_embeddings.weight").t() + get("lm_head.bias"), "logits",
                     wmask.bool())
    if has_entities:
        t = _act(s.act)(_lin(x[:, T:], get, "entity_predictions.transform.dense"))
        t = _ln(t, get, "entity_predictions.transform.LayerNorm", s.eps)
        logits = t @ get("entity_embeddings.entity_embeddings.weight").t() + get("entity_predictions.bias")
        yield Activation("entity_logits", logits, "logits", emask)
