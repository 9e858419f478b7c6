"""MobileBERT TF variable names -> transformers' MobileBertForPreTraining keys.

The whole weight conversion is this table. Every ``kernel`` is transposed from TF's [in, out] to
torch's [out, in]; ``extra_output_weights`` [V, H - E] too (it becomes ``cls.predictions.dense.weight``
[H - E, V], which the LM head concatenates under the tied [V, E] word embeddings); everything else is
copied. ``cls/seq_relationship/output_weights`` is already [out, in].

``FakeLayerNorm`` (the scope of ``normalization_type: no_norm``, x * gamma + beta) and ``LayerNorm``
(a real layer norm) are looked up under one spelling, ``LayerNorm`` (see :func:`rename`); the converter
checks that the checkpoint's spelling agrees with the config's ``normalization_type``. The MLM
transform's ``LayerNorm`` is real in every MobileBERT.

``{}`` is a layer index (``layer_{}``), then an FFN index (``ffn_layer_{}``: the
``num_feedforward_networks - 1`` FFNs stacked before each layer's own intermediate/output).
"""

from __future__ import annotations

from enc.converters.base import DropList, KeyTable, copy, transpose

_E = "bert/embeddings/"
_L = "bert/encoder/layer_{}/"
_HE = "mobilebert.embeddings."
_HL = "mobilebert.encoder.layer.{}."

TABLE = KeyTable({
    _E + "word_embeddings": (_HE + "word_embeddings.weight", copy),
    _E + "position_embeddings": (_HE + "position_embeddings.weight", copy),
    _E + "token_type_embeddings": (_HE + "token_type_embeddings.weight", copy),
    _E + "embedding_transformation/kernel": (_HE + "embedding_transformation.weight", transpose),
    _E + "embedding_transformation/bias": (_HE + "embedding_transformation.bias", copy),
    _E + "LayerNorm/gamma": (_HE + "LayerNorm.weight", copy),
    _E + "LayerNorm/beta": (_HE + "LayerNorm.bias", copy),
    # bottlenecks: input (the attention residual) and the shared key/query projection
    _L + "bottleneck/input/dense/kernel": (_HL + "bottleneck.input.dense.weight", transpose),
    _L + "bottleneck/input/dense/bias": (_HL + "bottleneck.input.dense.bias", copy),
    _L + "bottleneck/input/LayerNorm/gamma": (_HL + "bottleneck.input.LayerNorm.weight", copy),
    _L + "bottleneck/input/LayerNorm/beta": (_HL + "bottleneck.input.LayerNorm.bias", copy),
    _L + "bottleneck/attention/dense/kernel": (_HL + "bottleneck.attention.dense.weight", transpose),
    _L + "bottleneck/attention/dense/bias": (_HL + "bottleneck.attention.dense.bias", copy),
    _L + "bottleneck/attention/LayerNorm/gamma": (_HL + "bottleneck.attention.LayerNorm.weight", copy),
    _L + "bottleneck/attention/LayerNorm/beta": (_HL + "bottleneck.attention.LayerNorm.bias", copy),
    # attention
    _L + "attention/self/query/kernel": (_HL + "attention.self.query.weight", transpose),
    _L + "attention/self/query/bias": (_HL + "attention.self.query.bias", copy),
    _L + "attention/self/key/kernel": (_HL + "attention.self.key.weight", transpose),
    _L + "attention/self/key/bias": (_HL + "attention.self.key.bias", copy),
    _L + "attention/self/value/kernel": (_HL + "attention.self.value.weight", transpose),
    _L + "attention/self/value/bias": (_HL + "attention.self.value.bias", copy),
    _L + "attention/output/dense/kernel": (_HL + "attention.output.dense.weight", transpose),
    _L + "attention/output/dense/bias": (_HL + "attention.output.dense.bias", copy),
    _L + "attention/output/LayerNorm/gamma": (_HL + "attention.output.LayerNorm.weight", copy),
    _L + "attention/output/LayerNorm/beta": (_HL + "attention.output.LayerNorm.bias", copy),
    # stacked FFNs
    _L + "ffn_layer_{}/intermediate/dense/kernel": (_HL + "ffn.{}.intermediate.dense.weight", transpose),
    _L + "ffn_layer_{}/intermediate/dense/bias": (_HL + "ffn.{}.intermediate.dense.bias", copy),
    _L + "ffn_layer_{}/output/dense/kernel": (_HL + "ffn.{}.output.dense.weight", transpose),
    _L + "ffn_layer_{}/output/dense/bias": (_HL + "ffn.{}.output.dense.bias", copy),
    _L + "ffn_layer_{}/output/LayerNorm/gamma": (_HL + "ffn.{}.output.LayerNorm.weight", copy),
    _L + "ffn_layer_{}/output/LayerNorm/beta": (_HL + "ffn.{}.output.LayerNorm.bias", copy),
    # the layer's own FFN, then the output bottleneck back to hidden_size
    _L + "intermediate/dense/kernel": (_HL + "intermediate.dense.weight", transpose),
    _L + "intermediate/dense/bias": (_HL + "intermediate.dense.bias", copy),
    _L + "output/dense/kernel": (_HL + "output.dense.weight", transpose),
    _L + "output/dense/bias": (_HL + "output.dense.bias", copy),
    _L + "output/LayerNorm/gamma": (_HL + "output.LayerNorm.weight", copy),
    _L + "output/LayerNorm/beta": (_HL + "output.LayerNorm.bias", copy),
    _L + "output/bottleneck/dense/kernel": (_HL + "output.bottleneck.dense.weight", transpose),
    _L + "output/bottleneck/dense/bias": (_HL + "output.bottleneck.dense.bias", copy),
    _L + "output/bottleneck/LayerNorm/gamma": (_HL + "output.bottleneck.LayerNorm.weight", copy),
    _L + "output/bottleneck/LayerNorm/beta": (_HL + "output.bottleneck.LayerNorm.bias", copy),
    # pooler (only with classifier_activation) and the pre-training heads
    "bert/pooler/dense/kernel": ("mobilebert.pooler.dense.weight", transpose),
    "bert/pooler/dense/bias": ("mobilebert.pooler.dense.bias", copy),
    "cls/predictions/transform/dense/kernel": ("cls.predictions.transform.dense.weight", transpose),
    "cls/predictions/transform/dense/bias": ("cls.predictions.transform.dense.bias", copy),
    "cls/predictions/transform/LayerNorm/gamma": ("cls.predictions.transform.LayerNorm.weight", copy),
    "cls/predictions/transform/LayerNorm/beta": ("cls.predictions.transform.LayerNorm.bias", copy),
    "cls/predictions/output_bias": ("cls.predictions.bias", copy),
    "cls/predictions/extra_output_weights": ("cls.predictions.dense.weight", transpose),  # [V, H-E] -> [H-E, V]
    "cls/seq_relationship/output_weights": ("cls.seq_relationship.weight", copy),  # already [out, in]
    "cls/seq_relationship/output_bias": ("cls.seq_relationship.bias", copy),
})

DROP = DropList({
    r"(^|/)global_step$": "training step counter",
    r"/adam_[mv]$": "Adam optimizer slot",
    r"/lamb_[mv]$": "LAMB optimizer slot",
    r"/(Adam|Momentum|Adagrad)(_\d+)?$": "tf.train optimizer slot",
    r"^(AdamWeightDecayOptimizer|LAMB)(_\d+)?(/|$)": "optimizer state",
    r"(^|/)beta[12]_power$": "optimizer state",
    r"^teacher/": "distillation teacher (IB-BERT) variables, not part of the student",
    r"(^|/)MobileBert(Act|Weight)FakeQuantWithMinMaxVars": "quantization-aware-training range",
    r"^_CHECKPOINTABLE_OBJECT_GRAPH$": "TF2 object-graph metadata",
    r"^good_steps$|^loss_scale$|^current_loss_scale$": "mixed-precision loss-scale state",
})

# TF variable names that only MobileBERT writes (ALBERT's live under bert/encoder/transformer/group_N).
SIGNATURE = (
    r"^bert/encoder/layer_\d+/(bottleneck|ffn_layer_\d+)/",
    r"^bert/embeddings/(embedding_transformation|FakeLayerNorm)/",
    r"/FakeLayerNorm/(gamma|beta)$",
    r"^cls/predictions/extra_output_weights$",
)

# Tied on the HF side, never written: decoder.weight = word embeddings, decoder.bias = cls.predictions.bias.
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def rename(key: str) -> str:
    """The table's spelling: ``FakeLayerNorm`` (no_norm) is looked up as ``LayerNorm``."""
    return key.replace("/FakeLayerNorm/", "/LayerNorm/")
