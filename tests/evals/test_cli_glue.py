"""enc eval glue end to end: numbers equal transformers + independent metrics; label order; errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from enc.cli.main import run
from enc.evals.data import GLUE_TASKS, glue_split
from enc.evals.runtime import encode_pair
from enc.tokenization import load_tokenizer
from tests.evals.helpers import FIXTURES, save_albert, train_spm
from tests.evals.test_metrics import f1_reference, mcc_reference

GLUE = FIXTURES / "glue"


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()  # drop what the fixtures printed
    rc = run(["eval", *map(str, args)])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if cap.out.strip() else None), cap.err


def one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    rc, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and out is None and len(lines) == 1 and lines[0].startswith("enc: error: "), err
    return lines[0][len("enc: error: "):]


def hf_outputs(model_dir: Path, task: str, split: str, max_length: int = 128) -> np.ndarray:
    """transformers' logits on the same token ids: one right-padded batch, in dataset order."""
    import transformers

    t = GLUE_TASKS[task]
    tok = load_tokenizer(model_dir)
    model = transformers.AlbertForSequenceClassification.from_pretrained(model_dir).eval()
    encs = [encode_pair(tok, r[t.columns[0]], r[t.columns[1]] if len(t.columns) > 1 else None, max_length)
            for r in glue_split(t, GLUE, split).rows]
    T = max(len(e.input_ids) for e in encs)
    ids = torch.tensor([e.input_ids + [0] * (T - len(e.input_ids)) for e in encs])
    tt = torch.tensor([e.token_type_ids + [0] * (T - len(e.input_ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (T - len(e.input_ids)) for e in encs])
    with torch.no_grad():
        return model(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits.numpy()


def expected_metrics(task: str, preds: list, labels: list) -> dict[str, float]:
    if task in ("cola", "ax"):
        return {"matthews_correlation": mcc_reference(labels, preds)}
    if task == "stsb":
        return {"pearson": stats.pearsonr(preds, labels)[0], "spearmanr": stats.spearmanr(preds, labels)[0]}
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": acc, "f1": f1_reference(labels, preds)} if task in ("mrpc", "qqp") else {"accuracy": acc}


def labels_of(task: str, split: str) -> list:
    return [r["label"] for r in glue_split(GLUE_TASKS[task], GLUE, split).rows]


def make_task_model(root: Path, spiece: Path, task: str, seed: int) -> Path:
    t = GLUE_TASKS[task]
    if t.is_regression:
        return save_albert(root / task, spiece, vocab_size=300, num_labels=1, seed=seed)
    names = dict(enumerate(t.label_names))
    return save_albert(root / task, spiece, vocab_size=300, num_labels=len(names), id2label=names,
                       label2id={v: k for k, v in names.items()}, seed=seed)


def test_all_tasks_equal_transformers_and_independent_metrics(tmp_path: Path, spiece: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    tasks = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    for i, task in enumerate(tasks):
        make_task_model(tmp_path / "m", spiece, task, seed=i)
    out_file = tmp_path / "results.json"
    rc, res, err = cli(capsys, "glue", "--model", tmp_path / "m", "--task", "all", "--data", GLUE, "--json",
                       "--output", out_file, "--batch-size", "5")
    assert rc == 0 and json.loads(out_file.read_text()) == res
    assert [(r["task"], r["split"]) for r in res["results"]] == [
        ("cola", "validation"), ("sst2", "validation"), ("mrpc", "validation"), ("qqp", "validation"),
        ("stsb", "validation"), ("mnli", "validation_matched"), ("mnli", "validation_mismatched"),
        ("qnli", "validation"), ("rte", "validation"), ("wnli", "validation")]
    assert set(res["versions"]) == {"enc", "torch", "datasets"} and res["versions"]["torch"] == torch.__version__
    for r in res["results"]:
        task, split = r["task"], r["split"]
        logits = hf_outputs(tmp_path / "m" / task, task, split)
        preds = logits[:, 0].tolist() if task == "stsb" else logits.argmax(-1).tolist()
        want = expected_metrics(task, preds, labels_of(task, split))
        assert list(r["metrics"]) == list(want), task
        for k, v in want.items():  # STS-B: float outputs of a random model have a tiny spread; batching moves them ~1e-7
            assert r["metrics"][k] == pytest.approx(v, abs=1e-4 if task == "stsb" else 1e-9), (task, k)
        assert r["examples"] == len(preds) and r["model"] == str(tmp_path / "m" / task)
    assert res["results"][3]["notes"] == ["skipped 1 malformed row(s)"]  # QQP's broken raw row
    assert err == ""  # with --json, stderr holds only warnings and errors (the tables are for human mode)


def test_mnli_model_with_another_label_order_scores_the_same(tmp_path: Path, spiece: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file, save_file

    a = make_task_model(tmp_path, spiece, "mnli", seed=3)
    b = tmp_path / "mnli-permuted"
    b.mkdir()
    order = [2, 0, 1]  # model id -> dataset label: contradiction, entailment, neutral
    sd = load_file(str(a / "model.safetensors"))
    sd["classifier.weight"] = sd["classifier.weight"][order].contiguous()
    sd["classifier.bias"] = sd["classifier.bias"][order].contiguous()
    save_file(sd, str(b / "model.safetensors"))
    cfg = json.loads((a / "config.json").read_text())
    names = ["entailment", "neutral", "contradiction"]
    cfg["id2label"] = {str(i): names[d] for i, d in enumerate(order)}
    cfg["label2id"] = {names[d]: i for i, d in enumerate(order)}
    (b / "config.json").write_text(json.dumps(cfg))
    for f in ("spiece.model", "tokenizer_config.json"):
        (b / f).write_bytes((a / f).read_bytes())
    _, ra, _ = cli(capsys, "glue", "--model", a, "--task", "mnli", "--data", GLUE, "--json")
    _, rb, _ = cli(capsys, "glue", "--model", b, "--task", "mnli", "--data", GLUE, "--json",
                   "--predict-dir", tmp_path / "pred")
    assert [r["metrics"] for r in ra["results"]] == [r["metrics"] for r in rb["results"]]
    assert rb["results"][0]["label_mapping"].startswith("by name (model order contradiction, entailment, neutral")
    logits = hf_outputs(b, "mnli", "validation_matched")
    mapped = [order[i] for i in logits.argmax(-1)]  # through id2label, as the user expects
    want = expected_metrics("mnli", mapped, labels_of("mnli", "validation_matched"))
    assert rb["results"][0]["metrics"]["accuracy"] == pytest.approx(want["accuracy"])
    written = [ln.split("\t")[1] for ln in (tmp_path / "pred" / "MNLI-m.tsv").read_text().splitlines()[1:]]
    assert written == [names[d] for d in mapped]
    assert all(names[d] != names[i] for d, i in zip(mapped, logits.argmax(-1)))  # raw ids would be wrong


def test_ax_and_test_split_predictions(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture) -> None:
    m = make_task_model(tmp_path, spiece, "mnli", seed=5)
    rc, res, _ = cli(capsys, "glue", "--model", m, "--task", "ax", "--data", GLUE, "--json",
                     "--predict-dir", tmp_path / "sub")
    assert rc == 0 and list(res["results"][0]["metrics"]) == ["matthews_correlation"]
    lines = (tmp_path / "sub" / "AX.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 13
    assert {ln.split("\t")[1] for ln in lines[1:]} <= {"entailment", "neutral", "contradiction"}
    s = make_task_model(tmp_path, spiece, "sst2", seed=6)
    rc, res, _ = cli(capsys, "glue", "--model", s, "--task", "sst2", "--data", GLUE, "--split", "test", "--json",
                     "--predict-dir", tmp_path / "sub")
    assert rc == 0 and res["results"][0]["metrics"] == {}
    assert res["results"][0]["notes"] == ["split has no labels: predictions only"]
    assert len((tmp_path / "sub" / "SST-2.tsv").read_text().splitlines()) == 7


def test_finetune_reaches_accuracy_and_saves_an_hf_directory(tmp_path: Path, spiece: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import transformers

    base = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    save = tmp_path / "sst2-ft"
    rc, res, _ = cli(capsys, "glue", "--model", base, "--task", "sst2", "--data", GLUE, "--finetune", "--epochs", "20",
                     "--lr", "5e-4", "--batch-size", "8", "--seed", "0", "--save", save, "--json")
    r = res["results"][0]
    assert rc == 0 and res["seed"] == 0
    assert r["metrics"]["accuracy"] >= 0.9  # keyword-separable toy SST-2: 24 dev rows
    ft = r["finetune"]
    assert ft["steps"] == 160 and ft["examples"] == 64 and ft["mean_loss"] < ft["first_loss"]
    # the saved directory is a transformers AlbertForSequenceClassification with the dataset's labels
    hf, info = transformers.AlbertForSequenceClassification.from_pretrained(save, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    preds = hf_outputs(save, "sst2", "validation").argmax(-1)
    acc = float(np.mean(preds == np.array(labels_of("sst2", "validation"))))
    assert acc == pytest.approx(r["metrics"]["accuracy"])
    rc, again, _ = cli(capsys, "glue", "--model", save, "--task", "sst2", "--data", GLUE, "--json")
    assert again["results"][0]["metrics"] == r["metrics"]


def test_finetune_is_deterministic_under_a_seed(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture) -> None:
    base = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    args = ["glue", "--model", base, "--task", "rte", "--data", GLUE, "--finetune", "--epochs", "2", "--lr", "1e-3",
            "--batch-size", "4", "--grad-accum", "2", "--limit", "12", "--json"]
    runs = [cli(capsys, *args, "--seed", s)[1]["results"][0] for s in ("1", "1", "2")]
    assert runs[0]["finetune"]["steps"] == 3  # 12 rows / 4 = 3 batches per epoch, x2 epochs, /2 accumulation
    assert runs[0]["examples"] == 12
    assert runs[0]["finetune"]["final_loss"] == runs[1]["finetune"]["final_loss"]
    assert runs[0]["finetune"]["final_loss"] != runs[2]["finetune"]["final_loss"]


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture) -> None:
    sst2 = make_task_model(tmp_path, spiece, "sst2", seed=0)
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "sst5", "--data", GLUE) == \
        "unknown task 'sst5' (GLUE tasks: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax, or all)"
    bad = tmp_path / "dev.tsv"
    bad.write_text("text\tlabel\nfine\t1\n")
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "sst2", "--data", bad) == \
        f"{bad}: missing column(s) sentence for sst2 (header: text, label)"
    base = save_albert(tmp_path / "base", spiece, cls="AlbertForPreTraining", vocab_size=300)
    assert one_line_error(capsys, "glue", "--model", base, "--task", "sst2", "--data", GLUE) == \
        f"{base}: model has no classification head (classifier.* weights); pass --finetune to train one"
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "mrpc", "--data", GLUE) == \
        (f"{sst2 / 'config.json'}: the model's labels (negative, positive) do not match mrpc's "
         "(not_equivalent, equivalent)")
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "stsb", "--data", GLUE) == \
        f"{sst2 / 'config.json'}: stsb is a regression task and needs a 1-output head; this model has 2 labels"
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "mnli", "--data", GLUE) == \
        f"{sst2 / 'config.json'}: the model has 2 label(s), mnli has 3 (entailment, neutral, contradiction)"
    assert one_line_error(capsys, "glue", "--model", tmp_path / "nope", "--task", "sst2", "--data", GLUE) == \
        f"{tmp_path / 'nope' / 'config.json'}: config.json not found (is this a Hugging Face model directory?)"
    assert one_line_error(capsys, "glue", "--model", sst2, "--task", "sst2", "--data", tmp_path / "none") == \
        f"{tmp_path / 'none'}: --data path not found"
    dev = GLUE / "SST-2" / "dev.tsv"
    assert one_line_error(capsys, "glue", "--model", base, "--task", "sst2", "--data", dev, "--finetune") == \
        f"{dev}: --finetune with a single --data file needs --train FILE for the training data"


def test_no_data_offline_is_one_clear_error(tmp_path: Path, spiece: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    sst2 = make_task_model(tmp_path, spiece, "sst2", seed=0)
    msg = one_line_error(capsys, "glue", "--model", sst2, "--task", "sst2")
    assert msg.startswith("no local data for GLUE sst2 and the `datasets` package is not installed")
    assert "pass --data DIR|FILE" in msg


@pytest.mark.skipif(importlib.util.find_spec("enc.models.megatron_bert") is None,
                    reason="enc.models.megatron_bert not written yet")
def test_megatron_bert_glue_equals_transformers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    from tests.evals.helpers import save_megatron

    names = {0: "entailment", 1: "not_entailment"}
    m = save_megatron(tmp_path / "rte", num_labels=2, id2label=names, label2id={v: k for k, v in names.items()})
    rc, res, _ = cli(capsys, "glue", "--model", m, "--task", "rte", "--data", GLUE, "--json")
    assert rc == 0
    tok = load_tokenizer(m)
    hf = transformers.MegatronBertForSequenceClassification.from_pretrained(m).eval()
    preds = []
    with torch.no_grad():
        for r in glue_split(GLUE_TASKS["rte"], GLUE, "validation").rows:
            e = encode_pair(tok, r["sentence1"], r["sentence2"], 128)
            preds.append(int(hf(input_ids=torch.tensor([e.input_ids]),
                                token_type_ids=torch.tensor([e.token_type_ids])).logits.argmax(-1)))
    labels = labels_of("rte", "validation")
    assert res["results"][0]["metrics"] == {"accuracy": pytest.approx(np.mean(np.array(preds) == labels))}
