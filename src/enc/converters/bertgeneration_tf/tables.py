"""The bertseq2seq TF-Hub variable names -> transformers' BertGeneration / EncoderDecoderModel names.

Names are given after the module's leading scopes (``module/bert/`` in the released modules; the
converter strips whatever precedes ``embeddings/word_embeddings``). Every ``kernel`` is TF's
[in, out] and is transposed to torch's [out, in]; embeddings, LayerNorm ``gamma``/``beta`` and
biases are copied.

One TF layer scope (``encoder/layer_N`` or ``decoder/layer_N``) becomes one HF layer
(``encoder.layer.N``); the converter puts the HF names under the half that uses them:
``encoder.`` (BertGenerationEncoder) or ``decoder.bert.`` (BertGenerationDecoder). A shared
("BERTShare"/"RoBERTaShare") module keeps one stack under ``encoder/``: both halves read it, and the
decoder adds the cross-attention found under ``decoder/layer_N/attention/encdec*``.
"""

from __future__ import annotations

from enc.converters.base import DropList, KeyTable, copy, transpose

# embeddings/... -> <half>.embeddings...   (one set, read by both halves; the LM head is tied to it)
EMBEDDINGS = KeyTable({
    "embeddings/word_embeddings": ("embeddings.word_embeddings.weight", copy),
    "embeddings/position_embeddings": ("embeddings.position_embeddings.weight", copy),
    "embeddings/LayerNorm/gamma": ("embeddings.LayerNorm.weight", copy),
    "embeddings/LayerNorm/beta": ("embeddings.LayerNorm.bias", copy),
})

# <stack>/layer_N/... -> <half>.encoder.layer.N...   (self-attention and feed-forward)
LAYER = KeyTable({
    "layer_{}/attention/self/query/kernel": ("encoder.layer.{}.attention.self.query.weight", transpose),
    "layer_{}/attention/self/query/bias": ("encoder.layer.{}.attention.self.query.bias", copy),
    "layer_{}/attention/self/key/kernel": ("encoder.layer.{}.attention.self.key.weight", transpose),
    "layer_{}/attention/self/key/bias": ("encoder.layer.{}.attention.self.key.bias", copy),
    "layer_{}/attention/self/value/kernel": ("encoder.layer.{}.attention.self.value.weight", transpose),
    "layer_{}/attention/self/value/bias": ("encoder.layer.{}.attention.self.value.bias", copy),
    "layer_{}/attention/output/dense/kernel": ("encoder.layer.{}.attention.output.dense.weight", transpose),
    "layer_{}/attention/output/dense/bias": ("encoder.layer.{}.attention.output.dense.bias", copy),
    "layer_{}/attention/output/LayerNorm/gamma": ("encoder.layer.{}.attention.output.LayerNorm.weight", copy),
    "layer_{}/attention/output/LayerNorm/beta": ("encoder.layer.{}.attention.output.LayerNorm.bias", copy),
    "layer_{}/intermediate/dense/kernel": ("encoder.layer.{}.intermediate.dense.weight", transpose),
    "layer_{}/intermediate/dense/bias": ("encoder.layer.{}.intermediate.dense.bias", copy),
    "layer_{}/output/dense/kernel": ("encoder.layer.{}.output.dense.weight", transpose),
    "layer_{}/output/dense/bias": ("encoder.layer.{}.output.dense.bias", copy),
    "layer_{}/output/LayerNorm/gamma": ("encoder.layer.{}.output.LayerNorm.weight", copy),
    "layer_{}/output/LayerNorm/beta": ("encoder.layer.{}.output.LayerNorm.bias", copy),
})

# decoder/layer_N/attention/encdec* -> decoder.bert.encoder.layer.N.crossattention...
CROSS = KeyTable({
    "layer_{}/attention/encdec/query/kernel": ("encoder.layer.{}.crossattention.self.query.weight", transpose),
    "layer_{}/attention/encdec/query/bias": ("encoder.layer.{}.crossattention.self.query.bias", copy),
    "layer_{}/attention/encdec/key/kernel": ("encoder.layer.{}.crossattention.self.key.weight", transpose),
    "layer_{}/attention/encdec/key/bias": ("encoder.layer.{}.crossattention.self.key.bias", copy),
    "layer_{}/attention/encdec/value/kernel": ("encoder.layer.{}.crossattention.self.value.weight", transpose),
    "layer_{}/attention/encdec/value/bias": ("encoder.layer.{}.crossattention.self.value.bias", copy),
    "layer_{}/attention/encdec_output/dense/kernel": ("encoder.layer.{}.crossattention.output.dense.weight", transpose),
    "layer_{}/attention/encdec_output/dense/bias": ("encoder.layer.{}.crossattention.output.dense.bias", copy),
    "layer_{}/attention/encdec_output/LayerNorm/gamma":
        ("encoder.layer.{}.crossattention.output.LayerNorm.weight", copy),
    "layer_{}/attention/encdec_output/LayerNorm/beta":
        ("encoder.layer.{}.crossattention.output.LayerNorm.bias", copy),
})

# Where each half of the HF model reads, per layout: (HF prefix, [(TF scope, table), ...]).
# "stack" is the scope holding the self-attention layers of a shared module (encoder/ in the
# released layout; decoder/ is accepted too).
HALVES = {
    "separate": {
        "encoder": ("encoder.", [("", EMBEDDINGS), ("encoder/", LAYER)]),
        "decoder": ("decoder.bert.", [("", EMBEDDINGS), ("decoder/", LAYER), ("decoder/", CROSS)]),
    },
    "shared": {
        "encoder": ("encoder.", [("", EMBEDDINGS), ("{stack}/", LAYER)]),
        "decoder": ("decoder.bert.", [("", EMBEDDINGS), ("{stack}/", LAYER), ("decoder/", CROSS)]),
    },
}

# The LM head has no transform and no bias variable in the modules: the bias is written as zeros.
LM_BIAS = "lm_head.bias"

DROP = DropList({
    r"(^|/)global_step$": "training step counter",
    r"/adam_[mv]$": "Adam optimizer slot",
    r"/(Adafactor|adafactor)[^/]*$": "Adafactor optimizer slot",
    r"^(AdamWeightDecayOptimizer|Adafactor)(_\d+)?(/|$)": "optimizer state",
    r"(^|/)beta[12]_power$": "optimizer state",
})
