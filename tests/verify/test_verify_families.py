"""`enc verify OUT` on the families whose converters expose their own runtime hooks
(``output_activations`` / ``transformers_activations`` + ``verify_context``): keras-hub ALBERT presets,
MEGA, BertGeneration (encoder-decoder) and LUKE/mLUKE (entity probes stored in the golden record).

Each committed tiny fixture is converted, verified clean (enc runtime and, where transformers 5 has the
class, ``--runtime transformers``), then tampered with: one scaled tensor is caught by the numerics
(``--no-hash``, naming the first diverging activation) and by the hashes (naming the shard).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from enc.cli.main import run

FIX = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Case:
    src: Path
    args: list[str]
    scaled: str  # suffix of the output tensor to scale
    first: str  # the first activation that tensor changes
    transformers: bool  # transformers 5 has the class
    names: tuple[str, ...]  # activations the record must hold


KH = ("embeddings", "layer.0", "pooled_output")
CASES = {
    "kh_backbone": Case(FIX / "keras_hub/backbone", [], "albert_layers.0.ffn.weight", "layer.0", True, KH),
    "kh_mlm_g1": Case(FIX / "keras_hub/mlm_g1", [], "albert_layers.0.ffn.weight", "layer.0", True,
                      KH + ("mlm_logits",)),
    "kh_mlm_g2": Case(FIX / "keras_hub/mlm_g2", [], "albert_layers.0.ffn.weight", "layer.0", True,
                      KH + ("mlm_logits",)),
    "kh_cls_g2": Case(FIX / "keras_hub/cls_g2", [], "albert_layers.0.ffn.weight", "layer.0", True,
                      KH + ("class_logits",)),
    "mega_wrapper": Case(FIX / "mega/wrapper", [], "layers.1.nffn.fc1.weight", "layer.1", False,
                         ("embeddings", "layer.1", "logits")),
    "mega_lm_plain": Case(FIX / "mega/lm_plain", [], "layers.1.nffn.fc1.weight", "layer.1", False,
                          ("embeddings", "layer.1", "logits")),
    "bertgen_shared": Case(FIX / "bertgen/shared", ["--num-heads", "4", "--hidden-act", "gelu_new"],
                           "encoder.encoder.layer.1.intermediate.dense.weight", "encoder.layer.1", True,
                           ("encoder.embeddings", "encoder.layer.1", "decoder.embeddings", "decoder.layer.1",
                            "logits")),
    "bertgen_separate": Case(FIX / "bertgen/separate", ["--num-heads", "4", "--hidden-act", "gelu"],
                             "decoder.bert.encoder.layer.1.intermediate.dense.weight", "decoder.layer.1", True,
                             ("encoder.embeddings", "encoder.layer.1", "decoder.embeddings", "decoder.layer.1",
                              "logits")),
    "luke": Case(FIX / "luke/luke_tiny", [], "encoder.layer.1.intermediate.dense.weight", "layer.1", True,
                 ("embeddings", "entity_embeddings", "layer.1", "entity_layer.1", "mlm_logits", "entity_logits")),
    "mluke": Case(FIX / "luke/mluke_tiny", [], "encoder.layer.1.intermediate.dense.weight", "layer.1", True,
                  ("embeddings", "entity_embeddings", "layer.1", "entity_layer.1", "mlm_logits", "entity_logits")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def conv(request, tmp_path_factory) -> tuple[Case, Path]:
    case = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param) / "out"
    assert run(["convert", str(case.src), "-o", str(out), *case.args]) == 0
    return case, out


def _verify(capsys, d: Path, *flags: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = run(["verify", str(d), "--json", *flags])
    return rc, json.loads(capsys.readouterr().out)


def _key(d: Path, suffix: str) -> tuple[Path, str]:
    for path in sorted(d.glob("*.safetensors")):
        if path.name == "enc_parity.safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            hits = [k for k in f.keys() if k.endswith(suffix)]
        if hits:
            return path, hits[0]
    raise AssertionError(f"no tensor ending in {suffix} in {d}")


def _scale(d: Path, suffix: str) -> str:
    path, key = _key(d, suffix)
    sd = load_file(str(path))
    sd[key] = (sd[key] * 1.01).contiguous()
    save_file(sd, str(path), metadata={"format": "pt"})
    return path.name


def test_clean_output_verifies(conv, capsys):
    case, out = conv
    rc, rep = _verify(capsys, out)
    assert rc == 0, rep["first_failure"]
    assert rep["verdict"] == "pass" and rep["warnings"] == [] and rep["hashes"]["failed"] == []
    names = [r["name"] for r in rep["numerics"]["rows"]]
    assert set(case.names) <= set(names)
    assert rep["numerics"]["dtype"] == "float32" and rep["numerics"]["worst"]["nmse"] < 1e-8
    # hidden states agree to round-off (keras-hub MLM logits, summed over a 30k-wide row, to ~5e-9 as in parity)
    assert max(r["nmse"] for r in rep["numerics"]["rows"] if r["kind"] == "hidden") < 1e-11


def test_transformers_runtime(conv, capsys):
    case, out = conv
    capsys.readouterr()
    rc = run(["verify", str(out), "--runtime", "transformers", "--no-hash", "--json"])
    cap = capsys.readouterr()
    if not case.transformers:  # MEGA: removed from transformers 5
        assert rc == 2
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and "transformers 5 has no MEGA model class" in lines[0]
        return
    rep = json.loads(cap.out)
    assert rc == 0, rep["first_failure"]
    assert rep["runtime"] == "transformers" and rep["numerics"]["worst"]["nmse"] < 1e-8
    judged = {r["name"] for r in rep["numerics"]["rows"]}
    assert set(case.names) - {"pooled_output"} <= judged


def test_scaled_tensor_fails(conv, tmp_path, capsys):
    case, out = conv
    d = tmp_path / "model"
    shutil.copytree(out, d)
    shard = _scale(d, case.scaled)
    rc, rep = _verify(capsys, d, "--no-hash")
    assert rc == 1 and rep["numerics"]["first_failure"] == case.first
    assert rep["first_failure"].startswith(f"activation {case.first} diverges from the golden record")
    rc, rep = _verify(capsys, d)
    assert rc == 1 and rep["first_failure"].startswith(f"{shard}: sha256 differs")
    if case.transformers:
        rc, rep = _verify(capsys, d, "--runtime", "transformers", "--no-hash")
        assert rc == 1 and rep["numerics"]["first_failure"] == case.first


def test_luke_record_carries_entity_probes(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["convert", str(FIX / "luke/luke_tiny"), "-o", str(out)]) == 0
    with safe_open(str(out / "enc_parity.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["enc_record"])
        keys = set(f.keys())
    p = meta["probes"][0]
    assert p["class"] == "enc.converters.luke.reference:LukeProbe"
    assert p["fields"] == ["converted_entity_ids", "entity_attention_mask", "entity_ids", "entity_position_ids"]
    assert {f"probe.0.{n}" for n in p["fields"]} <= keys
    assert meta["format"] == "luke" and set(meta["context"]) == {"vocab", "entities", "mask2"}
    # entity inputs changed in the record: the entity activations no longer match
    rec = out / "enc_parity.safetensors"
    with safe_open(str(rec), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    pos = tensors["probe.0.entity_position_ids"]
    tensors["probe.0.entity_position_ids"] = torch.where(pos >= 0, (pos + 1).clamp(max=pos.max()), pos)
    save_file(tensors, str(rec), metadata=raw)
    rc, rep = _verify(capsys, out, "--no-hash")
    assert rc == 1 and rep["numerics"]["first_failure"] == "entity_embeddings"


def test_foreign_probe_class_in_record_is_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["convert", str(FIX / "luke/luke_tiny"), "-o", str(out)]) == 0
    rec = out / "enc_parity.safetensors"
    with safe_open(str(rec), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw["enc_record"])
    meta["probes"][0]["class"] = "os:system"
    save_file(tensors, str(rec), metadata={"enc_record": json.dumps(meta)})
    capsys.readouterr()
    assert run(["verify", str(out), "--no-hash"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "enc_parity.safetensors" in err[0] and "'os:system' is not one of enc's" in err[0]


@pytest.mark.parametrize("name,dtype", [("bertgen_shared", "bfloat16"), ("luke", "bfloat16"), ("mluke", "float16"),
                                        ("mega_wrapper", "float16"), ("kh_cls_g2", "bfloat16")])
def test_16bit_outputs_verify(name, dtype, tmp_path, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    assert run(["convert", str(case.src), "-o", str(out), "--dtype", dtype, *case.args]) == 0
    rc, rep = _verify(capsys, out)
    assert rc == 0, rep["first_failure"]
    assert rep["numerics"]["dtype"] == dtype and rep["warnings"] == []
    assert 0 < rep["numerics"]["worst"]["nmse"] < {"bfloat16": 1e-2, "float16": 1e-3}[dtype]
    d = tmp_path / "model"
    shutil.copytree(out, d)
    _scale(d, case.scaled)
    path, key = _key(d, case.scaled)
    sd = load_file(str(path))
    sd[key] = (sd[key].float() * 1.5).to(sd[key].dtype)  # a 16-bit output needs a coarser tamper
    save_file(sd, str(path), metadata={"format": "pt"})
    rc, rep = _verify(capsys, d, "--no-hash")
    assert rc == 1 and rep["numerics"]["first_failure"] == case.first


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_bertgeneration_part_verifies(part, tmp_path, capsys):
    """--part decoder is checked over a stand-in memory rebuilt from the record's context."""
    out = tmp_path / "out"
    assert run(["convert", str(FIX / "bertgen/separate"), "-o", str(out), "--part", part, "--num-heads", "4",
                "--hidden-act", "gelu"]) == 0
    for runtime in ("enc", "transformers"):
        rc, rep = _verify(capsys, out, "--runtime", runtime)
        assert rc == 0, rep["first_failure"]
        names = [r["name"] for r in rep["numerics"]["rows"]]
        assert names[0] == f"{part}.embeddings" and rep["numerics"]["worst"]["nmse"] < 1e-11
        assert ("logits" in names) == (part == "decoder")
    with safe_open(str(out / "enc_parity.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["enc_record"])["context"] == {"part": part, "hidden": 32}


@pytest.mark.parametrize("name", ["luke", "kh_cls_g2", "bertgen_shared", "mega_wrapper"])
def test_parity_runtime_transformers(name, tmp_path, capsys):
    """`enc parity SRC OUT --runtime transformers` uses the same per-format hooks (MEGA: exit 2, one line)."""
    case = CASES[name]
    out = tmp_path / "out"
    assert run(["convert", str(case.src), "-o", str(out), "--no-verify", *case.args]) == 0
    capsys.readouterr()
    rc = run(["parity", str(case.src), str(out), "--runtime", "transformers", "--json", *case.args])
    cap = capsys.readouterr()
    if not case.transformers:
        assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and "no MEGA model class" in cap.err
        return
    rep = json.loads(cap.out)
    assert rc == 0 and rep["verdict"] == "pass" and rep["worst"]["nmse"] < 1e-8
