"""keras-hub ALBERT presets (written by keras-hub itself, see tests/fixtures/keras_hub/make_fixtures.py).

The converted directories must load in transformers with the documented keys and reproduce keras-hub's own
outputs (sequence output, pooled output, MLM logits, class logits) saved by the fixture script.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run
from enc.convert import ParityFailed, convert

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "keras_hub"
POOLER = ["albert.pooler.bias", "albert.pooler.weight"]


def _npz(name: str) -> dict:
    return dict(np.load(FIX / f"{name}.npz"))


def _inputs(x: dict) -> dict:
    return {"input_ids": torch.from_numpy(x["token_ids"]).long(),
            "token_type_ids": torch.from_numpy(x["segment_ids"]).long(),
            "attention_mask": torch.from_numpy(x["padding_mask"]).long()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kh")
    out = {}
    for name in ("mlm_g1", "mlm_g2", "cls_g2", "backbone"):
        res = convert(FIX / name, root / name)
        assert res.parity["verdict"] == "pass", res.parity
        out[name] = root / name
    return out


def _close_on_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray, atol: float) -> None:
    m = mask.astype(bool)
    np.testing.assert_allclose(a[m], b[m], atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["mlm_g1", "mlm_g2"])
def test_masked_lm_reproduces_keras_hub(converted, name):
    import transformers

    out = converted[name]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["AlbertForMaskedLM"] and cfg["layer_norm_eps"] == 1e-12
    x = _npz(name)
    model, info = transformers.AlbertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    # keras-hub's MLM model has a pooler; transformers' AlbertForMaskedLM has none: kept, reported as unused
    assert sorted(info["unexpected_keys"]) == POOLER
    base, binfo = transformers.AlbertModel.from_pretrained(out, output_loading_info=True)
    assert not binfo["missing_keys"]
    with torch.no_grad():
        h = base.eval()(**_inputs(x))
        logits = model.eval()(**_inputs(x)).logits.numpy()
    _close_on_valid(h.last_hidden_state.numpy(), x["sequence_output"], x["padding_mask"], 2e-5)
    np.testing.assert_allclose(h.pooler_output.numpy(), x["pooled_output"], atol=2e-5, rtol=0)
    at_masks = np.take_along_axis(logits, x["mask_positions"][..., None].astype(np.int64), axis=1)
    # keras-hub's head LayerNorm uses eps 1e-5, HF's 1e-12: the one documented difference
    np.testing.assert_allclose(at_masks, x["mlm_logits"], atol=5e-4, rtol=0)
    assert np.array_equal(at_masks.argmax(-1), x["mlm_logits"].argmax(-1))
    # ... and it is the only one: with keras-hub's eps in the head, transformers equals keras-hub to round-off
    model.predictions.LayerNorm.eps = 1e-5
    with torch.no_grad():
        logits = model(**_inputs(x)).logits.numpy()
    at_masks = np.take_along_axis(logits, x["mask_positions"][..., None].astype(np.int64), axis=1)
    np.testing.assert_allclose(at_masks, x["mlm_logits"], atol=2e-5, rtol=0)


def test_classifier_reproduces_keras_hub(converted):
    import transformers

    out = converted["cls_g2"]
    x = _npz("cls_g2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["AlbertForSequenceClassification"] and cfg["num_labels"] == 3
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    model, info = transformers.AlbertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        o = model.eval()(**_inputs(x), output_hidden_states=True)
    np.testing.assert_allclose(o.logits.numpy(), x["class_logits"], atol=2e-5, rtol=0)
    _close_on_valid(o.hidden_states[-1].numpy(), x["sequence_output"], x["padding_mask"], 2e-5)


def test_backbone_alone_is_albert_model(converted):
    import transformers

    out = converted["backbone"]
    x = _npz("backbone")
    model, info = transformers.AlbertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        h = model.eval()(**_inputs(x))
    _close_on_valid(h.last_hidden_state.numpy(), x["sequence_output"], x["padding_mask"], 2e-5)
    np.testing.assert_allclose(h.pooler_output.numpy(), x["pooled_output"], atol=2e-5, rtol=0)


def test_presets_without_name_attributes_map_by_keras_order(tmp_path):
    """Older Keras wrote no ``name`` attribute on ``vars`` groups: the construction order decides."""
    import h5py

    src = tmp_path / "old"
    shutil.copytree(FIX / "mlm_g2", src)
    for f in ("model.weights.h5", "task.weights.h5"):
        with h5py.File(src / f, "r+") as h:
            h.visititems(lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None)
    res = convert(src, tmp_path / "out")
    assert res.parity["verdict"] == "pass"
    a = (tmp_path / "out" / "model.safetensors").read_bytes()
    b = convert(FIX / "mlm_g2", tmp_path / "ref", verify=False)
    assert b.n_tensors == res.n_tensors
    assert a == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_wrong_query_mapping_fails_parity(tmp_path, monkeypatch):
    from enc.converters import keras_hub_albert as kh
    from enc.converters.base import KeyTable, Transform

    no_t = Transform("reshape only", lambda t: t.reshape(t.shape[0], -1).contiguous(), lambda s: (s[0], s[1] * s[2]))
    table = dict(kh.TABLE.table)
    key = kh._A + "query_dense/vars/0"
    table[key] = (table[key][0], no_t)
    monkeypatch.setattr(kh, "TABLE", KeyTable(table))
    with pytest.raises(ParityFailed) as e:
        convert(FIX / "mlm_g1", tmp_path / "bad")
    assert e.value.result.parity["first_failure"] == "layer.0"
    assert not (tmp_path / "bad").exists()


def test_parity_command_and_fill_mask(converted, capsys):
    capsys.readouterr()
    assert run(["parity", str(FIX / "cls_g2"), str(converted["cls_g2"]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in (rep.get("parity") or rep)["rows"]}
    assert {"embeddings", "layer.3", "pooled_output", "class_logits"} <= set(rows)
    assert rows["class_logits"]["nmse"] < 1e-10

    import transformers

    out = converted["mlm_g1"]
    assert run(["fill-mask", "the weather today is [MASK] with a light breeze.", "--model", str(out), "--json",
                "--top-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    first = res[0] if isinstance(res, list) else res["results"][0]
    got = [p["token"] for p in first["masks"][0]["predictions"]]
    tok = transformers.AlbertTokenizer(vocab_file=str(out / "spiece.model"), do_lower_case=False)
    enc = tok("the weather today is [MASK] with a light breeze.", return_tensors="pt")
    model = transformers.AlbertForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(**enc).logits[0]
    pos = enc["input_ids"][0].tolist().index(tok.mask_token_id)
    assert got == logits[pos].topk(3).indices.tolist()


def test_eval_glue_on_converted_classifier(converted, capsys):
    from enc.evals.data import GLUE_TASKS, glue_split
    from tests.evals.test_cli_glue import hf_outputs

    capsys.readouterr()
    glue = FIX.parent / "glue"
    rc = run(["eval", "glue", "--model", str(converted["cls_g2"]), "--task", "mnli", "--data", str(glue), "--json",
              "--max-length", "32"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, res
    got = next(r for r in res["results"] if r["split"] == "validation_matched")["metrics"]["accuracy"]
    rows = glue_split(GLUE_TASKS["mnli"], glue, "validation_matched").rows
    preds = hf_outputs(converted["cls_g2"], "mnli", "validation_matched", max_length=32).argmax(-1)
    expected = float(np.mean([p == r["label"] for p, r in zip(preds, rows)]))
    assert got == pytest.approx(expected, abs=1e-12)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_bad_presets(tmp_path, capsys):
    # truncated weights
    src = tmp_path / "trunc"
    shutil.copytree(FIX / "backbone", src)
    w = src / "model.weights.h5"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    msg = _one_line_error(capsys, ["convert", str(src), "-o", str(tmp_path / "o1")])
    assert "model.weights.h5" in msg
    # not an H5 file at all
    w.write_bytes(b"not hdf5 at all" * 10)
    msg = _one_line_error(capsys, ["convert", str(src), "-o", str(tmp_path / "o2")])
    assert "model.weights.h5" in msg and "HDF5" in msg
    # a preset of another architecture
    other = tmp_path / "bert"
    shutil.copytree(FIX / "backbone", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["class_name"], cfg["registered_name"] = "BertBackbone", "keras_hub>BertBackbone"
    (other / "config.json").write_text(json.dumps(cfg))
    msg = _one_line_error(capsys, ["convert", str(other), "-o", str(tmp_path / "o3")])
    assert "config.json" in msg and "BertBackbone" in msg
    # config that does not match the weights
    bad = tmp_path / "mismatch"
    shutil.copytree(FIX / "backbone", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["config"]["intermediate_dim"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = _one_line_error(capsys, ["convert", str(bad), "-o", str(tmp_path / "o4")])
    assert "config.json" in msg and "disagrees" in msg
    for i in range(1, 5):
        assert not (tmp_path / f"o{i}").exists()


def test_fuzzed_h5_gives_one_line_error_or_converts(tmp_path_factory):
    """Damaged H5 bytes: enc's own one-line error (exit 2) or a conversion; never a traceback or a hang.

    HDF5 stores contiguous datasets without checksums, so a flipped bit inside tensor data converts
    (with that value): only structural damage can be detected, and it must be reported cleanly.
    """
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = (FIX / "backbone" / "model.weights.h5").read_bytes()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cut=st.integers(0, len(good)), flips=st.lists(st.tuples(st.integers(0, len(good) - 1),
                                                                   st.integers(1, 255)), max_size=4))
    def check(cut, flips):
        d = tmp_path_factory.mktemp("fz")
        shutil.copytree(FIX / "backbone", d / "p")
        data = bytearray(good)
        for off, x in flips:
            data[off] ^= x
        (d / "p" / "model.weights.h5").write_bytes(bytes(data[:cut] if cut < len(good) // 2 else data))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = run(["convert", str(d / "p"), "-o", str(d / "o"), "--no-verify"])
        lines = err.getvalue().strip().splitlines()
        assert rc in (0, 2), err.getvalue()
        if rc == 2:
            assert len(lines) == 1 and lines[0].startswith("enc: error: ") and "Traceback" not in err.getvalue()
            assert not (d / "o").exists()

    check()
