"""The torch-free ALBERT key list (enc.models.albert_keys) equals the models' own state dicts."""

from __future__ import annotations

import pytest

from enc.models.albert import AlbertConfig, AlbertForMaskedLM, AlbertForPreTraining, AlbertModel
from enc.models.albert_keys import expected_shapes
from enc.models.common import build

CLASSES = {"base": AlbertModel, "mlm": AlbertForMaskedLM, "pretraining": AlbertForPreTraining}


@pytest.mark.parametrize("cfg", [
    {"vocab_size": 50, "embedding_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
     "intermediate_size": 24},
    {"vocab_size": 40, "embedding_size": 16, "hidden_size": 16, "num_hidden_layers": 4, "num_hidden_groups": 2,
     "inner_group_num": 2, "num_attention_heads": 2, "intermediate_size": 12, "max_position_embeddings": 32,
     "type_vocab_size": 3},
    {"vocab_size": 30, "embedding_size": 6, "hidden_size": 12, "num_hidden_layers": 3, "num_hidden_groups": 3,
     "num_attention_heads": 3, "intermediate_size": 20, "max_position_embeddings": 16},
])
@pytest.mark.parametrize("head", sorted(CLASSES))
def test_shapes_equal_the_models_state_dict(cfg, head):
    sd = build(CLASSES[head], AlbertConfig.from_dict(cfg), "meta").state_dict()
    want = {k: tuple(v.shape) for k, v in sd.items()}
    assert expected_shapes(cfg, head) == want


def test_unknown_head_refused():
    with pytest.raises(ValueError, match="unknown ALBERT head"):
        expected_shapes({}, "qa")
