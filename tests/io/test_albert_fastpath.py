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

import pytest

pytest.importorskip("transformers")

SRC = Path(__file__).resolve().parents[2] / "src"

_CLI_WITHOUT_TORCH = r"""
import json, sys
from enc.cli.main import main
sys.argv = ["enc", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
print("\nENC-CHILD " + json.dumps({"code": code, "torch": "torch._C" in sys.modules,
                                   "torch_modules": sorted(m for m in sys.modules if m.startswith("torch."))[:5]}))
"""


def _child(args: list[str], fast: bool) -> dict:
    env = {**os.environ, "ENC_FASTCOPY": "1" if fast else "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_TORCH, *args], capture_output=True, text=True, env=env,
                       timeout=300)
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


# E == H (the identity projection is made by torch) is the one ALBERT case that needs torch
@pytest.mark.parametrize("dims", [(120, 16, 32, 2, 1, 1, 4, 64), (90, 8, 24, 4, 2, 2, 2, 40)])
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
