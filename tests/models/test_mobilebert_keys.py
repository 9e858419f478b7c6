"""The torch-free MobileBERT key list (enc.models.mobilebert_keys) equals the model's expected_shapes."""

from __future__ import annotations

import pytest

from enc.models import mobilebert
from enc.models.mobilebert_keys import expected_shapes

CLASSES = {"base": mobilebert.MobileBertModel, "mlm": mobilebert.MobileBertForMaskedLM,
           "pretraining": mobilebert.MobileBertForPreTraining}
BASE = {"vocab_size": 40, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 20, "max_position_embeddings": 16, "type_vocab_size": 3, "embedding_size": 8}


@pytest.mark.parametrize("over", [
    {},  # MobileBertConfig's defaults: trigram, shared q/k bottleneck, 4 FFNs, no_norm
    {"use_bottleneck": True, "intra_bottleneck_size": 12, "use_bottleneck_attention": True,
     "normalization_type": "layer_norm", "num_feedforward_networks": 1},
    {"use_bottleneck": True, "intra_bottleneck_size": 24, "use_bottleneck_attention": False,
     "key_query_shared_bottleneck": False, "trigram_input": False, "num_feedforward_networks": 2},
    {"use_bottleneck": False, "trigram_input": False, "embedding_size": 24, "classifier_activation": False,
     "normalization_type": "layer_norm", "num_feedforward_networks": 1},
    {"use_bottleneck": False, "tie_word_embeddings": False, "num_feedforward_networks": 3},
])
@pytest.mark.parametrize("head", sorted(CLASSES))
def test_shapes_equal_the_models(over, head):
    cfg = {**BASE, **over}
    want = mobilebert.expected_shapes(mobilebert.MobileBertConfig.from_dict(cfg), CLASSES[head])
    assert expected_shapes(cfg, head) == want


def test_unknown_head_refused():
    with pytest.raises(ValueError, match="unknown MobileBERT head"):
        expected_shapes({}, "qa")
