"""enc eval squad end to end: enc's predictions equal transformers', files, scoring-only mode, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from enc.evals import metrics
from enc.evals.data import load_squad
from enc.evals.squad import build_features, postprocess
from enc.tokenization import load_tokenizer
from tests.evals.helpers import FIXTURES, save_albert, train_spm
from tests.evals.test_cli_glue import cli, one_line_error
from tests.evals.test_metrics import V2, V2_NA, V2_PREDS

SQUAD = FIXTURES / "squad"


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


def hf_logits(model_dir: Path, feats) -> tuple[list, list]:
    import transformers

    model = transformers.AlbertForQuestionAnswering.from_pretrained(model_dir).eval()
    T = max(len(f.input_ids) for f in feats)
    ids = torch.tensor([f.input_ids + [0] * (T - len(f.input_ids)) for f in feats])
    tt = torch.tensor([f.token_type_ids + [0] * (T - len(f.input_ids)) for f in feats])
    mask = torch.tensor([[1] * len(f.input_ids) + [0] * (T - len(f.input_ids)) for f in feats])
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=tt, attention_mask=mask)
    n = [len(f.input_ids) for f in feats]
    return ([s[:k].numpy() for s, k in zip(out.start_logits, n)], [e[:k].numpy() for e, k in zip(out.end_logits, n)])


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_predictions_equal_transformers(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture,
                                        version: str) -> None:
    m = save_albert(tmp_path / "qa", spiece, cls="AlbertForQuestionAnswering", vocab_size=300, seed=7)
    data = SQUAD / f"dev-v{version}.json"
    out = tmp_path / "out"
    rc, res, _ = cli(capsys, "squad", "--model", m, "--version", version, "--data", data, "--out-dir", out,
                     "--max-length", "64", "--doc-stride", "16", "--batch-size", "4", "--json")
    assert rc == 0
    r = res["results"][0]
    sd = load_squad(data, version)
    feats = build_features(sd.examples, load_tokenizer(m), 64, 16)
    assert r["features"] == len(feats) > r["examples"] == len(sd.examples)  # several windows per example
    start, end = hf_logits(m, feats)
    ref = postprocess(sd.examples, feats, start, end, version == "2.0")
    preds = json.loads((out / "predictions.json").read_text())
    assert preds == ref.predictions
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    assert [p["text"] for p in nbest["q01"]] == [p["text"] for p in ref.nbest["q01"]]
    if version == "2.0":
        odds = json.loads((out / "null_odds.json").read_text())
        assert odds == pytest.approx(ref.null_odds, abs=1e-4)
        want = metrics.squad_v2_evaluate(sd.articles, ref.best_non_null, ref.null_odds, 0.0)
        assert r["task"] == "squad_v2" and list(r["metrics"]) == list(want)
        assert r["metrics"]["exact"] == pytest.approx(metrics.squad_v2_evaluate(sd.articles, preds)["exact"])
    else:
        assert not (out / "null_odds.json").exists()
        want = metrics.squad_v1_evaluate(sd.articles, preds)
        assert r["task"] == "squad" and list(r["metrics"]) == ["exact_match", "f1"]
    for k, v in want.items():
        assert r["metrics"][k] == pytest.approx(v)


def test_scoring_only_reproduces_the_official_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": q, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]} for q, golds in V2]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps(V2_PREDS))
    (tmp_path / "na.json").write_text(json.dumps(V2_NA))
    rc, res, _ = cli(capsys, "squad", "--data", tmp_path / "dev.json", "--predictions", tmp_path / "p.json",
                     "--na-probs", tmp_path / "na.json", "--json", "--output", tmp_path / "r.json")
    assert rc == 0 and res["version"] == "2.0"
    # the official evaluate-v2.0.py prints exactly this dict for these files (numbers worked by hand)
    assert res["results"][0]["metrics"] == {
        "exact": 40.0, "f1": 50.0, "total": 5, "HasAns_exact": pytest.approx(100 / 3), "HasAns_f1": 50.0,
        "HasAns_total": 3, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
        "best_exact": 60.0, "best_exact_thresh": 0.1, "best_f1": 70.0, "best_f1_thresh": 0.3}
    assert json.loads((tmp_path / "r.json").read_text()) == res
    rc, res, _ = cli(capsys, "squad", "--data", tmp_path / "dev.json", "--predictions", tmp_path / "p.json",
                     "--na-probs", tmp_path / "na.json", "--na-prob-thresh", "0.5", "--json")
    assert (res["results"][0]["metrics"]["exact"], res["results"][0]["metrics"]["f1"]) == (60.0, 70.0)
    v1 = load_squad(SQUAD / "dev-v1.1.json", "1.1").examples
    (tmp_path / "v1.json").write_text(json.dumps({e["id"]: e["answers"]["text"][-1] for e in v1}))  # any gold counts
    rc, res, _ = cli(capsys, "squad", "--data", SQUAD / "dev-v1.1.json", "--predictions", tmp_path / "v1.json",
                     "--json")
    assert rc == 0 and res["results"][0]["metrics"] == {"exact_match": 100.0, "f1": 100.0}


def test_finetune_squad_learns_and_saves(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    base = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    data = SQUAD / "dev-v1.1.json"
    rc, res, _ = cli(capsys, "squad", "--model", base, "--version", "1.1", "--data", data, "--train", data,
                     "--finetune", "--epochs", "30", "--lr", "2e-3", "--batch-size", "8", "--max-length", "96",
                     "--doc-stride", "32", "--out-dir", tmp_path / "o", "--save", tmp_path / "ft", "--json")
    r = res["results"][0]
    assert rc == 0 and r["finetune"]["mean_loss"] < r["finetune"]["first_loss"] / 2
    assert r["metrics"]["exact_match"] >= 50.0  # memorises the 11 training questions
    hf, info = transformers.AlbertForQuestionAnswering.from_pretrained(tmp_path / "ft", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rc, again, _ = cli(capsys, "squad", "--model", tmp_path / "ft", "--data", data, "--max-length", "96",
                       "--doc-stride", "32", "--out-dir", tmp_path / "o2", "--json")
    assert again["results"][0]["metrics"] == pytest.approx(r["metrics"])


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture) -> None:
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"q01": "Loire", "zz9": "x"}))
    assert one_line_error(capsys, "squad", "--data", SQUAD / "dev-v1.1.json", "--predictions", preds) == \
        f"{preds}: 1 prediction id(s) not in the data, e.g. 'zz9' (wrong data file or split?)"
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps({"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}))
    assert one_line_error(capsys, "squad", "--data", bad, "--predictions", preds) == \
        (f"{bad}: not a SQuAD JSON file: data[0].paragraphs[0].qas[0]: expected 'id' and 'question' strings "
         "and an 'answers' list")
    base = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    assert one_line_error(capsys, "squad", "--model", base, "--data", SQUAD / "dev-v2.0.json") == \
        f"{base}: model has no question-answering head (qa_outputs.* weights); pass --finetune to train one"
    assert one_line_error(capsys, "squad", "--data", SQUAD / "dev-v2.0.json") == \
        "pass --model DIR (or --predictions FILE --data FILE to score a file)"
    assert one_line_error(capsys, "squad", "--data", SQUAD / "dev-v1.1.json", "--predictions", preds,
                          "--model", base) == "--predictions scores a file; drop --model/--finetune"


@pytest.mark.skipif(importlib.util.find_spec("enc.models.megatron_bert") is None,
                    reason="enc.models.megatron_bert not written yet")
def test_megatron_bert_squad_equals_transformers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    from tests.evals.helpers import save_megatron

    m = save_megatron(tmp_path / "qa", cls="MegatronBertForQuestionAnswering", seed=3)
    data = SQUAD / "dev-v2.0.json"
    rc, res, _ = cli(capsys, "squad", "--model", m, "--data", data, "--out-dir", tmp_path / "o", "--max-length", "48",
                     "--doc-stride", "8", "--json")
    assert rc == 0 and res["version"] == "2.0"
    sd = load_squad(data, "2.0")
    feats = build_features(sd.examples, load_tokenizer(m), 48, 8)
    hf = transformers.MegatronBertForQuestionAnswering.from_pretrained(m).eval()
    start, end = [], []
    with torch.no_grad():
        for f in feats:
            out = hf(input_ids=torch.tensor([f.input_ids]), token_type_ids=torch.tensor([f.token_type_ids]))
            start.append(out.start_logits[0].numpy())
            end.append(out.end_logits[0].numpy())
    ref = postprocess(sd.examples, feats, start, end, True)
    assert json.loads((tmp_path / "o" / "predictions.json").read_text()) == ref.predictions
