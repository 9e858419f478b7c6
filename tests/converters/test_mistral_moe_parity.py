"""Issue 17: Mixtral (and deep dense Mistral) in 16-bit passes parity when correct, fails when not.

Releases are random transformers models written in Mistral's raw layout (tests/helpers/mistral_writer.py)
in bfloat16 / float16, with the issue's geometries (hidden 256 x 4 layers, hidden 512 x 8 layers,
8 experts, top-2) kept small elsewhere (vocab 512, expert width 64) so that they still reproduce the
problem: compared end-to-end, the bf16 ones fail on router flips.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enc.cli.main import run
from enc.converters.base import Activation, ConvertOptions
from enc.converters.mistral import MistralConverter
from enc.parity import THRESHOLDS, compare, measure, weights_dtype
from tests.helpers.mistral_writer import tiny_hf, write_release

pytest.importorskip("transformers")

GEOMETRIES = {
    "256x4": dict(hidden=256, layers=4, heads=4, head_dim=64),
    "512x8": dict(hidden=512, layers=8, heads=8, head_dim=64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mixtral(geometry: str):
    return tiny_hf(moe=True, **GEOMETRIES[geometry], kv_heads=2, inter=64, experts=8, top_k=2, rope_theta=1e6,
                   vocab=512)


@pytest.fixture(scope="module")
def models():
    return {g: _mixtral(g) for g in GEOMETRIES}


def _json(args: list[str], capsys) -> tuple[int, dict]:
    rc = run(args + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def _end_to_end(src: Path, out: Path):
    """The comparison enc made before layer-local parity: each converted layer fed its own output."""
    conv = MistralConverter(src, ConvertOptions())
    probes = conv.probes()
    with torch.inference_mode():
        return compare(conv.reference_activations(probes), conv.converted_activations(out, probes),
                       weights_dtype(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_mixtral_16bit_release_passes_by_default(tmp_path, models, geometry, dtype, capsys):
    src = write_release(tmp_path / "src", models[geometry], dtype=DTYPES[dtype], tokenizer=None)
    out = tmp_path / "hf"
    rc, res = _json(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0, res
    rep = res["parity"]
    assert rep["verdict"] == "pass" and rep["mode"] == "layer-local"
    assert rep["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    layers = GEOMETRIES[geometry]["layers"]
    routers = [r for r in rep["rows"] if r["kind"] == "router"]
    assert [r["name"] for r in routers] == [f"layer.{i}.router" for i in range(layers)]
    assert all(0.9 <= r["routing"] <= 1.0 for r in routers)
    assert rep["worst"]["routing"] == min(r["routing"] for r in routers)
    assert all(r["routing"] is None for r in rep["rows"] if r["kind"] != "router")
    assert json.loads((out / "enc_provenance.json").read_text())["parity"]["verdict"] == "pass"
    if dtype == "bf16":
        # the fixture reproduces issue 17: end-to-end, a router flip sends tokens to other experts
        e2e = _end_to_end(src, out)
        assert not e2e.passed and e2e.first_failure.name.startswith("layer.")
        assert e2e.worst()["routing"] < 1.0
    if (geometry, dtype) == ("256x4", "bf16"):
        rc, rep2 = _json(["parity", str(src), str(out)], capsys)
        assert rc == 0 and rep2["verdict"] == "pass"
        assert [r["routing"] for r in rep2["rows"]] == [r["routing"] for r in rep["rows"]]


# ----------------------------------------------------------------------------- negative controls


@pytest.fixture(scope="module")
def converted(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("mixtral-bf16")
    src = write_release(root / "src", models["256x4"], dtype=torch.bfloat16, tokenizer=None)
    out = root / "hf"
    assert run(["convert", str(src), "-o", str(out)]) == 0
    return src, out


def _broken(tmp_path: Path, out: Path, edit_weights=None, edit_config=None) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    if edit_weights:
        sd = load_file(str(bad / "model.safetensors"))
        edit_weights(sd)
        save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((bad / "config.json").read_text())
        edit_config(cfg)
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


E = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


def _swap_experts(sd):
    for w in ("w1", "w2", "w3"):
        sd[E.format(2, 1, w)], sd[E.format(2, 6, w)] = sd[E.format(2, 6, w)], sd[E.format(2, 1, w)]


def _swap_w1_w3(sd):
    for e in range(8):
        sd[E.format(1, e, "w1")], sd[E.format(1, e, "w3")] = sd[E.format(1, e, "w3")], sd[E.format(1, e, "w1")]


def _permute_gate(sd):
    k = "model.layers.3.block_sparse_moe.gate.weight"
    sd[k] = sd[k][[1, 0, 3, 2, 5, 4, 7, 6]].contiguous()


@pytest.mark.parametrize("edit_weights, edit_config, first, needle", [
    (_swap_experts, None, "layer.2", "cosine"),
    (_swap_w1_w3, None, "layer.1", "cosine"),
    (_permute_gate, None, "layer.3.router", "cosine"),
    (None, lambda c: c.update(num_experts_per_tok=1), "layer.0.router", "1 experts per token, reference 2"),
    (None, lambda c: c.update(num_experts_per_tok=3), "layer.0.router", "3 experts per token, reference 2"),
], ids=["experts-swapped", "w1-w3-exchanged", "gate-rows-permuted", "k=1", "k=3"])
def test_real_errors_still_fail(tmp_path, converted, edit_weights, edit_config, first, needle, capsys):
    src, out = converted
    bad = _broken(tmp_path, out, edit_weights, edit_config)
    rc, rep = _json(["parity", str(src), str(bad)], capsys)
    assert rc == 1 and rep["verdict"] == "fail"
    assert rep["first_failure"] == first
    row = next(r for r in rep["rows"] if r["name"] == first)
    assert needle in row["why"]
    # every row before the broken layer still passes
    names = [r["name"] for r in rep["rows"]]
    assert all(r["passed"] for r in rep["rows"][:names.index(first)])


def test_router_choosing_by_another_rule_fails(tmp_path, converted, monkeypatch, capsys):
    """Gate logits right, but the runtime picks the k LEAST likely experts: not explained by near-ties."""
    from enc.models import mistral

    src, out = converted

    def bottom_k(self, h, experts=None):
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1, largest=False) if experts is None else \
            (probs.gather(-1, experts), experts)
        return (w / w.sum(-1, keepdim=True)).to(h.dtype), idx

    monkeypatch.setattr(mistral.SparseMoe, "route", bottom_k)
    rc, rep = _json(["parity", str(src), str(out)], capsys)
    assert rc == 1 and rep["first_failure"] == "layer.0.router"
    assert "choose experts the gate logits do not explain" in rep["rows"][1]["why"]
    assert rep["rows"][1]["routing"] == 0.0


# ----------------------------------------------------------------------------- routing metric, exact


def _router(logits, topk, mask=None):
    return Activation("layer.0.router", torch.tensor([logits]), "router", mask, topk=torch.tensor([topk]))


def test_routing_metric_counts_near_ties_and_rejects_the_rest():
    th = THRESHOLDS[torch.float32]
    logits = [[3.0, 1.0, 0.99, -2.0], [0.0, 1.0, 2.0, 3.0]]
    ref = _router(logits, [[0, 1], [3, 2]])
    # experts 1 and 2 nearly tie; the converted side's logits put 2 ahead by as much as they differ
    tie = _router([[3.0, 0.99, 1.0, -2.0], [0.0, 1.0, 2.0, 3.0]], [[2, 0], [2, 3]])
    row = measure(ref, tie, THRESHOLDS[torch.bfloat16])
    assert row.passed and row.routing == 0.5  # position 0 chose another set, position 1 the same (order ignored)
    far = _router(logits, [[0, 3], [3, 2]])  # identical logits, yet expert 3 instead of 1: unexplained
    row = measure(ref, far, th)
    assert not row.passed and row.routing == 0.5
    assert row.why == "1 of 2 positions choose experts the gate logits do not explain (routing 0.500)"
    masked = _router(logits, [[0, 1], [3, 2]], torch.tensor([[False, True]]))
    row = measure(masked, far, th)  # the padded position is not judged
    assert row.passed and row.routing == 1.0
    wide = _router(logits, [[0, 1, 2], [3, 2, 1]])
    row = measure(ref, wide, th)
    assert not row.passed and row.routing == 0.0 and row.why == "3 experts per token, reference 2"


def test_forced_experts_use_the_routers_own_weights():
    from enc.models.mistral import MistralConfig, SparseMoe

    cfg = MistralConfig(hidden_size=8, intermediate_size=4, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = SparseMoe(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 3, 8)
    w, idx = moe.route(x.reshape(3, 8))
    assert torch.allclose(moe(x, experts=idx.view(1, 3, 2)), moe(x))  # its own choice: the same output
    forced = torch.tensor([[0, 1], [2, 3], [1, 3]])
    probs = torch.softmax(moe.gate(x.reshape(3, 8)), -1)
    w2, idx2 = moe.route(x.reshape(3, 8), forced)
    assert torch.equal(idx2, forced)
    assert torch.allclose(w2, probs.gather(1, forced) / probs.gather(1, forced).sum(1, keepdim=True))


# ----------------------------------------------------------------------------- deep dense, 16-bit


@pytest.fixture(scope="module")
def deep():
    return tiny_hf(hidden=64, layers=32, vocab=512)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_dense_16bit_passes_and_names_a_deep_error(tmp_path, deep, dtype, capsys):
    src = write_release(tmp_path / "src", deep, dtype=DTYPES[dtype], tokenizer=None)
    out = tmp_path / "hf"
    rc, res = _json(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0, res
    rep = res["parity"]
    th = THRESHOLDS[DTYPES[dtype]]
    assert rep["verdict"] == "pass" and len(rep["rows"]) == 1 + 32 + 2
    # layer-local: the error does not grow with depth; every layer is well inside the bounds
    hidden = [r for r in rep["rows"] if r["name"].startswith("layer.")]
    assert max(r["nmse"] for r in hidden) < th.nmse / 10 and max(r["rel"] for r in hidden) < th.rel / 4
    assert max(r["nmse"] for r in hidden[24:]) < 10 * max(r["nmse"] for r in hidden[:8])

    def swap_gate_up(sd):  # layer 29's w1 and w3 exchanged
        g, u = "model.layers.29.mlp.gate_proj.weight", "model.layers.29.mlp.up_proj.weight"
        sd[g], sd[u] = sd[u], sd[g]

    bad = _broken(tmp_path, out, swap_gate_up)
    rc, rep = _json(["parity", str(src), str(bad)], capsys)
    assert rc == 1 and rep["first_failure"] == "layer.29"


def test_a_runtime_without_router_rows_is_compared_without_them():
    """`enc parity --runtime transformers` has no router outputs: those reference rows are skipped, in step."""
    from enc.parity import compare

    m = torch.ones(1, 2, dtype=torch.bool)
    h = torch.ones(1, 2, 3)
    ref = [Activation("embeddings", h, mask=m), _router([[1.0, 0.0], [0.0, 1.0]], [[0], [1]], m),
           Activation("layer.0", h, mask=m)]
    out = [Activation("embeddings", h, mask=m), Activation("layer.0", h, mask=m)]
    rep = compare(iter(ref), iter(out), torch.float32)
    assert [r.name for r in rep.rows] == ["embeddings", "layer.0"] and rep.passed
    with pytest.raises(RuntimeError, match="more activations"):
        compare(iter(ref[:2]), iter(out), torch.float32)
