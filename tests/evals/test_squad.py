"""SQuAD features (vs transformers' overflow windows), post-processing, files, scoring-only mode."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from enc.errors import FormatError, UsageError
from enc.evals import squad as S
from enc.evals.data import load_squad


def wordpiece(squad_dir: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [e["context"] + " " + e["question"] for e in load_squad(squad_dir / "dev-v2.0.json", "2.0").examples]
    tk.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tk


class Adapter:
    """enc's tokenizer interface over a ``tokenizers.Tokenizer``."""

    def __init__(self, tk):
        self.tk, self.cls_id, self.sep_id = tk, tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")

    def encode(self, text, pair=None, add_special_tokens=True):
        e = self.tk.encode(text, add_special_tokens=False)
        return SimpleNamespace(ids=e.ids, offsets=e.offsets)


@pytest.mark.parametrize(("max_length", "stride"), [(384, 128), (64, 16), (48, 8), (40, 4)])
def test_features_equal_transformers_overflow_windows(squad_dir: Path, max_length: int, stride: int) -> None:
    from transformers import PreTrainedTokenizerFast

    tk = wordpiece(squad_dir)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                 unk_token="[UNK]")
    examples = load_squad(squad_dir / "dev-v2.0.json", "2.0").examples
    feats = S.build_features(examples, Adapter(tk), max_length, stride)
    enc = hf([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
             truncation="only_second", max_length=max_length, stride=stride, return_overflowing_tokens=True,
             return_offsets_mapping=True, return_token_type_ids=True)
    assert len(feats) == len(enc["input_ids"])
    if max_length < 48:
        assert len(feats) > len(examples)  # the long paragraph really is windowed
    for i, f in enumerate(feats):
        seq = enc.sequence_ids(i)
        assert f.example_index == enc["overflow_to_sample_mapping"][i]
        assert f.input_ids == enc["input_ids"][i]
        assert f.token_type_ids == enc["token_type_ids"][i]
        assert f.offsets == [tuple(o) if seq[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]


def test_window_starts() -> None:
    assert S.window_starts(10, 20, 5) == [0]
    assert S.window_starts(30, 11, 4) == [0, 7, 14, 21]  # slices overlap by the stride
    with pytest.raises(UsageError, match="--doc-stride 11 must be smaller"):
        S.window_starts(30, 11, 11)


def test_training_targets_point_at_the_answer(squad_dir: Path) -> None:
    examples = load_squad(squad_dir / "dev-v2.0.json", "2.0").examples
    feats = S.build_features(examples, Adapter(wordpiece(squad_dir)), 40, 8, train=True)
    found = set()
    for f in feats:
        ex = examples[f.example_index]
        if f.start_position == 0:
            assert f.end_position == 0
            continue
        a, b = f.offsets[f.start_position][0], f.offsets[f.end_position][1]
        assert ex["context"][a:b].lower() == ex["answers"]["text"][0].lower()
        found.add(ex["id"])
    answerable = {e["id"] for e in examples if e["answers"]["text"]}
    assert found == answerable


def feature(ei: int, offsets: list) -> S.Feature:
    return S.Feature(ei, [0] * len(offsets), [0] * len(offsets), offsets)


CTX = "abc def ghi jkl"
OFFS = [None, None, None, (0, 3), (4, 7), (8, 11), (12, 15), None]


def test_postprocess_by_hand() -> None:
    ex = [{"id": "a", "context": CTX}]
    start = [np.array([1, 0, 0, 5, 2, 0, 0, 9.0])]   # index 7 is [SEP]: never an answer
    end = [np.array([1, 0, 0, 0, 4, 6, 0, 9.0])]
    out = S.postprocess(ex, [feature(0, OFFS)], start, end, version_2=False, max_answer_length=3)
    assert out.predictions == {"a": "abc def ghi"}  # 5 + 6
    out = S.postprocess(ex, [feature(0, OFFS)], start, end, version_2=False, max_answer_length=2)
    assert out.predictions == {"a": "abc def"}  # 5 + 4 beats 2 + 6 once 3-token spans are too long
    nb = out.nbest["a"]
    assert [p["text"] for p in nb[:2]] == ["abc def", "def ghi"]
    assert {p["text"] for p in nb[2:4]} == {"def", "ghi"}  # both 6; "abc" (5) next
    assert nb[4]["text"] == "abc"
    assert (nb[0]["start_logit"], nb[0]["end_logit"]) == (5.0, 4.0)
    assert sum(p["probability"] for p in nb) == pytest.approx(1.0)
    assert set(nb[0]) == {"start_logit", "end_logit", "text", "probability"}
    # n_best limits the candidate indexes: top-1 start and end are [SEP] -> nothing valid
    out = S.postprocess(ex, [feature(0, OFFS)], start, end, version_2=False, n_best=1)
    assert out.predictions == {"a": "empty"}
    out = S.postprocess(ex, [feature(0, OFFS)], start, end, version_2=False, n_best=2)
    assert [p["text"] for p in out.nbest["a"]] == ["abc def ghi"]


def test_postprocess_v2_null_is_the_minimum_over_features() -> None:
    ex = [{"id": "a", "context": CTX}]
    f1 = feature(0, OFFS)
    f2 = feature(0, [None, None, (8, 11), (12, 15), None])
    start = [np.array([6, 0, 0, 3, 0, 0, 0, 0.0]), np.array([2, 0, 0, 0, 0.0])]
    end = [np.array([4, 0, 0, 1, 0, 0, 0, 0.0]), np.array([1, 0, 0, 0, 0.0])]
    # null scores: 10 (feature 1), 3 (feature 2) -> 3; best span "abc" = 3 + 1 = 4 -> diff -1
    out = S.postprocess(ex, [f1, f2], start, end, version_2=True)
    assert out.null_odds == {"a": -1.0} and out.predictions == {"a": "abc"}
    assert "" in [p["text"] for p in out.nbest["a"]]
    out = S.postprocess(ex, [f1, f2], start, end, version_2=True, null_threshold=-2.0)
    assert out.predictions == {"a": ""} and out.best_non_null == {"a": "abc"}


def test_postprocess_inserts_empty_when_nothing_fits() -> None:
    ex = [{"id": "a", "context": CTX}]
    f = feature(0, [None, None, None])
    out = S.postprocess(ex, [f], [np.zeros(3)], [np.zeros(3)], version_2=False)
    assert out.predictions == {"a": "empty"}
    out = S.postprocess(ex, [f], [np.zeros(3)], [np.zeros(3)], version_2=True)
    assert out.predictions == {"a": "empty"} and out.null_odds == {"a": 0.0}


def test_write_outputs(tmp_path: Path) -> None:
    out = S.QAOutput({"a": "x"}, {"a": [{"text": "x", "probability": 1.0}]}, {"a": -1.5}, {"a": "x"})
    files = S.write_outputs(out, tmp_path / "o", version_2=True)
    assert [f.name for f in files] == ["predictions.json", "nbest_predictions.json", "null_odds.json"]
    assert json.loads(files[2].read_text()) == {"a": -1.5}
    assert len(S.write_outputs(out, tmp_path / "p", version_2=False)) == 2


def gold_predictions(path: Path) -> dict[str, str]:
    return {e["id"]: (e["answers"]["text"][0] if e["answers"]["text"] else "")
            for e in load_squad(path, "2.0").examples}


def test_scoring_only_reproduces_official_numbers(tmp_path: Path, squad_dir: Path) -> None:
    preds = gold_predictions(squad_dir / "dev-v2.0.json")
    preds["q01"] = "Loire river"  # EM 0, F1 2/3
    preds["n01"] = "The Loire"    # unanswerable: 0
    pp = tmp_path / "predictions.json"
    pp.write_text(json.dumps(preds))
    r, v, _ = S.score_files(squad_dir / "dev-v2.0.json", pp)
    assert v == "2.0"
    assert r == {"exact": pytest.approx(1300 / 15), "f1": pytest.approx((13 + 2 / 3) / 15 * 100), "total": 15,
                 "HasAns_exact": pytest.approx(1000 / 11), "HasAns_f1": pytest.approx((10 + 2 / 3) / 11 * 100),
                 "HasAns_total": 11, "NoAns_exact": 75.0, "NoAns_f1": 75.0, "NoAns_total": 4}
    na = tmp_path / "null_odds.json"
    na.write_text(json.dumps({k: (0.9 if k == "n01" else 0.1) for k in preds}))
    r = S.score_files(squad_dir / "dev-v2.0.json", pp, na)[0]
    # thresh 0.1 keeps everything answered but n01: best = 14 (EM) / 14 + 2/3 (F1) of 15
    assert (r["best_exact"], r["best_exact_thresh"]) == (pytest.approx(1400 / 15), 0.1)
    assert (r["best_f1"], r["best_f1_thresh"]) == (pytest.approx((14 + 2 / 3) / 15 * 100), 0.1)
    r = S.score_files(squad_dir / "dev-v2.0.json", pp, na, na_prob_thresh=0.5)[0]
    assert r["exact"] == pytest.approx(1400 / 15)


def test_scoring_only_v1(tmp_path: Path, squad_dir: Path, capsys: pytest.CaptureFixture) -> None:
    preds = gold_predictions(squad_dir / "dev-v1.1.json")
    del preds["q11"]
    pp = tmp_path / "p.json"
    pp.write_text(json.dumps(preds))
    r, v, _ = S.score_files(squad_dir / "dev-v1.1.json", pp)
    assert v == "1.1" and r == {"exact_match": pytest.approx(1000 / 11), "f1": pytest.approx(1000 / 11)}
    assert "1 unanswered question(s) will receive score 0" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--na-probs is for SQuAD v2.0"):
        S.score_files(squad_dir / "dev-v1.1.json", pp, pp)


def test_scoring_only_bad_files(tmp_path: Path, squad_dir: Path) -> None:
    data = squad_dir / "dev-v2.0.json"
    preds = gold_predictions(data)
    pp = tmp_path / "p.json"
    pp.write_text(json.dumps({**preds, "zzz": "x"}))
    with pytest.raises(FormatError) as e:
        S.score_files(data, pp)
    assert str(e.value) == f"{pp}: 1 prediction id(s) not in the data, e.g. 'zzz' (wrong data file or split?)"
    pp.write_text(json.dumps({k: v for k, v in preds.items() if k != "q05"}))
    with pytest.raises(FormatError, match="no prediction for 1 question"):
        S.score_files(data, pp)
    pp.write_text(json.dumps({**preds, "q05": 3}))
    with pytest.raises(FormatError, match="prediction for id 'q05' is int, expected a string"):
        S.score_files(data, pp)
    pp.write_text(json.dumps(preds))
    na = tmp_path / "na.json"
    na.write_text(json.dumps({"q01": 0.5}))
    with pytest.raises(FormatError, match="no no-answer probability for 14 question"):
        S.score_files(data, pp, na)
