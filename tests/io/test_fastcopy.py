"""The byte path (enc.io.fastcopy): the same output files, byte for byte, as loading tensors with torch.

Each family is converted twice with ``--no-verify``: once with ``ENC_FASTCOPY=0`` (every tensor loaded
with torch and written by the writer, the path enc had before) and once with the byte path; every
safetensors file, the index and config.json must be identical, and the byte path must really have
carried the tensors (its counters are read back).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run
from enc.converters.base import permute_rope
from enc.errors import CorruptCheckpoint
from enc.io import fastcopy
from enc.io.fastcopy import RawWriter, raw_source

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def albert_spm(tmp_path_factory):
    from tests.helpers.albert_release import train_spm

    return train_spm(tmp_path_factory.mktemp("spm"))


def _convert(src: Path, out: Path, fast: bool, monkeypatch, capsys, *extra: str) -> dict[str, int]:
    monkeypatch.setenv("ENC_FASTCOPY", "1" if fast else "0")
    before = dict(RawWriter.stats)
    rc = run(["convert", str(src), "-o", str(out), "--no-verify", "--json", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return {k: RawWriter.stats[k] - before[k] for k in before}


def _same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "enc_provenance.json")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json")
                           and p.name != "enc_provenance.json")
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    return names


def _n_tensors(d: Path) -> int:
    import json

    n = 0
    for f in d.glob("*.safetensors"):
        raw = f.read_bytes()
        n += len(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])) - 1
    return n


def _both(src: Path, tmp: Path, monkeypatch, capsys, *extra: str) -> tuple[dict, dict, list[str]]:
    slow = _convert(src, tmp / "torch-path", False, monkeypatch, capsys, *extra)
    fast = _convert(src, tmp / "byte-path", True, monkeypatch, capsys, *extra)
    return slow, fast, _same_files(tmp / "torch-path", tmp / "byte-path")


# ----------------------------------------------------------------------------- families


@pytest.mark.parametrize("case", ["pth-bf16", "safetensors-fp32-sharded", "mixtral-pth", "mixtral-stacked-st",
                                  "pth-to-fp16"])
def test_mistral_family_bytes_identical(case, tmp_path, monkeypatch, capsys):
    from tests.helpers.mistral_writer import tiny_hf, write_release

    moe = case.startswith("mixtral")
    model = tiny_hf(moe=moe, vocab=32000)
    fmt = "safetensors" if "-st" in case or "safetensors" in case else "pth"
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    src = write_release(tmp_path / "release", model, fmt=fmt, dtype=dtype, stacked_moe="stacked" in case)
    extra = ["--shard-size", "3MB"] if "sharded" in case else ["--dtype", "float16"] if "to-fp16" in case else []
    slow, fast, names = _both(src, tmp_path, monkeypatch, capsys, *extra)
    assert slow == {"kernel": 0, "rearranged": 0}
    n_layers = 2
    if case == "pth-to-fp16":  # a dtype change is arithmetic: every tensor takes the torch path
        assert fast == {"kernel": 0, "rearranged": 0}
        return
    n_tensors = 3 + n_layers * (6 + (1 + 3 * 4 if moe else 3))
    assert n_tensors == _n_tensors(tmp_path / "byte-path")
    # wq and wk of each layer are permuted; with stacked experts w2 is transposed; the rest is copied by the
    # kernel (a .pth's zip CRC-32s are checked on a helper thread meanwhile)
    permuted = 2 * n_layers + (4 * n_layers if "stacked" in case else 0)
    assert fast == {"kernel": n_tensors - permuted, "rearranged": permuted}
    if "sharded" in case:
        assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1


def test_output_sha256_hashed_while_writing_is_the_files(tmp_path, monkeypatch, capsys):
    """enc_provenance.json's output hashes: for the byte path they are computed as the file is written."""
    import hashlib
    import json

    from enc.io.fastcopy import known_sha256
    from tests.helpers.mistral_writer import tiny_hf, write_release

    src = write_release(tmp_path / "release", tiny_hf(vocab=32000), fmt="pth", dtype=torch.bfloat16)
    _convert(src, tmp_path / "out", True, monkeypatch, capsys, "--shard-size", "3MB")
    prov = json.loads((tmp_path / "out" / "enc_provenance.json").read_text())
    outputs = {o["file"]: o["sha256"] for o in prov["outputs"]}
    shards = sorted(p for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    for p in shards:
        assert outputs[p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    # a file the byte path did not write has no record (one changed since writing is checked by size+mtime)
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abc")
    assert known_sha256(f) is None


def test_albert_tf_bytes_identical_with_crc(tmp_path, monkeypatch, capsys, albert_spm):
    from tests.helpers.albert_release import hf_albert, write_release

    model = hf_albert(120, 16, 32, 2, 1, 1, 4, 64)
    src = write_release(tmp_path / "albert", model, albert_spm)
    slow, fast, _ = _both(src, tmp_path, monkeypatch, capsys)
    assert slow == {"kernel": 0, "rearranged": 0}
    # every tensor takes the byte path: kernels transposed in memory, the rest copied by the kernel (each
    # one's CRC32C checked either way: see the mismatch test below)
    assert fast["kernel"] + fast["rearranged"] == _n_tensors(tmp_path / "byte-path")
    assert fast["rearranged"] == 9 and fast["kernel"] > 0  # 7 kernels [in, out] + 2 embedding projections


def test_albert_tf_crc_mismatch_is_caught_on_the_byte_path(tmp_path, monkeypatch, capsys, albert_spm):
    from tests.helpers.albert_release import hf_albert, write_release

    src = write_release(tmp_path / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 64), albert_spm)
    shard = next(src.rglob("*.data-00000-of-00001"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    monkeypatch.setenv("ENC_FASTCOPY", "1")
    rc = run(["convert", str(src), "-o", str(tmp_path / "out"), "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 2 and "CRC32C mismatch" in " ".join(err.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [("bert", 0.0, "zip"), ("bert", 3.0, "dir"), ("gpt2", 1.0, "dir")])
def test_megatron_bytes_identical(case, tmp_path, monkeypatch, capsys):
    from tests.helpers.megatron_writer import (
        Spec,
        hf_state,
        pack_zip,
        tiny_bert,
        tiny_gpt2,
        write_dir,
        write_gpt2_vocab,
        write_wordpiece_vocab,
    )

    kind, version, container = case
    H = 32
    spec = Spec(kind, H, 4, 4, 2 * H if kind == "bert" else 3 * H, 64, 128, version=version, tp=1, pp=1,
                style="2020", args=True)
    model = tiny_bert() if kind == "bert" else tiny_gpt2()
    src = write_dir(tmp_path / "ckpt", spec, hf_state(model))
    if container == "zip":
        src = pack_zip(src, tmp_path / "megatron.zip")
    if kind == "bert":
        vocab = ["--vocab", str(write_wordpiece_vocab(tmp_path / "vocab.txt", 100))]
    else:
        v, m = write_gpt2_vocab(tmp_path / "vocab.json", tmp_path / "merges.txt", 120)
        vocab = ["--vocab", str(v), "--merges", str(m)]
    slow, fast, _ = _both(src, tmp_path, monkeypatch, capsys, *vocab)
    assert slow == {"kernel": 0, "rearranged": 0}
    # every tensor takes the byte path (the zip CRC-32s checked alongside): q/k/v rows rearranged per the
    # checkpoint version, everything else copied by the kernel
    assert fast["kernel"] + fast["rearranged"] == _n_tensors(tmp_path / "byte-path")
    # BERT: 4 layers x q, k, v x (weight, bias), except version 0 (stored in HF order: q, k, v are row ranges
    # the kernel copies); GPT-2: 4 layers x (4 Conv1D kernels transposed + the fused qkv bias reordered; the
    # fused qkv weight's reorder and transpose are one rearrangement)
    assert fast["rearranged"] == (4 * 5 if kind == "gpt2" else 0 if version == 0 else 4 * 6)


def test_megatron_zip_crc_mismatch_is_caught_on_the_byte_path(tmp_path, monkeypatch, capsys):
    from tests.helpers.megatron_writer import (
        Spec,
        hf_state,
        pack_zip,
        tiny_bert,
        write_dir,
        write_wordpiece_vocab,
    )

    spec = Spec("bert", 32, 4, 4, 64, 64, 128, version=3.0, args=True)
    src = pack_zip(write_dir(tmp_path / "ckpt", spec, hf_state(tiny_bert())), tmp_path / "m.zip")
    # flip one byte inside the first tensor storage of the inner checkpoint (stored, so in place)
    with zipfile.ZipFile(src) as outer:
        info = next(i for i in outer.infolist() if i.filename.endswith("model_optim_rng.pt"))
    data = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    inner = zipfile.ZipFile(src).open(info).read()
    with zipfile.ZipFile(__import__("io").BytesIO(inner)) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        lh = inner[big.header_offset:big.header_offset + 30]
        off = big.header_offset + 30 + int.from_bytes(lh[26:28], "little") + int.from_bytes(lh[28:30], "little")
    data[start + off + big.file_size // 2] ^= 0x40
    src.write_bytes(bytes(data))
    vocab = ["--vocab", str(write_wordpiece_vocab(tmp_path / "vocab.txt", 100))]
    monkeypatch.setenv("ENC_FASTCOPY", "1")
    rc = run(["convert", str(src), "-o", str(tmp_path / "out"), "--no-verify", *vocab])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "CRC" in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- primitives


def test_raw_permute_rope_equals_torch_permute_on_bf16_bits():
    w = torch.randn(48, 10).to(torch.bfloat16)
    want = permute_rope(4).fn(w).view(torch.int16).numpy().view(np.uint16)
    got = fastcopy.permute_rope(4).fn(w.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("path", ["copy_file_range", "sendfile", "buffered"])
def test_kernel_copy_and_its_fallbacks_give_the_same_bytes(path, tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * 2**20 + 123)
    src.write_bytes(payload)

    def refuse(*a, **k):
        raise OSError(22, "refused")

    if path != "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    if path == "buffered":
        monkeypatch.setattr(os, "sendfile", refuse, raising=False)
    raw = raw_source(src, 1000, 2 * 2**20, (2**20,), 2, label="t")
    sliced = raw.then(fastcopy.row_slice(10, 2**20 - 7))
    with open(tmp_path / "out.bin", "wb") as f:
        f.write(b"head")
        w = RawWriter([raw, None, sliced], [(2**20,), (1,), (2**20 - 17,)])
        assert w.write(f, 0) and not w.write(f, 1) and w.write(f, 2)
        f.write(b"tail")
        w.close()
    want = b"head" + payload[1000:1000 + 2 * 2**20] + payload[1020:1000 + 2 * (2**20 - 7)] + b"tail"
    assert (tmp_path / "out.bin").read_bytes() == want


def test_truncated_source_is_a_corrupt_checkpoint(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    raw = raw_source(src, 50, 80, (40,), 2, label="t")
    with open(tmp_path / "out.bin", "wb") as f, pytest.raises(CorruptCheckpoint, match="truncated"):
        RawWriter([raw], [(40,)]).write(f, 0)
    transposed = raw_source(src, 50, 80, (8, 5), 2, label="t").then(fastcopy.transpose2d())
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        transposed.materialize()


def test_impossible_numbers_give_no_recipe():
    assert raw_source("x", -1, 8, (4,), 2) is None
    assert raw_source("x", 0, 9, (4,), 2) is None
    assert raw_source("x", 0, 12, (4,), 3) is None


# ----------------------------------------------------------------------------- torch only when needed

_PLAN_WITHOUT_TORCH = r"""
import json, sys
from pathlib import Path
from enc import lazytorch
lazytorch.install()
from enc.convert import build_plan, open_converter
from enc.converters.base import ConvertOptions
from enc.io.safetensors_out import _header
with open_converter(Path(sys.argv[1]), None, ConvertOptions()) as conv:
    plan = build_plan(conv, model_keys=False)
    header, size = _header(plan.tensors, sorted(plan.tensors), {"format": "pt"})
    recipes = sum(t.raw is not None for t in plan.tensors.values())
    cfg = conv.hf_config()
print(json.dumps({"torch": lazytorch.loaded(), "tensors": len(plan.tensors), "recipes": recipes,
                  "bytes": size, "arch": cfg["architectures"][0]}))
"""


@pytest.mark.parametrize("fmt", ["pth"])  # a safetensors source is read by io/safetensors_in (torch dtypes)
def test_detection_and_plan_do_not_import_torch(fmt, tmp_path):
    import json
    import subprocess
    import sys

    from tests.helpers.mistral_writer import tiny_hf, write_release

    src = write_release(tmp_path / "release", tiny_hf(vocab=32000), fmt=fmt, dtype=torch.bfloat16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _PLAN_WITHOUT_TORCH, str(src)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "tensors": 21, "recipes": 21, "bytes": got["bytes"], "arch": "MistralForCausalLM"}
    assert got["bytes"] == (2 * 32000 * 64 + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96)) * 2


def test_model_key_check_still_stops_a_bad_plan(tmp_path, monkeypatch, capsys):
    """The check against the model's keys runs while the bytes move; a failure still publishes nothing."""
    from enc.converters.mistral import MistralConverter
    from tests.helpers.mistral_writer import tiny_hf, write_release

    src = write_release(tmp_path / "release", tiny_hf(vocab=32000), fmt="safetensors")
    real = MistralConverter.expected_keys
    monkeypatch.setattr(MistralConverter, "expected_keys", lambda self: real(self) | {"model.extra.weight"})
    rc = run(["convert", str(src), "-o", str(tmp_path / "out"), "--no-verify"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "lack 1 tensor(s) the model needs: model.extra.weight" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".enc-tmp-" in p.name]


@pytest.mark.parametrize("kind", ["crc32", "crc32c"])
def test_checksums_over_several_mapped_windows(kind, tmp_path, monkeypatch):
    import zlib

    from enc.io.tf_checkpoint import crc32c

    monkeypatch.setattr(fastcopy, "MAP_WINDOW", 3 * 65536)  # several windows, none aligned with the range
    data = os.urandom(2**20 + 777)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    off, n = 4099, 2**20 - 5000
    want = zlib.crc32(data[off:off + n]) if kind == "crc32" else crc32c(data[off:off + n])
    fastcopy.verify(raw_source(src, off, n, (n,), 1, (kind, want), label="t"))
    with pytest.raises(CorruptCheckpoint, match="mismatch"):
        fastcopy.verify(raw_source(src, off, n, (n,), 1, (kind, want ^ 1), label="t"))


def test_permute_rope_view_is_fn_in_c_order_and_is_written_without_a_full_copy(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 2**16, size=(48, 10), dtype=np.uint16)
    op = fastcopy.permute_rope(4)
    view = op.view(src)
    assert view.ndim == 4 and np.shares_memory(view, src)  # no copy: rows reordered by strides
    assert np.array_equal(np.ascontiguousarray(view).reshape(48, 10), op.fn(src))
    (tmp_path / "src.bin").write_bytes(b"x" * 7 + src.tobytes())
    raw = raw_source(tmp_path / "src.bin", 7, src.nbytes, (48, 10), 2, None, "wq").then(op)
    assert raw.written_shape_ok(raw.mapped(last_view=True), (48, 10))
    assert not raw.written_shape_ok(raw.mapped(last_view=True), (10, 48))
    with open(tmp_path / "out.bin", "wb") as f:
        w = RawWriter([raw], [(48, 10)])
        assert w.write(f, 0)
        w.close()
    assert (tmp_path / "out.bin").read_bytes() == op.fn(src).tobytes()
