"""The torch-free key lists (enc.models.megatron_bert_keys) equal the models' own state dict keys."""

from __future__ import annotations

import pytest

from enc.models import gpt2, megatron_bert
from enc.models.megatron_bert_keys import HEAD_OF, gpt2_keys, megatron_bert_keys

CONFIGS = [
    {"model_type": "megatron-bert", "num_hidden_layers": 3},
    {"model_type": "megatron-bert", "num_hidden_layers": 1, "tie_word_embeddings": False},
    {"model_type": "bert", "num_hidden_layers": 2},  # post-LN BERT
    {"model_type": "bert", "num_hidden_layers": 2, "tie_word_embeddings": False},
    {"model_type": "megatron-bert"},  # the default 24 layers
]


def test_every_architecture_has_a_head():
    assert set(HEAD_OF) == set(megatron_bert.HEADS)


@pytest.mark.parametrize("arch", sorted(megatron_bert.HEADS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['model_type']}-{c.get('num_hidden_layers')}-"
                                                        f"{c.get('tie_word_embeddings', True)}")
def test_bert_key_list_equals_the_models(arch, cfg):
    full = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
            "max_position_embeddings": 8, "architectures": [arch], **cfg}
    want = megatron_bert.expected_keys(megatron_bert.MegatronBertConfig.from_dict(full), megatron_bert.HEADS[arch])
    got = megatron_bert_keys(full, arch)
    assert got == want
    assert len(got) > 16 * cfg.get("num_hidden_layers", 24)


@pytest.mark.parametrize("cfg", [{"n_layer": 3}, {"n_layer": 2, "tie_word_embeddings": False},
                                 {"num_hidden_layers": 1}, {}])
def test_gpt2_key_list_equals_the_models(cfg):
    full = {"vocab_size": 40, "n_embd": 16, "n_head": 4, "n_positions": 8, **cfg}
    c = gpt2.GPT2Config.from_dict(full)
    want = set(gpt2.build(c).state_dict()) - set(gpt2.tied_keys(c))
    assert gpt2_keys(full) == want
    assert ("lm_head.weight" in want) == (cfg.get("tie_word_embeddings") is False)
