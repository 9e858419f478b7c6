"""MegatronBERT in the Hugging Face layout (``model_type: megatron-bert``), SDPA attention.

Megatron's BERT is pre-LN: no LayerNorm on the embeddings, each layer normalises its input before
attention (``attention.ln``) and before the MLP (``ln``), and the encoder ends with a final
LayerNorm (``encoder.ln``). Parameter names are exactly transformers' ``MegatronBertModel`` /
``MegatronBertForPreTraining`` / ``MegatronBertForMaskedLM`` ones, so ``bert.``-prefixed keys of any
``MegatronBertFor*`` checkpoint load into :class:`MegatronBertModel` via ``strip_prefix``.

The MLM decoder is tied: ``cls.predictions.decoder.weight`` is the word embedding matrix and
``cls.predictions.decoder.bias`` is ``cls.predictions.bias`` (written once on disk).

``model_type: bert`` (original BERT, post-LN) runs here too with ``post_ln``: LayerNorm after the
embeddings (``embeddings.LayerNorm``) and after each residual (``attention.output.LayerNorm``,
``output.LayerNorm``), no final LayerNorm: transformers' ``BertModel`` / ``BertFor*`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError
from enc.models.common import MaskedLMHeads, activation, config_errors, no_init, padding_mask
from enc.models.config import check_heads
from enc.models.loading import lazy_weights, load_into, read_config, strip_prefix


@dataclass
class MegatronBertConfig:
    vocab_size: int = 29056
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    architectures: list[str] | None = None
    post_ln: bool = False  # original BERT (model_type "bert")

    @classmethod
    @config_errors
    def from_dict(cls, d: dict) -> MegatronBertConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and k != "post_ln"})
        cfg.post_ln = d.get("model_type") == "bert"
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(None, f"position_embedding_type {d['position_embedding_type']!r} is not supported")
        if "id2label" in d and isinstance(d["id2label"], dict) and "num_labels" not in d:
            cfg.num_labels = len(d["id2label"])
        activation(cfg.hidden_act)  # a clear error for an unknown name
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class MegatronBertEmbeddings(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.post_ln:
            self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the model's "
                             f"{self.position_embeddings.num_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions)[None])
        return self.LayerNorm(x) if hasattr(self, "LayerNorm") else x


class MegatronBertSelfAttention(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=bias)
        return y.transpose(1, 2).reshape(B, T, C)


class MegatronBertSelfOutput(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        if cfg.post_ln:
            self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class MegatronBertAttention(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.post_ln = cfg.post_ln
        if not cfg.post_ln:
            self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self = MegatronBertSelfAttention(cfg)
        self.output = MegatronBertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.post_ln:
            return self.output.LayerNorm(x + self.output.dense(self.self(x, bias)))
        return x + self.output.dense(self.self(self.ln(x), bias))


class MegatronBertIntermediate(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class MegatronBertOutput(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        if cfg.post_ln:
            self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class MegatronBertLayer(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.post_ln = cfg.post_ln
        self.attention = MegatronBertAttention(cfg)
        if not cfg.post_ln:
            self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = MegatronBertIntermediate(cfg)
        self.output = MegatronBertOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, bias)
        if self.post_ln:
            return self.output.LayerNorm(x + self.output.dense(self.intermediate(x)))
        return x + self.output.dense(self.intermediate(self.ln(x)))


class MegatronBertEncoder(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MegatronBertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln = nn.Identity() if cfg.post_ln else nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class MegatronBertPooler(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class MegatronBertModel(nn.Module):
    """The encoder. ``forward`` returns ``last_hidden_state``, ``pooler_output`` and ``hidden_states``.

    ``hidden_states`` (when asked) follows transformers: the embeddings, then each layer's output,
    the last one taken after the final LayerNorm (so it equals ``last_hidden_state``; post-LN BERT
    has no final LayerNorm).
    """

    def __init__(self, config: MegatronBertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = MegatronBertEmbeddings(config)
        self.encoder = MegatronBertEncoder(config)
        self.pooler = MegatronBertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> dict:
        x = self.embeddings(input_ids, token_type_ids)
        bias = padding_mask(attention_mask, x.dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, bias)
            if hidden is not None:
                hidden.append(x)
        x = self.encoder.ln(x)
        if hidden is not None:
            hidden[-1] = x
        return {
            "last_hidden_state": x,
            "pooler_output": self.pooler(x) if self.pooler is not None else None,
            "hidden_states": tuple(hidden) if hidden is not None else None,
        }


class MegatronBertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MegatronBertLMPredictionHead(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.transform = MegatronBertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class MegatronBertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(cfg)


class MegatronBertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: MegatronBertConfig):
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(cfg)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)


class _WithMLMHead(MaskedLMHeads):
    """Shared by the two masked-LM classes (enc.models.common.MaskedLMHeads): the encoder is ``bert``."""

    backbone_attr = "bert"
    bert: MegatronBertModel


class MegatronBertForPreTraining(_WithMLMHead):
    """Masked-LM and sentence-order (NSP) heads. ``forward`` -> ``logits`` (MLM), ``seq_relationship_logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self._attach(config, MegatronBertModel(config, add_pooling_layer=True), MegatronBertPreTrainingHeads(config))


class MegatronBertForMaskedLM(_WithMLMHead):
    """Masked-LM head only (no pooler). ``forward`` -> ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self._attach(config, MegatronBertModel(config, add_pooling_layer=False), MegatronBertOnlyMLMHead(config))


HEADS: dict[str, type[nn.Module]] = {
    "MegatronBertForPreTraining": MegatronBertForPreTraining,
    "MegatronBertForMaskedLM": MegatronBertForMaskedLM,
    "MegatronBertForCausalLM": MegatronBertForMaskedLM,  # same parameters
    "MegatronBertModel": MegatronBertModel,
    "BertForPreTraining": MegatronBertForPreTraining,
    "BertForMaskedLM": MegatronBertForMaskedLM,
    "BertLMHeadModel": MegatronBertForMaskedLM,
    "BertModel": MegatronBertModel,
}


def tied_keys(model: nn.Module) -> dict[str, str]:
    if not isinstance(model, _WithMLMHead):
        return {}
    tied = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
    if model.config.tie_word_embeddings:
        tied["cls.predictions.decoder.weight"] = "bert.embeddings.word_embeddings.weight"
    return tied


def build(cfg: MegatronBertConfig, cls: type[nn.Module] = MegatronBertForPreTraining,
          device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """A model with uninitialised weights (meta by default: shapes only)."""
    with no_init(), torch.device("meta"):  # no init: shapes only, no dynamo import
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        if isinstance(model, _WithMLMHead):
            model.tie_weights()
    return model.eval()


def expected_keys(cfg: MegatronBertConfig, cls: type[nn.Module] = MegatronBertForPreTraining) -> set[str]:
    """The state-dict keys written on disk (tied ones excluded)."""
    model = build(cfg, cls)
    return set(model.state_dict()) - set(tied_keys(model))


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    head: str | None = None, **kw) -> nn.Module:
    """Load any HF ``megatron-bert`` (or ``bert``) directory, one tensor at a time.

    ``head``: "pretraining", "mlm" or "base"; by default the class named in ``architectures``
    (a task head enc does not implement, e.g. ForSequenceClassification, loads its ``bert.`` encoder).
    Keys and shapes are checked first (nothing read); then the weights stream into the allocated
    model, so the peak is the model plus one tensor.
    """
    raw = read_config(model_dir)
    cfg = MegatronBertConfig.from_dict(raw)
    arch = (raw.get("architectures") or ["MegatronBertForPreTraining"])[0]
    by_head = {"pretraining": MegatronBertForPreTraining, "mlm": MegatronBertForMaskedLM, "base": MegatronBertModel}
    if head is not None and head not in by_head:
        raise ConfigError(Path(model_dir) / "config.json", f"unknown head {head!r} (pretraining, mlm, base)")
    cls = by_head[head] if head else HEADS.get(arch, MegatronBertModel)
    weights = {_tf_era_name(k): v for k, v in lazy_weights(model_dir).items()
               if not k.endswith(".position_ids")}  # an old HF buffer
    if dtype is None:
        dtype = next((v.dtype for v in weights.values() if v.dtype.is_floating_point), torch.float32)
    if cls is MegatronBertModel:
        has_pooler = any(k.startswith(("bert.pooler.", "pooler.")) for k in weights)
        with no_init(), torch.device("meta"):  # no init: shapes only, no dynamo import
            model: nn.Module = MegatronBertModel(cfg, add_pooling_layer=has_pooler).to(dtype)
        tied: dict[str, str] = {}
        ignore: tuple[str, ...] = ("cls.", "classifier.", "qa_outputs.", "bert.")
    else:
        model = build(cfg, cls, device="meta", dtype=dtype)
        tied = tied_keys(model)
        ignore = ("cls.seq_relationship.", "bert.pooler.") if cls is MegatronBertForMaskedLM else ()
    wanted = set(model.state_dict())
    names = strip_prefix(dict.fromkeys(weights), "bert.", wanted)  # renames only: values unused
    weights = dict(zip(names, weights.values(), strict=True))
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    load_into(model, shapes, Path(model_dir), tied=tied, ignore_unexpected=ignore)  # strict; reads nothing
    model = model.to_empty(device=device)
    if isinstance(model, _WithMLMHead):
        model.tie_weights()
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, lazy in weights.items():
            if k in params:  # others were ignored on purpose (another task's head)
                params[k].copy_(lazy.load())
    return model.eval()


def _tf_era_name(key: str) -> str:
    """``LayerNorm.gamma`` / ``LayerNorm.beta`` -> ``.weight`` / ``.bias``, as transformers renames them."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key
