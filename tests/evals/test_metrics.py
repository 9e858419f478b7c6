"""GLUE and SQuAD metrics against independent computations and hand-computed official numbers."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from enc.evals import metrics as M

# ---------------------------------------------------------------- independent GLUE references


def mcc_reference(y: list[int], p: list[int]) -> float:
    """Gorodkin's R_K from its definition: covariance of one-hot label and prediction matrices."""
    classes = sorted(set(y) | set(p))
    Y = np.array([[int(a == c) for c in classes] for a in y], dtype=float)
    P = np.array([[int(b == c) for c in classes] for b in p], dtype=float)

    def cov(A: np.ndarray, B: np.ndarray) -> float:
        return float(((A - A.mean(0)) * (B - B.mean(0))).sum())

    d = cov(Y, Y) * cov(P, P)
    return 0.0 if d == 0 else cov(Y, P) / math.sqrt(d)


def f1_reference(y: list[int], p: list[int]) -> float:
    tp = sum(1 for a, b in zip(y, p) if a == 1 and b == 1)
    fp = sum(1 for a, b in zip(y, p) if a == 0 and b == 1)
    fn = sum(1 for a, b in zip(y, p) if a == 1 and b == 0)
    if tp == 0:
        return 0.0
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    return 2 * prec * rec / (prec + rec)


@pytest.mark.parametrize("seed", range(8))
def test_classification_metrics_match_independent_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 60)), int(rng.integers(2, 4))
    y = rng.integers(0, k, n).tolist()
    p = [a if rng.random() < 0.6 else int(rng.integers(0, k)) for a in y]
    assert M.matthews_corrcoef(p, y) == pytest.approx(mcc_reference(y, p), abs=1e-12)
    assert M.accuracy(p, y) == pytest.approx(sum(a == b for a, b in zip(y, p)) / n, abs=1e-15)
    yb, pb = [int(a == 1) for a in y], [int(b == 1) for b in p]
    assert M.f1_binary(pb, yb) == pytest.approx(f1_reference(yb, pb), abs=1e-12)


def test_binary_mcc_closed_form() -> None:
    # tp=3 tn=2 fp=1 fn=2: (3*2-1*2)/sqrt(4*5*3*4)
    y = [1, 1, 1, 1, 1, 0, 0, 0]
    p = [1, 1, 1, 0, 0, 0, 0, 1]
    assert M.matthews_corrcoef(p, y) == pytest.approx(4 / math.sqrt(240), abs=1e-15)
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions: sklearn gives 0.0


def test_f1_zero_division_is_zero() -> None:
    assert M.f1_binary([0, 0], [0, 0]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_pearson_spearman_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 50))
    x = np.round(rng.uniform(0, 5, n), 1)  # rounding makes ties, which Spearman must average
    y = np.round(x + rng.normal(0, 1, n), 1)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_rankdata_averages_ties() -> None:
    assert M.rankdata([10, 20, 10, 30, 20, 20]).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]


def test_glue_metric_names_and_values() -> None:
    assert M.glue_metric("cola", [1, 0, 1, 1], [1, 0, 0, 1]) == {"matthews_correlation": pytest.approx(math.sqrt(1 / 3))}
    assert M.glue_metric("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    assert M.glue_metric("mrpc", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75, "f1": 0.8}
    assert M.glue_metric("qqp", [0, 0], [1, 0]) == {"accuracy": 0.5, "f1": 0.0}
    r = M.glue_metric("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert r == {"pearson": pytest.approx(0.8), "spearmanr": pytest.approx(0.8)}
    with pytest.raises(KeyError):
        M.glue_metric("squad", [1], [1])


# ----------------------------------------------------------------------------------- SQuAD


def test_normalize_answer() -> None:
    assert M.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert M.normalize_answer("an apple a day") == "apple day"
    assert M.normalize_answer("  Theatre ") == "theatre"  # articles only as whole words


def _dataset(qas: list[tuple[str, list[str]]]) -> list[dict]:
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": qid, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]}
        for qid, golds in qas]}]}]


def test_squad_v1_official_numbers_by_hand() -> None:
    data = _dataset([("q1", ["The Loire", "Loire"]), ("q2", ["1,006 kilometres"]), ("q3", ["ten"])])
    preds = {"q1": "the loire river", "q2": "1,006 kilometres."}  # q3 unanswered: scores 0
    r = M.squad_v1_evaluate(data, preds)
    # q1: EM 0, F1 2/3 (P 1/2, R 1); q2: EM 1, F1 1; q3: 0 -> totals over 3 questions
    assert r == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx((2 / 3 + 1) / 3 * 100)}
    assert list(r) == ["exact_match", "f1"]


V2 = [("q1", ["The Loire", "Loire"]), ("q2", ["1,006 kilometres"]), ("q3", ["the Atlantic Ocean"]),
      ("q4", []), ("q5", [])]
V2_PREDS = {"q1": "loire", "q2": "1,006 km", "q3": "", "q4": "", "q5": "Newton"}
V2_NA = {"q1": 0.1, "q2": 0.3, "q3": 0.9, "q4": 0.8, "q5": 0.95}


def test_squad_v2_official_numbers_by_hand() -> None:
    data = _dataset(V2)
    # raw EM: 1,0,0,1,0  F1: 1,.5,0,1,0  (q3: empty prediction vs an answer -> 0; q4: both empty -> 1)
    r = M.squad_v2_evaluate(data, V2_PREDS)
    assert r == {"exact": 40.0, "f1": 50.0, "total": 5,
                 "HasAns_exact": pytest.approx(100 / 3), "HasAns_f1": 50.0, "HasAns_total": 3,
                 "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2}
    # with na-probs: sweep in na_prob order q1 .1, q2 .3, q4 .8, q3 .9, q5 .95 starting from 2 (no-answers)
    # EM: 3 at .1 (best), F1: 3 at .1, 3.5 at .3 (best), then q5 costs 1
    r = M.squad_v2_evaluate(data, V2_PREDS, V2_NA)
    assert r["exact"] == 40.0 and r["f1"] == 50.0
    assert (r["best_exact"], r["best_exact_thresh"], r["best_f1"], r["best_f1_thresh"]) == (60.0, 0.1, 70.0, 0.3)
    assert list(r)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    # threshold 0.5: q3, q4, q5 predicted unanswerable -> q5 becomes right
    r = M.squad_v2_evaluate(data, V2_PREDS, V2_NA, na_prob_thresh=0.5)
    assert (r["exact"], r["f1"], r["NoAns_exact"], r["HasAns_f1"]) == (60.0, 70.0, 100.0, 50.0)


def test_squad_v2_no_noans_keys_without_unanswerable() -> None:
    r = M.squad_v2_evaluate(_dataset([("a", ["x"])]), {"a": "x"})
    assert r == {"exact": 100.0, "f1": 100.0, "total": 1, "HasAns_exact": 100.0, "HasAns_f1": 100.0,
                 "HasAns_total": 1}


def test_v1_and_v2_differ_on_empty_strings() -> None:
    # v2: no tokens on both sides -> F1 1; v1: no common token -> 0
    assert M.compute_f1("a", "the") == 1 and M.f1_score_v1("the", "a") == 0
    # gold answers that normalize to nothing are dropped in v2 (the question counts as unanswerable)
    r = M.squad_v2_evaluate(_dataset([("a", ["The"])]), {"a": ""})
    assert r["exact"] == 100.0


def test_squad_f1_bag_of_tokens() -> None:
    # Counter intersection, not set intersection
    gold, pred = "x x y", "x y y"
    common = sum((Counter(gold.split()) & Counter(pred.split())).values())
    assert common == 2
    assert M.compute_f1(gold, pred) == pytest.approx(2 / 3)
