"""GLUE and SQuAD metrics, offline, in numpy and the standard library.

GLUE: names and definitions as ``evaluate``'s ``glue`` metric (which calls sklearn and scipy):
``matthews_correlation`` (CoLA), ``accuracy`` (SST-2, MNLI, QNLI, RTE, WNLI), ``accuracy`` + ``f1``
(MRPC, QQP; F1 of the positive class 1), ``pearson`` + ``spearmanr`` (STS-B). Fractions in [0, 1].

SQuAD: the logic of the official ``evaluate-v1.1.py`` and ``evaluate-v2.0.py`` scripts, line for
line, including their different empty-answer rules, the HasAns/NoAns split and
``find_best_thresh``. Percentages, as the scripts print them.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------- GLUE


def accuracy(preds: Sequence, labels: Sequence) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean())


def f1_binary(preds: Sequence, labels: Sequence, positive: int = 1) -> float:
    """F1 of the positive class, 0.0 when it is undefined (sklearn's ``zero_division`` default)."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = int(np.sum(p & y))
    denom = int(np.sum(p)) + int(np.sum(y))
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(preds: Sequence, labels: Sequence) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, as sklearn); 0.0 if undefined."""
    y, p = np.asarray(labels), np.asarray(preds)
    classes, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (idx[: len(y)], idx[len(y):]), 1)
    t_sum, p_sum = c.sum(axis=1), c.sum(axis=0)
    n_correct, n = np.trace(c), c.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if denom == 0.0:
        return float("nan")  # scipy warns and returns nan for constant input
    return float(max(-1.0, min(1.0, float(np.dot(a, b)) / denom)))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rankdata(x), rankdata(y))


# metric config name (as evaluate's glue metric) -> metric keys
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
    # Not in evaluate: the GLUE diagnostic set is scored with (3-class) Matthews correlation.
    "ax": ("matthews_correlation",),
}


def glue_metric(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """``evaluate.load("glue", task).compute(predictions=..., references=...)`` without the Hub."""
    if task not in GLUE_METRICS:
        raise KeyError(f"unknown GLUE metric config {task!r}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if task in ("cola", "ax"):
        return {"matthews_correlation": matthews_corrcoef(predictions, references)}
    if task == "stsb":
        return {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy(predictions, references), "f1": f1_binary(predictions, references)}
    return {"accuracy": accuracy(predictions, references)}


# -------------------------------------------------------------------------------------- SQuAD


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (both official scripts)."""

    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


# v1.1 ----------------------------------------------------------------------------------------


def f1_score_v1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_v1(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_v1_evaluate(dataset: list[dict], predictions: Mapping[str, str]) -> dict[str, float]:
    """``evaluate-v1.1.py``'s ``evaluate(dataset, predictions)``: ``dataset`` is the JSON's ``data``.

    A question without a prediction scores 0 (the script prints a warning; the caller does).
    """
    f1 = exact_match = 0.0
    total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(exact_match_v1(prediction, gt) for gt in ground_truths)
                f1 += max(f1_score_v1(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# v2.0 ----------------------------------------------------------------------------------------


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def make_qid_to_has_ans(dataset: list[dict]) -> dict[str, bool]:
    return {qa["id"]: bool(qa["answers"]) for article in dataset for p in article["paragraphs"] for qa in p["qas"]}


def get_raw_scores(dataset: list[dict], preds: Mapping[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    exact_scores: dict[str, float] = {}
    f1_scores: dict[str, float] = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
                if not gold_answers:
                    # For unanswerable questions, only correct answer is empty string
                    gold_answers = [""]
                if qid not in preds:
                    continue  # the script prints "Missing prediction for ..."
                a_pred = preds[qid]
                exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float],
                           qid_to_has_ans: Mapping[str, bool], na_prob_thresh: float) -> dict[str, float]:
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        new_scores[qid] = float(not qid_to_has_ans[qid]) if pred_na else s
    return new_scores


def make_eval_dict(exact_scores: Mapping[str, float], f1_scores: Mapping[str, float],
                   qid_list: Iterable[str] | None = None) -> dict[str, float]:
    if not qid_list:
        total = len(exact_scores)
        return {"exact": 100.0 * sum(exact_scores.values()) / total,
                "f1": 100.0 * sum(f1_scores.values()) / total, "total": total}
    qid_list = list(qid_list)
    total = len(qid_list)
    return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
            "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}


def find_best_thresh(preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
                     qid_to_has_ans: Mapping[str, bool]) -> tuple[float, float]:
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2_evaluate(dataset: list[dict], preds: Mapping[str, str], na_probs: Mapping[str, float] | None = None,
                      na_prob_thresh: float = 1.0) -> dict[str, float]:
    """``evaluate-v2.0.py``'s ``main()``: the exact dict it prints with ``--out-file``.

    ``best_*`` keys appear only with ``na_probs`` (the script's ``--na-prob-file``), ``HasAns_*`` /
    ``NoAns_*`` only when such questions exist.
    """
    given_na = na_probs is not None
    na = dict(na_probs) if given_na else {k: 0.0 for k in preds}
    qid_to_has_ans = make_qid_to_has_ans(dataset)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(dataset, preds)
    exact_thresh = apply_no_ans_threshold(exact_raw, na, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na, qid_to_has_ans, na_prob_thresh)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        for k, v in make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids).items():
            out_eval[f"HasAns_{k}"] = v
    if no_ans_qids:
        for k, v in make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids).items():
            out_eval[f"NoAns_{k}"] = v
    if given_na:
        best_exact, exact_t = find_best_thresh(preds, exact_raw, na, qid_to_has_ans)
        best_f1, f1_t = find_best_thresh(preds, f1_raw, na, qid_to_has_ans)
        out_eval.update(best_exact=best_exact, best_exact_thresh=exact_t, best_f1=best_f1, best_f1_thresh=f1_t)
    return out_eval
