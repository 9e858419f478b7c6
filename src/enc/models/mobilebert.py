"""MobileBERT in the Hugging Face layout (``model_type: mobilebert``), SDPA attention.

Parameter names are exactly transformers' ``MobileBertModel`` / ``MobileBertForPreTraining`` /
``MobileBertForMaskedLM`` ones. What is unusual, and how this file follows transformers:

- embeddings: word embeddings are ``embedding_size`` wide; with ``trigram_input`` each position sees
  ``[e(t+1), e(t), e(t-1)]`` (zero past the ends), and ``embedding_transformation`` maps that (or the
  plain embedding when it is narrower than ``hidden_size``) to ``hidden_size``;
- ``normalization_type``: ``no_norm`` is ``x * weight + bias`` (:class:`NoNorm`) everywhere in the body;
  ``layer_norm`` is a real LayerNorm. As transformers builds them, the embedding LayerNorm and each
  layer's ``output.LayerNorm`` use torch's default eps 1e-5, the others ``layer_norm_eps``;
- bottlenecks: ``bottleneck.input`` maps hidden -> ``intra_bottleneck_size`` (the residual of the
  attention block); queries and keys come from ``bottleneck.attention`` when
  ``key_query_shared_bottleneck``, values from the un-bottlenecked input (unless
  ``use_bottleneck_attention``, where all three read ``bottleneck.input``); ``output.bottleneck`` maps back
  to hidden with a residual to the layer input;
- ``num_feedforward_networks`` - 1 extra FFNs (``ffn.{j}``) before the layer's own intermediate/output;
- pooler: the first token, through ``dense`` + tanh only when ``classifier_activation``;
- MLM decoder: ``h @ cat([word_embeddings^T, dense.weight])`` + bias: the output embedding is the tied
  ``[V, E]`` table widened by ``cls.predictions.dense.weight`` ``[H - E, V]``. ``decoder.weight`` is tied
  to the word embeddings and ``decoder.bias`` to ``cls.predictions.bias`` (written once on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError
from enc.models.common import ACTIVATIONS, MaskedLMHeads, no_init, padding_mask
from enc.models.config import check_heads
from enc.models.loading import lazy_weights, load_into, read_config, strip_prefix

NORMS = ("no_norm", "layer_norm")


def _activation(name: str):
    if name == "relu6":
        return F.relu6
    if name not in ACTIVATIONS:
        raise ConfigError(None, f"unsupported activation {name!r} (supported: relu6, {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


@dataclass
class MobileBertConfig:
    vocab_size: int = 30522
    hidden_size: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    embedding_size: int = 128
    trigram_input: bool = True
    use_bottleneck: bool = True
    intra_bottleneck_size: int = 128
    use_bottleneck_attention: bool = False
    key_query_shared_bottleneck: bool = True
    num_feedforward_networks: int = 4
    normalization_type: str = "no_norm"
    classifier_activation: bool = True
    tie_word_embeddings: bool = True
    num_labels: int = 2
    architectures: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> MobileBertConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if "id2label" in d and isinstance(d["id2label"], dict) and "num_labels" not in d:
            cfg.num_labels = len(d["id2label"])
        _activation(cfg.hidden_act)
        if cfg.normalization_type not in NORMS:
            raise ConfigError(None, f"normalization_type {cfg.normalization_type!r} is not one of {', '.join(NORMS)}")
        check_heads(cfg.true_hidden_size, cfg.num_attention_heads, "attention width")
        if cfg.num_feedforward_networks < 1:
            raise ConfigError(None, "num_feedforward_networks must be at least 1")
        return cfg

    @property
    def true_hidden_size(self) -> int:
        return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size


class NoNorm(nn.Module):
    """MobileBERT's "no_norm": an elementwise affine map (TF's FakeLayerNorm)."""

    def __init__(self, size: int, eps: float | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _norm(cfg: MobileBertConfig, size: int, eps: float | None = None) -> nn.Module:
    if cfg.normalization_type == "no_norm":
        return NoNorm(size)
    return nn.LayerNorm(size, eps=cfg.layer_norm_eps if eps is None else eps)


_TORCH_DEFAULT_EPS = 1e-5  # where transformers builds the LayerNorm without passing layer_norm_eps


class MobileBertEmbeddings(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.trigram_input = cfg.trigram_input
        self.project = cfg.trigram_input or cfg.embedding_size != cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embedding_transformation = nn.Linear(cfg.embedding_size * (3 if cfg.trigram_input else 1),
                                                  cfg.hidden_size)
        self.LayerNorm = _norm(cfg, cfg.hidden_size, _TORCH_DEFAULT_EPS)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the model's "
                             f"{self.position_embeddings.num_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids)
        if self.trigram_input:
            x = torch.cat([F.pad(x[:, 1:], (0, 0, 0, 1)), x, F.pad(x[:, :-1], (0, 0, 1, 0))], dim=2)
        if self.project:
            x = self.embedding_transformation(x)
        positions = torch.arange(T, device=input_ids.device)
        x = x + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class MobileBertSelfAttention(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        width = cfg.true_hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, width // cfg.num_attention_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width if cfg.use_bottleneck_attention else cfg.hidden_size, width)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(q)), heads(self.key(k)), heads(self.value(v)),
                                           attn_mask=bias)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class _DenseNorm(nn.Module):
    """``dense`` then ``LayerNorm(dense(x) + residual)``: SelfOutput, FFNOutput, OutputBottleneck."""

    def __init__(self, cfg: MobileBertConfig, n_in: int, n_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = _norm(cfg, n_out, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class MobileBertAttention(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.self = MobileBertSelfAttention(cfg)
        self.output = _DenseNorm(cfg, cfg.true_hidden_size, cfg.true_hidden_size)


class MobileBertIntermediate(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.true_hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class FFNLayer(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.intermediate = MobileBertIntermediate(cfg)
        self.output = _DenseNorm(cfg, cfg.intermediate_size, cfg.true_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


class MobileBertOutput(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.true_hidden_size)
        self.LayerNorm = _norm(cfg, cfg.true_hidden_size, _TORCH_DEFAULT_EPS)
        if cfg.use_bottleneck:
            self.bottleneck = _DenseNorm(cfg, cfg.true_hidden_size, cfg.hidden_size)

    def forward(self, inter: torch.Tensor, residual: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(self.dense(inter) + residual)
        return self.bottleneck(h, layer_input) if hasattr(self, "bottleneck") else h


class BottleneckLayer(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intra_bottleneck_size)
        self.LayerNorm = _norm(cfg, cfg.intra_bottleneck_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x))


class Bottleneck(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.mode = ("all" if cfg.use_bottleneck_attention else "shared_qk" if cfg.key_query_shared_bottleneck
                     else "none")
        self.input = BottleneckLayer(cfg)
        if self.mode == "shared_qk":
            self.attention = BottleneckLayer(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query input, key input, value input, attention residual)."""
        small = self.input(x)
        if self.mode == "all":
            return small, small, small, small
        if self.mode == "shared_qk":
            qk = self.attention(x)
            return qk, qk, x, small
        return x, x, x, small


class MobileBertLayer(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.attention = MobileBertAttention(cfg)
        self.intermediate = MobileBertIntermediate(cfg)
        self.output = MobileBertOutput(cfg)
        if cfg.use_bottleneck:
            self.bottleneck = Bottleneck(cfg)
        if cfg.num_feedforward_networks > 1:
            self.ffn = nn.ModuleList(FFNLayer(cfg) for _ in range(cfg.num_feedforward_networks - 1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, residual = self.bottleneck(x) if hasattr(self, "bottleneck") else (x, x, x, x)
        h = self.attention.output(self.attention.self(q, k, v, bias), residual)
        for ffn in getattr(self, "ffn", ()):
            h = ffn(h)
        return self.output(self.intermediate(h), h, x)


class MobileBertEncoder(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MobileBertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MobileBertPooler(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.do_activate = cfg.classifier_activation
        if self.do_activate:
            self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        first = h[:, 0]
        return torch.tanh(self.dense(first)) if self.do_activate else first


class MobileBertModel(nn.Module):
    """The encoder. ``forward`` returns ``last_hidden_state``, ``pooler_output`` and ``hidden_states``
    (the embeddings, then every layer's output, as transformers returns them)."""

    def __init__(self, config: MobileBertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = MobileBertEmbeddings(config)
        self.encoder = MobileBertEncoder(config)
        self.pooler = MobileBertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> dict:
        x = self.embeddings(input_ids, token_type_ids)
        bias = padding_mask(attention_mask, x.dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, bias)
            if hidden is not None:
                hidden.append(x)
        return {
            "last_hidden_state": x,
            "pooler_output": self.pooler(x) if self.pooler is not None else None,
            "hidden_states": tuple(hidden) if hidden is not None else None,
        }


class MobileBertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # a real LayerNorm, always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MobileBertLMPredictionHead(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.transform = MobileBertPredictionHeadTransform(cfg)
        self.dense = nn.Linear(cfg.vocab_size, cfg.hidden_size - cfg.embedding_size, bias=False)
        self.decoder = nn.Linear(cfg.embedding_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.transform(x)
        return h @ torch.cat([self.decoder.weight.t(), self.dense.weight], dim=0) + self.decoder.bias


class MobileBertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.predictions = MobileBertLMPredictionHead(cfg)


class MobileBertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.predictions = MobileBertLMPredictionHead(cfg)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)


class _WithMLMHead(MaskedLMHeads):
    """Shared by the two masked-LM classes (enc.models.common.MaskedLMHeads): the encoder is ``mobilebert``."""

    backbone_attr = "mobilebert"
    mobilebert: MobileBertModel


class MobileBertForPreTraining(_WithMLMHead):
    """MLM and next-sentence heads. ``forward`` -> ``logits`` (MLM), ``seq_relationship_logits``."""

    def __init__(self, config: MobileBertConfig):
        super().__init__()
        self._attach(config, MobileBertModel(config, add_pooling_layer=True), MobileBertPreTrainingHeads(config))


class MobileBertForMaskedLM(_WithMLMHead):
    """MLM head only (no pooler). ``forward`` -> ``logits``."""

    def __init__(self, config: MobileBertConfig):
        super().__init__()
        self._attach(config, MobileBertModel(config, add_pooling_layer=False), MobileBertOnlyMLMHead(config))


HEADS: dict[str, type[nn.Module]] = {
    "MobileBertForPreTraining": MobileBertForPreTraining,
    "MobileBertForMaskedLM": MobileBertForMaskedLM,
    "MobileBertModel": MobileBertModel,
}


def tied_keys(model: nn.Module) -> dict[str, str]:
    if not isinstance(model, _WithMLMHead):
        return {}
    tied = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
    if model.config.tie_word_embeddings:
        tied["cls.predictions.decoder.weight"] = "mobilebert.embeddings.word_embeddings.weight"
    return tied


def build(cfg: MobileBertConfig, cls: type[nn.Module] = MobileBertForPreTraining,
          device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """A model with uninitialised weights (meta by default: shapes only)."""
    with no_init(), torch.device("meta"):
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        if isinstance(model, _WithMLMHead):
            model.tie_weights()
    return model.eval()


def expected_shapes(cfg: MobileBertConfig, cls: type[nn.Module] = MobileBertForPreTraining) -> dict[str, tuple]:
    """The state-dict keys written on disk (tied ones excluded) and their shapes.

    Built on the CPU without initialisation: the weights are never touched, so their pages are never
    resident, and the meta device (whose first use imports ~1.5 s of torch) is not needed.
    """
    with no_init():
        model = cls(cfg)
    tied = tied_keys(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    head: str | None = None, **kw) -> nn.Module:
    """Load any HF ``mobilebert`` directory, one tensor at a time.

    ``head``: "pretraining", "mlm" or "base"; by default the class named in ``architectures``
    (a task head enc runs elsewhere, e.g. ForSequenceClassification, loads its ``mobilebert.`` encoder).
    """
    raw = read_config(model_dir)
    try:
        cfg = MobileBertConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(Path(model_dir) / "config.json", e.message) from None
    arch = (raw.get("architectures") or ["MobileBertForPreTraining"])[0]
    by_head = {"pretraining": MobileBertForPreTraining, "mlm": MobileBertForMaskedLM, "base": MobileBertModel}
    if head is not None and head not in by_head:
        raise ConfigError(Path(model_dir) / "config.json", f"unknown head {head!r} (pretraining, mlm, base)")
    cls = by_head[head] if head else HEADS.get(arch, MobileBertModel)
    weights = {k: v for k, v in lazy_weights(model_dir).items() if not k.endswith(".position_ids")}
    if dtype is None:
        dtype = next((v.dtype for v in weights.values() if v.dtype.is_floating_point), torch.float32)
    if cls is MobileBertModel:
        with no_init(), torch.device("meta"):
            model: nn.Module = MobileBertModel(cfg, add_pooling_layer=True).to(dtype)
        tied: dict[str, str] = {}
        ignore: tuple[str, ...] = ("cls.", "classifier.", "qa_outputs.", "mobilebert.")
        optional: tuple[str, ...] = ("pooler.",)  # QA checkpoints are saved without one
    else:
        model = build(cfg, cls, device="meta", dtype=dtype)
        tied = tied_keys(model)
        ignore = ("cls.seq_relationship.", "mobilebert.pooler.") if cls is MobileBertForMaskedLM else ()
        optional = ()
    wanted = set(model.state_dict())
    names = strip_prefix(dict.fromkeys(weights), "mobilebert.", wanted)
    weights = dict(zip(names, weights.values(), strict=True))
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    load_into(model, shapes, Path(model_dir), tied=tied, ignore_unexpected=ignore, optional_missing=optional)
    model = model.to_empty(device=device)
    if isinstance(model, _WithMLMHead):
        model.tie_weights()
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, lazy in weights.items():
            if k in params:
                params[k].copy_(lazy.load())
    return model.eval()
