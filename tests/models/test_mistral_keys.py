"""The torch-free key list (enc.models.mistral_keys) equals the model's own state dict keys."""

from __future__ import annotations

import pytest

from enc.models import mistral
from enc.models.mistral_keys import expected_keys


@pytest.mark.parametrize("cfg", [
    {"model_type": "mistral", "num_hidden_layers": 3, "tie_word_embeddings": False},
    {"model_type": "mistral", "num_hidden_layers": 2, "tie_word_embeddings": True},
    {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4, "tie_word_embeddings": False},
    {"model_type": "mixtral", "num_hidden_layers": 1},  # Mixtral's default: 8 experts
])
def test_key_list_equals_the_models_state_dict(cfg):
    full = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, **cfg}
    want = mistral.expected_keys(mistral.MistralConfig.from_dict(full))
    got = expected_keys(full)
    assert got == want
    assert ("lm_head.weight" in got) == (not cfg.get("tie_word_embeddings", False))
