"""Megatron without torch: the torch-free unpickler (enc.io.torch_meta) gives the torch path's tree, and
``enc convert --no-verify`` of a Megatron checkpoint never imports torch, with the same bytes out."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from enc.cli.main import run
from enc.errors import EncError, UnsafeInput
from enc.io.dtypes import DType
from enc.io.megatron_pickle import ByteRange, iter_tensors, load_lazy
from tests.converters.test_megatron_pickle import _tree
from tests.helpers.megatron_writer import (
    Spec,
    hf_state,
    pack_zip,
    tiny_bert,
    write_dir,
    write_wordpiece_vocab,
)
from tests.io.test_fuzz_readers import FUZZ, mutate, mutation

ROOT = Path(__file__).resolve().parents[2]


def _same_trees(fast, slow) -> None:
    """Equal trees; every tensor the same storage, shape, stride and offset; dtypes by name."""
    a, b = dict(iter_tensors(fast)), dict(iter_tensors(slow))
    assert list(a) == list(b)
    for k, x in a.items():
        y = b[k]
        assert isinstance(x.dtype, DType) and x.dtype == y.dtype, k
        assert (x.storage, x.shape, x.stride, x.offset) == (y.storage, y.shape, y.stride, y.offset), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_torch_free_tree_equals_the_torch_paths(tmp_path, legacy):
    path = tmp_path / "x.pt"
    torch.save(_tree(), path, _use_new_zipfile_serialization=not legacy)
    fast = load_lazy(ByteRange.whole_file(path), torch_free=True)
    slow = load_lazy(ByteRange.whole_file(path))
    _same_trees(fast, slow)  # views, a transpose, a Parameter, bf16, empty, scalar, a shared storage
    assert fast["iteration"] == 7 and fast["list"][1][1] == 5
    want = torch.load(path, weights_only=True)
    assert torch.equal(fast["model"]["view"].read(), want["model"]["view"])
    assert torch.equal(fast["model"]["t"].read(), want["model"]["t"])


def test_args_namespace_and_rng_state_without_torch(tmp_path):
    src = write_dir(tmp_path / "c", Spec("bert", 32, 4, 2, 64, 16, 64, version=3.0, args=True),
                    hf_state(tiny_bert(layers=2, max_pos=16, vocab=64)))
    p = ByteRange.whole_file(next(src.rglob("model_optim_rng.pt")))
    fast, slow = load_lazy(p, torch_free=True), load_lazy(p)
    _same_trees(fast, slow)
    assert vars(fast["args"]).keys() == vars(slow["args"]).keys()
    assert fast["args"].params_dtype == torch.float32 and fast["args"].model_type.value == 1
    assert fast["checkpoint_version"] == 3.0 and fast["np_rng_state"][0] == "MT19937"


def test_an_unknown_class_still_is_refused(tmp_path):
    torch.save({"model": {}, "cfg": zipfile.ZipInfo("x")}, tmp_path / "c.pt")
    with pytest.raises(UnsafeInput, match="zipfile.ZipInfo"):  # declined, then refused by the torch path
        load_lazy(ByteRange.whole_file(tmp_path / "c.pt"), torch_free=True)


@pytest.fixture(scope="module")
def pt_bytes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    tree = {"model": {"w": base, "v": base[1:3, 2:9], "h": torch.arange(8).half()}, "iteration": 3}
    out = {}
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(tree, buf, _use_new_zipfile_serialization=not legacy)
        out[legacy] = buf.getvalue()
    return out


@FUZZ
@given(legacy=st.booleans(), muts=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_read_torch_free_as_the_torch_path_reads_them(tmp_path_factory, pt_bytes, legacy, muts):
    p = tmp_path_factory.mktemp("tf") / "model_optim_rng.pt"
    p.write_bytes(mutate(pt_bytes[legacy], muts))
    try:
        fast = load_lazy(ByteRange.whole_file(p), torch_free=True)
        got = {k: t.read() for k, t in iter_tensors(fast)}
    except EncError:
        return
    for v in got.values():
        assert v.numel() * v.element_size() <= p.stat().st_size  # never reads outside the file
    try:
        slow = load_lazy(ByteRange.whole_file(p))
    except EncError:
        return
    a, b = dict(iter_tensors(fast)), dict(iter_tensors(slow))
    assert list(a) == list(b)
    for k, x in a.items():
        assert (x.storage, x.shape, x.stride, x.offset) == (b[k].storage, b[k].shape, b[k].stride, b[k].offset)


# ----------------------------------------------------------------------------- the CLI, in a fresh process

_CONVERT = r"""
import sys
from enc import lazytorch
from enc.cli.main import run
rc = run(sys.argv[1:])
from enc.io.fastcopy import RawWriter
import os
print("RESULT", rc, lazytorch.loaded(), "torch._C" in sys.modules, RawWriter.stats["kernel"], RawWriter.stats["rearranged"],
      os.environ.get("OPENBLAS_NUM_THREADS"))
"""


def _convert_twice(argv: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, int]:
    """``enc ARGV -o fast`` in a fresh process (torch must stay unloaded), then ``ENC_FASTCOPY=0`` (torch
    unpickles, the model is built for its key list) in this one: the same files, byte for byte.
    Returns (kernel-copied, rearranged) tensor counts of the first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("ENC_FASTCOPY", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-c", _CONVERT, *argv, "-o", str(tmp_path / "fast")], capture_output=True,
                       text=True, env=env, timeout=120)
    result = r.stdout.strip().splitlines()[-1].split()
    assert result[:4] == ["RESULT", "0", "False", "False"], r.stdout + r.stderr
    # no parity, so no matrix products: numpy was imported with one OpenBLAS thread (a second one spins
    # on the core the checksums and copies need)
    assert result[6] == "1"
    monkeypatch.setenv("ENC_FASTCOPY", "0")
    assert run([*argv, "-o", str(tmp_path / "slow")]) == 0, capsys.readouterr().err
    fast = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert fast == sorted(p.name for p in (tmp_path / "slow").iterdir())
    for name in fast:
        if name != "enc_provenance.json":  # holds the time it was made
            assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    prov = [json.loads((tmp_path / d / "enc_provenance.json").read_text())["outputs"] for d in ("fast", "slow")]
    assert prov[0] == prov[1]  # the same sha256 of every output
    return int(result[4]), int(result[5])


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
@pytest.mark.parametrize("version", [0.0, 2.0, 3.0])
def test_convert_no_verify_never_imports_torch(tmp_path, monkeypatch, capsys, legacy, version):
    # version 0 as the NGC release has it: no args (heads given on the command line); 2+ with args
    spec = Spec("bert", 32, 4, 4, 64, 64, 128, version=version, args=version > 0, legacy_format=legacy)
    src = pack_zip(write_dir(tmp_path / "ckpt", spec, hf_state(tiny_bert())), tmp_path / "megatron.zip")
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", 100)
    kernel, rearranged = _convert_twice(["convert", str(src), "--vocab", str(vocab), "--no-verify", "--num-heads", "4"],
                                        tmp_path, monkeypatch, capsys)
    # every tensor on the byte path: version 0 keeps HF's q/k/v row order (row ranges: kernel copies), later
    # versions interleave per head (4 layers x q, k, v x weight, bias rearranged)
    assert rearranged == (0 if version == 0 else 4 * 6) and kernel + rearranged == 78


def test_gpt2_training_dir_no_verify_never_imports_torch(tmp_path, monkeypatch, capsys):
    from tests.helpers.megatron_writer import tiny_gpt2, write_gpt2_vocab

    src = write_dir(tmp_path / "ckpt", Spec("gpt2", 32, 4, 4, 96, 64, 128, version=1.0), hf_state(tiny_gpt2()))
    v, m = write_gpt2_vocab(tmp_path / "vocab.json", tmp_path / "merges.txt", 120)
    kernel, rearranged = _convert_twice(["convert", str(src), "--vocab", str(v), "--merges", str(m), "--no-verify"],
                                        tmp_path, monkeypatch, capsys)
    # 4 layers x (4 Conv1D kernels transposed, fused qkv bias reordered from version 1.0's [heads, hd, 3])
    assert rearranged == 4 * 5 and kernel + rearranged == 52


def test_a_pickle_cannot_alter_the_readers_records(tmp_path):
    """BUILD on a dtype record (setting its itemsize) changes that one object, never the next load's."""
    import pickle

    from enc.io.torch_meta import RefStorages

    class Evil:
        def __reduce__(self):
            return (getattr, (torch.float16, "name"))  # any REDUCE through a non-allow-listed global

    hacked = b"\x80\x02ctorch\nfloat16\nq\x00N}q\x01X\x08\x00\x00\x00itemsizeq\x02K\x08s\x86q\x03b."  # BUILD slots
    got = RefStorages.unpickle(io.BytesIO(hacked), RefStorages(), "x")
    assert got.itemsize == 8
    assert RefStorages.unpickle(io.BytesIO(b"\x80\x02ctorch\nfloat16\n."), RefStorages(), "x").itemsize == 2
    from enc.io.torch_meta import Decline

    with pytest.raises(Decline, match="getattr"):
        RefStorages.unpickle(io.BytesIO(pickle.dumps(Evil(), protocol=2)), RefStorages(), "x")


@pytest.mark.parametrize("verify", [False, True], ids=["no-verify", "verify"])
def test_damaged_legacy_member_in_an_ngc_zip_is_caught_by_its_zip_crc(tmp_path, capsys, verify):
    """The legacy torch format has no checksum of its own: one flipped bit in a stored weight used to be
    converted silently. The zip directory's CRC-32 of the member now catches it: exit 2, nothing published."""
    from enc.io.megatron_pickle import zip_member_offset

    spec = Spec("bert", 32, 4, 4, 64, 64, 128, version=0.0, args=False, legacy_format=True)
    src = pack_zip(write_dir(tmp_path / "ckpt", spec, hf_state(tiny_bert())), tmp_path / "megatron.zip")
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", 100)
    argv = ["convert", str(src), "--vocab", str(vocab), "--num-heads", "4", *([] if verify else ["--no-verify"])]
    assert run([*argv, "-o", str(tmp_path / "clean")]) == 0  # the intact zip converts
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("model_optim_rng.pt"))
        assert info.compress_type == zipfile.ZIP_STORED
    with open(src, "r+b") as f:
        start = zip_member_offset(f, info)
        f.seek(start)
        assert f.read(1) == b"\x80"  # legacy pickle format
        at = start + info.file_size - 5  # inside the last storage's bytes (the legacy format ends with them)
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    capsys.readouterr()
    assert run([*argv, "-o", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model_optim_rng.pt" in err and "CRC mismatch for the zip member" in err
    assert not (tmp_path / "out").exists()
