"""Fuzzing the readers: any input gives enc's own one-line error or a correct result, never a traceback,
a hang, or a memory blow-up from a declared huge shape (issue 15, "Also").

Each reader gets real bytes from the real writer (a TF bundle from the test bundle writer, torch.save,
safetensors) and hypothesis mutates them: flipped bytes, truncation, inserted bytes, and for the JSON
formats arbitrary (and adversarial) structures. Every tensor the reader accepts is then read in full;
a result must equal what was written (a mutation that leaves the tensor bytes intact) or be refused.
"""

from __future__ import annotations

import io
import json
import os
import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from enc.errors import EncError

FUZZ = settings(max_examples=int(os.environ.get("ENC_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Mutations: (kind, position fraction, byte)
mutation = st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
                     st.floats(min_value=0, max_value=1, allow_nan=False), st.integers(0, 255))


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for kind, frac, val in muts:
        if not b:
            break
        i = min(len(b) - 1, int(frac * len(b)))
        if kind == "flip":
            b[i] ^= 1 << (val % 8)
        elif kind == "set":
            b[i] = val
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([val]) * (1 + val % 9)
        else:
            del b[i:i + 1 + val % 9]
    return bytes(b)


def _rss_growth_guard():
    """Peak RSS grows by less than 1 GiB over a whole fuzz run (a declared huge shape must not allocate)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(autouse=True, scope="module")
def _bounded_memory():
    before = _rss_growth_guard()
    yield
    assert _rss_growth_guard() - before < 1 << 20  # ru_maxrss is in KiB: < 1 GiB


# ----------------------------------------------------------------------------- TF bundle


TF_VALUES = {
    "bert/embeddings/word_embeddings": np.arange(48, dtype=np.float32).reshape(12, 4),
    "bert/pooler/dense/bias": np.linspace(-1, 1, 7).astype(np.float64),
    "global_step": np.array(7, dtype=np.int64),
    "layer/kernel": np.arange(30, dtype=np.int16).reshape(5, 6),
}


@pytest.fixture(scope="module")
def tf_bundle(tmp_path_factory):
    from tests.helpers.tf_bundle import write_bundle

    d = tmp_path_factory.mktemp("tf")
    write_bundle(d / "model.ckpt", TF_VALUES, num_shards=2, restart_interval=2)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _read_tf(d: Path):
    from enc.io.tf_checkpoint import TFCheckpoint

    ck = TFCheckpoint(d / "model.ckpt")
    return {k: ck.read(k) for k in ck.keys()}


def _check_tf(got: dict) -> None:
    assert set(got) <= set(TF_VALUES)
    for k, v in got.items():
        np.testing.assert_array_equal(v, TF_VALUES[k])


@FUZZ
@given(which=st.sampled_from(["index", "data0", "data1"]), muts=st.lists(mutation, min_size=1, max_size=4))
def test_tf_bundle_mutations(tmp_path_factory, tf_bundle, which, muts):
    d = tmp_path_factory.mktemp("tfm")
    for name, data in tf_bundle.items():
        target = {"index": ".index", "data0": "data-00000", "data1": "data-00001"}[which]
        (d / name).write_bytes(mutate(data, muts) if target in name else data)
    try:
        got = _read_tf(d)
    except EncError:
        return
    _check_tf(got)  # accepted: then every value is exactly what was written (CRC32C guards the bytes)


@FUZZ
@given(dims=st.lists(st.integers(0, 2**62), min_size=1, max_size=4), size=st.integers(0, 2**62),
       offset=st.integers(0, 2**62))
@example(dims=[0, 2**40, 2**40], size=0, offset=0)
def test_tf_declared_huge_shapes_are_refused_before_reading(tmp_path_factory, dims, size, offset):
    """An index entry may claim any shape, size and offset; only what the data file holds is read."""
    from tests.helpers import tf_bundle as tb

    d = tmp_path_factory.mktemp("tfh")
    real = tb._entry_proto
    tb._entry_proto = lambda dtype, shape, shard, off, sz, crc, slices=(): real(dtype, tuple(dims), shard, offset,
                                                                                  size, crc, slices)
    try:
        tb.write_bundle(d / "model.ckpt", {"w": np.zeros((3, 4), np.float32)})
    finally:
        tb._entry_proto = real
    try:
        got = _read_tf(d)
    except EncError:
        return
    assert got["w"].shape == tuple(dims) and got["w"].nbytes <= 48


# ----------------------------------------------------------------------------- torch zip + pickle


PTH_VALUES = {"tok_embeddings.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
              "norm.weight": torch.ones(4, dtype=torch.bfloat16),
              "layers.0.attention.wq.weight": torch.arange(16, dtype=torch.float16).reshape(4, 4).t()}


@pytest.fixture(scope="module")
def pth_bytes():
    buf = io.BytesIO()
    torch.save(PTH_VALUES, buf)
    return buf.getvalue()


def _read_pth(path: Path) -> dict:
    from enc.converters.mistral import _pth_tensors

    return {k: v.load() for k, v in _pth_tensors(path).items()}


def _check_pth(got: dict) -> None:
    assert set(got) <= set(PTH_VALUES)
    for k, v in got.items():
        assert v.dtype == PTH_VALUES[k].dtype and torch.equal(v, PTH_VALUES[k]), k


@FUZZ
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_pth_mutations(tmp_path_factory, pth_bytes, muts):
    p = tmp_path_factory.mktemp("pth") / "consolidated.00.pth"
    p.write_bytes(mutate(pth_bytes, muts))
    try:
        got = _read_pth(p)
    except EncError:
        return
    _check_pth(got)  # accepted: every tensor equal to what torch.save wrote (zip CRCs guard the storages)


@FUZZ
@given(shape=st.lists(st.integers(0, 2**40), min_size=1, max_size=3),
       stride=st.lists(st.integers(0, 2**40), min_size=1, max_size=3), offset=st.integers(0, 2**40))
@example(shape=[0, 3_036_988_439, 3_037_012_561], stride=[0, 0, 0], offset=0)  # found: torch.empty overflowed
def test_pth_declared_layouts(tmp_path_factory, shape, stride, offset):
    """Any shape/stride/offset a pickle declares over a 16-element storage: read correctly or refused."""
    n = min(len(shape), len(stride))
    shape, stride = shape[:n], stride[:n]
    base = torch.arange(16, dtype=torch.float32)
    p = tmp_path_factory.mktemp("pthl") / "consolidated.00.pth"
    buf = io.BytesIO()
    with _patched_reduce(base, shape, stride, offset):  # torch.save cannot write such a layout by itself
        torch.save({"w": base[:1]}, buf)
    p.write_bytes(buf.getvalue())
    try:
        got = _read_pth(p)
    except EncError:
        return
    assert torch.equal(got["w"], base.as_strided(shape, stride, offset))  # accepted only when it is real


class _patched_reduce:
    """Make torch.save record ``shape``/``stride``/``offset`` over ``base``'s storage for the tensor it pickles."""

    def __init__(self, base, shape, stride, offset):
        self.base, self.layout = base, (tuple(shape), tuple(stride), offset)

    def __enter__(self):
        self.real = torch.Tensor._reduce_ex_internal
        shape, stride, offset = self.layout
        base, real = self.base, self.real

        def reduce(t, proto):
            fn, args = real(base, proto)
            return fn, (args[0], offset, shape, stride, *args[4:])

        torch.Tensor._reduce_ex_internal = reduce

    def __exit__(self, *exc):
        torch.Tensor._reduce_ex_internal = self.real


# ----------------------------------------------------------------------------- safetensors header


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
entry = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "f32"]), json_value),
     "shape": st.one_of(st.lists(st.integers(-3, 40), max_size=3), json_value),
     "data_offsets": st.one_of(st.lists(st.integers(-64, 400), min_size=2, max_size=2), json_value)},
    optional={"extra": json_value})
header = st.one_of(st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(entry, json_value), max_size=5),
                   json_value)


@FUZZ
@given(head=header, data=st.binary(max_size=400), pad=st.integers(0, 8))
def test_safetensors_arbitrary_headers(tmp_path_factory, head, data, pad):
    from enc.io.safetensors_in import read_entry, read_header

    raw = json.dumps(head).encode() + b" " * pad
    p = tmp_path_factory.mktemp("st") / "consolidated.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    try:
        entries, _ = read_header(p)
        tensors = {k: read_entry(p, e) for k, e in entries.items()}
    except EncError:
        return
    base = 8 + len(raw)
    covered = 0
    for k, e in entries.items():  # accepted: each tensor is exactly its bytes, inside the data section
        assert base <= e.offset and e.offset + e.nbytes <= p.stat().st_size
        assert tensors[k].numel() * tensors[k].element_size() == e.nbytes
        assert bytes(tensors[k].contiguous().view(torch.uint8).reshape(-1).numpy()) == \
            data[e.offset - base:e.offset - base + e.nbytes]
        covered += e.nbytes
    assert covered <= len(data)  # never more output than input


@FUZZ
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_safetensors_file_mutations(tmp_path_factory, muts):
    from safetensors.torch import save

    from enc.io.safetensors_in import lazy_tensors

    values = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)}
    p = tmp_path_factory.mktemp("stm") / "model.safetensors"
    p.write_bytes(mutate(save(values), muts))
    try:
        got = {k: v.load() for k, v in lazy_tensors(p).items()}
    except EncError:
        return
    for v in got.values():  # no checksum in safetensors: a value may differ, but never its size
        assert v.numel() * v.element_size() <= p.stat().st_size


# ----------------------------------------------------------------------------- params.json


SHAPES = {"tok_embeddings.weight": (32, 8), "layers.0.feed_forward.w1.weight": (16, 8)}
params_value = st.one_of(st.integers(-3, 2**66), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["8", "inf", "nan", "-1", "1e400", "", "none", "0"]), st.none(),
                         st.booleans(), st.lists(st.integers(-2, 4096), max_size=3),
                         st.dictionaries(st.sampled_from(["num_experts", "num_experts_per_tok"]),
                                         st.one_of(st.integers(-2, 9), st.text(max_size=3)), max_size=2),
                         st.lists(st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), max_size=2))
small = st.one_of(st.integers(1, 16), params_value)
_OPTIONAL = ["n_kv_heads", "head_dim", "hidden_dim", "norm_eps", "vocab_size", "rope_theta", "sliding_window", "moe",
             "max_seq_len", "model_type", "num_local_experts", "hidden_size", "num_attention_heads", "rms_norm_eps"]
params = st.fixed_dictionaries({"dim": small, "n_layers": small, "n_heads": small},
                               optional={k: small for k in _OPTIONAL})


@FUZZ
@given(p=st.one_of(params, json_value), text=st.one_of(st.none(), st.binary(max_size=30)))
def test_params_json(tmp_path_factory, p, text):
    from enc.converters.mistral import Params, read_params, resolve_params

    f = tmp_path_factory.mktemp("params") / "params.json"
    if text is not None:
        f.write_bytes(text)
    else:
        f.write_text(json.dumps(p))
    try:
        got = resolve_params(read_params(f, {}), SHAPES, f)
    except EncError as e:
        assert e.path == f  # the one line names params.json
        return
    assert isinstance(got, Params)
    assert got.dim > 0 and got.n_heads > 0 and got.head_dim > 0 and got.n_heads % got.n_kv_heads == 0


# ----------------------------------------------------------------------------- zip members


@FUZZ
@given(ctype=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
       which=st.sampled_from(["data.pkl", "data/0", "byteorder", "version"]))
def test_pth_members_compressed(tmp_path_factory, pth_bytes, ctype, which):
    """torch writes every member STORED; a compressed one (a possible bomb) is refused, never inflated."""
    with zipfile.ZipFile(io.BytesIO(pth_bytes)) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            zf.writestr(zipfile.ZipInfo(name), data, ctype if name.endswith(which) else zipfile.ZIP_STORED)
    p = tmp_path_factory.mktemp("pthz") / "consolidated.00.pth"
    p.write_bytes(buf.getvalue())
    try:
        got = _read_pth(p)
    except EncError:
        assert ctype != zipfile.ZIP_STORED or which not in ("data.pkl", "data/0")
        return
    _check_pth(got)
    assert ctype == zipfile.ZIP_STORED or which in ("byteorder", "version")


@pytest.fixture(scope="module")
def legacy_bytes():
    buf = io.BytesIO()
    torch.save(PTH_VALUES, buf, _use_new_zipfile_serialization=False)  # the 2019-2020 Megatron releases' format
    return buf.getvalue()


@FUZZ
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_legacy_torch_format_mutations(tmp_path_factory, legacy_bytes, muts):
    """No CRC in the legacy format: a value may change, but the reader never over-reads or crashes."""
    from enc.io.megatron_pickle import ByteRange, iter_tensors, load_lazy

    p = tmp_path_factory.mktemp("legacy") / "model_optim_rng.pt"
    p.write_bytes(mutate(legacy_bytes, muts))
    try:
        tree = load_lazy(ByteRange.whole_file(p))
        got = {k: t.read() for k, t in iter_tensors(tree)}
    except EncError:
        return
    for v in got.values():
        assert v.numel() * v.element_size() <= p.stat().st_size


@FUZZ
@given(data=st.binary(max_size=300), claim=st.integers(0, 2**40))
def test_snappy_blocks(data, claim):
    """Raw snappy from an index block: the declared length is bounded by the input, never trusted."""
    from enc.io.tf_checkpoint import _Bad, _snappy_decompress
    from tests.helpers.tf_bundle import _varint, snappy_compress

    try:
        out = _snappy_decompress(_varint(claim) + data)
    except _Bad:
        pass
    else:
        assert len(out) == claim <= 22 * (len(data) + 10) + 64
    assert _snappy_decompress(snappy_compress(data)) == data
