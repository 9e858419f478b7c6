"""The tensor names and shapes of ``enc.models.bert_generation``'s models for a config, without importing torch.

``enc convert --no-verify`` checks its plan against the model (strict key accounting, and the
config's shapes against the checkpoint's) before any byte moves; building the model on the meta
device for that would import torch (~1.3 s of CPU) for a conversion that otherwise needs none.
This is that list, written out. ``tests/models/test_bert_generation_keys.py`` holds it equal to
``build_model(cfg, "meta").state_dict()`` (names and shapes) and :func:`tied` equal to
``tied_keys(model)``, for encoder-decoder configs, each half alone and several sizes, so a change to
the model that this list misses fails.
"""

from __future__ import annotations

# the defaults of enc.models.bert_generation.BertGenerationConfig
_DEFAULTS = {"vocab_size": 50358, "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096,
             "max_position_embeddings": 512}

# lm_head.decoder.weight is tied to the word embeddings (when tie_word_embeddings), lm_head.decoder.bias
# is lm_head.bias (always)
_TIED = {"lm_head.decoder.weight": "bert.embeddings.word_embeddings.weight", "lm_head.decoder.bias": "lm_head.bias"}


def _half(cfg: dict, decoder: bool) -> dict[str, tuple[int, ...]]:
    """BertGenerationEncoder's (``decoder`` False) or BertGenerationDecoder's state dict, unprefixed."""
    d = {k: int(cfg.get(k, v)) for k, v in _DEFAULTS.items()}
    V, H, L, F, P = (d["vocab_size"], d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"],
                     d["max_position_embeddings"])
    cross = bool(cfg.get("add_cross_attention", False))
    out: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (V, H),
        "embeddings.position_embeddings.weight": (P, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }

    def attention(p: str) -> dict[str, tuple[int, ...]]:
        return {p + "self.query.weight": (H, H), p + "self.query.bias": (H,),
                p + "self.key.weight": (H, H), p + "self.key.bias": (H,),
                p + "self.value.weight": (H, H), p + "self.value.bias": (H,),
                p + "output.dense.weight": (H, H), p + "output.dense.bias": (H,),
                p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,)}

    for i in range(L):
        p = f"encoder.layer.{i}."
        out.update(attention(p + "attention."))
        if cross:
            out.update(attention(p + "crossattention."))
        out.update({p + "intermediate.dense.weight": (F, H), p + "intermediate.dense.bias": (F,),
                    p + "output.dense.weight": (H, F), p + "output.dense.bias": (H,),
                    p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,)})
    if not decoder:
        return out
    out = {"bert." + k: s for k, s in out.items()}
    out.update({"lm_head.bias": (V,), "lm_head.decoder.weight": (V, H), "lm_head.decoder.bias": (V,)})
    return out


def _is_decoder(cfg: dict) -> bool:
    arch = (cfg.get("architectures") or [""])[0]
    return arch == "BertGenerationDecoder" or bool(cfg.get("is_decoder", False))


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of the model the config dict ``cfg`` (a config.json's contents:
    an encoder-decoder, or one BertGeneration half) describes, tied tensors included."""
    if cfg.get("model_type") == "encoder-decoder":
        out = {"encoder." + k: s for k, s in _half(cfg["encoder"], False).items()}
        out.update({"decoder." + k: s for k, s in _half(cfg["decoder"], True).items()})
        return out
    return _half(cfg, _is_decoder(cfg))


def tied(cfg: dict) -> set[str]:
    """The names in :func:`expected_shapes` that are another tensor (not written), as ``tied_keys``."""
    if cfg.get("model_type") == "encoder-decoder":
        return {"decoder." + k for k in tied(cfg["decoder"])}
    if not _is_decoder(cfg):
        return set()
    return {k for k in _TIED if cfg.get("tie_word_embeddings", True) or k.endswith("bias")}
