"""`enc convert --no-verify` of an ALBERT TF release: no torch at all, and the torch path's bytes.

The CLI runs in a child process (this test process has torch loaded); the child reports at exit
whether torch's C extension was ever imported. Its output is compared byte for byte with the same
conversion through torch (``ENC_FASTCOPY=0``), and its recorded sha256s with the files'.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

SRC = Path(__file__).resolve().parents[2] / "src"

_RUN_CLI = r"""
from enc.cli.main import main
sys.argv = ["enc", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
"""

_CLI_WITHOUT_TORCH = "import json, sys\n" + _RUN_CLI + r"""
print("\nENC-CHILD " + json.dumps({"code": code, "torch": "torch._C" in sys.modules,
                                   "torch_modules": sorted(m for m in sys.modules if m.startswith("torch."))[:5]}))
"""


def _child(args: list[str], fast: bool | None, script: str = _CLI_WITHOUT_TORCH) -> dict:
    """Run ``enc ARGS`` in a fresh process (``fast``: ENC_FASTCOPY on/off, None: as inherited) and return
    what ``script`` reports on its ENC-CHILD line; the command must exit 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    if fast is not None:
        env["ENC_FASTCOPY"] = "1" if fast else "0"
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    line = [x for x in r.stdout.splitlines() if x.startswith("ENC-CHILD ")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    got = json.loads(line[-1][len("ENC-CHILD "):])
    assert got["code"] == 0, r.stderr[-2000:]
    return got


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "enc_provenance.json"}


@pytest.fixture(scope="module")
def albert_spm(tmp_path_factory):
    from tests.helpers.albert_release import train_spm

    return train_spm(tmp_path_factory.mktemp("spm"))


# E == H: the identity projection and its zero bias are generated (enc.io.generated), without torch too
@pytest.mark.parametrize("dims", [(120, 16, 32, 2, 1, 1, 4, 64), (90, 8, 24, 4, 2, 2, 2, 40), (60, 16, 16, 1, 1, 1, 2, 24)])
def test_albert_tf_no_verify_never_imports_torch_and_matches_the_torch_path(dims, tmp_path, albert_spm):
    from tests.helpers.albert_release import hf_albert, write_release

    src = write_release(tmp_path / "albert", hf_albert(*dims), albert_spm)
    fast = _child(["convert", str(src), "-o", str(tmp_path / "fast"), "--no-verify", "--json"], True)
    assert fast["torch"] is False and fast["torch_modules"] == []
    slow = _child(["convert", str(src), "-o", str(tmp_path / "slow"), "--no-verify", "--json"], False)
    assert slow["torch"] is True  # the torch path really is another path
    a, b = _outputs(tmp_path / "fast"), _outputs(tmp_path / "slow")
    assert sorted(a) == sorted(b) and "model.safetensors" in a
    for name in a:
        assert a[name] == b[name], name
    prov = json.loads((tmp_path / "fast" / "enc_provenance.json").read_text())
    hashes = {o["file"]: o["sha256"] for o in prov["outputs"]}
    assert hashes["model.safetensors"] == hashlib.sha256(a["model.safetensors"]).hexdigest()


# ----------------------------------------------------------------------------- the blocked transposes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("threads", [0, 2])
def test_blocked_transpose_writes_the_transposed_bytes(dtype, threads, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from enc.io import fastcopy

    monkeypatch.setattr(fastcopy, "CHUNK_BYTES", 1000)  # several blocks, a partial last one, odd strips
    rng = np.random.default_rng(1)
    pool = ThreadPoolExecutor(threads) if threads else None
    scratch: list[np.ndarray] = []
    blocks = []
    want = b""
    with open(tmp_path / "out.bin", "wb") as f:
        for shape in [(37, 53), (5, 300), (300, 5), (1, 1), (64, 16)]:  # scratch reused, and regrown
            src = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
            for view in (src.T, src[:, 1:-1], src.T[::-1, ::2]):  # a transpose, a column slice, reversed strides
                if view.size and not view.flags.c_contiguous:
                    fastcopy._write_array(f.fileno(), view, pool, lambda: blocks.append(f.tell()), scratch)
                    want += np.ascontiguousarray(view).tobytes()
    if pool is not None:
        pool.shutdown()
    assert (tmp_path / "out.bin").read_bytes() == want
    assert len(blocks) > 5 and blocks == sorted(blocks) and blocks[-1] == len(want)


def test_mapped_source_checks_size_and_checksum(tmp_path):
    from enc.errors import CorruptCheckpoint
    from enc.io import fastcopy
    from enc.io.tf_checkpoint import crc32c

    data = np.arange(12, dtype=np.uint32).tobytes()
    (tmp_path / "src.bin").write_bytes(b"z" * 3 + data)
    r = fastcopy.raw_source(tmp_path / "src.bin", 3, 48, (3, 4), 4, ("crc32c", crc32c(data)), "t")
    got = r.then(fastcopy.transpose2d()).mapped()
    assert np.array_equal(got, np.arange(12, dtype=np.uint32).reshape(3, 4).T)
    bad = fastcopy.raw_source(tmp_path / "src.bin", 3, 48, (3, 4), 4, ("crc32c", crc32c(data) ^ 1), "t")
    with pytest.raises(CorruptCheckpoint, match="CRC32C mismatch for t"):
        bad.mapped()
    assert bad.mapped(check=False).shape == (3, 4)  # the caller checks it (RawWriter: on its helper thread)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        fastcopy.raw_source(tmp_path / "src.bin", 7, 48, (3, 4), 4, None, "t").mapped()


def _big_path(monkeypatch) -> None:
    """Every tensor is 'big' (no prefetch: mapped, checked on the helper thread) and made in many blocks."""
    from enc.io import fastcopy

    monkeypatch.setattr(fastcopy, "PREFETCH_MAX", 0)
    monkeypatch.setattr(fastcopy, "CHUNK_BYTES", 4096)


@pytest.mark.parametrize("mapping", ["1", "0"])
def test_albert_tf_big_tensor_path_matches_the_torch_path(mapping, tmp_path, monkeypatch, capsys, albert_spm):
    from enc.cli.main import run
    from tests.helpers.albert_release import hf_albert, write_release

    src = write_release(tmp_path / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 64), albert_spm)
    outs = {}
    for fast in ("0", "1"):
        monkeypatch.setenv("ENC_FASTCOPY", fast)
        monkeypatch.setenv("ENC_FASTCOPY_MMAP", mapping)
        if fast == "1":
            _big_path(monkeypatch)
        rc = run(["convert", str(src), "-o", str(tmp_path / f"out{fast}"), "--no-verify"])
        assert rc == 0, capsys.readouterr().err
        outs[fast] = _outputs(tmp_path / f"out{fast}")
    assert outs["0"] == outs["1"]


def test_albert_tf_crc_mismatch_in_a_big_transposed_tensor(tmp_path, monkeypatch, capsys, albert_spm):
    from enc.cli.main import run
    from enc.io.tf_checkpoint import TFCheckpoint
    from tests.helpers.albert_release import hf_albert, write_release

    src = write_release(tmp_path / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 64), albert_spm)
    ckpt = TFCheckpoint(src / "model.ckpt-best")
    e = ckpt._entries["bert/encoder/transformer/group_0/inner_group_0/ffn_1/intermediate/dense/kernel"]
    shard = next(src.glob("*.data-00000-of-00001"))
    data = bytearray(shard.read_bytes())
    data[e.offset + e.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    monkeypatch.setenv("ENC_FASTCOPY", "1")
    _big_path(monkeypatch)
    rc = run(["convert", str(src), "-o", str(tmp_path / "out"), "--no-verify"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "CRC32C mismatch" in err and "ffn_1/intermediate/dense/kernel" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".enc-tmp-" in p.name]


_WHO_LOADS_TORCH = r"""
import json, sys, threading
from enc import lazytorch
lazytorch.install()
who = []
real = lazytorch._load
def spy(module):
    who.append(threading.current_thread().name.split("_")[0])
    real(module)
lazytorch._load = spy
""" + _RUN_CLI + r"""
print("\nENC-CHILD " + json.dumps({"code": code, "who": who}))
"""


def test_with_parity_torch_loads_on_the_helper_thread_while_bytes_move(tmp_path, albert_spm):
    from tests.helpers.albert_release import hf_albert, write_release

    src = write_release(tmp_path / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 64), albert_spm)
    got = _child(["convert", str(src), "-o", str(tmp_path / "out"), "--json"], None, _WHO_LOADS_TORCH)
    assert got == {"code": 0, "who": ["enc-overlap"]}
    assert json.loads((tmp_path / "out" / "enc_provenance.json").read_text())["parity"]["verdict"] == "pass"


@pytest.mark.parametrize("over", [{}, {"use_bottleneck": True, "intra_bottleneck_size": 16,
                                       "key_query_shared_bottleneck": True, "num_feedforward_networks": 2},
                                  {"use_bottleneck": False, "trigram_input": False, "embedding_size": 32}])  # E == H
def test_mobilebert_tf_no_verify_never_imports_torch_and_matches_the_torch_path(over, tmp_path):
    from tests.helpers.mobilebert_release import hf_mobilebert, write_release

    src = write_release(tmp_path / "mobilebert", hf_mobilebert(**over))
    fast = _child(["convert", str(src), "-o", str(tmp_path / "fast"), "--no-verify", "--json"], True)
    assert fast["torch"] is False and fast["torch_modules"] == []
    _child(["convert", str(src), "-o", str(tmp_path / "slow"), "--no-verify", "--json"], False)
    a, b = _outputs(tmp_path / "fast"), _outputs(tmp_path / "slow")
    assert sorted(a) == sorted(b) and "model.safetensors" in a
    for name in a:
        assert a[name] == b[name], name
