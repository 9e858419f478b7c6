"""`enc verify OUT`: golden records written by `enc convert`, checked without the original checkpoint.

Every family enc converts is built tiny in its original format, converted, and then tampered with
(scaled tensor, swapped q/k rows, wrong rope_theta, dropped tokenizer file, truncated shard); each
must be caught with the documented exit code and a message naming the cause.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enc.cli.main import run

ROOT = Path(__file__).resolve().parents[2]
ALBERT_EXAMPLE = ROOT / "examples" / "albert_tiny"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(n)


@dataclass
class Family:
    name: str
    src: Path
    out: Path
    args: list[str]  # extra flags convert/parity need
    scaled: tuple[str, str]  # (tensor, first activation it changes)
    qk: tuple[str, int, int, int]  # (query tensor, row a, row b, dim)
    tokenizer: str  # the tokenizer file enc loads
    rope: bool


def _build(name: str, tmp: Path) -> Family:
    if name == "albert":
        src, args, shard = ALBERT_EXAMPLE, [], "100KB"
        pre = "albert.encoder.albert_layer_groups.0.albert_layers.0."
        fam = Family(name, src, tmp / "out", args, (pre + "ffn.weight", "layer.0"),
                     (pre + "attention.query.weight", 0, 1, 0), "spiece.model", False)
    elif name in ("megatron-bert", "gpt2"):
        from tests.helpers.megatron_writer import (
            Spec,
            hf_state,
            tiny_bert,
            tiny_gpt2,
            write_dir,
            write_gpt2_vocab,
            write_wordpiece_vocab,
        )

        if name == "megatron-bert":
            src = write_dir(tmp / "ckpt", Spec("bert", 32, 4, 4, 64, 64, 128, tp=2), hf_state(tiny_bert()))
            args = ["--vocab", str(write_wordpiece_vocab(tmp / "vocab.txt", 100))]
            fam = Family(name, src, tmp / "out", args, ("bert.encoder.layer.1.intermediate.dense.weight", "layer.1"),
                         ("bert.encoder.layer.0.attention.self.query.weight", 0, 1, 0), "tokenizer.json", False)
        else:
            src = write_dir(tmp / "ckpt", Spec("gpt2", 32, 4, 4, 96, 64, 128), hf_state(tiny_gpt2()))
            vocab, merges = write_gpt2_vocab(tmp / "vocab.json", tmp / "merges.txt", 120)
            args = ["--vocab", str(vocab), "--merges", str(merges)]
            # Conv1D c_attn is [in, 3 * out]: columns are the q | k | v features
            fam = Family(name, src, tmp / "out", args, ("transformer.h.1.mlp.c_fc.weight", "layer.1"),
                         ("transformer.h.0.attn.c_attn.weight", 0, 1, 1), "tokenizer.json", False)
        shard = "20KB"
    else:
        from tests.helpers.mistral_writer import tiny_hf, write_release

        moe = name == "mixtral"
        model = tiny_hf(moe=moe, rope_theta=1e6 if moe else 1e4, sliding_window=None if moe else 8)
        src = write_release(tmp / "release", model)
        scaled = ("model.layers.1.block_sparse_moe.experts.0.w1.weight" if moe else "model.layers.1.mlp.up_proj.weight")
        # rows 0 and 8 of q are a rotate-half pair of head 0 (head_dim 16)
        fam = Family(name, src, tmp / "out", [], (scaled, "layer.1"),
                     ("model.layers.0.self_attn.q_proj.weight", 0, 8, 0), "tokenizer.model", True)
        shard = "4MB"
    rc = run(["convert", str(fam.src), "-o", str(fam.out), "--shard-size", shard, *fam.args])
    assert rc == 0
    return fam


FAMILIES = ["albert", "megatron-bert", "gpt2", "mistral", "mixtral"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> Family:
    return _build(request.param, tmp_path_factory.mktemp(request.param))


def _copy(fam: Family, tmp: Path) -> Path:
    d = tmp / "model"
    shutil.copytree(fam.out, d)
    return d


def _verify(capsys, d: Path, *flags: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = run(["verify", str(d), "--json", *flags])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out), cap.err


def _shard_of(d: Path, key: str) -> Path:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return d / json.loads(index.read_text())["weight_map"][key]
    return d / "model.safetensors"


def _edit(d: Path, key: str, fn) -> str:
    """Rewrite the shard holding ``key`` with ``fn(tensor)``; returns the shard's file name."""
    path = _shard_of(d, key)
    sd = load_file(str(path))
    sd[key] = fn(sd[key].clone()).contiguous()
    save_file(sd, str(path), metadata={"format": "pt"})
    return path.name


# ------------------------------------------------------------------------------------------ clean


def test_clean_output_verifies(fam, tmp_path, capsys):
    rc, rep, _ = _verify(capsys, fam.out)
    assert rc == 0 and rep["ok"] is True and rep["exit_code"] == 0 and rep["command"] == "verify"
    res = rep
    assert res["verdict"] == "pass" and res["first_failure"] is None and rep["warnings"] == []
    files = sorted(p.name for p in fam.out.iterdir() if p.name != "enc_provenance.json")
    assert res["hashes"]["checked"] == len(files) and res["hashes"]["failed"] == []
    names = [r["name"] for r in res["numerics"]["rows"]]
    assert names[0] == "embeddings" and "layer.1" in names and names[-1].endswith("logits")
    assert res["numerics"]["worst"]["nmse"] < 1e-11 and res["numerics"]["tokenizer"] == "pass"
    assert res["record"]["version"] == 1 and res["record"]["recipe"]["projection"] == "rademacher-lowbias32"
    prov = json.loads((fam.out / "enc_provenance.json").read_text())
    assert prov["golden_record"] == "enc_parity.safetensors"
    assert (fam.out / "enc_parity.safetensors").stat().st_size < 200_000


def test_transformers_runtime_verifies(fam, capsys):
    rc, rep, _ = _verify(capsys, fam.out, "--runtime", "transformers", "--no-hash")
    assert rc == 0, rep["first_failure"]
    assert rep["runtime"] == "transformers" and rep["hashes"] is None
    assert rep["numerics"]["worst"]["nmse"] < 1e-11


# ------------------------------------------------------------------------------------------ tampering


def test_scaled_tensor_fails_numerics_and_hashes(fam, tmp_path, capsys):
    d = _copy(fam, tmp_path)
    key, where = fam.scaled
    shard = _edit(d, key, lambda t: t * 1.01)
    rc, rep, _ = _verify(capsys, d)
    res = rep
    assert rc == 1 and rep["ok"] is False and rep["exit_code"] == 1
    assert res["hashes"]["failed"] == [{"file": shard, "why": "sha256 differs from enc_provenance.json "
                                                              "(contents changed)"}]
    assert res["first_failure"].startswith(f"{shard}: sha256 differs")
    assert res["numerics"]["first_failure"] == where
    # numerics alone catch it too, and name the first diverging activation
    rc, rep, _ = _verify(capsys, d, "--no-hash")
    assert rc == 1 and rep["first_failure"].startswith(f"activation {where} diverges from the golden record")


def test_swapped_qk_rows_fail(fam, tmp_path, capsys):
    d = _copy(fam, tmp_path)
    key, a, b, dim = fam.qk

    def swap(t):
        t = t.transpose(0, dim).clone()
        t[[a, b]] = t[[b, a]]
        return t.transpose(0, dim)

    _edit(d, key, swap)
    rc, rep, _ = _verify(capsys, d, "--no-hash")
    # Mixtral: layer 0's router row (gate logits, after attention) comes before layer 0's output
    assert rc == 1 and rep["numerics"]["first_failure"] in ("layer.0", "layer.0.router")
    assert "nmse" in rep["first_failure"]
    rc, rep, _ = _verify(capsys, d, "--runtime", "transformers", "--no-hash")
    assert rc == 1 and rep["numerics"]["first_failure"] == "layer.0"


def test_wrong_rope_theta_in_config_fails(fam, tmp_path, capsys):
    if not fam.rope:
        pytest.skip("no rotary embeddings in this family")
    d = _copy(fam, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = 5e5 if cfg["rope_theta"] != 5e5 else 1e4
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    rc, rep, _ = _verify(capsys, d)
    res = rep
    assert rc == 1 and res["first_failure"].startswith("config.json: ")
    assert res["hashes"]["failed"][0]["file"] == "config.json"
    assert res["numerics"]["first_failure"] in ("layer.0", "layer.0.router")  # Mixtral: its router row first
    rc, rep, _ = _verify(capsys, d, "--no-hash")
    assert rc == 1 and rep["first_failure"].startswith(("activation layer.0 diverges",
                                                         "activation layer.0.router diverges"))


def test_dropped_tokenizer_file_fails(fam, tmp_path, capsys):
    d = _copy(fam, tmp_path)
    (d / fam.tokenizer).unlink()
    rc, rep, _ = _verify(capsys, d)
    assert rc == 1
    assert rep["first_failure"].startswith(f"{fam.tokenizer}: missing (listed in enc_provenance.json)")
    rc, rep, _ = _verify(capsys, d, "--no-hash")
    if fam.name in ("mistral", "mixtral"):
        # tokenizer.json is there too and gives the same ids: only the hashes notice
        assert rc == 0 and rep["numerics"]["tokenizer"] == "pass"
    else:
        assert rc == 1 and rep["first_failure"].startswith("tokenizer: ")
        assert "no tokenizer files found" in rep["first_failure"]


def test_truncated_shard_fails(fam, tmp_path, capsys):
    d = _copy(fam, tmp_path)
    shard = _shard_of(d, fam.scaled[0])
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    rc, rep, _ = _verify(capsys, d)
    assert rc == 1
    assert rep["first_failure"] == (f"{shard.name}: {size - 100} bytes, provenance records {size} "
                                              "(truncated or replaced)")
    # without hashes the model cannot be loaded: bad input, one line naming the file
    capsys.readouterr()
    assert run(["verify", str(d), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("enc: error: ") and shard.name in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ single cases


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Family:
    return _build("mistral", tmp_path_factory.mktemp("mistral1"))


def test_resaved_by_transformers_still_verifies(mistral, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "resaved"
    model = AutoModelForCausalLM.from_pretrained(mistral.out, dtype=torch.float32)
    model.save_pretrained(d, max_shard_size="10MB")
    shutil.copyfile(mistral.out / "enc_parity.safetensors", d / "enc_parity.safetensors")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(mistral.out / f, d / f)
    old = json.loads((mistral.out / "model.safetensors.index.json").read_text())["weight_map"]
    new = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(old) == set(new) and old != new  # the same tensors in a different shard layout
    # no enc_provenance.json: hashes cannot be checked, so the default refuses (bad input) ...
    capsys.readouterr()
    assert run(["verify", str(d)]) == 2
    assert "no enc_provenance.json" in capsys.readouterr().err
    # ... and the numerics verify the same tensors in their new files
    for rt in ("enc", "transformers"):
        rc, rep, _ = _verify(capsys, d, "--no-hash", "--runtime", rt)
        assert rc == 0 and rep["numerics"]["worst"]["nmse"] < 1e-11


def test_one_ulp_in_a_sensitive_tensor_fails_the_hashes(mistral, tmp_path, capsys):
    d = _copy(mistral, tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight"

    def ulp(t):
        t[0, 0] = torch.nextafter(t[0, 0], torch.tensor(float("inf")))
        return t

    shard = _edit(d, key, ulp)
    rc, rep, _ = _verify(capsys, d)
    assert rc == 1 and rep["first_failure"].startswith(f"{shard}: sha256 differs")
    # one ULP is float32 round-off: within the thresholds, so numerics alone pass (documented)
    rc, rep, _ = _verify(capsys, d, "--no-hash")
    assert rc == 0 and 0 < rep["numerics"]["worst"]["nmse"] < 1e-11


def test_transformers_runtime_runs_transformers_code(mistral, capsys, monkeypatch):
    from transformers.models.mistral import modeling_mistral

    forward = modeling_mistral.MistralRMSNorm.forward
    monkeypatch.setattr(modeling_mistral.MistralRMSNorm, "forward", lambda self, x: forward(self, x) * 1.001)
    rc, rep, _ = _verify(capsys, mistral.out, "--runtime", "transformers", "--no-hash")
    assert rc == 1 and rep["numerics"]["first_failure"] == "layer.0"
    rc, _, _ = _verify(capsys, mistral.out, "--no-hash")  # enc's runtime is untouched
    assert rc == 0


def test_no_verify_conversion_has_no_record(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["convert", str(ALBERT_EXAMPLE), "-o", str(out), "--no-verify"]) == 0
    assert not (out / "enc_parity.safetensors").exists()
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["golden_record"] is None and prov["parity"] is None
    capsys.readouterr()
    assert run(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "enc_parity.safetensors: no golden record (the model was converted with --no-verify" in " ".join(err.split())
    rc, rep, _ = _verify(capsys, out, "--hash-only")
    files = [p for p in out.iterdir() if p.name != "enc_provenance.json"]
    assert rc == 0 and rep["numerics"] is None and rep["hashes"]["checked"] == len(files) == 5
    rc, rep, _ = _verify(capsys, out, "--hash-only", "--no-hash")
    assert rc == 2 and rep["ok"] is False and rep["error"]["kind"] == "usage"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_outputs_verify_with_their_thresholds(tmp_path, capsys, dtype):
    out = tmp_path / "out"
    assert run(["convert", str(ALBERT_EXAMPLE), "-o", str(out), "--dtype", dtype]) == 0
    rc, rep, _ = _verify(capsys, out)
    num = rep["numerics"]
    assert rc == 0 and num["dtype"] == dtype and rep["record"]["dtype"] == dtype
    assert num["thresholds_text"].startswith("nmse <= 0.01" if dtype == "bfloat16" else "nmse <= 0.001")
    assert num["thresholds"]["nmse"] == (1e-2 if dtype == "bfloat16" else 1e-3)
    assert 1e-9 < num["worst"]["nmse"] < (1e-2 if dtype == "bfloat16" else 1e-3)  # 16-bit, not round-off


def test_parity_runtime_transformers(mistral, capsys):
    capsys.readouterr()
    assert run(["parity", str(mistral.src), str(mistral.out), "--runtime", "transformers", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"] == "transformers" and report["verdict"] == "pass"
    assert [r["name"] for r in report["rows"]] == ["embeddings", "layer.0", "layer.1", "final_norm", "logits"]


def test_parity_runtime_transformers_albert_tf(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["convert", str(ALBERT_EXAMPLE), "-o", str(out), "--no-verify"]) == 0
    capsys.readouterr()
    assert run(["parity", str(ALBERT_EXAMPLE), str(out), "--runtime", "transformers", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass" and [r["name"] for r in report["rows"]][-2:] == ["mlm_logits", "sop_logits"]


def test_missing_transformers_is_bad_input_with_install_hint(mistral, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    for args in (["verify", str(mistral.out), "--runtime", "transformers"],
                 ["parity", str(mistral.src), str(mistral.out), "--runtime", "transformers"]):
        capsys.readouterr()
        assert run(args) == 2
        err = capsys.readouterr().err
        assert "--runtime transformers needs the transformers package: pip install 'enc[hf]'" in err


def test_bad_inputs_exit_2(tmp_path, capsys, mistral):
    capsys.readouterr()
    assert run(["verify", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err
    d = _copy(mistral, tmp_path)
    (d / "enc_parity.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    rc, rep, err = _verify(capsys, d)
    assert rc == 2 and rep["error"]["kind"] == "corrupt" and "enc_parity.safetensors" in err
    capsys.readouterr()
    assert run(["verify", str(mistral.out), "--runtime", "onnx"]) == 2
    assert "invalid value for '--runtime'" in capsys.readouterr().err  # a choice: enc, transformers


def test_human_output_names_the_cause(mistral, tmp_path, capsys):
    d = _copy(mistral, tmp_path)
    _edit(d, "model.layers.1.mlp.up_proj.weight", lambda t: t * 1.01)
    capsys.readouterr()
    assert run(["verify", str(d), "--no-hash"]) == 1
    text = " ".join(capsys.readouterr().err.split())  # human output is on stderr
    assert "FAIL: activation layer.1 diverges from the golden record: nmse" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_on_cuda(mistral, capsys):
    for rt in ("enc", "transformers"):
        rc, rep, _ = _verify(capsys, mistral.out, "--device", "cuda", "--runtime", rt)
        assert rc == 0 and rep["device"] == "cuda", rep["first_failure"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_bad_input(mistral, capsys):
    rc, rep, err = _verify(capsys, mistral.out, "--device", "cuda")
    assert rc == 2 and rep["error"]["kind"] == "usage" and "CUDA is not available" in err


def test_no_verify_fingerprints_large_outputs_and_hash_outputs_restores_sha256(tmp_path, capsys, monkeypatch):
    """--no-verify records a size + first/last MiB fingerprint for files over the limit (no second pass
    over every byte); --hash-outputs records the full sha256; `enc verify --hash-only` checks either."""
    import hashlib

    import enc.convert

    monkeypatch.setattr(enc.convert, "FULL_HASH_LIMIT", 100_000)  # the example's weights (257 KB) count as large
    quick, full = tmp_path / "quick", tmp_path / "full"
    assert run(["convert", str(ALBERT_EXAMPLE), "-o", str(quick), "--no-verify"]) == 0
    assert run(["convert", str(ALBERT_EXAMPLE), "-o", str(full), "--no-verify", "--hash-outputs"]) == 0
    capsys.readouterr()

    def entry(out, name):
        return next(o for o in json.loads((out / "enc_provenance.json").read_text())["outputs"] if o["file"] == name)

    weights = (quick / "model.safetensors").read_bytes()
    assert len(weights) > 100_000
    q = entry(quick, "model.safetensors")
    head_tail = hashlib.sha256(str(len(weights)).encode() + weights[:2**20] + weights[-(2**20):]).hexdigest()
    assert q == {"file": "model.safetensors", "bytes": len(weights), "sha256_head_tail": head_tail}
    assert entry(full, "model.safetensors")["sha256"] == hashlib.sha256(weights).hexdigest()
    small = (quick / "config.json").read_bytes()  # small files keep their full sha256 either way
    assert entry(quick, "config.json")["sha256"] == hashlib.sha256(small).hexdigest()
    assert (full / "model.safetensors").read_bytes() == weights  # the same bytes either way

    large = sorted(p.name for p in quick.iterdir() if p.stat().st_size > 100_000 and p.name != "enc_provenance.json")
    assert "model.safetensors" in large
    rc, rep, _ = _verify(capsys, quick, "--hash-only")
    assert rc == 0 and rep["hashes"]["head_tail_only"] == large
    rc, rep, _ = _verify(capsys, full, "--hash-only")
    assert rc == 0 and rep["hashes"]["head_tail_only"] == []
    # one flipped byte in the first MiB is caught by the fingerprint too
    flipped = bytearray(weights)
    flipped[len(weights) // 2] ^= 1
    (quick / "model.safetensors").write_bytes(bytes(flipped))
    rc, rep, _ = _verify(capsys, quick, "--hash-only")
    assert rc == 1 and rep["hashes"]["failed"] == [
        {"file": "model.safetensors", "why": "first or last MiB differs from enc_provenance.json (contents changed)"}]
