"""The original LUKE -> Hugging Face ``LukeForMaskedLM`` key table.

Original names: ``luke/model.py`` (LukeModel, EntityEmbeddings, EntityAwareSelfAttention) and
``luke/pretraining/model.py`` (RobertaLMHead as ``lm_head``, EntityPredictionHead as
``entity_predictions``). The encoder moves under ``luke.``; the heads keep their names.

The third column names the transform; the converter binds them to this checkpoint:

    copy      unchanged
    words     word rows: ``<ent>`` and ``<ent2>`` appended, copies of the rows of "@" and "#"
              (transformers' and studio-ousia's conversion), when the word tokenizer is known
    entities  entity rows: ``[MASK2]`` made a copy of ``[MASK]`` (in place when the vocabulary
              has it, appended when not); with --no-entity-embeddings only [MASK], [UNK], [PAD],
              [MASK2] are kept (the "lite" models)

A pretrained checkpoint has no entity-aware query matrices; ``w2e_query``, ``e2w_query`` and
``e2e_query`` are then copies of ``query`` (``QUERY_COPIES``): with equal matrices entity-aware
attention computes exactly what the original plain attention did.
"""

from __future__ import annotations

from enc.converters.base import DropList

_E = "encoder.layer.{}."
_H = "luke.encoder.layer.{}."

TABLE: dict[str, tuple[str, str]] = {
    "embeddings.word_embeddings.weight": ("luke.embeddings.word_embeddings.weight", "words"),
    "embeddings.position_embeddings.weight": ("luke.embeddings.position_embeddings.weight", "copy"),
    "embeddings.token_type_embeddings.weight": ("luke.embeddings.token_type_embeddings.weight", "copy"),
    "embeddings.LayerNorm.weight": ("luke.embeddings.LayerNorm.weight", "copy"),
    "embeddings.LayerNorm.bias": ("luke.embeddings.LayerNorm.bias", "copy"),
    "entity_embeddings.entity_embeddings.weight": ("luke.entity_embeddings.entity_embeddings.weight", "entities"),
    "entity_embeddings.entity_embedding_dense.weight": ("luke.entity_embeddings.entity_embedding_dense.weight", "copy"),
    "entity_embeddings.position_embeddings.weight": ("luke.entity_embeddings.position_embeddings.weight", "copy"),
    "entity_embeddings.token_type_embeddings.weight": ("luke.entity_embeddings.token_type_embeddings.weight", "copy"),
    "entity_embeddings.LayerNorm.weight": ("luke.entity_embeddings.LayerNorm.weight", "copy"),
    "entity_embeddings.LayerNorm.bias": ("luke.entity_embeddings.LayerNorm.bias", "copy"),
    _E + "attention.self.query.weight": (_H + "attention.self.query.weight", "copy"),
    _E + "attention.self.query.bias": (_H + "attention.self.query.bias", "copy"),
    _E + "attention.self.key.weight": (_H + "attention.self.key.weight", "copy"),
    _E + "attention.self.key.bias": (_H + "attention.self.key.bias", "copy"),
    _E + "attention.self.value.weight": (_H + "attention.self.value.weight", "copy"),
    _E + "attention.self.value.bias": (_H + "attention.self.value.bias", "copy"),
    _E + "attention.self.w2e_query.weight": (_H + "attention.self.w2e_query.weight", "copy"),
    _E + "attention.self.w2e_query.bias": (_H + "attention.self.w2e_query.bias", "copy"),
    _E + "attention.self.e2w_query.weight": (_H + "attention.self.e2w_query.weight", "copy"),
    _E + "attention.self.e2w_query.bias": (_H + "attention.self.e2w_query.bias", "copy"),
    _E + "attention.self.e2e_query.weight": (_H + "attention.self.e2e_query.weight", "copy"),
    _E + "attention.self.e2e_query.bias": (_H + "attention.self.e2e_query.bias", "copy"),
    _E + "attention.output.dense.weight": (_H + "attention.output.dense.weight", "copy"),
    _E + "attention.output.dense.bias": (_H + "attention.output.dense.bias", "copy"),
    _E + "attention.output.LayerNorm.weight": (_H + "attention.output.LayerNorm.weight", "copy"),
    _E + "attention.output.LayerNorm.bias": (_H + "attention.output.LayerNorm.bias", "copy"),
    _E + "intermediate.dense.weight": (_H + "intermediate.dense.weight", "copy"),
    _E + "intermediate.dense.bias": (_H + "intermediate.dense.bias", "copy"),
    _E + "output.dense.weight": (_H + "output.dense.weight", "copy"),
    _E + "output.dense.bias": (_H + "output.dense.bias", "copy"),
    _E + "output.LayerNorm.weight": (_H + "output.LayerNorm.weight", "copy"),
    _E + "output.LayerNorm.bias": (_H + "output.LayerNorm.bias", "copy"),
    "pooler.dense.weight": ("luke.pooler.dense.weight", "copy"),
    "pooler.dense.bias": ("luke.pooler.dense.bias", "copy"),
    "lm_head.dense.weight": ("lm_head.dense.weight", "copy"),
    "lm_head.dense.bias": ("lm_head.dense.bias", "copy"),
    "lm_head.layer_norm.weight": ("lm_head.layer_norm.weight", "copy"),
    "lm_head.layer_norm.bias": ("lm_head.layer_norm.bias", "copy"),
    "lm_head.decoder.weight": ("lm_head.decoder.weight", "words"),  # tied to the word embeddings in the original
    "lm_head.bias": ("lm_head.decoder.bias", "words"),
    "entity_predictions.transform.dense.weight": ("entity_predictions.transform.dense.weight", "copy"),
    "entity_predictions.transform.dense.bias": ("entity_predictions.transform.dense.bias", "copy"),
    "entity_predictions.transform.LayerNorm.weight": ("entity_predictions.transform.LayerNorm.weight", "copy"),
    "entity_predictions.transform.LayerNorm.bias": ("entity_predictions.transform.LayerNorm.bias", "copy"),
    "entity_predictions.bias": ("entity_predictions.bias", "entities"),
}

# HF key -> the original key it copies when the checkpoint has no entity-aware queries of its own.
QUERY_COPIES: dict[str, str] = {
    _H + "attention.self.w2e_query.{}": _E + "attention.self.query.{}",
    _H + "attention.self.e2w_query.{}": _E + "attention.self.query.{}",
    _H + "attention.self.e2e_query.{}": _E + "attention.self.query.{}",
}

DROP = DropList({
    r"^embeddings\.position_ids$": "buffer: transformers computes position ids from the input",
    r"^embeddings\.token_type_ids$": "buffer: all-zero default token types",
    r"^lm_head\.decoder\.bias$": "the same tensor as lm_head.bias (RobertaLMHead ties them)",
    r"^entity_predictions\.decoder\.weight$": "the same tensor as the entity embeddings (tied; transformers ties it)",
    r"^cls_entity_predictions\.": "pretraining-only [CLS] entity-embedding regression head (no HF counterpart)",
})

# Tensors of a DeepSpeed checkpoint outside "module" (ZeRO-less optimizer state, loss scaler ...).
TRAINING_STATE = "DeepSpeed training state outside the model (optimizer, scheduler)"

# Original keys whose presence says what kind of model this is.
BERT_HEADS = ("cls.predictions.", "cls.seq_relationship.")
