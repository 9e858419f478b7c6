"""The streaming writer: HF sharding rules, index format, byte-exact tensors, atomic publish."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from enc.errors import OutputExists, UsageError
from enc.io.lazy import LazyTensor, from_tensor
from enc.io.safetensors_out import atomic_dir, check_output, parse_size, plan_shards, write_sharded


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.count": torch.tensor(12345, dtype=torch.int64),
        "e.ids": torch.arange(10, dtype=torch.int32),
        "f.big": torch.randn(128, 64, generator=g),
    }


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size(1234) == 1234
    with pytest.raises(UsageError):
        parse_size("five gigs")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=30), st.integers(min_value=50, max_value=600))
def test_plan_shards_matches_huggingface_hub(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    names = [f"t{i:03d}" for i in range(len(sizes))]
    sd = {n: torch.empty(s, dtype=torch.uint8) for n, s in zip(names, sizes)}
    hub = split_torch_state_dict_into_shards(sd, max_shard_size=limit, filename_pattern="model{suffix}.safetensors")
    ours = plan_shards(list(zip(names, sizes)), limit)
    hub_groups = sorted(sorted(v) for v in hub.filename_to_tensors.values())
    assert sorted(sorted(g) for g in ours) == hub_groups


def test_single_file_round_trip_bit_exact(tmp_path):
    ts = _tensors()
    lazy = {k: from_tensor(v) for k, v in ts.items()}
    res = write_sharded(tmp_path, lazy, "5GB")
    assert res.files == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_index_follows_hf_rules(tmp_path):
    ts = _tensors(1)
    lazy = {k: from_tensor(v) for k, v in ts.items()}
    res = write_sharded(tmp_path, lazy, 9000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    n = len(res.files) - 1
    assert n == 2  # f.big (32768 B) is over the limit: a shard of its own; the rest fit in 9000 B
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    assert list(index["weight_map"]) == sorted(ts)
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-0000{n}.safetensors" for i in range(1, n + 1)}
    for k, fname in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / fname))[k], ts[k])


def test_transformers_style_loader_reads_sharded(tmp_path):
    """The index must be usable by transformers' own sharded loader helpers."""
    from enc.models.loading import load_state_dict

    ts = _tensors(2)
    write_sharded(tmp_path, {k: from_tensor(v) for k, v in ts.items()}, 10000)
    back = load_state_dict(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in ts.items())


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Each tensor is loaded only when written, and released before the next is loaded."""
    live: list[str] = []
    peak = [0]

    def make(name: str, n: int) -> LazyTensor:
        def load() -> torch.Tensor:
            live.append(name)
            peak[0] = max(peak[0], len(live))
            t = torch.full((n,), 1.0)
            live.remove(name)  # the writer holds the only reference from here on
            return t

        return LazyTensor((n,), torch.float32, load, (name,))

    lazy = {f"t{i}": make(f"t{i}", 1000 + i) for i in range(20)}
    loads: list[str] = []
    for k, v in list(lazy.items()):
        lazy[k] = v.apply(lambda t, k=k: (loads.append(k), t)[1], name="probe")
    write_sharded(tmp_path, lazy, 20_000)
    assert sorted(loads) == sorted(lazy) and len(loads) == 20  # every tensor loaded exactly once
    assert peak[0] == 1


def test_wrong_declared_shape_is_caught(tmp_path):
    bad = {"x": LazyTensor((3,), torch.float32, lambda: torch.zeros(4), ("x",))}
    with pytest.raises(ValueError, match="declared"):
        write_sharded(tmp_path, bad)


def test_atomic_dir_publishes_or_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("y")
        (tmp / "enc_provenance.json").write_text("{}")
    assert (out / "done").read_text() == "y"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("z")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_output_refuses_existing_and_nested(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExists, match="already exists"):
        check_output(tmp_path / "exists", False, [src])
    (tmp_path / "exists" / "enc_provenance.json").write_text("{}")  # a previous enc output: --force may replace it
    check_output(tmp_path / "exists", True, [src])
    with pytest.raises(OutputExists, match="inside the input"):
        check_output(src / "hf", True, [src])
