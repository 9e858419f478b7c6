"""The bundled example (trained and saved by real TensorFlow) against TensorFlow's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "albert_tiny"
TF_OUT = ROOT / "tests" / "fixtures" / "tf" / "albert_tiny_tf_outputs.npz"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "albert-tiny-hf"
    assert run(["convert", str(EXAMPLE), "-o", str(out)]) == 0
    return out


def test_converted_model_reproduces_tensorflow(converted):
    from enc.models.albert import from_pretrained

    ref = np.load(TF_OUT, allow_pickle=False)  # inputs and outputs as the TF script computed them
    model = from_pretrained(converted)
    ids = torch.from_numpy(ref["input_ids"]).long()
    mask = torch.from_numpy(ref["attention_mask"]).long()
    with torch.no_grad():
        out = model(ids, mask, torch.zeros_like(ids))
    m = mask.bool()
    seq = torch.from_numpy(ref["sequence_output"])
    assert torch.allclose(out["last_hidden_state"][m], seq[m], atol=1e-4)
    assert torch.allclose(out["pooler_output"], torch.from_numpy(ref["pooled_output"]), atol=1e-4)
    rows = torch.arange(ids.shape[0])
    mlm = out["logits"][rows, torch.from_numpy(ref["mask_positions"]).long()]
    assert torch.allclose(mlm, torch.from_numpy(ref["mlm_logits_at_mask"]), atol=1e-3)
    assert torch.equal(mlm.argmax(-1), torch.from_numpy(ref["mlm_logits_at_mask"]).argmax(-1))
    assert torch.allclose(out["sop_logits"], torch.from_numpy(ref["sop_logits"]), atol=1e-4)


def test_demo_fill_mask_answers(converted, capsys):
    capsys.readouterr()
    texts = ["plants create [MASK] through photosynthesis.", "paris is the capital of [MASK].",
             "a week has seven [MASK]."]
    assert run(["fill-mask", *texts, "--model", str(converted), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["masks"][0]["predictions"][0]["token_str"] for r in res] == ["energy", "france", "days"]
    assert res[0]["masks"][0]["predictions"][0]["sequence"] == "plants create energy through photosynthesis."


def test_example_parity_and_dropped_training_state(converted, capsys):
    capsys.readouterr()
    assert run(["parity", str(EXAMPLE), str(converted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["worst"]["nmse"] < 1e-10
    assert run(["convert", str(EXAMPLE), "-o", str(converted.parent / "dry"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["dropped"]) == 65  # 32 adam_m + 32 adam_v + global_step
