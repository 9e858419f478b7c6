"""LUKE / mLUKE in the Hugging Face layout (``model_type: luke``): words and entities, entity-aware attention.

Parameter names are exactly transformers' ``LukeModel`` / ``LukeForMaskedLM`` ones, so any HF LUKE
directory loads strictly (enc's output, ``studio-ousia/luke-*``, ``studio-ousia/mluke-*``).

- Words: RoBERTa embeddings; position ids count real tokens from ``pad_token_id + 1`` (padding keeps
  the padding position), as transformers' ``create_position_ids_from_input_ids``.
- Entities: a (usually low-rank, ``entity_emb_size``) entity table, projected to the hidden size by the
  bias-free ``entity_embedding_dense`` when the sizes differ; an entity's position embedding is the
  mean over the positions of its mention tokens (``entity_position_ids`` [B, N, M], -1 = padding);
  plus token type, LayerNorm.
- Words and entities run through one post-LN BERT encoder. With ``use_entity_aware_attention`` each
  query type has its own matrix: word->word ``query``, word->entity ``w2e_query``, entity->word
  ``e2w_query``, entity->entity ``e2e_query``. It runs as one SDPA call: queries are the two query
  kinds side by side ([q_to_words | q_to_entities], 2 x head_dim) and keys are zero-padded to match
  ([k | 0] for word keys, [0 | k] for entity keys), so each query meets each key through the right
  matrix; the scale stays 1/sqrt(head_dim).
- Heads: the RoBERTa LM head (``lm_head``: dense, GELU, layer_norm, decoder + bias) and the entity
  prediction head (``entity_predictions``: dense to ``entity_emb_size``, GELU, LayerNorm, decoder tied
  to the entity table, bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError
from enc.models.common import activation, build, padding_mask
from enc.models.config import check_heads


@dataclass
class LukeConfig:
    vocab_size: int = 50267
    entity_vocab_size: int = 500000
    hidden_size: int = 768
    entity_emb_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    use_entity_aware_attention: bool = True
    pad_token_id: int = 1
    architectures: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LukeConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        activation(cfg.hidden_act)
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def word_position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """RoBERTa positions: pad_id + 1, pad_id + 2, ... over real tokens; padding keeps pad_id."""
    real = input_ids.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class LukeEmbeddings(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.pad_id = c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        pos = word_position_ids(input_ids, self.pad_id)
        if int(pos.max()) >= self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class LukeEntityEmbeddings(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.entity_embeddings = nn.Embedding(c.entity_vocab_size, c.entity_emb_size)
        if c.entity_emb_size != c.hidden_size:
            self.entity_embedding_dense = nn.Linear(c.entity_emb_size, c.hidden_size, bias=False)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, entity_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.entity_embeddings(entity_ids)
        if hasattr(self, "entity_embedding_dense"):
            x = self.entity_embedding_dense(x)
        real = (position_ids != -1).to(x.dtype).unsqueeze(-1)  # [B, N, M, 1]
        pos = (self.position_embeddings(position_ids.clamp(min=0)) * real).sum(-2) / real.sum(-2).clamp(min=1e-7)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(entity_ids)
        return self.LayerNorm(x + pos + self.token_type_embeddings(token_type_ids))


class LukeSelfAttention(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_attention_heads, c.head_dim
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.entity_aware = c.use_entity_aware_attention
        if self.entity_aware:
            self.w2e_query = nn.Linear(c.hidden_size, c.hidden_size)
            self.e2w_query = nn.Linear(c.hidden_size, c.hidden_size)
            self.e2e_query = nn.Linear(c.hidden_size, c.hidden_size)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, n_words: int) -> torch.Tensor:
        """``x``: words then entities, [B, T + N, C]. Returns the attention output, same shape."""
        k, v = self._heads(self.key(x)), self._heads(self.value(x))
        if self.entity_aware and x.shape[1] > n_words:
            w, e = x[:, :n_words], x[:, n_words:]
            q = torch.cat([torch.cat([self._heads(self.query(w)), self._heads(self.w2e_query(w))], -1),
                           torch.cat([self._heads(self.e2w_query(e)), self._heads(self.e2e_query(e))], -1)], 2)
            zeros = torch.zeros_like(k)
            word_key = torch.arange(k.shape[2], device=k.device) < n_words
            k = torch.where(word_key[:, None], torch.cat([k, zeros], -1), torch.cat([zeros, k], -1))
        else:
            q = self._heads(self.query(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(self.head_dim))
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, -1)


class LukeSelfOutput(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class LukeAttention(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.self = LukeSelfAttention(c)
        self.output = LukeSelfOutput(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, n_words: int) -> torch.Tensor:
        return self.output.LayerNorm(x + self.output.dense(self.self(x, bias, n_words)))


class LukeIntermediate(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class LukeOutput(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class LukeLayer(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.attention = LukeAttention(c)
        self.intermediate = LukeIntermediate(c)
        self.output = LukeOutput(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, n_words: int) -> torch.Tensor:
        x = self.attention(x, bias, n_words)
        return self.output.LayerNorm(x + self.output.dense(self.intermediate(x)))


class LukeEncoder(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.layer = nn.ModuleList(LukeLayer(c) for _ in range(c.num_hidden_layers))


class LukePooler(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class LukeModel(nn.Module):
    """The encoder. ``forward`` -> last_hidden_state, entity_last_hidden_state, pooler_output, hidden_states."""

    def __init__(self, config: LukeConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = LukeEmbeddings(config)
        self.entity_embeddings = LukeEntityEmbeddings(config)
        self.encoder = LukeEncoder(config)
        self.pooler = LukePooler(config) if add_pooling_layer else None

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, entity_ids=None, entity_position_ids=None,
              entity_attention_mask=None, entity_token_type_ids=None):
        """Word and entity embeddings concatenated, the additive attention bias, the word count."""
        x = self.embeddings(input_ids, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if entity_ids is not None and entity_ids.shape[1] > 0:
            if entity_position_ids is None:
                raise ValueError("entity_ids need entity_position_ids")
            e = self.entity_embeddings(entity_ids, entity_position_ids, entity_token_type_ids)
            x = torch.cat([x, e], 1)
            if entity_attention_mask is None:
                entity_attention_mask = torch.ones_like(entity_ids)
            attention_mask = torch.cat([attention_mask, entity_attention_mask.to(attention_mask.dtype)], 1)
        return x, padding_mask(attention_mask, x.dtype), input_ids.shape[1]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, entity_ids=None, entity_position_ids=None,
                entity_attention_mask=None, entity_token_type_ids=None, output_hidden_states: bool = False) -> dict:
        x, bias, T = self.embed(input_ids, attention_mask, token_type_ids, entity_ids, entity_position_ids,
                                entity_attention_mask, entity_token_type_ids)
        hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, bias, T)
            if hidden is not None:
                hidden.append(x)
        has_entities = x.shape[1] > T
        return {
            "last_hidden_state": x[:, :T],
            "entity_last_hidden_state": x[:, T:] if has_entities else None,
            "pooler_output": self.pooler(x) if self.pooler is not None else None,
            "hidden_states": tuple(h[:, :T] for h in hidden) if hidden else None,
            "entity_hidden_states": tuple(h[:, T:] for h in hidden) if hidden and has_entities else None,
        }


class LukeLMHead(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)
        self.bias = self.decoder.bias  # tied, as transformers' lm_head.bias / lm_head.decoder.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(h))))


class EntityPredictionHeadTransform(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.entity_emb_size)
        self.act = activation(c.hidden_act)
        self.LayerNorm = nn.LayerNorm(c.entity_emb_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class EntityPredictionHead(nn.Module):
    def __init__(self, c: LukeConfig):
        super().__init__()
        self.transform = EntityPredictionHeadTransform(c)
        self.decoder = nn.Linear(c.entity_emb_size, c.entity_vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.entity_vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h)) + self.bias


class LukeForMaskedLM(nn.Module):
    """Word MLM and masked-entity prediction. ``forward`` -> ``logits``, ``entity_logits`` (None without entities)."""

    def __init__(self, config: LukeConfig):
        super().__init__()
        self.config = config
        self.luke = LukeModel(config)
        self.lm_head = LukeLMHead(config)
        self.entity_predictions = EntityPredictionHead(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.entity_predictions.decoder.weight = self.luke.entity_embeddings.entity_embeddings.weight
        self.lm_head.bias = self.lm_head.decoder.bias

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, entity_ids=None, entity_position_ids=None,
                entity_attention_mask=None, entity_token_type_ids=None, output_hidden_states: bool = False) -> dict:
        out = self.luke(input_ids, attention_mask, token_type_ids, entity_ids, entity_position_ids,
                        entity_attention_mask, entity_token_type_ids, output_hidden_states)
        e = out["entity_last_hidden_state"]
        return {"logits": self.lm_head(out["last_hidden_state"]),
                "entity_logits": self.entity_predictions(e) if e is not None else None,
                "hidden_states": out["hidden_states"], "entity_hidden_states": out["entity_hidden_states"]}


HEADS: dict[str, type[nn.Module]] = {"mlm": LukeForMaskedLM, "base": LukeModel}


def tied_keys(model: nn.Module) -> dict[str, str]:
    """Parameters that may be absent on disk -> the one they are tied to."""
    if isinstance(model, LukeForMaskedLM):
        return {"entity_predictions.decoder.weight": "luke.entity_embeddings.entity_embeddings.weight",
                "lm_head.bias": "lm_head.decoder.bias",
                # transformers 4.x tied the LM decoder to the word embeddings and did not always save it
                "lm_head.decoder.weight": "luke.embeddings.word_embeddings.weight"}
    return {}


def expected_keys(cfg: LukeConfig) -> set[str]:
    """Keys an HF LukeForMaskedLM directory holds on disk (transformers 5 writes lm_head.decoder.weight)."""
    with torch.device("meta"):
        model = build(LukeForMaskedLM, cfg, device="meta")
    return set(model.state_dict()) - {"entity_predictions.decoder.weight", "lm_head.bias"}


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    head: str | None = None, **kw) -> nn.Module:
    """Load an HF ``luke`` directory. ``head``: "mlm" (LukeForMaskedLM) or "base" (LukeModel); by default the
    architecture config.json names (any other LUKE task head loads its ``luke.`` encoder)."""
    from enc.models.loading import load_into, load_state_dict, read_config, strip_prefix

    raw = read_config(model_dir)
    cfg = LukeConfig.from_dict(raw)
    arch = (raw.get("architectures") or ["LukeModel"])[0]
    if head is not None and head not in HEADS:
        raise ConfigError(Path(model_dir) / "config.json", f"unknown head {head!r} (mlm, base)")
    cls = HEADS[head] if head else (LukeForMaskedLM if arch == "LukeForMaskedLM" else LukeModel)
    sd = {k: v for k, v in load_state_dict(model_dir).items() if not k.endswith((".position_ids", ".token_type_ids"))}
    model = build(cls, cfg)
    if cls is LukeModel:
        sd = strip_prefix(sd, "luke.", set(model.state_dict()))
        ignore: tuple[str, ...] = ("lm_head.", "entity_predictions.", "classifier.", "qa_outputs.", "head_classifier.",
                                   "tail_classifier.", "dropout.", "luke.")
        if not any(k.startswith("pooler.") for k in sd):
            model.pooler = None
    else:
        ignore = ()
    load_into(model, sd, Path(model_dir), tied=tied_keys(model), ignore_unexpected=ignore)
    if isinstance(model, LukeForMaskedLM):
        model.tie_weights()
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)
