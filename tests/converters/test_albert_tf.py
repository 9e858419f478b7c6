"""ALBERT TF checkpoints -> HF: round trips, transformers as the peer, parity, and bad input."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from enc.cli.main import run
from tests.helpers.albert_release import hf_albert, tf_variables, write_release

SHAPES = {  # vocab, E, H, L, G, I, N, F
    "base-like": (120, 16, 32, 3, 1, 1, 4, 64),
    "groups2-inner2": (120, 8, 24, 4, 2, 2, 3, 40),
    "E-equals-H": (120, 32, 32, 2, 1, 1, 2, 48),
    "groups3-of-6": (120, 12, 16, 6, 3, 1, 2, 32),
}


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, tmp_path_factory, albert_spm):
    tmp = tmp_path_factory.mktemp(request.param)
    model = hf_albert(*SHAPES[request.param])
    src = write_release(tmp / "albert_release", model, albert_spm)
    out = tmp / "hf"
    rc = run(["convert", str(src), "-o", str(out), "--json"])
    assert rc == 0
    return model, src, out


def test_output_layout_and_config(converted):
    model, _, out = converted
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "enc_parity.safetensors", "enc_provenance.json", "model.safetensors",
                     "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "albert" and cfg["architectures"] == ["AlbertForPreTraining"]
    assert cfg["hidden_act"] == "gelu_new"  # TF "gelu" is the tanh form
    assert cfg["num_hidden_groups"] == model.config.num_hidden_groups
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass" and prov["source"]["format"] == "albert_tf"


def test_tensors_equal_source_after_documented_transform(converted):
    from safetensors.torch import load_file

    model, src, out = converted
    tf = tf_variables(model, extras=False)
    got = load_file(str(out / "model.safetensors"))
    assert "predictions.decoder.weight" not in got  # tied: written once
    assert torch.equal(got["albert.embeddings.word_embeddings.weight"], torch.from_numpy(tf["bert/embeddings/word_embeddings"]))
    q = "bert/encoder/transformer/group_0/inner_group_0/attention_1/self/query/kernel"
    assert torch.equal(got["albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"],
                       torch.from_numpy(tf[q].T.copy()))
    assert torch.equal(got["sop_classifier.classifier.weight"], torch.from_numpy(tf["cls/seq_relationship/output_weights"]))
    sd = model.state_dict()
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k


def test_transformers_loads_and_matches(converted):
    import transformers

    model, _, out = converted
    hf, info = transformers.AlbertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info.get("mismatched_keys")
    ids, mask, types = _inputs(model.config.vocab_size)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types)
    m = mask.bool()
    assert torch.allclose(a.prediction_logits[m], b.prediction_logits[m], atol=1e-5)
    assert torch.allclose(a.sop_logits, b.sop_logits, atol=1e-5)


def test_enc_runtime_matches_transformers(converted):
    from enc.models.albert import from_pretrained

    model, _, out = converted
    ours = from_pretrained(out)
    ids, mask, types = _inputs(model.config.vocab_size)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, mask, types, output_hidden_states=True)
    m = mask.bool()
    assert len(a.hidden_states) == len(b["hidden_states"])
    assert torch.allclose(a.prediction_logits[m], b["logits"][m], atol=1e-5)
    assert torch.allclose(a.sop_logits, b["sop_logits"], atol=1e-5)


def test_parity_command_passes(converted, capsys):
    _, src, out = converted
    capsys.readouterr()
    assert run(["parity", str(src), str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"] == "pass"
    names = [r["name"] for r in rep["rows"]]
    assert names[0] == "embeddings" and names[-2:] == ["mlm_logits", "sop_logits"]
    assert rep["worst"]["nmse"] < 1e-10


# ----------------------------------------------------------------------------- deliberate breakage


@pytest.fixture(scope="module")
def release(tmp_path_factory, albert_spm):
    tmp = tmp_path_factory.mktemp("release")
    model = hf_albert(*SHAPES["base-like"])
    return model, write_release(tmp / "albert_release", model, albert_spm)


def test_untransposed_kernel_fails_parity(release, tmp_path, monkeypatch, capsys):
    from enc.converters import albert_tf
    from enc.converters.base import KeyTable, copy

    _, src = release
    table = dict(albert_tf.TABLE.table)
    key = "bert/encoder/transformer/group_{}/inner_group_{}/attention_1/self/query/kernel"
    table[key] = (table[key][0], copy)  # forget the transpose (square kernel: shapes still fit)
    monkeypatch.setattr(albert_tf, "TABLE", KeyTable(table))
    out = tmp_path / "broken"
    assert run(["convert", str(src), "-o", str(out)]) == 1  # verification fails; nothing published
    assert not out.exists()
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert run(["parity", str(src), str(out), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"] == "fail" and rep["first_failure"] == "layer.0"
    assert rep["rows"][0]["passed"]  # embeddings are still right


def test_exact_gelu_instead_of_tanh_fails_parity(release, tmp_path, capsys):
    _, src = release
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_act"] = "gelu"  # what a naive converter copies through
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert run(["parity", str(src), str(out), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["first_failure"] == "layer.0"
    assert 1e-12 < rep["rows"][1]["nmse"] < 1e-3  # small, but far above round-off


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_outputs_pass_loose_thresholds(release, tmp_path, dtype, capsys):
    from safetensors.torch import load_file

    _, src = release
    out = tmp_path / dtype
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(out), "--dtype", dtype, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == dtype and res["parity"]["verdict"] == "pass"
    assert load_file(str(out / "model.safetensors"))["albert.pooler.weight"].dtype == getattr(torch, dtype)


def test_sharded_output_loads_in_transformers(release, tmp_path):
    import transformers

    _, src = release
    out = tmp_path / "sharded"
    assert run(["convert", str(src), "-o", str(out), "--shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    _, info = transformers.AlbertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_dry_run_prints_plan_and_writes_nothing(release, tmp_path, capsys):
    _, src = release
    out = tmp_path / "dry"
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists()
    rows = {r["hf"]: r for r in plan["map"]}
    q = rows["albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"]
    assert q["recipe"] == "transpose" and q["sources"] == [
        "bert/encoder/transformer/group_0/inner_group_0/attention_1/self/query/kernel"]
    assert plan["dropped"]["global_step"] == "training step counter"
    assert sum(1 for why in plan["dropped"].values() if why == "Adam optimizer slot") == 8


def test_tarball_and_prefix_and_hub_inputs(release, tmp_path, capsys):
    model, src = release
    tgz = tmp_path / "albert_tiny_v2.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="albert_tiny")
    assert run(["convert", str(tgz), "-o", str(tmp_path / "from_tgz")]) == 0
    assert run(["convert", str(src / "model.ckpt-best"), "-o", str(tmp_path / "from_prefix")]) == 0
    assert run(["convert", str(src / "model.ckpt-best.index"), "-o", str(tmp_path / "from_index")]) == 0
    # TF-Hub module layout, variables under the module/ scope
    hub = tmp_path / "hub"
    (hub / "assets").mkdir(parents=True)
    (hub / "assets" / "albert_config.json").write_bytes((src / "albert_config.json").read_bytes())
    (hub / "assets" / "30k-clean.model").write_bytes((src / "30k-clean.model").read_bytes())
    from tests.helpers.tf_bundle import write_bundle

    write_bundle(hub / "variables" / "variables", {"module/" + k: v for k, v in tf_variables(model).items()})
    (hub / "tfhub_module.pb").write_bytes(b"")
    assert run(["convert", str(hub), "-o", str(tmp_path / "from_hub")]) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "from_tgz" / "model.safetensors"))
    for name in ("from_prefix", "from_index", "from_hub"):
        b = load_file(str(tmp_path / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input: exit 2, one line


def _fails(capsys, args, *needles):
    capsys.readouterr()
    rc = run(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def fresh(release, tmp_path):
    import shutil

    _, src = release
    dst = tmp_path / "rel"
    shutil.copytree(src, dst)
    return dst


def test_bad_missing_config(fresh, tmp_path, capsys):
    (fresh / "albert_config.json").unlink()
    out = tmp_path / "o"
    # without a config the directory is no longer recognisable, so force the format
    _fails(capsys, ["convert", str(fresh), "-o", str(out), "--from", "albert_tf"], "albert_config.json", "not found")
    assert not out.exists()


def test_bad_missing_vocab(fresh, tmp_path, capsys):
    (fresh / "30k-clean.model").unlink()
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "30k-clean.model", "--tokenizer")
    assert not (tmp_path / "o").exists()


def test_bad_config_disagrees_with_shapes(fresh, tmp_path, capsys):
    cfg = json.loads((fresh / "albert_config.json").read_text())
    cfg["intermediate_size"] += 8
    (fresh / "albert_config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "albert_config.json", "disagrees", "ffn")
    assert not (tmp_path / "o").exists()


def test_bad_config_invalid_json(fresh, tmp_path, capsys):
    (fresh / "albert_config.json").write_text("{not json")
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "albert_config.json", "invalid JSON")


def test_bad_index_magic(fresh, tmp_path, capsys):
    p = fresh / "model.ckpt-best.index"
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "model.ckpt-best.index")
    assert not (tmp_path / "o").exists()


def test_bad_truncated_index(fresh, tmp_path, capsys):
    p = fresh / "model.ckpt-best.index"
    p.write_bytes(p.read_bytes()[:30])
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "model.ckpt-best.index")


def test_bad_missing_data_shard(fresh, tmp_path, capsys):
    (fresh / "model.ckpt-best.data-00000-of-00001").unlink()
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "data-00000-of-00001")
    assert not (tmp_path / "o").exists()


def test_bad_truncated_data(fresh, tmp_path, capsys):
    p = fresh / "model.ckpt-best.data-00000-of-00001"
    p.write_bytes(p.read_bytes()[:-100])
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "data-00000-of-00001")
    assert not (tmp_path / "o").exists()


def test_bad_crc_flipped_byte(fresh, tmp_path, capsys):
    p = fresh / "model.ckpt-best.data-00000-of-00001"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    _fails(capsys, ["convert", str(fresh), "-o", str(tmp_path / "o")], "data-00000-of-00001", "CRC")
    assert not (tmp_path / "o").exists()


def test_bad_unknown_variable(release, tmp_path, albert_spm, capsys):
    model, _ = release
    v = tf_variables(model)
    v["bert/encoder/mystery/kernel"] = np.zeros((2, 2), np.float32)
    src = write_release(tmp_path / "rel", model, albert_spm, variables=v)
    _fails(capsys, ["convert", str(src), "-o", str(tmp_path / "o")], "unknown variable", "bert/encoder/mystery/kernel")
    assert not (tmp_path / "o").exists()


def test_bad_tarball_with_parent_member(release, tmp_path, capsys):
    import io

    _, src = release
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="albert")
        data = b"owned"
        info = tarfile.TarInfo("albert/../../escaped.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _fails(capsys, ["convert", str(tgz), "-o", str(tmp_path / "o")], "evil.tar.gz", "escapes")
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "o").exists()


def test_bad_output_exists_and_inside_input(release, tmp_path, capsys):
    _, src = release
    (tmp_path / "exists").mkdir()
    _fails(capsys, ["convert", str(src), "-o", str(tmp_path / "exists")], "exists", "--force")
    _fails(capsys, ["convert", str(src), "-o", str(src / "hf")], "inside the input")
    assert not (src / "hf").exists()


def test_bad_missing_input(tmp_path, capsys):
    _fails(capsys, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "nope", "no such file")


def test_bad_unrecognised_input(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    _fails(capsys, ["convert", str(tmp_path / "junk"), "-o", str(tmp_path / "o")], "junk", "not a checkpoint")
