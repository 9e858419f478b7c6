"""The torch-free fill-mask path (enc.models.albert_numpy): transformers' pipeline answers, the torch path's
output, and the torch path wherever the numpy one would not be exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run
from tests.helpers.albert_release import hf_albert, train_spm, write_release

TEXTS = ["plants create [MASK] through photosynthesis.", "the capital of [MASK] is paris .",
         "the capital of italy is [MASK] .", "dogs [MASK] and [MASK] cats", "[MASK] ."]
# text glued to [MASK] continues the word in enc (tests/serve/test_albert_tokenizer_fill_mask.py), not in transformers
GLUED = ["seven [MASK].", "[MASK]s and [MASK]"]
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """converted: enc's output of a TF release (pretraining heads, pooler, sop); groups: transformers'
    AlbertForMaskedLM save (no pooler) with 2 groups x 2 inner layers and relu; bf16, f16: that saved in 16 bits."""
    import transformers

    tmp = tmp_path_factory.mktemp("fmnp")
    spm_model = train_spm(tmp / "spm")
    src = write_release(tmp / "rel", hf_albert(70, 16, 32, 2, 1, 1, 4, 64), spm_model)
    assert run(["convert", str(src), "-o", str(tmp / "converted"), "--no-verify"]) == 0
    out = {"converted": tmp / "converted"}
    cfg = transformers.AlbertConfig(vocab_size=70, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                    num_hidden_groups=2, inner_group_num=2, num_attention_heads=4,
                                    intermediate_size=48, hidden_act="relu", max_position_embeddings=64)
    torch.manual_seed(1)
    mlm = transformers.AlbertForMaskedLM(cfg).eval()
    with torch.no_grad():  # unit-scale weights: every tensor matters (see tests.helpers.albert_release)
        for name, p in mlm.named_parameters():
            p.normal_(0.0, 1.0 if p.dim() == 1 or "embeddings" in name else p.shape[1] ** -0.5)
    for name, dtype in (("groups", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
        d = tmp / name
        mlm.to(dtype).save_pretrained(d)
        mlm.to(torch.float32)
        for f in TOKENIZER_FILES:
            shutil.copy(out["converted"] / f, d / f)
        out[name] = d
    return out


def fill(model_dir: Path, texts: list[str], *extra: str, numpy: bool = True, capsys=None, monkeypatch=None):
    """``enc fill-mask --json`` in-process: (exit code, parsed stdout, stderr); with numpy=True it fails if
    the torch runtime is loaded, with numpy=False the numpy path is off (ENC_NUMPY=0)."""
    import enc.models

    with monkeypatch.context() as m:
        if numpy:
            m.setattr(enc.models, "load_model", lambda *a, **k: pytest.fail("the torch runtime was loaded"))
        else:
            m.setenv("ENC_NUMPY", "0")
        capsys.readouterr()
        rc = run(["fill-mask", *texts, "--model", str(model_dir), *extra])
        cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if "--json" in extra else cap.out), cap.err


@pytest.mark.parametrize("variant", ["converted", "groups", "bf16", "f16"])
def test_numpy_path_equals_transformers_pipeline(dirs, variant, capsys, monkeypatch):
    import transformers

    rc, out, _ = fill(dirs[variant], TEXTS, "--top-k", "6", "--json", capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0
    # the pipeline in float32 (bf16 weights upcast exactly, as enc's --dtype auto computes)
    pipe = transformers.pipeline("fill-mask", model=str(dirs[variant]), top_k=6, dtype=torch.float32)
    for text, res in zip(TEXTS, out["results"], strict=True):
        ref = pipe(text)
        ref = ref if isinstance(ref[0], list) else [ref]
        assert len(res["masks"]) == len(ref)
        for mask, want in zip(res["masks"], ref):
            got = mask["predictions"]
            assert [p["token"] for p in got] == [r["token"] for r in want], text
            assert [p["token_str"] for p in got] == [r["token_str"] for r in want], text
            assert [p["sequence"] for p in got] == [r["sequence"] for r in want], text
            assert [p["score"] for p in got] == pytest.approx([r["score"] for r in want], abs=1e-5), text


@pytest.mark.parametrize("variant", ["converted", "groups", "bf16", "f16"])
def test_numpy_path_output_equals_torch_path(dirs, variant, capsys, monkeypatch):
    args, texts = ("--top-k", "4"), TEXTS + GLUED
    rc_np, js_np, _ = fill(dirs[variant], texts, *args, "--json", capsys=capsys, monkeypatch=monkeypatch)
    rc_t, js_t, _ = fill(dirs[variant], texts, *args, "--json", numpy=False, capsys=capsys, monkeypatch=monkeypatch)
    assert rc_np == rc_t == 0
    scores_np, scores_t = [], []
    for env in (js_np, js_t):
        env.pop("seconds")
        for res in env["results"]:
            for mask in res["masks"]:
                for p in mask["predictions"]:
                    (scores_np if env is js_np else scores_t).append(p.pop("score"))
    assert js_np == js_t  # everything but the scores and the timing, exactly
    assert scores_np == pytest.approx(scores_t, abs=1e-5)
    # the text report: the same lines, scores aside
    _, text_np, err_np = fill(dirs[variant], texts, *args, capsys=capsys, monkeypatch=monkeypatch)
    _, text_t, err_t = fill(dirs[variant], texts, *args, numpy=False, capsys=capsys, monkeypatch=monkeypatch)
    num = re.compile(r"\d+\.\d{4}")
    assert text_np == text_t and num.sub("S", err_np) == num.sub("S", err_t) and err_np.count("\n") > len(texts)


def test_padded_batch_logits_equal_torch_and_transformers(dirs):
    """fill-mask batches equal lengths only; the forward itself handles padding as the torch one does."""
    import transformers

    from enc.models import load_model
    from enc.models.albert_numpy import load

    d = dirs["groups"]
    fast = load(d)
    ours = load_model(d, head="mlm")
    theirs = transformers.AlbertForMaskedLM.from_pretrained(d).eval()
    ids = np.array([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    types = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    rows = [(0, 1), (0, 5), (1, 0), (1, 2), (1, 3)]
    got = fast.logits(ids, mask, types, rows)
    t = [torch.tensor(a) for a in (ids, mask, types)]
    with torch.no_grad():
        ref_enc = ours(*t)["logits"].numpy()
        ref_hf = theirs(input_ids=t[0], attention_mask=t[1], token_type_ids=t[2]).logits.numpy()
    for n, (r, p) in enumerate(rows):
        np.testing.assert_allclose(got[n], ref_enc[r, p], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[n], ref_hf[r, p], rtol=0, atol=1e-5)


def test_mlm_shapes_equal_the_torch_model():
    from enc.models.albert import AlbertForMaskedLM
    from enc.models.albert_config import AlbertConfig, mlm_shapes

    for groups, inner, layers in ((1, 1, 2), (2, 2, 3), (3, 1, 6)):
        c = AlbertConfig.from_dict(dict(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=layers,
                                        num_hidden_groups=groups, inner_group_num=inner, num_attention_heads=4,
                                        intermediate_size=20, max_position_embeddings=32, type_vocab_size=3))
        want = {k: tuple(v.shape) for k, v in AlbertForMaskedLM(c).state_dict().items()}
        assert mlm_shapes(c) == want and list(mlm_shapes(c)) == list(want)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` whose model.safetensors went through ``change(dict of tensors)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    change(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_the_torch_path_runs_where_numpy_would_not_be_exact(dirs, tmp_path, monkeypatch):
    from enc.io.dtypes import DType
    from enc.models.albert_numpy import load

    d = dirs["converted"]
    assert load(d) is not None and load(d, dtype=DType("float32")) is not None
    assert load(d, dtype=torch.float32) is not None
    assert load(d, dtype=torch.bfloat16) is None and load(d, dtype=DType("float16")) is None
    assert load(d, device="cuda") is None
    untied = _rewrite(d, tmp_path / "untied", lambda sd: sd.__setitem__(
        "predictions.decoder.weight", sd["albert.embeddings.word_embeddings.weight"] * 2))
    assert load(untied) is None
    f64 = _rewrite(d, tmp_path / "f64", lambda sd: sd.update({k: v.double() for k, v in sd.items()}))
    assert load(f64) is None
    unprefixed = _rewrite(d, tmp_path / "unprefixed", lambda sd: sd.update(
        {k[len("albert."):]: sd.pop(k) for k in [k for k in sd if k.startswith("albert.")]}))
    assert load(unprefixed) is None
    cfg = json.loads((d / "config.json").read_text())
    erf = tmp_path / "erf"
    shutil.copytree(d, erf)
    (erf / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    assert load(erf) is None
    monkeypatch.setenv("ENC_NUMPY", "0")
    assert load(d) is None


@pytest.mark.parametrize("damage", ["missing", "shape", "int", "extra", "header"])
def test_bad_weights_give_the_torch_paths_error(dirs, tmp_path, damage, capsys, monkeypatch):
    d = dirs["converted"]
    key = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.bias"
    if damage == "header":
        bad = tmp_path / "bad"
        shutil.copytree(d, bad)
        raw = bytearray((bad / "model.safetensors").read_bytes())
        raw[8:10] = b"[]"  # the header is no longer a JSON object
        (bad / "model.safetensors").write_bytes(bytes(raw))
    else:
        change = {"missing": lambda sd: sd.pop(key),
                  "shape": lambda sd: sd.__setitem__(key, sd[key][:-1].clone()),
                  "int": lambda sd: sd.__setitem__(key, sd[key].to(torch.int32)),
                  "extra": lambda sd: sd.__setitem__("albert.encoder.stray", torch.zeros(2))}[damage]
        bad = _rewrite(d, tmp_path / "bad", change)
    results = []
    for env in ({}, {"ENC_NUMPY": "0"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            capsys.readouterr()
            rc = run(["fill-mask", TEXTS[0], "--model", str(bad)])
            results.append((rc, capsys.readouterr().err.strip()))
    assert results[0] == results[1]
    assert results[0][0] == 2 and len(results[0][1].splitlines()) == 1 and str(bad) in results[0][1]


def test_cold_cli_process_answers_without_importing_torch(dirs):
    """A fresh `enc fill-mask` on a CPU-only torch: the same JSON as in-process, and torch never imported."""
    code = ("import json, sys; from enc.cli.main import run; rc = run(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch._C' in sys.modules}), file=sys.stderr)")
    args = ["fill-mask", TEXTS[0], "--model", str(dirs["converted"]), "--json"]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("ENC_NUMPY", None)
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    status = json.loads(p.stderr.strip().splitlines()[-1])
    import torch.version

    assert status["rc"] == 0
    assert status["torch"] is bool(torch.version.cuda or torch.version.hip)  # a CUDA build asks torch (auto)
    out = json.loads(p.stdout)
    ref = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**env, "ENC_NUMPY": "0"})
    assert json.loads(ref.stderr.strip().splitlines()[-1]) == {"rc": 0, "torch": True}
    theirs = json.loads(ref.stdout)
    scores = []
    for env_ in (out, theirs):
        env_.pop("seconds")
        scores.append([p_.pop("score") for p_ in env_["results"][0]["masks"][0]["predictions"]])
    assert out == theirs and scores[0] == pytest.approx(scores[1], abs=1e-5)
