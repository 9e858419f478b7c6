"""The lazy, allow-listed torch.save reader and the QKV / tensor-parallel merge rules."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enc.converters.megatron import tables as T
from enc.converters.megatron.reference import _split_heads
from enc.errors import CorruptCheckpoint, UnsafeInput
from enc.io.megatron_pickle import ByteRange, InertStandIn, iter_tensors, load_lazy, zip_member_offset
from tests.helpers.megatron_writer import fake_megatron_enums, stored_qkv


def _tree():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "model": {
            "w": torch.randn(5, 3, generator=g).half(),
            "view": base[1:4, 2:7],  # strided view of a shared storage
            "t": base.t(),  # transposed: non-contiguous
            "same": base,  # the storage again
            "p": torch.nn.Parameter(torch.ones(3)),
            "i": torch.arange(7),
            "bf": torch.randn(4, generator=g).bfloat16(),
            "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(3.5),
        },
        "list": [torch.ones(2), (torch.zeros(1), 5)],
        "iteration": 7,
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_lazy_reader_equals_torch_load(tmp_path, legacy):
    tree = _tree()
    path = tmp_path / "x.pt"
    torch.save(tree, path, _use_new_zipfile_serialization=not legacy)
    lazy = load_lazy(ByteRange.whole_file(path))
    want = _flatten(torch.load(path, weights_only=True))
    got = dict(iter_tensors(lazy))
    assert set(got) == set(want) and lazy["iteration"] == 7 and lazy["list"][1][1] == 5
    for k, st_ in got.items():
        t = st_.read()
        assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """torch.load's tree as {dotted path: tensor}, named the way iter_tensors names StoredTensors."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def test_stored_member_of_an_outer_zip_is_read_in_place(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(_tree(), path)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("README", "padding before the member")
        zf.write(path, "release/mp_rank_00/model_optim_rng.pt")
    with zipfile.ZipFile(outer) as zf, open(outer, "rb") as f:
        info = zf.getinfo("release/mp_rank_00/model_optim_rng.pt")
        off = zip_member_offset(f, info)
    lazy = load_lazy(ByteRange(outer, off, info.file_size, "outer"))
    want = _tree()
    assert torch.equal(lazy["model"]["t"].read(), want["model"]["t"])
    assert torch.equal(lazy["model"]["w"].read(), want["model"]["w"])


def test_args_namespace_enums_and_numpy_rng_state_load_as_inert_stand_ins(tmp_path):
    with fake_megatron_enums() as ModelType:
        state = {"args": argparse.Namespace(hidden_size=8, model_type=ModelType.encoder_and_decoder,
                                            params_dtype=torch.float16),
                 "np_rng_state": np.random.RandomState(1).get_state(), "model": {}}
        torch.save(state, tmp_path / "a.pt")
    tree = load_lazy(ByteRange.whole_file(tmp_path / "a.pt"))
    args = tree["args"]
    assert isinstance(args, argparse.Namespace) and args.hidden_size == 8 and args.params_dtype == torch.float16
    assert isinstance(args.model_type, InertStandIn) and args.model_type.value == 2
    assert args.model_type.qualname == "megatron.model.enums.ModelType"
    rng = tree["np_rng_state"]
    assert rng[0] == "MT19937" and isinstance(rng[1], InertStandIn)


def test_unknown_class_is_refused(tmp_path):
    state = {"model": {}, "cfg": zipfile.ZipInfo("x")}  # an arbitrary stdlib class
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(UnsafeInput, match="zipfile.ZipInfo"):
        load_lazy(ByteRange.whole_file(tmp_path / "c.pt"))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "t.pt").write_text("hello")
    with pytest.raises(CorruptCheckpoint, match="not a torch checkpoint"):
        load_lazy(ByteRange.whole_file(tmp_path / "t.pt"))


# ------------------------------------------------------------------------------------ QKV / TP rules


@settings(max_examples=60, deadline=None)
@given(version=st.sampled_from([0.0, 1.0, 2.0, 3.0]), heads_per_rank=st.integers(1, 3), hd=st.integers(1, 4),
       tp=st.sampled_from([1, 2, 4]), cols=st.integers(0, 3))
def test_qkv_merge_inverts_megatron_partitioning(version, heads_per_rank, hd, tp, cols):
    heads = heads_per_rank * tp
    shape = (3 * heads * hd,) + ((cols,) if cols else ())
    hf = torch.arange(float(torch.Size(shape).numel())).reshape(shape)  # [q|k|v, heads, hd] rows
    per_rank = [stored_qkv(p.reshape(-1, *shape[1:]), version, heads_per_rank)
                for p in hf.reshape(3, heads, hd, *shape[1:]).chunk(tp, 1)]
    merge = T.merge_fn(T.QKV, version, heads_per_rank, "qkv", lambda w, r: AssertionError())
    assert torch.equal(merge(per_rank), hf)


@settings(max_examples=40, deadline=None)
@given(version=st.sampled_from([0.0, 1.0, 3.0]), heads=st.integers(1, 4), hd=st.integers(1, 4))
def test_reference_reads_the_stored_order_like_megatron(version, heads, hd):
    """The reference's own reading of a projection (no weight reordering) agrees with HF's q/k/v split."""
    hf = torch.randn(2, 5, 3 * heads * hd)  # activations in [q|k|v, heads, hd] order
    stored = stored_qkv(hf.reshape(-1, 3 * heads * hd).t(), version, heads).t().reshape(hf.shape)
    q, k, v = _split_heads(stored, version, heads, hd)
    want = hf.reshape(2, 5, 3, heads, hd)
    for i, got in enumerate((q, k, v)):
        assert torch.equal(got, want[:, :, i])


def test_replicated_merge_checks_ranks():
    merge = T.merge_fn(T.REPLICATED, 3.0, 1, "ln", lambda w, r: ValueError(f"{w} rank {r}"))
    a = torch.ones(3)
    assert merge([a, a.clone()]) is a
    with pytest.raises(ValueError, match="ln rank 2"):
        merge([a, a, a + 1])


def test_key_spellings_normalise():
    assert T.normalize("language_model.encoder.layers.3.self_attention.query_key_value.weight") == \
        "language_model.transformer.layers.3.attention.query_key_value.weight"
    assert T.normalize("language_model.encoder.layers.0.post_attention_norm.bias") == \
        "language_model.transformer.layers.0.post_attention_layernorm.bias"
    assert T.normalize("decoder.layers.2.mlp.linear_fc1.layer_norm_weight") == \
        "language_model.transformer.layers.2.post_attention_layernorm.weight"
    assert T.normalize("decoder.final_layernorm.weight") == "language_model.transformer.final_layernorm.weight"
    assert T.normalize("lm_head.norm.weight") == "lm_head.layernorm.weight"


def test_paths_are_rank_prefixed_and_unique(tmp_path):
    from enc.converters.megatron import MegatronConverter
    from tests.helpers.megatron_writer import Spec, hf_state, tiny_gpt2, write_dir

    src = write_dir(tmp_path / "c", Spec("gpt2", 32, 4, 2, 96, 16, 64, tp=2, pp=2), hf_state(tiny_gpt2(layers=2,
                                                                                                  max_pos=16, vocab=64)))
    with MegatronConverter(Path(src)) as conv:
        keys = list(conv.source_tensors())
        assert len(keys) == len(set(keys))
        assert "mp_rank_01_001/model.language_model.transformer.layers.0.attention.dense.weight" in keys
        assert conv.parts["language_model.transformer.layers.1.attention.dense.weight"][1].sources == (
            "mp_rank_01_001/model.language_model.transformer.layers.0.attention.dense.weight",)
        assert conv.plan().dropped["mp_rank_00_001/model.word_embeddings_for_head.weight"].startswith("the last")
