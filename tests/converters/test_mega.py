"""MEGA: enc's runtime against transformers 4.57's own outputs, and conversion of the authors' formats.

Fixtures: tests/fixtures/mega/make_hf_fixtures.py (transformers 4.57 in a throwaway venv: models saved with
save_pretrained plus its logits/hidden states) and make_original_fixtures.py (the same weights in the fairseq
``model.pt`` and Colab-wrapper formats, written with torch.save / pickle).
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from enc.cli.main import run
from enc.convert import ParityFailed, convert

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "mega"
HF = FIX / "hf"
VARIANTS = ["mlm_rotary_scalenorm", "mlm_simple_layernorm_chunk", "mlm_rmsnorm_relu2", "causal_rotary",
            "wrapper_like", "causal_postnorm"]


def _run_enc(model_dir: Path, x: dict) -> dict:
    from enc.models.mega import from_pretrained

    model = from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"]),
                     output_hidden_states=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_runtime_reproduces_transformers_457(name):
    x = dict(np.load(HF / f"{name}.npz"))
    out = _run_enc(HF / name, x)
    m = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(out["logits"].numpy()[m], x["logits"][m], atol=1e-5, rtol=0)
    assert len(out["hidden_states"]) == x["hidden_states"].shape[0]
    for h, ref in zip(out["hidden_states"], x["hidden_states"]):
        np.testing.assert_allclose(h.numpy()[m], ref[m], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers_457():
    from enc.generation import Settings, generate
    from enc.models.mega import from_pretrained

    x = dict(np.load(HF / "causal_rotary.npz"))
    ref = x["generated"][0].tolist()
    model = from_pretrained(HF / "causal_rotary")
    res = generate(model, None, ref[:5], Settings(max_new_tokens=6, temp=0.0, stop_ids=[]))
    assert res.token_ids == ref[5:]


def test_chunked_model_accepts_lengths_that_are_not_whole_chunks():
    """fairseq pads to whole chunks (transformers raised): the real tokens' outputs do not change."""
    x = dict(np.load(HF / "wrapper_like.npz"))  # chunk 4, length 8
    cut = {k: v[:, :6] if v.ndim == 2 else v for k, v in x.items()}
    full = _run_enc(HF / "wrapper_like", {"input_ids": x["input_ids"][:, :8], "attention_mask":
                                          np.concatenate([x["attention_mask"][:, :6], np.zeros((2, 2), np.int64)], 1)})
    part = _run_enc(HF / "wrapper_like", cut)
    np.testing.assert_allclose(part["logits"].numpy(), full["logits"].numpy()[:, :6], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mega")
    out = {}
    for name in ("wrapper", "lm_plain", "lm_prenorm"):
        res = convert(FIX / name, root / name)
        assert res.parity["verdict"] == "pass", res.parity
        out[name] = root / name
    return out


def test_wrapper_trio_converts_to_what_transformers_wrote(converted):
    out = converted["wrapper"]
    ours, theirs = load_file(out / "model.safetensors"), load_file(HF / "wrapper_like" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg, ref = json.loads((out / "config.json").read_text()), json.loads((HF / "wrapper_like" / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size", "chunk_size",
              "truncation", "normalization_type", "relative_positional_bias", "attention_activation",
              "tie_word_embeddings", "use_chunking", "bidirectional", "normalize_before_mega"):
        assert cfg[k] == ref[k], k
    assert (out / "tokenizer.json").is_file()
    x = dict(np.load(HF / "wrapper_like.npz"))
    m = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(_run_enc(out, x)["logits"].numpy()[m], x["logits"][m], atol=1e-5, rtol=0)


def test_fairseq_lm_reproduces_transformers_on_the_shared_parts(converted):
    """--no-scale-embedding, post-norm, shared embeddings: exactly a transformers MegaForCausalLM (4.57's logits)."""
    out = converted["lm_plain"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MegaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "embed_scale" not in cfg and "final_norm" not in cfg
    x = dict(np.load(HF / "causal_postnorm.npz"))
    m = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(_run_enc(out, x)["logits"].numpy()[m], x["logits"][m], atol=1e-5, rtol=0)
    assert (out / "dict.txt").read_bytes() == (FIX / "lm_plain" / "dict.txt").read_bytes()


def test_fairseq_lm_parts_transformers_never_had(converted):
    out = converted["lm_prenorm"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["embed_scale"] == pytest.approx(16 ** 0.5) and cfg["final_norm"] is True
    sd = load_file(out / "model.safetensors")
    assert "mega.final_norm.norm.scalar" in sd and torch.equal(sd["lm_head.bias"], torch.zeros(48))
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass"


def test_generate_and_fill_mask_on_outputs(converted, capsys):
    capsys.readouterr()
    assert run(["generate", "w1 w2 w3", "--model", str(converted["lm_plain"]), "-n", "4", "--temp", "0",
                "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    res = res.get("result", res)
    assert res["prompt_ids"] == [5, 6, 7] and len(res["token_ids"]) == 4
    # the ids equal the runtime's greedy continuation computed directly
    from enc.models.mega import from_pretrained

    model = from_pretrained(converted["lm_plain"])
    seq = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq)["logits"][:, -1].argmax(-1, keepdim=True)], 1)
    assert res["token_ids"] == seq[0, 3:].tolist()

    assert run(["fill-mask", "w3 w5 <mask> w7", "--model", str(converted["wrapper"]), "--top-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    first = res[0] if isinstance(res, list) else res["results"][0]
    preds = first["masks"][0]["predictions"]
    with torch.no_grad():
        logits = from_pretrained(converted["wrapper"])(torch.tensor([[7, 9, 47, 11]]))["logits"][0, 2]
    assert [p["token"] for p in preds] == logits.topk(3).indices.tolist()


def test_wrong_ema_mapping_fails_parity(tmp_path, monkeypatch):
    from enc.converters.base import KeyTable, copy
    from enc.converters.mega import converter as conv

    table = dict(conv.LM_TABLE.table)
    d, a = "decoder.layers.{}.mega_layer.move.delta", "decoder.layers.{}.mega_layer.move.alpha"
    table[d], table[a] = (table[a][0], copy), (table[d][0], copy)  # damping <-> decay swapped
    monkeypatch.setattr(conv, "LM_TABLE", KeyTable(table))
    with pytest.raises(ParityFailed) as e:
        convert(FIX / "lm_prenorm", tmp_path / "bad")
    assert e.value.result.parity["first_failure"] == "layer.0"
    assert not (tmp_path / "bad").exists()


class _Boom:
    def __reduce__(self):
        return (shutil.copyfile, ("/etc/hostname", "/tmp/enc-mega-pwned"))


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_code_in_pickles_is_refused_and_not_run(tmp_path, capsys):
    Path("/tmp/enc-mega-pwned").unlink(missing_ok=True)
    w = tmp_path / "wrapper"
    shutil.copytree(FIX / "wrapper", w)
    with open(w / "model_args.pkl", "wb") as f:
        pickle.dump({"mega_args": argparse.Namespace(), "depth": 2, "vocab_size": 48, "x": _Boom()}, f)
    msg = _one_line(capsys, ["convert", str(w), "-o", str(tmp_path / "o1")])
    assert "model_args.pkl" in msg and "allow-list" in msg
    lm = tmp_path / "lm"
    shutil.copytree(FIX / "lm_plain", lm)
    tree = torch.load(FIX / "lm_plain" / "model.pt", weights_only=False)
    tree["extra_state"]["meters"] = _Boom()
    torch.save(tree, lm / "model.pt")
    msg = _one_line(capsys, ["convert", str(lm / "model.pt"), "-o", str(tmp_path / "o2"), "--from", "mega"])
    assert "model.pt" in msg and "allow-list" in msg
    assert not Path("/tmp/enc-mega-pwned").exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_inputs(tmp_path, capsys):
    tree = torch.load(FIX / "lm_plain" / "model.pt", weights_only=False)
    d = tmp_path / "adaptive"
    d.mkdir()
    tree["args"].adaptive_softmax_cutoff = "20000,60000"
    torch.save(tree, d / "model.pt")
    assert "adaptive" in _one_line(capsys, ["convert", str(d), "-o", str(tmp_path / "o1")])
    tree["args"].adaptive_softmax_cutoff = None
    tree["args"].decoder_embed_dim = 32
    torch.save(tree, d / "model.pt")
    msg = _one_line(capsys, ["convert", str(d), "-o", str(tmp_path / "o2")])
    assert "decoder_embed_dim" in msg
    w = tmp_path / "wrapper"
    shutil.copytree(FIX / "wrapper", w)
    (w / "mlm_head_weights.pt").write_bytes(b"PK\x03\x04 truncated")
    msg = _one_line(capsys, ["convert", str(w), "-o", str(tmp_path / "o3"), "--from", "mega"])
    assert "mlm_head_weights.pt" in msg
    for i in (1, 2, 3):
        assert not (tmp_path / f"o{i}").exists()
