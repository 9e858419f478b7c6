"""enc.models.mistral against transformers on the same HF directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from enc.models.mistral import MistralConfig, from_pretrained
from tests.helpers.mistral_writer import tiny_hf

pytest.importorskip("transformers")

CASES = {
    "dense": dict(),
    "dense_window": dict(sliding_window=6),
    "dense_mha_tied": dict(kv_heads=4, tied=True),
    "mixtral": dict(moe=True, rope_theta=1e6),
    "mixtral_window": dict(moe=True, sliding_window=5, experts=3, top_k=1),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_dir(request, tmp_path_factory):
    model = tiny_hf(vocab=500, seed=7, **CASES[request.param])
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return d, model


def _ids(n: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 500, (batch, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("prepare", [False, True])
def test_logits_equal_transformers(hf_dir, prepare):
    d, model = hf_dir
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    ours = from_pretrained(d, prepare=prepare)
    with torch.inference_mode():
        got = ours(ids)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5


def test_cached_decode_equals_full_forward(hf_dir):
    d, _ = hf_dir
    ours = from_pretrained(d)
    ids = _ids(20)
    with torch.inference_mode():
        full = ours(ids)
        cache = ours.new_cache(2, 24)
        parts = [ours(ids[:, :3], cache=cache, pos=0), ours(ids[:, 3:9], cache=cache, pos=3)]  # chunked prefill
        parts += [ours(ids[:, t:t + 1], cache=cache, pos=t) for t in range(9, 20)]  # one token at a time
        inc = torch.cat(parts, 1)
        assert (inc - full).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="KV cache holds 24"):
            ours(ids[:, :5], cache=cache, pos=20)


def test_transformers5_fused_experts_layout(tmp_path):
    """A directory with fused mlp.experts.gate_up_proj / down_proj and mlp.gate loads and gives the same logits."""
    model = tiny_hf(vocab=500, moe=True, seed=9)
    model.save_pretrained(tmp_path / "legacy")
    sd = load_file(str(tmp_path / "legacy" / "model.safetensors"))
    fused = {}
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe."
        w1 = [sd.pop(f"{p}experts.{e}.w1.weight") for e in range(4)]
        w3 = [sd.pop(f"{p}experts.{e}.w3.weight") for e in range(4)]
        w2 = [sd.pop(f"{p}experts.{e}.w2.weight") for e in range(4)]
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3)])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w2)
        fused[f"model.layers.{i}.mlp.gate.weight"] = sd.pop(f"{p}gate.weight")
    d = tmp_path / "fused"
    d.mkdir()
    save_file({**sd, **fused}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    ids = _ids()
    with torch.inference_mode():
        a, b = from_pretrained(tmp_path / "legacy")(ids), from_pretrained(d)(ids)
    assert torch.equal(a, b)


def test_bf16_close_to_fp32(tmp_path):
    model = tiny_hf(vocab=500, seed=4)
    model.save_pretrained(tmp_path)
    ids = _ids()
    with torch.inference_mode():
        ref = from_pretrained(tmp_path)(ids)
        m16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert m16.model.embed_tokens.weight.dtype == torch.bfloat16
        got = m16(ids)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_config_defaults_follow_transformers():
    # absent keys take transformers' class defaults: Mistral window 4096 / theta 1e4, Mixtral theta 1e6 / no window
    m = MistralConfig.from_dict({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    assert m.sliding_window == 4096 and m.rope_theta == 10000.0 and m.head_dim == 16 and not m.is_moe
    x = MistralConfig.from_dict({"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 4, "sliding_window": None, "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 5e5}})
    assert x.sliding_window is None and x.rope_theta == 5e5 and x.num_local_experts == 8
    assert json.loads(json.dumps(x.eos_ids)) == [2]
