"""The pure-Python TF tensor-bundle reader against real TensorFlow output and the test writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enc.errors import CorruptCheckpoint, FormatError, MissingFile
from enc.io import tf_checkpoint as tfc
from enc.io.tf_checkpoint import TFCheckpoint
from tests.helpers import tf_bundle
from tests.helpers.tf_bundle import Partitioned, write_bundle

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
PREFIXES = {
    "v1_saver": FIX / "v1_saver" / "model.ckpt-7",
    "tf2_object": FIX / "tf2_object" / "ckpt-1",
    "hub_module": FIX / "hub_module" / "variables" / "variables",
    "sharded": FIX / "sharded" / "model.ckpt",
}


def _bits(t: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(t, torch.Tensor):
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        t = t.numpy()
    return np.ascontiguousarray(t).tobytes()


# ------------------------------------------------------------------------------ real TF fixtures


@pytest.mark.parametrize("name", sorted(PREFIXES))
def test_real_tensorflow_fixture_bit_exact(name: str) -> None:
    ck = TFCheckpoint(PREFIXES[name])
    expected = np.load(FIX / f"{name}.npz")
    meta = json.loads(str(expected["__meta__"]))
    assert ck.keys(include_non_numeric=True) == sorted(meta)
    assert ck.keys() == sorted(k for k, (dt, _) in meta.items() if dt != "DT_STRING")
    for key, (tf_dtype, shape) in meta.items():
        assert ck.tf_dtype(key) == tf_dtype
        assert ck.shape(key) == tuple(shape)
        if tf_dtype == "DT_STRING":
            with pytest.raises(FormatError, match="string tensor"):
                ck.read(key)
            continue
        want, got = expected[key], ck.read(key)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.tobytes() == want.tobytes(), key
        t = ck.read_torch(key)
        assert t.dtype == ck.dtype(key) and tuple(t.shape) == ck.shape(key)
        assert _bits(t.float() if t.dtype == torch.bfloat16 else t) == want.tobytes(), key


def test_v1_saver_contents() -> None:
    ck = TFCheckpoint(PREFIXES["v1_saver"])
    keys = ck.keys()
    assert len(keys) == 32 * 3 + 1 + 14  # ALBERT names, their adam_m/adam_v, global_step, extras
    assert ck.read("global_step").item() == 7 and ck.dtype("global_step") == torch.int64
    assert ck.shape(
        "bert/encoder/transformer/group_0/inner_group_0/ffn_1/intermediate/output/dense/kernel"
    ) == (8, 6)
    assert "cls/seq_relationship/output_weights/adam_v" in keys
    assert ck.dtype("extra/bfloat16") == torch.bfloat16 and ck.read("extra/bfloat16").dtype == np.float32
    assert ck.read("extra/scalar").shape == () and ck.read("extra/scalar").item() == 3.25
    assert ck.read("extra/empty").shape == (0, 3)
    assert ck.read("extra/bool").tolist() == [True, False, True, True, False]
    assert ck.shape("extra/partitioned_130") == (130, 3) and "extra/string" not in keys
    assert "extra/string" in ck.keys(include_non_numeric=True) and "extra/string" in ck
    assert [p.name for p in ck.files] == ["model.ckpt-7.index", "model.ckpt-7.data-00000-of-00001"]


def test_tf2_object_graph_is_not_numeric() -> None:
    ck = TFCheckpoint(PREFIXES["tf2_object"])
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in ck.keys(include_non_numeric=True)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in ck.keys()
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in ck.lazy_tensors()
    with pytest.raises(
        FormatError, match=r"ckpt-1\.index: string tensor _CHECKPOINTABLE_OBJECT_GRAPH not supported"
    ):
        ck.read_torch("_CHECKPOINTABLE_OBJECT_GRAPH")
    with pytest.raises(FormatError, match="string tensor"):
        ck.dtype("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert ck.read("model/steps/.ATTRIBUTES/VARIABLE_VALUE").item() == 41


def test_sharded_fixture_uses_both_shards() -> None:
    ck = TFCheckpoint(PREFIXES["sharded"])
    assert [p.name for p in ck.files] == [
        "model.ckpt.index",
        "model.ckpt.data-00000-of-00002",
        "model.ckpt.data-00001-of-00002",
    ]
    assert {ck._entries[k].shard_id for k in ck.keys()} == {0, 1}
    assert ck.read("global_step").item() == 99 and ck.dtype("cls/predictions/output_bias") == torch.float16


def test_lazy_tensors() -> None:
    ck = TFCheckpoint(PREFIXES["v1_saver"])
    lazy = ck.lazy_tensors()
    assert sorted(lazy) == ck.keys()
    lt = lazy["bert/embeddings/word_embeddings"]
    assert (lt.shape, lt.dtype, lt.sources) == ((7, 4), torch.float32, ("bert/embeddings/word_embeddings",))
    assert torch.equal(lt.load(), ck.read_torch("bert/embeddings/word_embeddings"))
    assert lazy["extra/bfloat16"].load().dtype == torch.bfloat16
    assert lazy["extra/partitioned"].load().shape == (10, 4)


def test_albert_tiny_example_is_a_training_checkpoint() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "albert_tiny"
    config = json.loads((example / "albert_config.json").read_text())
    ck = TFCheckpoint(example)
    assert ck.prefix == example / "model.ckpt-best"
    weights = [k for k in ck.keys() if not k.endswith(("/adam_m", "/adam_v")) and k != "global_step"]
    assert len(weights) == 32 and len(ck.keys()) == 3 * 32 + 1
    assert ck.read("global_step").item() == 5000
    assert ck.shape("bert/embeddings/word_embeddings") == (config["vocab_size"], config["embedding_size"])
    assert ck.shape("bert/encoder/embedding_hidden_mapping_in/kernel") == (32, 64)
    assert ck.dtype("cls/predictions/output_bias/adam_v") == torch.float32
    for name in ck.keys():
        assert np.isfinite(ck.read(name)).all(), name


# ------------------------------------------------------------------------------------ resolve()


def test_resolve_forms(tmp_path: Path) -> None:
    v1 = PREFIXES["v1_saver"]
    assert TFCheckpoint.resolve(v1) == v1
    assert TFCheckpoint.resolve(f"{v1}.index") == v1
    assert TFCheckpoint.resolve(f"{v1}.data-00000-of-00001") == v1
    # TF wrote an absolute /tmp path into `checkpoint`; it no longer exists, so the basename is used.
    assert TFCheckpoint.resolve(v1.parent) == v1
    assert TFCheckpoint.resolve(FIX / "tf2_object") == PREFIXES["tf2_object"]  # relative state path
    assert TFCheckpoint.resolve(FIX / "hub_module") == PREFIXES["hub_module"]
    assert TFCheckpoint.resolve(FIX / "sharded") == PREFIXES["sharded"]  # single *.index, no state file
    assert TFCheckpoint(FIX / "hub_module").prefix == PREFIXES["hub_module"]


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFile, match="no TensorFlow checkpoint in directory") as e:
        TFCheckpoint.resolve(tmp_path)
    assert e.value.path == tmp_path
    write_bundle(tmp_path / "a", {"x": np.zeros(1, np.float32)})
    write_bundle(tmp_path / "b", {"x": np.zeros(1, np.float32)})
    with pytest.raises(FormatError, match=r"several checkpoints in directory .*: a\.index, b\.index"):
        TFCheckpoint.resolve(tmp_path)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "b"\nall_model_checkpoint_paths: "a"\n')
    assert TFCheckpoint.resolve(tmp_path) == tmp_path / "b"
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "gone"\n')
    with pytest.raises(MissingFile, match="checkpoint: model_checkpoint_path gone has no .index"):
        TFCheckpoint.resolve(tmp_path)
    with pytest.raises(MissingFile, match="no such checkpoint") as e:
        TFCheckpoint.resolve(tmp_path / "nope")
    assert e.value.path == tmp_path / "nope"
    with pytest.raises(MissingFile, match="checkpoint index not found"):
        TFCheckpoint.resolve(tmp_path / "nope.index")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"model\.bin: not a TensorFlow V2 checkpoint"):
        TFCheckpoint.resolve(tmp_path / "model.bin")


# ---------------------------------------------------------------------------- writer round trips

_DTYPES = ["float32", "float16", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "bool"]  # fmt: skip


def _random_value(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray | torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == "bfloat16":  # arbitrary bit patterns, NaNs included: compared as bits
        return torch.from_numpy(np.frombuffer(rng.bytes(2 * n), np.int16).reshape(shape).copy()).view(
            torch.bfloat16
        )
    dt = np.dtype(dtype)
    return np.frombuffer(rng.bytes(dt.itemsize * n), dt).reshape(shape).copy()


@st.composite
def _bundles(draw: st.DrawFn) -> tuple[dict, dict]:
    names = draw(st.lists(st.text("ab/_.0é", min_size=1, max_size=10), min_size=1, max_size=40, unique=True))
    tensors: dict[str, object] = {}
    for i, name in enumerate(names):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        value = _random_value(draw(st.sampled_from(_DTYPES)), shape, seed=i)
        splittable = [d for d, size in enumerate(shape) if size >= 2]
        if splittable and draw(st.integers(0, 4)) == 0:
            axis = draw(st.sampled_from(splittable))
            value = Partitioned(value, draw(st.integers(2, shape[axis])), axis, draw(st.booleans()))
        tensors[name] = value
    options = {
        "num_shards": draw(st.integers(1, 3)),
        "restart_interval": draw(st.integers(1, 16)),
        "block_size": draw(st.sampled_from([1, 64, 256, 4096, 262144])),
        "big_endian": draw(st.booleans()),
        "compression": draw(st.sampled_from(["none", "snappy"])),
    }
    return tensors, options


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_bundles())
def test_writer_reader_round_trip(tmp_path_factory: pytest.TempPathFactory, case: tuple[dict, dict]) -> None:
    tensors, options = case
    prefix = tmp_path_factory.mktemp("rt") / "ckpt"
    files = write_bundle(prefix, tensors, **options)
    ck = TFCheckpoint(prefix)
    assert ck.files == files and ck.big_endian == options["big_endian"]
    assert ck.keys() == sorted(tensors)
    for name, value in tensors.items():
        value = value.value if isinstance(value, Partitioned) else value
        got = ck.read_torch(name)
        want = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert _bits(got) == _bits(want), name
        if got.dtype != torch.bfloat16:
            assert ck.read(name).tobytes() == np.ascontiguousarray(value).tobytes()


def _index_layout(index: bytes) -> tuple[int, list[int]]:
    """(number of data blocks, restart-point count of each data block) of an .index file."""
    footer = index[-48:]
    _, _, pos = tfc._block_handle(footer)
    off, size, _ = tfc._block_handle(footer, pos)
    restarts = []
    for _, handle in tfc._block_entries(tfc._read_block(index, off, size, "index")):
        boff, bsize, _ = tfc._block_handle(handle)
        block = tfc._read_block(index, boff, bsize, "data")
        restarts.append(struct.unpack_from("<I", block, len(block) - 4)[0])
    return len(restarts), restarts


def test_many_keys_span_restarts_and_blocks(tmp_path: Path) -> None:
    tensors = {f"bert/encoder/layer_{i:03d}/kernel": np.full((2, i % 4), i, np.float32) for i in range(100)}
    write_bundle(tmp_path / "one", tensors)
    write_bundle(tmp_path / "many", tensors, block_size=1024)
    assert _index_layout((tmp_path / "one.index").read_bytes()) == (1, [7])  # 101 entries / 16
    blocks, restarts = _index_layout((tmp_path / "many.index").read_bytes())
    assert blocks >= 3 and all(r >= 2 for r in restarts[:-1])
    for prefix in ("one", "many"):
        ck = TFCheckpoint(tmp_path / prefix)
        assert ck.keys() == sorted(tensors)
        for name, value in tensors.items():
            assert np.array_equal(ck.read(name), value)


def test_partitioned_and_slice_keys(tmp_path: Path) -> None:
    # The key TF 2.15/2.21 writes for rows [0:4] of a [10,4] variable split in 3 (albert_tf.md §3.6).
    key = tfc.slice_key("extra/partitioned", ((0, 4), (0, 4)))
    assert key == b"\x00extra/partitioned\x00\x01\x01\x02\x80\x84\x80\x84"
    assert tfc.slice_key("a", ((65, -1),)) == b"\x00a\x00\x01\x01\x01\xc0\x41\x7f"
    value = np.arange(3 * 300 * 2, dtype=np.int64).reshape(3, 300, 2)
    write_bundle(tmp_path / "p", {"big": Partitioned(value, 7, axis=1), "x": np.float32(1)}, num_shards=2)
    ck = TFCheckpoint(tmp_path / "p")
    assert ck.keys() == ["big", "x"] and len(ck._entries["big"].slices) == 7
    assert np.array_equal(ck.read("big"), value)


def test_big_endian_and_snappy(tmp_path: Path) -> None:
    value = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    write_bundle(tmp_path / "be", {"v": value, "w": np.arange(5, dtype=np.int64)}, big_endian=True)
    assert (tmp_path / "be.data-00000-of-00001").read_bytes()[:4] == value.astype(">f4").tobytes()[:4]
    assert np.array_equal(TFCheckpoint(tmp_path / "be").read("v"), value)
    write_bundle(tmp_path / "sn", {f"layer_{i}/kernel": value for i in range(30)}, compression="snappy")
    assert np.array_equal(TFCheckpoint(tmp_path / "sn").read("layer_29/kernel"), value)


def test_snappy_decoder() -> None:
    rng = np.random.default_rng(0)
    for data in [b"", b"a", rng.bytes(5000), b"abcd" * 300 + rng.bytes(70) + bytes(9000)]:
        assert tfc._snappy_decompress(tf_bundle.snappy_compress(data)) == data
    # A 4-byte-offset copy (tag 3), which the small test compressor never emits.
    blob = bytes([12]) + bytes([3 << 2]) + b"abcd" + bytes([(8 - 1) << 2 | 3]) + struct.pack("<I", 4)
    assert tfc._snappy_decompress(blob) == b"abcd" * 3
    with pytest.raises(tfc._Bad):
        tfc._snappy_decompress(
            bytes([12]) + bytes([3 << 2]) + b"abcd" + bytes([(8 - 1) << 2 | 3]) + struct.pack("<I", 9)
        )


# --------------------------------------------------------------------------------------- CRC32C


def test_crc32c_backends_agree() -> None:
    assert tfc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfc._crc32c_numpy(b"123456789") == tfc._crc32c_python(b"123456789") == 0xE3069283
    rng = np.random.default_rng(1)
    block = tfc._BLOCK
    for n in (0, 3, 4095, 4096, block - 1, block + 1, block + 3, 3 * block + 17):
        data = rng.bytes(n)
        for init in (0, 0xDEADBEEF):
            assert (
                tfc._crc32c_numpy(data, init) == tfc.crc32c(data, init) == tfc._crc32c_python(data, init)
            ), n
    assert tfc.crc32c(b"56789", tfc.crc32c(b"1234")) == 0xE3069283
    assert tfc.crc32c(bytearray(b"123456789")) == tfc.crc32c(memoryview(b"123456789")) == 0xE3069283
    for c in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert tfc.unmask_crc(tfc.mask_crc(c)) == c
    assert tfc.mask_crc(0) == 0xA282EAD8


# ----------------------------------------------------------------------------------- corruption


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    tensors = {f"t{i:02d}": np.arange(i, i + 8, dtype=np.float32) for i in range(20)}
    write_bundle(tmp_path / "ckpt", tensors, num_shards=2)
    return tmp_path / "ckpt"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _message(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert exc.value.path == path and msg.startswith(f"{path}: ") and "\n" not in msg
    return msg


def test_bad_magic(bundle: Path) -> None:
    index = Path(f"{bundle}.index")
    _flip(index, index.stat().st_size - 1)
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(bundle)
    assert "bad magic number" in _message(e, index)


@pytest.mark.parametrize("keep", [0, 30, -1, -48])
def test_truncated_index(bundle: Path, keep: int) -> None:
    index = Path(f"{bundle}.index")
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(bundle)
    assert ("truncated" if keep >= 0 else "bad magic") in _message(e, index)


def test_truncated_index_keeping_the_footer(bundle: Path) -> None:
    index = Path(f"{bundle}.index")
    data = index.read_bytes()
    index.write_bytes(data[:20] + data[-48:])  # blocks cut away, footer intact
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(bundle)
    assert "truncated: index block" in _message(e, index)


def test_truncated_data(bundle: Path) -> None:
    shard = Path(f"{bundle}.data-00001-of-00002")
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(bundle)
    assert "truncated: tensor t19 needs bytes [288, 320), file has 317" in _message(e, shard)


def test_truncated_data_after_open(bundle: Path) -> None:
    ck = TFCheckpoint(bundle)
    shard = Path(f"{bundle}.data-00001-of-00002")
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpoint) as e:
        ck.read("t19")
    assert "truncated: tensor t19 needs bytes [288, 320), file ends at 317" in _message(e, shard)


def test_missing_data_shard(bundle: Path) -> None:
    shard = Path(f"{bundle}.data-00001-of-00002")
    shard.unlink()
    with pytest.raises(MissingFile) as e:
        TFCheckpoint(bundle)
    assert "data shard missing (the index lists 2)" in _message(e, shard)


def test_flipped_data_byte(bundle: Path) -> None:
    shard = Path(f"{bundle}.data-00000-of-00002")
    ck = TFCheckpoint(bundle)
    _flip(shard, ck._entries["t04"].offset + 5)
    with pytest.raises(CorruptCheckpoint) as e:
        ck.read("t04")
    assert "CRC32C mismatch for tensor t04" in _message(e, shard)
    with pytest.raises(CorruptCheckpoint, match="CRC32C mismatch for tensor t04"):
        ck.lazy_tensors()["t04"].load()
    assert not np.array_equal(ck.read("t04", verify=False), np.arange(4, 12, dtype=np.float32))
    # Every other tensor is read from its own bytes only and is unaffected.
    for name in ck.keys():
        if name != "t04":
            assert np.array_equal(
                ck.lazy_tensors()[name].load().numpy(), np.arange(int(name[1:]), int(name[1:]) + 8)
            )


def test_flipped_index_byte(bundle: Path) -> None:
    index = Path(f"{bundle}.index")
    _flip(index, 20)  # inside the (single) data block
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(bundle)
    assert "CRC32C mismatch in data block at offset 0" in _message(e, index)
    data = bytearray(index.read_bytes())
    data[20] ^= 0x40  # repair it
    _, _, pos = tfc._block_handle(bytes(data[-48:]))
    index_block_offset = tfc._block_handle(bytes(data[-48:]), pos)[0]
    data[index_block_offset + 1] ^= 0x01  # inside the index block
    index.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="CRC32C mismatch in index block"):
        TFCheckpoint(bundle)


def _index_from_items(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    path.write_bytes(tf_bundle._table(items, 16, 262144, "none"))


def test_inconsistent_entries(tmp_path: Path) -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    (tmp_path / "c.data-00000-of-00001").write_bytes(data)
    crc = tfc.mask_crc(tfc.crc32c(data))
    header = tf_bundle._header_proto(1, False)
    good = tf_bundle._entry_proto(1, (4,), 0, 0, 16, crc)

    _index_from_items(
        tmp_path / "c.index", [(b"", header), (b"x", tf_bundle._entry_proto(1, (5,), 0, 0, 16, crc))]
    )
    with pytest.raises(CorruptCheckpoint) as e:
        TFCheckpoint(tmp_path / "c")
    assert "size mismatch for tensor x: entry says 16 bytes, DT_FLOAT [5] needs 20" in _message(
        e, tmp_path / "c.index"
    )

    _index_from_items(tmp_path / "c.index", [(b"x", good)])
    with pytest.raises(CorruptCheckpoint, match="bundle header entry missing"):
        TFCheckpoint(tmp_path / "c")

    newer = tf_bundle._int_field(1, 1) + tf_bundle._msg_field(
        3, tf_bundle._int_field(1, 2) + tf_bundle._int_field(2, 2)
    )
    _index_from_items(tmp_path / "c.index", [(b"", newer), (b"x", good)])
    with pytest.raises(FormatError, match="bundle format too new"):
        TFCheckpoint(tmp_path / "c")

    _index_from_items(
        tmp_path / "c.index", [(b"", header), (b"x", tf_bundle._entry_proto(1, (4,), 3, 0, 16, crc))]
    )
    with pytest.raises(CorruptCheckpoint, match="tensor x in shard 3, but the bundle has 1"):
        TFCheckpoint(tmp_path / "c")

    sliced = tf_bundle._entry_proto(1, (8,), slices=(((0, 4),), ((4, 4),)))
    part = tf_bundle._entry_proto(1, (4,), 0, 0, 16, crc)
    _index_from_items(
        tmp_path / "c.index", [(b"", header), (tfc.slice_key("x", ((0, 4),)), part), (b"x", sliced)]
    )
    with pytest.raises(CorruptCheckpoint, match=r"slice 4,4 of tensor x missing from the index"):
        TFCheckpoint(tmp_path / "c")

    _index_from_items(tmp_path / "c.index", [(b"", header), (b"x", good)])
    assert TFCheckpoint(tmp_path / "c").read("x").tolist() == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="no tensor named 'y'"):
        TFCheckpoint(tmp_path / "c").read("y")


def test_reads_use_seek_and_exact_sizes(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read asks the OS for exactly the tensor's bytes, never the whole shard."""
    ck = TFCheckpoint(bundle)
    requested: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, off):
            return self.f.seek(off)

        def readinto(self, view):
            requested.append(len(view))
            return self.f.readinto(view)

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: Spy(real_open(p, *a, **k)))
    ck.read("t07")
    assert requested == [32]
    assert os.path.getsize(f"{bundle}.data-00001-of-00002") == 320
