"""The tensor names and shapes of ``enc.models.mobilebert``'s models for a config, without importing torch.

``enc convert --no-verify`` of a MobileBERT TF checkpoint checks its plan against the model (strict key
accounting, and the config's shapes against the checkpoint's) before any byte moves; building the model
for that imported torch (1.5-2 s of CPU). This is that list, written out, as
``enc.models.mobilebert.expected_shapes`` gives it (tied tensors excluded).
``tests/models/test_mobilebert_keys.py`` holds the two equal over configs that cover every switch
(bottleneck modes, stacked FFNs, trigram input, normalization, pooler, tying) and every head.
"""

from __future__ import annotations

# the defaults of enc.models.mobilebert.MobileBertConfig
_DEFAULTS = {"vocab_size": 30522, "hidden_size": 512, "num_hidden_layers": 24, "intermediate_size": 512,
             "max_position_embeddings": 512, "type_vocab_size": 2, "embedding_size": 128, "trigram_input": True,
             "use_bottleneck": True, "intra_bottleneck_size": 128, "use_bottleneck_attention": False,
             "key_query_shared_bottleneck": True, "num_feedforward_networks": 4, "classifier_activation": True,
             "tie_word_embeddings": True}

HEADS = ("base", "mlm", "pretraining")  # MobileBertModel, MobileBertForMaskedLM, MobileBertForPreTraining


def _affine(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (n,), prefix + "bias": (n,)}  # LayerNorm and NoNorm alike


def _linear(prefix: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (n_out, n_in), prefix + "bias": (n_out,)}


def expected_shapes(cfg: dict, head: str = "pretraining") -> dict[str, tuple[int, ...]]:
    """Names and shapes written on disk for ``head`` (see :data:`HEADS`) and the HF config dict ``cfg``."""
    if head not in HEADS:
        raise ValueError(f"unknown MobileBERT head {head!r}")
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    V, H, E, F = c["vocab_size"], c["hidden_size"], c["embedding_size"], c["intermediate_size"]
    B = c["intra_bottleneck_size"]
    W = B if c["use_bottleneck"] else H  # the attention / FFN width
    p = "" if head == "base" else "mobilebert."
    out: dict[str, tuple[int, ...]] = {
        p + "embeddings.word_embeddings.weight": (V, E),
        p + "embeddings.position_embeddings.weight": (c["max_position_embeddings"], H),
        p + "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], H),
        **_linear(p + "embeddings.embedding_transformation.", H, E * (3 if c["trigram_input"] else 1)),
        **_affine(p + "embeddings.LayerNorm.", H),
    }
    for i in range(c["num_hidden_layers"]):
        q = f"{p}encoder.layer.{i}."
        out.update(_linear(q + "attention.self.query.", W, W))
        out.update(_linear(q + "attention.self.key.", W, W))
        out.update(_linear(q + "attention.self.value.", W, W if c["use_bottleneck_attention"] else H))
        out.update(_linear(q + "attention.output.dense.", W, W))
        out.update(_affine(q + "attention.output.LayerNorm.", W))
        out.update(_linear(q + "intermediate.dense.", F, W))
        out.update(_linear(q + "output.dense.", W, F))
        out.update(_affine(q + "output.LayerNorm.", W))
        if c["use_bottleneck"]:
            out.update(_linear(q + "output.bottleneck.dense.", H, W))
            out.update(_affine(q + "output.bottleneck.LayerNorm.", H))
            out.update(_linear(q + "bottleneck.input.dense.", B, H))
            out.update(_affine(q + "bottleneck.input.LayerNorm.", B))
            if not c["use_bottleneck_attention"] and c["key_query_shared_bottleneck"]:
                out.update(_linear(q + "bottleneck.attention.dense.", B, H))
                out.update(_affine(q + "bottleneck.attention.LayerNorm.", B))
        for j in range(c["num_feedforward_networks"] - 1):
            out.update(_linear(f"{q}ffn.{j}.intermediate.dense.", F, W))
            out.update(_linear(f"{q}ffn.{j}.output.dense.", W, F))
            out.update(_affine(f"{q}ffn.{j}.output.LayerNorm.", W))
    if head != "mlm" and c["classifier_activation"]:  # the pooler (MaskedLM has none)
        out.update(_linear(p + "pooler.dense.", H, H))
    if head == "base":
        return out
    out.update(_linear("cls.predictions.transform.dense.", H, H))
    out.update(_affine("cls.predictions.transform.LayerNorm.", H))
    out["cls.predictions.dense.weight"] = (H - E, V)
    out["cls.predictions.bias"] = (V,)
    if not c["tie_word_embeddings"]:
        out["cls.predictions.decoder.weight"] = (V, E)
    if head == "pretraining":
        out.update(_linear("cls.seq_relationship.", 2, H))
    return out
