"""GLUE/SQuAD readers: the original GLUE layout and its quirks, HF-column files, errors, no network."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from enc.errors import FormatError, MissingFile, UsageError
from enc.evals import data as D


def split(task: str, path: Path, name: str | None = None) -> D.Split:
    t = D.get_task(task)
    return D.glue_split(t, path, name or D.default_splits(t, path)[0])


def test_every_task_reads_from_the_original_folder(glue_dir: Path) -> None:
    counts = {}
    for t in D.parse_tasks("all"):
        for s in D.default_splits(t, glue_dir):
            sp = D.glue_split(t, glue_dir, s)
            assert sp.labelled and all(set(r) == {*t.columns, "label", "idx"} for r in sp.rows)
            counts[f"{t.name}/{s}"] = len(sp.rows)
    assert counts == {"cola/validation": 24, "sst2/validation": 24, "mrpc/validation": 24, "qqp/validation": 30,
                      "stsb/validation": 24, "mnli/validation_matched": 24, "mnli/validation_mismatched": 21,
                      "qnli/validation": 24, "rte/validation": 24, "wnli/validation": 24}


def test_cola_has_no_header(glue_dir: Path) -> None:
    first = (glue_dir / "CoLA/dev.tsv").read_text().split("\n")[0].split("\t")
    sp = split("cola", glue_dir)
    assert sp.rows[0] == {"sentence": first[3], "label": int(first[1]), "idx": 0}
    test = split("cola", glue_dir, "test")  # the test file does have a header
    assert len(test.rows) == 6 and not test.labelled


def test_raw_label_names_and_quotes(glue_dir: Path) -> None:
    mnli = split("mnli", glue_dir, "validation_matched")
    assert [r["label"] for r in mnli.rows[:3]] == [0, 1, 2]  # entailment, neutral, contradiction
    assert mnli.rows[1]["hypothesis"].endswith('"maybe" twice')  # quotes are text (QUOTE_NONE)
    rte = split("rte", glue_dir)
    assert [r["label"] for r in rte.rows[:2]] == [0, 1]  # entailment, not_entailment
    stsb = split("stsb", glue_dir)
    assert isinstance(stsb.rows[0]["label"], float)
    mrpc = split("mrpc", glue_dir, "train")  # train.tsv starts with a UTF-8 BOM
    assert mrpc.rows[0]["sentence1"].startswith('He said "')


def test_qqp_malformed_rows_are_skipped_and_counted(glue_dir: Path) -> None:
    sp = split("qqp", glue_dir, "train")
    assert (len(sp.rows), sp.skipped) == (24, 2)
    assert sp.notes == ["skipped 2 malformed row(s)"]


def test_unlabelled_test_splits_and_ax(glue_dir: Path) -> None:
    assert not split("sst2", glue_dir, "test").labelled
    ax = split("ax", glue_dir)  # diagnostic-full.tsv (labelled) is preferred over diagnostic.tsv
    assert ax.labelled and len(ax.rows) == 12 and ax.source.endswith("diagnostic-full.tsv")


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "json"])
def test_hf_column_files(tmp_path: Path, fmt: str) -> None:
    rows = [{"premise": 'a "b", c', "hypothesis": "d", "label": "neutral", "idx": 7},
            {"premise": "e", "hypothesis": "f", "label": 2, "idx": 8}]
    path = tmp_path / f"validation_matched.{fmt}"
    if fmt == "tsv":  # quotes are literal text in TSV
        path.write_text("premise\thypothesis\tlabel\tidx\n" + "".join(
            f"{r['premise']}\t{r['hypothesis']}\t{r['label']}\t{r['idx']}\n" for r in rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["premise", "hypothesis", "label", "idx"])
            for r in rows:
                w.writerow([r["premise"], r["hypothesis"], r["label"], r["idx"]])
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    sp = split("mnli", path)
    assert sp.name == "validation_matched"
    assert [(r["premise"], r["label"], r["idx"]) for r in sp.rows] == [('a "b", c', 1, 7), ("e", 2, 8)]


def test_parquet_and_hub_snapshot_layout(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "sst2"
    d.mkdir()
    pq.write_table(pa.table({"sentence": ["x", "y"], "label": [1, 0], "idx": [0, 1]}),
                   d / "validation-00000-of-00001.parquet")
    sp = split("sst2", tmp_path)
    assert [r["label"] for r in sp.rows] == [1, 0]


def test_errors_are_one_line_and_name_the_file(tmp_path: Path, glue_dir: Path) -> None:
    with pytest.raises(UsageError, match="unknown task 'sst3'"):
        D.parse_tasks("sst2,sst3")
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence1\tlabel\nx\tentailment\n")
    with pytest.raises(FormatError) as e:
        split("rte", bad)
    assert str(e.value) == f"{bad}: missing column(s) sentence2 for rte (header: sentence1, label)"
    bad.write_text("sentence\tlabel\nx\tmaybe\n")
    with pytest.raises(FormatError, match=r"dev.tsv: row 2: label 'maybe' is not one of negative, positive"):
        split("sst2", bad)
    bad.write_text("sentence\tlabel\nx\t5\n")
    with pytest.raises(FormatError, match="out of range"):
        split("sst2", bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFile, match="no rte validation data"):
        split("rte", tmp_path / "empty")
    with pytest.raises(MissingFile, match="not found"):
        split("rte", tmp_path / "nope")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(FormatError, match="unsupported data file type"):
        split("rte", tmp_path / "x.xlsx")


def test_no_data_and_no_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UsageError) as e:
        D.glue_split(D.get_task("sst2"), None, "validation")
    assert "not installed" in str(e.value) and "pass --data" in str(e.value)
    with pytest.raises(UsageError, match="pass --data dev-v2.0.json"):
        D.load_squad(None, "2.0")


def test_hub_offline_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as e:
        D.glue_split(D.get_task("mnli"), None, "validation_matched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert str(e.value) == ("no local data for GLUE mnli and nyu-mll/glue could not be loaded: HF_HUB_OFFLINE is "
                            "set and it is not cached; pass --data DIR|FILE (original GLUE folder, or "
                            "tsv/csv/jsonl/parquet) (see docs/evaluation.md)")


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDS:
        def to_list(self):
            return [{"question1": "a", "question2": "b", "label": 1, "idx": 3}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDS()))
    sp = D.glue_split(D.get_task("qqp"), None, "validation")
    assert sp.rows == [{"question1": "a", "question2": "b", "label": 1, "idx": 3}]
    assert sp.source == "hf://nyu-mll/glue/qqp/validation"


# ------------------------------------------------------------------------------------ SQuAD


def test_squad_json_reader(squad_dir: Path) -> None:
    v1 = D.load_squad(squad_dir / "dev-v1.1.json", "1.1")
    v2 = D.load_squad(squad_dir / "dev-v2.0.json", "2.0")
    assert (len(v1.examples), v1.version, v1.has_impossible) == (11, "1.1", False)
    assert (len(v2.examples), v2.version, v2.has_impossible) == (15, "v2.0", True)
    ex = v1.examples[1]
    assert ex["context"][ex["answers"]["answer_start"][0]:].startswith(ex["answers"]["text"][0])
    small = v2.limit(3)
    assert [e["id"] for e in small.examples] == ["q01", "q02", "q03"]
    assert sum(len(p["qas"]) for a in small.articles for p in a["paragraphs"]) == 3


def test_squad_records_roundtrip(tmp_path: Path, squad_dir: Path) -> None:
    v2 = D.load_squad(squad_dir / "dev-v2.0.json", "2.0")
    p = tmp_path / "validation.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in v2.examples))
    back = D.load_squad(p, "2.0")
    assert back.examples == v2.examples
    assert [q["id"] for a in back.articles for pp in a["paragraphs"] for q in pp["qas"]] == \
           [e["id"] for e in v2.examples]


@pytest.mark.parametrize(("obj", "msg"), [
    ([1, 2], "top level"),
    ({"data": {}}, "top level"),
    ({"data": [{"title": "x"}]}, r"data\[0\]: expected an object with a 'paragraphs' list"),
    ({"data": [{"paragraphs": [{"context": 3, "qas": []}]}]}, r"data\[0\].paragraphs\[0\]"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a", "question": "q"}]}]}]},
     r"qas\[0\]: expected 'id' and 'question' strings and an 'answers' list"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a", "question": "q", "answers": [{"text": "c"}]}]}]}]},
     r"answers\[0\]: expected 'text' \(string\), 'answer_start' \(int\)"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a", "question": "q", "answers": []}] * 2}]}]},
     "duplicate question id 'a'"),
])
def test_squad_wrong_shape(tmp_path: Path, obj, msg: str) -> None:
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(obj))
    with pytest.raises(FormatError, match=msg) as e:
        D.load_squad(p, "2.0")
    assert str(e.value).startswith(f"{p}: not a SQuAD JSON file: ")
