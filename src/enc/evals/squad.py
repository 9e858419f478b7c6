"""SQuAD: features (sliding windows), post-processing, output files, scoring-only mode.

Features follow transformers' ``run_qa.py`` (fast tokenizer, ``truncation="only_second"``,
``stride=doc_stride``, ``return_overflowing_tokens``): each window holds ``[CLS] question [SEP]
context-slice [SEP]``; consecutive slices start ``L - doc_stride`` tokens apart (they *overlap* by
``doc_stride`` tokens), where ``L`` is the room left for context. Post-processing is
``utils_qa.postprocess_qa_predictions``: top ``n_best`` start/end logits per feature, spans inside
the context and at most ``max_answer_length`` tokens, score = start + end logit, v2 null score =
the minimum over an example's features of ``start[0] + end[0]``, answer "" when
``null - best_non_null > null_threshold``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from enc.errors import FormatError, MissingFile, UsageError
from enc.evals import metrics
from enc.evals.data import SquadData, load_squad


class OffsetTokenizer(Protocol):
    cls_id: int | None
    sep_id: int | None

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Any: ...


@dataclass
class Feature:
    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]   # character span in the context, None outside it
    start_position: int = 0                 # training targets (0 = [CLS]: no answer in this window)
    end_position: int = 0


def window_starts(n: int, room: int, stride: int) -> list[int]:
    """Start of each context slice, as the ``tokenizers`` library truncates with overflow."""
    if n <= room:
        return [0]
    if room <= stride:
        raise UsageError(None, f"--doc-stride {stride} must be smaller than the room left for the context "
                               f"({room} tokens); lower it or raise --max-length")
    starts = []
    for start in range(0, n, room - stride):
        starts.append(start)
        if start + room >= n:
            break
    return starts


def build_features(examples: Sequence[dict[str, Any]], tok: OffsetTokenizer, max_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64, train: bool = False) -> list[Feature]:
    """Tokenize (question, context) pairs into overlapping windows with offsets back to the context."""
    if tok.cls_id is None or tok.sep_id is None:
        raise UsageError(None, "the tokenizer has no [CLS]/[SEP] tokens; extractive QA needs them")
    features: list[Feature] = []
    for ei, ex in enumerate(examples):
        q = tok.encode(ex["question"].lstrip(), add_special_tokens=False).ids[:max_query_length]
        c = tok.encode(ex["context"], add_special_tokens=False)
        ctx_offsets = [_trim(ex["context"], a, b) for a, b in c.offsets]
        room = max_length - len(q) - 3
        for start in window_starts(len(c.ids), room, doc_stride):
            stop = min(start + room, len(c.ids))
            ids = [tok.cls_id, *q, tok.sep_id, *c.ids[start:stop], tok.sep_id]
            tt = [0] * (len(q) + 2) + [1] * (stop - start + 1)
            offsets: list[tuple[int, int] | None] = [None] * (len(q) + 2)
            offsets += ctx_offsets[start:stop] + [None]  # type: ignore[operator]
            f = Feature(ei, ids, tt, offsets)
            if train:
                f.start_position, f.end_position = _target(ex, offsets, len(q) + 2, len(q) + 1 + stop - start)
            features.append(f)
    return features


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    """Drop whitespace a tokenizer included at the edges of a span (sentencepiece's leading space)."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _target(ex: dict[str, Any], offsets: list, first: int, last: int) -> tuple[int, int]:
    """Token span of the first gold answer in this window, (0, 0) if absent (run_qa's rule)."""
    if not ex["answers"]["answer_start"]:
        return 0, 0
    start_char = ex["answers"]["answer_start"][0]
    end_char = start_char + len(ex["answers"]["text"][0])
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    s = first
    while s <= last and offsets[s][0] <= start_char:
        s += 1
    e = last
    while e >= first and offsets[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


@dataclass
class QAOutput:
    predictions: dict[str, str]
    nbest: dict[str, list[dict[str, Any]]]
    null_odds: dict[str, float]              # v2 only: null score - best non-null score
    best_non_null: dict[str, str]            # v2: the best non-empty answer (for the threshold sweep)


def postprocess(examples: Sequence[dict[str, Any]], features: Sequence[Feature],
                start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], version_2: bool,
                n_best: int = 20, max_answer_length: int = 30, null_threshold: float = 0.0) -> QAOutput:
    by_example: dict[int, list[int]] = {}
    for fi, f in enumerate(features):
        by_example.setdefault(f.example_index, []).append(fi)
    out = QAOutput({}, {}, {}, {})
    for ei, ex in enumerate(examples):
        min_null: dict[str, Any] | None = None
        prelim: list[dict[str, Any]] = []
        for fi in by_example.get(ei, []):
            sl, el = np.asarray(start_logits[fi]), np.asarray(end_logits[fi])
            offsets = features[fi].offsets
            null_score = sl[0] + el[0]
            if min_null is None or min_null["score"] > null_score:
                min_null = {"offsets": (0, 0), "score": null_score, "start_logit": sl[0], "end_logit": el[0]}
            start_indexes = np.argsort(sl)[-1: -n_best - 1: -1].tolist()
            end_indexes = np.argsort(el)[-1: -n_best - 1: -1].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    prelim.append({"offsets": (offsets[s][0], offsets[e][1]), "score": sl[s] + el[e],
                                   "start_logit": sl[s], "end_logit": el[e]})
        null_score = 0.0
        if version_2 and min_null is not None:
            prelim.append(min_null)
            null_score = float(min_null["score"])
        preds = sorted(prelim, key=lambda x: x["score"], reverse=True)[:n_best]
        if version_2 and min_null is not None and not any(p["offsets"] == (0, 0) for p in preds):
            preds.append(min_null)
        context = ex["context"]
        for p in preds:
            a, b = p.pop("offsets")
            p["text"] = context[a:b]
        if len(preds) == 0 or (len(preds) == 1 and preds[0]["text"] == ""):
            preds.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([p.pop("score") for p in preds], dtype=np.float64)
        exp = np.exp(scores - np.max(scores))
        probs = exp / exp.sum()
        for prob, p in zip(probs, preds):
            p["probability"] = prob
        qid = ex["id"]
        if not version_2:
            out.predictions[qid] = preds[0]["text"]
        else:
            best = next((p for p in preds if p["text"] != ""), {"text": "", "start_logit": 0.0, "end_logit": 0.0})
            diff = float(null_score - best["start_logit"] - best["end_logit"])
            out.null_odds[qid] = diff
            out.best_non_null[qid] = best["text"]
            out.predictions[qid] = "" if diff > null_threshold else best["text"]
        out.nbest[qid] = [{k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in p.items()}
                          for p in preds]
    return out


def write_outputs(out: QAOutput, out_dir: Path, version_2: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [(out_dir / "predictions.json", out.predictions), (out_dir / "nbest_predictions.json", out.nbest)]
    if version_2:
        files.append((out_dir / "null_odds.json", out.null_odds))
    for path, obj in files:
        path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n")
    return [p for p, _ in files]


# ------------------------------------------------------------------------------------ scoring


def infer_version(data: SquadData, explicit: str | None, na_probs_given: bool = False) -> str:
    if explicit is not None:
        v = explicit.lstrip("v")
        if v not in ("1.1", "2.0"):
            raise UsageError(None, f"--version must be 1.1 or 2.0, not {explicit!r}")
        return v
    fv = (data.version or "").lstrip("v")
    if fv in ("1.1", "2.0"):
        return fv
    return "2.0" if na_probs_given or data.has_impossible else "1.1"


def score(data: SquadData, version: str, predictions: dict[str, str], na_probs: dict[str, float] | None = None,
          na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The official script's result dict for this version."""
    if version == "1.1":
        return metrics.squad_v1_evaluate(data.articles, predictions)
    return metrics.squad_v2_evaluate(data.articles, predictions, na_probs, na_prob_thresh)


def _read_id_map(path: Path, what: str, kind: type | tuple[type, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFile(path, f"{what} file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(path, f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(path, f"{what} must be a JSON object {{question id: value}}")
    for k, v in obj.items():
        if not isinstance(v, kind) or isinstance(v, bool):
            raise FormatError(path, f"{what} for id {k!r} is {type(v).__name__}, expected "
                                    f"{'a string' if kind is str else 'a number'}")
    return obj


def _check_ids(path: Path, what: str, given: dict[str, Any], known: list[str], require_all: bool) -> None:
    known_set = set(known)
    unknown = [k for k in given if k not in known_set]
    if unknown:
        raise FormatError(path, f"{len(unknown)} {what} id(s) not in the data, e.g. {unknown[0]!r} "
                                "(wrong data file or split?)")
    missing = [k for k in known if k not in given]
    if missing and require_all:
        raise FormatError(path, f"no {what} for {len(missing)} question(s), e.g. {missing[0]!r}")
    if missing:
        print(f"enc: warning: {len(missing)} unanswered question(s) will receive score 0", file=sys.stderr)


def score_files(data_path: Path, predictions_path: Path, na_probs_path: Path | None = None,
                version: str | None = None, na_prob_thresh: float = 1.0) -> tuple[dict[str, float], str, SquadData]:
    """Scoring-only mode: the official evaluation script's output for these files."""
    data = load_squad(Path(data_path), version or "2.0")
    v = infer_version(data, version, na_probs_path is not None)
    if data.version is not None and data.version.lstrip("v") not in (v, ""):
        print(f"enc: warning: evaluating as v{v} but the data file says version {data.version}", file=sys.stderr)
    ids = [e["id"] for e in data.examples]
    preds = _read_id_map(Path(predictions_path), "prediction", str)
    _check_ids(Path(predictions_path), "prediction", preds, ids, require_all=(v == "2.0"))
    na_probs = None
    if na_probs_path is not None:
        if v == "1.1":
            raise UsageError(na_probs_path, "--na-probs is for SQuAD v2.0 (use --version 2.0)")
        na_probs = {k: float(x) for k, x in _read_id_map(Path(na_probs_path), "no-answer probability",
                                                         (int, float)).items()}
        _check_ids(Path(na_probs_path), "no-answer probability", na_probs, ids, require_all=True)
        if any(math.isnan(x) for x in na_probs.values()):
            raise FormatError(na_probs_path, "no-answer probabilities contain NaN")
    return score(data, v, preds, na_probs, na_prob_thresh), v, data


# ------------------------------------------------------------------------------------ runner


@dataclass
class SquadOptions:
    model: Path
    version: str | None = None
    data: Path | None = None
    train_data: Path | None = None
    out_dir: Path = Path("squad-predictions")
    max_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: float = 0.0
    batch_size: int = 32
    max_tokens: int | None = None
    limit: int | None = None
    device: str = "auto"
    precision: str = "auto"
    finetune: Any = None          # FinetuneConfig
    save: Path | None = None
    progress: bool = True


def run(opts: SquadOptions) -> dict[str, Any]:
    """Fine-tune (optionally), predict, post-process, write the three files and score."""
    import time

    from enc.evals.glue import versions
    from enc.evals.runtime import Encoded, clamp_length, predict, progress_bar, resolve_device
    from enc.models.heads import check_save_target, load_task_model
    from enc.tokenization import load_tokenizer

    check_save_target(opts.save, opts.model)
    if opts.data is None and opts.version is None:
        raise UsageError(None, "pass --version 1.1 or 2.0 (or --data FILE to infer it)")
    data = load_squad(opts.data, (opts.version or "1.1").lstrip("v"))
    version = infer_version(data, opts.version)
    data = data.limit(opts.limit)
    v2 = version == "2.0"
    device = resolve_device(opts.device)
    ft = opts.finetune
    model = load_task_model(opts.model, "question-answering", new_head=ft is not None, seed=ft.seed if ft else None)
    tok = load_tokenizer(opts.model)
    pad = tok.pad_id if tok.pad_id is not None else 0
    max_length, warnings = clamp_length(model, opts.max_length)
    feats = build_features(data.examples, tok, max_length, opts.doc_stride, opts.max_query_length)
    train_info = None
    if ft is not None:
        from enc.evals.finetune import qa_loss, train

        tr = load_squad(opts.train_data, version, split="train").limit(opts.limit)
        tf = build_features(tr.examples, tok, max_length, opts.doc_stride, opts.max_query_length, train=True)
        ft.device = device
        train_info = train(model, [Encoded(f.input_ids, f.token_type_ids) for f in tf],
                           [(f.start_position, f.end_position) for f in tf], qa_loss, pad, ft, opts.progress,
                           f"fine-tuning squad v{version}")
        train_info.update(examples=len(tr.examples), features=len(tf), source=tr.source, **ft.as_dict())
        if opts.save is not None:
            from enc.models.heads import save_task_model

            train_info["saved_to"] = str(save_task_model(model, opts.save, opts.model))
    model.to(device)
    with progress_bar(len(feats), f"squad v{version}", opts.progress) as advance:
        t0 = time.perf_counter()
        outs = predict(model, [Encoded(f.input_ids, f.token_type_ids) for f in feats], pad, device, opts.batch_size,
                       opts.max_tokens, opts.precision, advance)
        secs = time.perf_counter() - t0
    qa = postprocess(data.examples, feats, [o[0] for o in outs], [o[1] for o in outs], v2, opts.n_best,
                     opts.max_answer_length, opts.null_threshold)
    files = write_outputs(qa, opts.out_dir, v2)
    if v2:  # non-null answers + null odds: the sweep finds the best --null-threshold
        scores = score(data, version, qa.best_non_null, qa.null_odds, na_prob_thresh=opts.null_threshold)
    else:
        scores = score(data, version, qa.predictions)
    res: dict[str, Any] = {
        "task": "squad_v2" if v2 else "squad", "split": "validation" if opts.data is None else Path(opts.data).name,
        "metrics": scores, "examples": len(data.examples), "features": len(feats), "source": data.source,
        "model": str(opts.model), "seconds": round(secs, 4),
        "examples_per_s": round(len(data.examples) / secs, 2) if secs > 0 else None,
        "files": [str(f) for f in files], "warnings": warnings,
    }
    if train_info is not None:
        res["finetune"] = train_info
    return {"model": str(opts.model), "tasks": [res["task"]], "version": version,
            "seed": ft.seed if ft else None, "limit": opts.limit, "versions": versions(), "results": [res]}
