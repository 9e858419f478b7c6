"""The torch-free BertGeneration key list (enc.models.bert_generation_keys) equals the models' own state dicts."""

from __future__ import annotations

import pytest

from enc.models.bert_generation import build_model, tied_keys
from enc.models.bert_generation_keys import expected_shapes, tied

SIZES = [
    {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
     "max_position_embeddings": 12},
    {"vocab_size": 33, "hidden_size": 12, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 20,
     "max_position_embeddings": 7},
    {"vocab_size": 7, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8},
]


def _half(size: dict, decoder: bool, **extra) -> dict:
    return {"model_type": "bert-generation", **size, "is_decoder": decoder, "add_cross_attention": decoder,
            "architectures": ["BertGenerationDecoder" if decoder else "BertGenerationEncoder"], **extra}


def _configs() -> list:
    out = []
    for i, size in enumerate(SIZES):
        out.append(pytest.param(_half(size, False), id=f"encoder-{i}"))
        out.append(pytest.param(_half(size, True), id=f"decoder-{i}"))
        out.append(pytest.param({"model_type": "encoder-decoder", "encoder": _half(size, False),
                                 "decoder": _half(size, True), "tie_encoder_decoder": i % 2 == 0}, id=f"seq2seq-{i}"))
    size = SIZES[0]
    # a decoder without its embeddings tied (only the bias stays tied); one without cross-attention;
    # a decoder named by is_decoder alone; defaults (no sizes given)
    out.append(pytest.param(_half(size, True, tie_word_embeddings=False), id="decoder-untied"))
    out.append(pytest.param({"model_type": "encoder-decoder", "encoder": _half(size, False),
                             "decoder": _half(size, True, tie_word_embeddings=False)}, id="seq2seq-untied"))
    out.append(pytest.param({**_half(size, True), "add_cross_attention": False}, id="decoder-no-cross"))
    out.append(pytest.param({**_half(size, True), "architectures": []}, id="decoder-by-flag"))
    out.append(pytest.param({"model_type": "bert-generation", "num_hidden_layers": 1}, id="defaults"))
    return out


@pytest.mark.parametrize("cfg", _configs())
def test_shapes_and_tied_keys_equal_the_models(cfg):
    model = build_model(cfg, "meta")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = expected_shapes(cfg)
    assert list(got) == list(want) and got == want  # names, order and shapes
    assert tied(cfg) == set(tied_keys(model))


def test_the_converters_key_list_is_the_models(tmp_path):
    """What the converter checks its plan against, for each part of a real (TensorFlow-written) module."""
    from pathlib import Path

    from enc.converters.base import ConvertOptions
    from enc.converters.bertgeneration_tf import BertGenerationTFConverter

    fix = Path(__file__).resolve().parents[1] / "fixtures" / "bertgen"
    for layout in ("separate", "shared"):
        for part in (None, "encoder", "decoder"):
            ov = {"num_heads": 4, "hidden_act": "gelu", **({"part": part} if part else {})}
            with BertGenerationTFConverter(fix / layout, ConvertOptions(overrides=ov)) as conv:
                model = build_model(conv.hf_config(), "meta")
                assert conv.expected_keys() == set(model.state_dict()) - set(tied_keys(model))
                assert conv.expected_keys() == set(conv.plan().tensors)
