"""The tensor names and shapes of ``enc.models.albert``'s models for a config, without importing torch.

``enc convert --no-verify`` checks its plan against the model (strict key accounting, and the
config's shapes against the checkpoint's) before any byte moves; building the model on the meta
device for that would import torch (1.5-2 s of CPU) for a conversion that otherwise needs none.
This is that list, written out. ``tests/models/test_albert_keys.py`` holds it equal to
``build(cls, cfg, "meta").state_dict()`` (names and shapes) for several configs and every head, so a
change to the model that this list misses fails.
"""

from __future__ import annotations

# the defaults of enc.models.albert.AlbertConfig
_DEFAULTS = {"vocab_size": 30000, "embedding_size": 128, "hidden_size": 768, "num_hidden_groups": 1,
             "intermediate_size": 3072, "inner_group_num": 1, "max_position_embeddings": 512, "type_vocab_size": 2}

HEADS = ("base", "mlm", "pretraining")  # AlbertModel, AlbertForMaskedLM, AlbertForPreTraining


def _dims(cfg: dict) -> tuple[int, ...]:
    d = {k: int(cfg.get(k, v)) for k, v in _DEFAULTS.items()}
    return (d["vocab_size"], d["embedding_size"], d["hidden_size"], d["intermediate_size"],
            d["num_hidden_groups"], d["inner_group_num"], d["max_position_embeddings"], d["type_vocab_size"])


def backbone_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """``AlbertModel(cfg).state_dict()``'s names and shapes (no ``albert.`` prefix)."""
    V, E, H, F, G, Inner, P, T = _dims(cfg)
    out: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (V, E),
        "embeddings.position_embeddings.weight": (P, E),
        "embeddings.token_type_embeddings.weight": (T, E),
        "embeddings.LayerNorm.weight": (E,),
        "embeddings.LayerNorm.bias": (E,),
        "encoder.embedding_hidden_mapping_in.weight": (H, E),
        "encoder.embedding_hidden_mapping_in.bias": (H,),
    }
    layer = {
        "attention.query.weight": (H, H), "attention.query.bias": (H,),
        "attention.key.weight": (H, H), "attention.key.bias": (H,),
        "attention.value.weight": (H, H), "attention.value.bias": (H,),
        "attention.dense.weight": (H, H), "attention.dense.bias": (H,),
        "attention.LayerNorm.weight": (H,), "attention.LayerNorm.bias": (H,),
        "ffn.weight": (F, H), "ffn.bias": (F,),
        "ffn_output.weight": (H, F), "ffn_output.bias": (H,),
        "full_layer_layer_norm.weight": (H,), "full_layer_layer_norm.bias": (H,),
    }
    for g in range(G):
        for i in range(Inner):
            p = f"encoder.albert_layer_groups.{g}.albert_layers.{i}."
            out.update({p + k: s for k, s in layer.items()})
    out["pooler.weight"] = (H, H)
    out["pooler.bias"] = (H,)
    return out


def expected_shapes(cfg: dict, head: str = "pretraining") -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of ``head`` (see :data:`HEADS`) for the config dict ``cfg``
    (an HF config.json's contents), tied tensors included: ``predictions.decoder.weight`` (tied to the
    word embeddings) and ``predictions.decoder.bias`` (the same parameter as ``predictions.bias``)."""
    if head not in HEADS:
        raise ValueError(f"unknown ALBERT head {head!r}")
    base = backbone_shapes(cfg)
    if head == "base":
        return base
    V, E, H = _dims(cfg)[:3]
    out = {"albert." + k: s for k, s in base.items()}
    out.update({
        "predictions.bias": (V,),
        "predictions.dense.weight": (E, H), "predictions.dense.bias": (E,),
        "predictions.LayerNorm.weight": (E,), "predictions.LayerNorm.bias": (E,),
        "predictions.decoder.weight": (V, E), "predictions.decoder.bias": (V,),
    })
    if head == "pretraining":
        out["sop_classifier.classifier.weight"] = (2, H)
        out["sop_classifier.classifier.bias"] = (2,)
    return out
