"""Evaluation data: the GLUE task table, readers for local files, SQuAD JSON, and the Hub.

Local GLUE data can be the original GLUE folder (``glue_data/SST-2/dev.tsv``,
``MNLI/dev_matched.tsv``, ``diagnostic/diagnostic.tsv`` ...), a folder or file with the Hugging
Face column names (tsv, csv, jsonl/json, parquet), or a Hub snapshot folder
(``sst2/validation-00000-of-00001.parquet``). Without ``--data`` the Hub datasets ``nyu-mll/glue``,
``rajpurkar/squad`` and ``rajpurkar/squad_v2`` are loaded through ``datasets`` (imported here
only, and only then).

Raw GLUE TSV quirks handled: CoLA train/dev have no header (source, label, original label,
sentence); MRPC names its columns ``Quality, #1 String, #2 String``; QQP uses ``question1,
question2, is_duplicate`` and its raw train file has malformed rows (skipped and counted, as
transformers' processors do); MNLI/STS-B are read by column name (``sentence1, sentence2,
gold_label`` / ``score``); test files have no labels (label -1); quotes are literal text
(``QUOTE_NONE``), never field delimiters; a UTF-8 BOM is ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enc.errors import FormatError, MissingFile, UsageError

# ------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class GlueTask:
    name: str
    columns: tuple[str, ...]               # text columns, HF names (1 or 2)
    label_names: tuple[str, ...] | None    # None: regression (STS-B)
    eval_splits: tuple[str, ...]
    folder: str                            # folder in the original GLUE download
    files: dict[str, tuple[str, ...]]      # split -> file names in that folder, first found wins

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


def _files(dev: str = "dev.tsv") -> dict[str, tuple[str, ...]]:
    return {"train": ("train.tsv",), "validation": (dev,), "test": ("test.tsv",)}


_VAL = ("validation",)
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), _VAL, "CoLA", _files()),
    "sst2": GlueTask("sst2", ("sentence",), ("negative", "positive"), _VAL, "SST-2", _files()),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _VAL, "MRPC", _files()),
    "qqp": GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _VAL, "QQP", _files()),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), None, _VAL, "STS-B", _files()),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     ("validation_matched", "validation_mismatched"), "MNLI",
                     {"train": ("train.tsv",), "validation_matched": ("dev_matched.tsv",),
                      "validation_mismatched": ("dev_mismatched.tsv",), "test_matched": ("test_matched.tsv",),
                      "test_mismatched": ("test_mismatched.tsv",)}),
    "qnli": GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), _VAL, "QNLI", _files()),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), _VAL, "RTE", _files()),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _VAL, "WNLI", _files()),
    # The diagnostic set: an MNLI model, test split only; labelled in diagnostic-full.tsv.
    "ax": GlueTask("ax", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("test",),
                   "diagnostic", {"test": ("diagnostic-full.tsv", "diagnostic.tsv")}),
}
ALL_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")  # "all"; ax only when asked

# Column names of the raw GLUE TSVs (and other common spellings) for each HF column.
_ALIASES: dict[str, tuple[str, ...]] = {
    "sentence": ("sentence",),
    "sentence1": ("sentence1", "#1 String"),
    "sentence2": ("sentence2", "#2 String"),
    "question1": ("question1",),
    "question2": ("question2",),
    "question": ("question",),
    "premise": ("premise", "sentence1", "Premise"),
    "hypothesis": ("hypothesis", "sentence2", "Hypothesis"),
    "label": ("label", "Quality", "is_duplicate", "score", "gold_label", "Label"),
    "idx": ("idx", "index", "id"),
}
_COLA_RAW = ("source", "label", "original_label", "sentence")  # CoLA train/dev.tsv: no header
_DATA_EXTS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise UsageError(None, f"unknown task {name!r} (GLUE tasks: {', '.join(ALL_TASKS)}, ax, or all)")
    return GLUE_TASKS[key]


def parse_tasks(spec: str) -> list[GlueTask]:
    if spec.lower() == "all":
        return [GLUE_TASKS[t] for t in ALL_TASKS]
    return [get_task(t.strip()) for t in spec.split(",") if t.strip()]


@dataclass
class Split:
    """One split of a task, rows in the HF schema: text columns, ``label`` (-1: none), ``idx``."""

    task: str
    name: str
    rows: list[dict[str, Any]]
    source: str
    skipped: int = 0      # malformed raw rows dropped (QQP)
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(r["label"] != -1 for r in self.rows)


# ------------------------------------------------------------------------------------ readers


def read_table(path: Path) -> tuple[list[str] | None, list[list[str]] | list[dict[str, Any]]]:
    """Rows of a data file. TSV/CSV give (header, rows of strings); JSON/parquet give (None, dicts)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise MissingFile(path, "data file not found")
    if suffix == ".parquet":
        return None, _read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return None, _read_json_records(path)
    if suffix not in (".tsv", ".csv", ".txt"):
        raise FormatError(path, f"unsupported data file type {suffix or '(none)'} (use {', '.join(_DATA_EXTS)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(path, f"not UTF-8 text: {e}") from None
    if suffix == ".csv":
        rows = list(csv.reader(text.splitlines(keepends=True)))
    else:  # tsv: quotes are text (GLUE's MNLI/QQP/MRPC contain stray quotes)
        rows = [line.rstrip("\r").split("\t") for line in text.split("\n")]
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise FormatError(path, "data file is empty")
    return rows[0], rows[1:]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FormatError(path, "reading parquet needs pyarrow (pip install pyarrow), or pass a tsv/csv/jsonl") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid & co
        raise FormatError(path, f"cannot read parquet: {e}") from None


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FormatError(path, f"line {n}: invalid JSON: {e}") from None
    if records is None:
        raise FormatError(path, "expected JSON lines or a JSON list of records")
    if not all(isinstance(r, dict) for r in records):
        raise FormatError(path, "every record must be a JSON object")
    return records


def _find(names: list[str], wanted: str) -> int | None:
    for alias in _ALIASES.get(wanted, (wanted,)):
        if alias in names:
            return names.index(alias)
    return None


def _label_value(task: GlueTask, raw: Any, path: Path, where: str) -> int | float:
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "-1")):
        return -1
    if task.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise FormatError(path, f"{where}: label {raw!r} is not a number (STS-B scores are 0-5)") from None
    assert task.label_names is not None
    if isinstance(raw, str):
        s = raw.strip()
        if s in task.label_names:
            return task.label_names.index(s)
        try:
            raw = int(s)
        except ValueError:
            raise FormatError(path, f"{where}: label {s!r} is not one of {', '.join(task.label_names)}") from None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not -1 <= raw < len(task.label_names):
        raise FormatError(path, f"{where}: label {raw!r} is out of range for {task.name} "
                                f"({len(task.label_names)} labels: {', '.join(task.label_names)})")
    return raw


def read_glue_file(task: GlueTask, path: Path) -> tuple[list[dict[str, Any]], int]:
    """Read one GLUE split file into HF-schema rows; returns (rows, malformed rows skipped)."""
    header, raw_rows = read_table(path)
    if header is None:  # records (jsonl/parquet): HF names expected
        records: list[dict[str, Any]] = raw_rows  # type: ignore[assignment]
        names = sorted({k for r in records[:1] for k in r}) if records else []
        getters = {c: _find(names, c) for c in (*task.columns, "label", "idx")}
        missing = [c for c in task.columns if getters[c] is None]
        if missing:
            raise FormatError(path, f"missing column(s) {', '.join(missing)} for {task.name} "
                                    f"(has: {', '.join(names) or 'nothing'})")
        out = []
        for i, r in enumerate(records):
            row: dict[str, Any] = {}
            for c in task.columns:
                key = names[getters[c]]  # type: ignore[index]
                if not isinstance(r.get(key), str):
                    raise FormatError(path, f"record {i}: column {key!r} is not a string")
                row[c] = r[key]
            lab = getters["label"]
            row["label"] = _label_value(task, r.get(names[lab]), path, f"record {i}") if lab is not None else -1
            ix = getters["idx"]
            row["idx"] = r.get(names[ix], i) if ix is not None else i
            out.append(row)
        return out, 0

    rows: list[list[str]] = raw_rows  # type: ignore[assignment]
    names = [h.strip() for h in header]
    if task.name == "cola" and "sentence" not in names:
        if len(header) != 4:
            raise FormatError(path, f"CoLA file without a header must have 4 columns, first row has {len(header)}")
        names, rows = list(_COLA_RAW), [header, *rows]
    cols = {c: _find(names, c) for c in (*task.columns, "label", "idx")}
    missing = [c for c in task.columns if cols[c] is None]
    if missing:
        raise FormatError(path, f"missing column(s) {', '.join(missing)} for {task.name} "
                                f"(header: {', '.join(names)})")
    width = len(names)
    out, skipped = [], 0
    for n, r in enumerate(rows):
        if len(r) != width:  # QQP's raw train.tsv has a few broken rows
            skipped += 1
            continue
        row = {c: r[cols[c]] for c in task.columns}  # type: ignore[index]
        lab = cols["label"]
        row["label"] = _label_value(task, r[lab], path, f"row {n + 2}") if lab is not None else -1
        ix = cols["idx"]
        row["idx"] = _int_or(r[ix], n) if ix is not None else n
        out.append(row)
    if rows and skipped == len(rows):
        raise FormatError(path, f"no row has the header's {width} columns")
    return out, skipped


def _int_or(s: str, default: int) -> int:
    try:
        return int(s)
    except ValueError:
        return default


# ------------------------------------------------------------------------------ finding files


def _split_of_file(task: GlueTask, path: Path) -> str | None:
    for split, names in task.files.items():
        if path.name in names:
            return split
    stem = path.name.split(".")[0].split("-0")[0]
    return stem if stem in task.files or stem in ("train", "validation", "test") else None


def _split_files_in(task: GlueTask, d: Path, split: str) -> list[Path]:
    for name in task.files.get(split, ()):
        if (d / name).is_file():
            return [d / name]
    for ext in _DATA_EXTS:
        if (d / f"{split}{ext}").is_file():
            return [d / f"{split}{ext}"]
    return sorted(d.glob(f"{split}-*.parquet"))


def _task_dir(task: GlueTask, data: Path) -> Path:
    for d in (data / task.folder, data / task.name, data / task.folder.lower()):
        if d.is_dir():
            return d
    return data


def local_glue_split(task: GlueTask, data: Path, split: str) -> Split:
    data = Path(data)
    if not data.exists():
        raise MissingFile(data, "--data path not found")
    if data.is_file():
        paths = [data]
    else:
        d = _task_dir(task, data)
        paths = _split_files_in(task, d, split)
        if not paths:
            expected = " or ".join((*task.files.get(split, ()), f"{split}.tsv/.csv/.jsonl/.parquet"))
            raise MissingFile(d, f"no {task.name} {split} data here (expected {task.folder}/{expected})")
    rows: list[dict[str, Any]] = []
    skipped = 0
    for p in paths:
        r, s = read_glue_file(task, p)
        rows += r
        skipped += s
    notes = [f"skipped {skipped} malformed row(s)"] if skipped else []
    return Split(task.name, split, rows, str(paths[0] if len(paths) == 1 else paths[0].parent), skipped, notes)


def default_splits(task: GlueTask, data: Path | None) -> list[str]:
    """The evaluation splits; a single --data file is one split named after the file."""
    if data is not None and Path(data).is_file():
        return [_split_of_file(task, Path(data)) or task.eval_splits[0]]
    return list(task.eval_splits)


# ---------------------------------------------------------------------------------------- Hub


def _no_data(what: str, flag: str, cause: str) -> UsageError:
    return UsageError(None, f"no local data for {what} and {cause}; pass {flag} (see docs/evaluation.md)")


def _load_hub(repo: str, config: str | None, split: str, what: str, flag: str):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise _no_data(what, flag, "the `datasets` package is not installed (pip install datasets)") from None
    from datasets import load_dataset

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one-line error below
    try:
        return load_dataset(repo, config, split=split) if config else load_dataset(repo, split=split)
    except Exception as e:  # network, offline mode with an empty cache, unknown split
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else f"the Hub failed ({type(e).__name__})"
        raise _no_data(what, flag, f"{repo} could not be loaded: {why}") from None
    finally:
        hub_log.setLevel(level)


def hub_glue_split(task: GlueTask, split: str) -> Split:
    ds = _load_hub("nyu-mll/glue", task.name, split, f"GLUE {task.name}" + (" train" if split == "train" else ""),
                   "--data DIR|FILE (original GLUE folder, or tsv/csv/jsonl/parquet)")
    rows = [{**{c: r[c] for c in task.columns}, "label": r["label"], "idx": r.get("idx", i)}
            for i, r in enumerate(ds.to_list())]
    return Split(task.name, split, rows, f"hf://nyu-mll/glue/{task.name}/{split}")


def glue_split(task: GlueTask, data: Path | None, split: str) -> Split:
    return local_glue_split(task, Path(data), split) if data is not None else hub_glue_split(task, split)


# -------------------------------------------------------------------------------------- SQuAD


@dataclass
class SquadData:
    """The official nested structure (``articles`` = the JSON's ``data``) and a flat example list."""

    articles: list[dict[str, Any]]
    examples: list[dict[str, Any]]      # id, title, context, question, answers{text[], answer_start[]}
    source: str
    version: str | None = None          # the file's "version" field, if any

    @property
    def has_impossible(self) -> bool:
        return any(not e["answers"]["text"] for e in self.examples)

    def limit(self, n: int | None) -> SquadData:
        if n is None or n >= len(self.examples):
            return self
        keep = {e["id"] for e in self.examples[:n]}
        arts = []
        for a in self.articles:
            paras = [{**p, "qas": [q for q in p["qas"] if q["id"] in keep]} for p in a["paragraphs"]]
            paras = [p for p in paras if p["qas"]]
            if paras:
                arts.append({**a, "paragraphs": paras})
        return SquadData(arts, self.examples[:n], self.source, self.version)


def _shape_error(path: Path, where: str, msg: str) -> FormatError:
    return FormatError(path, f"not a SQuAD JSON file: {where}: {msg}")


def parse_squad_json(obj: Any, path: Path) -> SquadData:
    """Validate the official SQuAD v1.1/v2.0 shape strictly and flatten it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise _shape_error(path, "top level", 'expected {"version": ..., "data": [articles]}')
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for ai, art in enumerate(obj["data"]):
        where = f"data[{ai}]"
        if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
            raise _shape_error(path, where, "expected an object with a 'paragraphs' list")
        for pi, para in enumerate(art["paragraphs"]):
            w = f"{where}.paragraphs[{pi}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas"), list):
                raise _shape_error(path, w, "expected an object with 'context' (string) and 'qas' (list)")
            for qi, qa in enumerate(para["qas"]):
                wq = f"{w}.qas[{qi}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str) \
                        or not isinstance(qa.get("question"), str) or not isinstance(qa.get("answers"), list):
                    raise _shape_error(path, wq, "expected 'id' and 'question' strings and an 'answers' list")
                for ni, ans in enumerate(qa["answers"]):
                    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) \
                            or not isinstance(ans.get("answer_start"), int):
                        raise _shape_error(path, f"{wq}.answers[{ni}]", "expected 'text' (string), 'answer_start' (int)")
                if qa["id"] in seen:
                    raise _shape_error(path, wq, f"duplicate question id {qa['id']!r}")
                seen.add(qa["id"])
                examples.append({
                    "id": qa["id"], "title": art.get("title", ""), "context": para["context"],
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in qa["answers"]],
                                "answer_start": [a["answer_start"] for a in qa["answers"]]},
                })
    version = obj.get("version")
    return SquadData(obj["data"], examples, str(path), str(version) if version is not None else None)


def squad_from_records(records: list[dict[str, Any]], source: str, path: Path | None = None) -> SquadData:
    """HF-schema rows (``rajpurkar/squad``'s columns) -> SquadData, grouped back into articles."""
    articles: dict[str, dict[str, Any]] = {}
    examples = []
    seen: set[str] = set()
    need = ("id", "context", "question", "answers")
    for i, r in enumerate(records):
        missing = [c for c in need if c not in r]
        if missing:
            raise FormatError(path, f"record {i}: missing column(s) {', '.join(missing)} "
                                    f"(SQuAD rows need {', '.join(need)})")
        ans = r["answers"]
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), list) \
                or not isinstance(ans.get("answer_start"), list) or len(ans["text"]) != len(ans["answer_start"]):
            raise FormatError(path, f"record {i}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
        qid = str(r["id"])
        if qid in seen:
            raise FormatError(path, f"record {i}: duplicate question id {qid!r}")
        seen.add(qid)
        title = r.get("title") or ""
        ex = {"id": qid, "title": title, "context": r["context"], "question": r["question"],
              "answers": {"text": list(ans["text"]), "answer_start": [int(s) for s in ans["answer_start"]]}}
        examples.append(ex)
        art = articles.setdefault(title, {"title": title, "paragraphs": []})
        paras = art["paragraphs"]
        if not paras or paras[-1]["context"] != ex["context"]:
            paras.append({"context": ex["context"], "qas": []})
        paras[-1]["qas"].append({"id": qid, "question": ex["question"],
                                 "answers": [{"text": t, "answer_start": s}
                                             for t, s in zip(ex["answers"]["text"], ex["answers"]["answer_start"])]})
    return SquadData(list(articles.values()), examples, source)


def load_squad(data: Path | None, version: str, split: str = "validation") -> SquadData:
    if data is None:
        repo = "rajpurkar/squad_v2" if version == "2.0" else "rajpurkar/squad"
        flag = ("--train train-v2.0.json (the official SQuAD JSON)" if split == "train"
                else "--data dev-v2.0.json (the official SQuAD JSON)")
        ds = _load_hub(repo, None, split, f"SQuAD v{version} {split}", flag)
        return squad_from_records(ds.to_list(), f"hf://{repo}/{split}")
    path = Path(data)
    if not path.is_file():
        raise MissingFile(path, "SQuAD data file not found")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:
            obj = None  # maybe JSON lines with a .json name
        except UnicodeDecodeError as e:
            raise FormatError(path, f"not UTF-8 text: {e}") from None
        if isinstance(obj, dict):
            return parse_squad_json(obj, path)
        if obj is not None and not (isinstance(obj, list) and all(isinstance(r, dict) for r in obj)):
            raise _shape_error(path, "top level", 'expected {"version": ..., "data": [articles]}')
    if path.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        raise FormatError(path, "SQuAD data must be the official JSON, or jsonl/parquet with the HF columns")
    _, records = read_table(path)
    return squad_from_records(records, str(path), path)  # type: ignore[arg-type]
