"""Megatron bad input: each case exits 2 with one line on stderr and leaves nothing behind."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from enc.cli.main import run
from tests.helpers.megatron_writer import (
    Spec,
    hf_state,
    pack_zip,
    tiny_bert,
    write_dir,
    write_wordpiece_vocab,
)

H, N, L, V, P = 32, 4, 2, 128, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def state():
    return hf_state(tiny_bert(seed=3, layers=L, max_pos=P))


def _spec(**kw) -> Spec:
    return Spec("bert", H, N, L, 2 * H, P, V, **kw)


def _temp_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("enc-")}


def fails_cleanly(capsys, src: Path, out: Path, *extra: str, expect: str = "") -> str:
    """enc convert exits 2, prints exactly one line, publishes nothing and leaves no temp files."""
    before = _temp_dirs()
    capsys.readouterr()
    rc = run(["convert", str(src), "-o", str(out), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("enc: error: "), err
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert _temp_dirs() <= before
    return lines[0]


def test_zip_without_model_optim_rng(tmp_path, capsys):
    z = tmp_path / "megatron_bert_345m_v0_1_uncased.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("latest_checkpointed_iteration.txt", "release")
        zf.writestr("release/mp_rank_00/README.txt", "weights missing")
    fails_cleanly(capsys, z, tmp_path / "out", expect="no model_optim_rng.pt in mp_rank_00")


def test_zip_with_nothing_megatron(tmp_path, capsys):
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/b.txt", "hello")
    fails_cleanly(capsys, z, tmp_path / "out", expect="not a checkpoint enc recognises")


def test_zip_member_escaping_with_dotdot(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(), state)
    z = pack_zip(src, tmp_path / "evil.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("../escaped.txt", "gotcha")
    fails_cleanly(capsys, z, tmp_path / "out", expect="escapes the extraction directory")
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pt(tmp_path, capsys, state, legacy):
    src = write_dir(tmp_path / "ckpt", _spec(legacy_format=legacy), state)
    pt = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    fails_cleanly(capsys, src, tmp_path / "out", expect="truncated")


def test_corrupted_tensor_bytes_caught_by_crc(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(), state)
    pt = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(pt.read_bytes())
    with zipfile.ZipFile(pt) as zf:  # flip bytes inside the largest storage record
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    h = info.header_offset  # the local header's name and extra lengths (its extra differs from the central one)
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little") + 16
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
    pt.write_bytes(bytes(data))
    fails_cleanly(capsys, src, tmp_path / "out", expect="CRC mismatch")


def test_garbage_pt(tmp_path, capsys):
    d = tmp_path / "ckpt" / "release" / "mp_rank_00"
    d.mkdir(parents=True)
    (d / "model_optim_rng.pt").write_bytes(b"\x80\x02" + os.urandom(300))
    fails_cleanly(capsys, tmp_path / "ckpt", tmp_path / "out", expect="corrupted pickle")


class _System:
    """A pickle payload: unpickling it would run os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "protocol-4"])
def test_pickle_code_payload_is_refused_without_running(tmp_path, capsys, state, payload):
    marker = tmp_path / "PWNED"

    def mutate(name: str, st: dict) -> None:
        st["model"]["language_model"]["embedding"]["evil"] = (_System if payload == "os.system" else _Exec)(marker)

    src = write_dir(tmp_path / "ckpt", _spec(), state, mutate=mutate if payload != "protocol-4" else None)
    if payload == "protocol-4":  # STACK_GLOBAL opcodes instead of GLOBAL, written into torch's data.pkl
        pt = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
        with zipfile.ZipFile(pt) as zf:
            records = {i.filename: zf.read(i) for i in zf.infolist()}
        pkl = next(n for n in records if n.endswith("/data.pkl"))
        records[pkl] = pickle.dumps({"model": _Exec(marker)}, protocol=4)
        with zipfile.ZipFile(pt, "w", zipfile.ZIP_STORED) as zf:
            for n, b in records.items():
                zf.writestr(n, b)
    line = fails_cleanly(capsys, src, tmp_path / "out")
    assert not marker.exists()  # the payload never ran
    if payload != "protocol-4":
        assert "not on enc's allow-list" in line and ("system" in line or "exec" in line)


def test_missing_tensor_parallel_rank(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(tp=4, version=3.0), state)
    shutil.rmtree(src / "release" / "mp_rank_02")
    fails_cleanly(capsys, src, tmp_path / "out", expect="mp_rank_02 is missing")


def test_missing_last_rank_caught_by_args(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(tp=2, version=3.0), state)
    shutil.rmtree(src / "release" / "mp_rank_01")
    fails_cleanly(capsys, src, tmp_path / "out", expect="tensor-parallel size 2, but 1 rank(s)")


def test_missing_pipeline_stage(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(tp=2, pp=2, version=3.0), state)
    shutil.rmtree(src / "release" / "mp_rank_01_001")
    fails_cleanly(capsys, src, tmp_path / "out", expect="mp_rank_01_001 is missing")


def test_ranks_disagree_on_replicated_tensor(tmp_path, capsys, state):
    def mutate(name: str, st: dict) -> None:
        if name == "mp_rank_01":
            ln = st["model"]["language_model"]["transformer"]
            ln["layers.1.post_attention_layernorm.weight"] = ln["layers.1.post_attention_layernorm.weight"] + 0.5

    src = write_dir(tmp_path / "ckpt", _spec(tp=2, version=3.0), state, mutate=mutate)
    fails_cleanly(capsys, src, tmp_path / "out",
                  expect="ranks disagree on replicated tensor language_model.transformer.layers.1.post_attention_layernorm"
                         ".weight: rank 1 differs from rank 0")


def test_vocab_larger_than_embedding(tmp_path, capsys, state):
    src = pack_zip(write_dir(tmp_path / "ckpt", _spec(), state), tmp_path / "m.zip")
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", V + 72)
    fails_cleanly(capsys, src, tmp_path / "out", "--vocab", str(vocab),
                  expect=f"the vocabulary has {V + 72} tokens but the checkpoint's embedding has only {V} rows")


def test_wrong_vocab_kind(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(), state)
    (tmp_path / "gpt2-vocab.json").write_text('{"a": 0}')
    fails_cleanly(capsys, src, tmp_path / "out", "--vocab", str(tmp_path / "gpt2-vocab.json"),
                  expect="needs a WordPiece vocab.txt")


def test_flag_that_does_not_apply(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(), state)
    fails_cleanly(capsys, src, tmp_path / "out", "--rope-theta", "10000", expect="--rope-theta does not apply to megatron")


def test_torch_dist_checkpoint_is_named(tmp_path, capsys):
    it = tmp_path / "ckpt" / "iter_0000100"
    it.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("100")
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (it / "__0_0.distcp").write_bytes(b"\0" * 16)
    fails_cleanly(capsys, tmp_path / "ckpt", tmp_path / "out", "--from", "megatron", expect="torch_dist")


def test_tracker_naming_a_missing_iteration(tmp_path, capsys, state):
    src = write_dir(tmp_path / "ckpt", _spec(iteration=200), state)
    (src / "latest_checkpointed_iteration.txt").write_text("300")
    fails_cleanly(capsys, src, tmp_path / "out", expect="names iter_0000300/")


def test_compressed_member_temp_dir_is_removed_on_failure(tmp_path, capsys, state):
    """A deflated member is extracted to a temp dir; a failure later still removes it."""
    def mutate(name: str, st: dict) -> None:
        if name == "mp_rank_01":
            st["model"]["binary_head"]["bias"] = st["model"]["binary_head"]["bias"] + 1.0

    src = write_dir(tmp_path / "ckpt", _spec(tp=2, version=3.0), state, mutate=mutate)
    z = pack_zip(src, tmp_path / "m.zip", zipfile.ZIP_DEFLATED)
    fails_cleanly(capsys, z, tmp_path / "out", expect="binary_head.bias")


def test_pickle_is_not_a_dict(tmp_path, capsys):
    d = tmp_path / "ckpt" / "release" / "mp_rank_00"
    d.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save([torch.zeros(2)], buf)
    (d / "model_optim_rng.pt").write_bytes(buf.getvalue())
    fails_cleanly(capsys, tmp_path / "ckpt", tmp_path / "out", expect="expected a dict")
