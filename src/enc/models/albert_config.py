"""ALBERT's config.json as a dataclass, and the masked-LM weights it implies, without importing torch.

``enc.models.albert`` (torch) and ``enc.models.albert_numpy`` (the torch-free fill-mask forward)
both read configs through :class:`AlbertConfig`; :func:`mlm_shapes` is the masked-LM state dict's
keys and shapes, held equal to the torch model's by a test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from enc.models.config import check_heads, config_errors


@dataclass
class AlbertConfig:
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    classifier_dropout_prob: float | None = 0.1
    hidden_dropout_prob: float = 0.0
    num_labels: int = 2
    problem_type: str | None = None
    id2label: dict | None = None

    @classmethod
    @config_errors
    def from_dict(cls, d: dict) -> AlbertConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        if cfg.id2label:
            cfg.id2label = {int(k): v for k, v in cfg.id2label.items()}
            cfg.num_labels = len(cfg.id2label)
        return cfg


def mlm_shapes(c: AlbertConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``AlbertForMaskedLM(c).state_dict()`` (pooler included; tied names too) with its shape."""
    E, H, F, V = c.embedding_size, c.hidden_size, c.intermediate_size, c.vocab_size
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name: str, n: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (n,), (n,)

    emb = "albert.embeddings."
    out[emb + "word_embeddings.weight"] = (V, E)
    out[emb + "position_embeddings.weight"] = (c.max_position_embeddings, E)
    out[emb + "token_type_embeddings.weight"] = (c.type_vocab_size, E)
    norm(emb + "LayerNorm", E)
    linear("albert.encoder.embedding_hidden_mapping_in", E, H)
    for g in range(c.num_hidden_groups):
        for i in range(c.inner_group_num):
            p = f"albert.encoder.albert_layer_groups.{g}.albert_layers.{i}."
            for name in ("query", "key", "value", "dense"):
                linear(p + "attention." + name, H, H)
            norm(p + "attention.LayerNorm", H)
            linear(p + "ffn", H, F)
            linear(p + "ffn_output", F, H)
            norm(p + "full_layer_layer_norm", H)
    linear("albert.pooler", H, H)
    out["predictions.bias"] = (V,)
    linear("predictions.dense", H, E)
    norm("predictions.LayerNorm", E)
    linear("predictions.decoder", E, V)
    return out
