"""Heads over enc's runtimes: same outputs as transformers' fine-tuned models, strict loading, saving."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from enc.errors import CorruptCheckpoint, UsageError
from enc.evals.runtime import collate, encode_pair
from enc.models.heads import load_task_model, save_task_model
from enc.tokenization import load_tokenizer
from tests.evals.helpers import albert_config, save_albert, train_spm

TEXTS = [("the movie was good and fun .", None), ("Who wrote the book ?", "Anna wrote the book ."),
         ("The Loire is the longest river in France.", "How long is it?"), ("a", "b c d e f g h")]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


def batch(model_dir: Path) -> dict:
    tok = load_tokenizer(model_dir)
    return collate([encode_pair(tok, a, b, 64) for a, b in TEXTS], tok.pad_id, "cpu")


def hf_inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if v is not None}


@pytest.mark.parametrize("num_labels", [1, 3])
def test_albert_sequence_classification_equals_transformers(tmp_path: Path, spiece: Path, num_labels: int) -> None:
    import transformers

    d = save_albert(tmp_path / "m", spiece, vocab_size=300, num_labels=num_labels)
    b = batch(d)
    assert b["attention_mask"] is not None  # padding is exercised
    ours = load_task_model(d, "sequence-classification")
    theirs = transformers.AlbertForSequenceClassification.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b), theirs(**hf_inputs(b)).logits, rtol=1e-5, atol=1e-5)


def test_albert_qa_equals_transformers_and_has_no_pooler(tmp_path: Path, spiece: Path) -> None:
    import transformers

    d = save_albert(tmp_path / "qa", spiece, cls="AlbertForQuestionAnswering", vocab_size=300)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("albert.pooler") for k in f.keys())  # transformers' QA model has none
    b = batch(d)
    ours = load_task_model(d, "question-answering")
    theirs = transformers.AlbertForQuestionAnswering.from_pretrained(d).eval()
    with torch.no_grad():
        s, e = ours(**b)
        ref = theirs(**hf_inputs(b))
    torch.testing.assert_close(s, ref.start_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e, ref.end_logits, rtol=1e-5, atol=1e-5)


def test_base_checkpoint_needs_finetune_then_gets_a_fresh_head(tmp_path: Path, spiece: Path) -> None:
    d = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    with pytest.raises(UsageError) as e:
        load_task_model(d, "sequence-classification")
    assert str(e.value) == f"{d}: model has no classification head (classifier.* weights); pass --finetune to train one"
    with pytest.raises(UsageError, match="no question-answering head"):
        load_task_model(d, "question-answering")
    m = load_task_model(d, "sequence-classification", num_labels=3, new_head=True, seed=0)
    from enc.models.loading import load_state_dict

    sd = load_state_dict(d)
    torch.testing.assert_close(m.albert.encoder.embedding_hidden_mapping_in.weight,
                               sd["albert.encoder.embedding_hidden_mapping_in.weight"])
    assert m.classifier.weight.shape == (3, 32) and float(m.classifier.bias.detach().abs().sum()) == 0.0
    assert abs(float(m.classifier.weight.detach().std()) - 0.02) < 0.01
    m2 = load_task_model(d, "sequence-classification", num_labels=3, new_head=True, seed=0)
    assert torch.equal(m.classifier.weight, m2.classifier.weight)  # seeded


def test_saved_models_load_in_transformers_without_missing_keys(tmp_path: Path, spiece: Path) -> None:
    import transformers

    d = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    b = batch(d)
    for kind, cls in (("sequence-classification", transformers.AlbertForSequenceClassification),
                      ("question-answering", transformers.AlbertForQuestionAnswering)):
        m = load_task_model(d, kind, num_labels=2, new_head=True, seed=1)
        out = save_task_model(m, tmp_path / kind, d, {"id2label": {"0": "no", "1": "yes"}})
        assert (out / "spiece.model").is_file()
        theirs, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            ref = theirs.eval()(**hf_inputs(b))
            ours = m(**b)
        if kind == "sequence-classification":
            torch.testing.assert_close(ours, ref.logits, rtol=1e-5, atol=1e-5)
            assert theirs.config.id2label == {0: "no", 1: "yes"}
        else:
            torch.testing.assert_close(ours[0], ref.start_logits, rtol=1e-5, atol=1e-5)
        assert load_task_model(out, kind) is not None  # and enc reloads it strictly


def test_wrong_head_size_and_corrupt_weights(tmp_path: Path, spiece: Path) -> None:
    d = save_albert(tmp_path / "m", spiece, vocab_size=300, num_labels=3)
    with pytest.raises(UsageError, match="the classifier has 3 output"):
        load_task_model(d, "sequence-classification", num_labels=2)
    assert load_task_model(d, "sequence-classification", num_labels=2, new_head=True).num_labels == 2
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    del sd["albert.embeddings.LayerNorm.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CorruptCheckpoint, match="missing weights"):
        load_task_model(d, "sequence-classification")


@pytest.mark.skipif(importlib.util.find_spec("enc.models.megatron_bert") is None,
                    reason="enc.models.megatron_bert not written yet")
@pytest.mark.parametrize("cls", ["MegatronBertForSequenceClassification", "MegatronBertForQuestionAnswering",
                                 "BertForSequenceClassification", "BertForQuestionAnswering"])
def test_megatron_bert_and_bert_heads_equal_transformers(tmp_path: Path, cls: str) -> None:
    import transformers

    config_cls = transformers.BertConfig if cls.startswith("Bert") else transformers.MegatronBertConfig
    cfg = config_cls(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3 if "Sequence" in cls else 2)
    torch.manual_seed(0)
    theirs = getattr(transformers, cls)(cfg).eval()
    from tests.evals.helpers import randomize

    randomize(theirs, 0)
    theirs.save_pretrained(tmp_path / "m")
    kind = "sequence-classification" if "Sequence" in cls else "question-answering"
    ours = load_task_model(tmp_path / "m", kind)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 6:] = 1
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    if kind == "sequence-classification":
        torch.testing.assert_close(a, b.logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(a[0][mask.bool()], b.start_logits[mask.bool()], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[1][mask.bool()], b.end_logits[mask.bool()], rtol=1e-5, atol=1e-5)
    out = save_task_model(ours, tmp_path / "saved")
    _, info = getattr(transformers, cls).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_albert_config_roundtrip_keeps_label_names(tmp_path: Path, spiece: Path) -> None:
    cfg = albert_config(300, num_labels=3, id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    assert cfg.id2label[0] == "contradiction"
    d = save_albert(tmp_path / "m", spiece, vocab_size=300, num_labels=3,
                    id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    m = load_task_model(d, "sequence-classification")
    assert m.hf_config["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
