"""No data loss: --force replaces only enc's own outputs, atomically; failed and interrupted runs leave
nothing behind (temp dirs, extraction dirs, created parents); TF state files never redirect reads
silently; published outputs get the umask's modes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from enc.cli.main import run
from tests.helpers.albert_release import hf_albert, write_release

SHAPE = (120, 16, 32, 2, 1, 1, 4, 48)


@pytest.fixture(scope="module")
def release(tmp_path_factory, albert_spm):
    tmp = tmp_path_factory.mktemp("safety")
    return write_release(tmp / "albert_release", hf_albert(*SHAPE), albert_spm)


@pytest.fixture
def src(release, tmp_path):
    dst = tmp_path / "albert"
    shutil.copytree(release, dst)
    return dst


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp dir as seen by enc (tarball extraction), isolated per test."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _run(capsys, args):
    capsys.readouterr()
    rc = run(args)
    cap = capsys.readouterr()
    return rc, cap.err.strip()


def _flat(err: str) -> str:
    """rich wraps long warning lines at the terminal width (in the middle of paths)."""
    return err.replace("\n", "")


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- item 1: --force


def test_force_never_deletes_the_source_or_unrelated_files(src, tmp_path, capsys):
    """The issue's example: `enc convert danger/albert -o danger --force` deleted both."""
    danger = tmp_path / "danger"
    danger.mkdir()
    shutil.move(str(src), danger / "albert")
    (danger / "important.txt").write_text("keep me")
    before = _tree(danger)
    rc, err = _run(capsys, ["convert", str(danger / "albert"), "-o", str(danger), "--force"])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "inside the output" in err and str(danger) in err
    assert _tree(danger) == before


def test_force_refuses_a_directory_that_is_not_an_enc_output(src, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err = _run(capsys, ["convert", str(src), "-o", str(out), "--force"])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "not a previous enc output" in err and "enc_provenance.json" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["albert", "notes"]


def test_force_may_replace_an_empty_directory(src, tmp_path, capsys):
    out = tmp_path / "made-by-mkdir"
    out.mkdir()
    rc, err = _run(capsys, ["convert", str(src), "-o", str(out)])
    assert rc == 2 and "--force" in err
    assert run(["convert", str(src), "-o", str(out), "--force", "--no-verify"]) == 0
    assert (out / "model.safetensors").is_file()


def test_force_refuses_a_file_and_a_previous_output_holding_user_files(src, tmp_path, capsys):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    rc, err = _run(capsys, ["convert", str(src), "-o", str(f), "--force"])
    assert rc == 2 and "not a directory" in err and f.read_bytes() == b"x"
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    listed = [e["file"] for e in json.loads((out / "enc_provenance.json").read_text())["outputs"]]
    assert sorted(listed + ["enc_provenance.json"]) == sorted(os.listdir(out))
    (out / "my_notes.md").write_text("mine")
    rc, err = _run(capsys, ["convert", str(src), "-o", str(out), "--force", "--no-verify"])
    assert rc == 2 and "enc did not write" in err and "my_notes.md" in err
    assert (out / "my_notes.md").read_text() == "mine"


def test_force_replaces_a_previous_output_and_leaves_no_temp(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    (out / "config.json").write_text("{}")  # stale content the new run must replace
    assert run(["convert", str(src), "-o", str(out), "--force", "--no-verify"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "albert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["albert", "hf"]


def test_failed_force_run_keeps_the_old_output(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out)]) == 0
    before = _tree(out)
    _flip(src / "model.ckpt-best.data-00000-of-00001")  # the second run fails its CRC check mid-way
    rc, err = _run(capsys, ["convert", str(src), "-o", str(out), "--force"])
    assert rc == 2 and "CRC" in err, err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["albert", "hf"]


def test_input_file_inside_the_old_output_is_refused(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    rc, err = _run(capsys, ["convert", str(src), "-o", str(out), "--force", "--no-verify",
                            "--tokenizer", str(out / "spiece.model")])
    assert rc == 2 and "inside the output" in err and "spiece.model" in err, err
    assert (out / "spiece.model").is_file()


def test_output_dot_with_force_is_refused_before_any_work(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    import enc.convert

    def boom(*a, **k):
        raise AssertionError("the conversion must not start")

    monkeypatch.setattr(enc.convert, "open_converter", boom)
    monkeypatch.chdir(out)
    for target in (".", "..", str(tmp_path)):
        rc, err = _run(capsys, ["convert", str(src), "-o", target, "--force"])
        assert rc == 2 and "current directory" in err, err
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- item 3: modes


def test_published_output_has_umask_modes(src, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "hf"
        assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_eval_save_writes_umask_modes(tmp_path):
    """`eval --save` (save_task_model): safetensors writes 0600; the saved directory must be readable by others."""
    from enc.models.heads import load_task_model, save_task_model
    from tests.evals.helpers import save_albert, train_spm

    d = save_albert(tmp_path / "base", train_spm(tmp_path / "spm"), cls="AlbertForPreTraining", vocab_size=300)
    m = load_task_model(d, "sequence-classification", num_labels=2, new_head=True, seed=1)
    old = os.umask(0o027)
    try:
        out = save_task_model(m, tmp_path / "saved" / "cls", d)
        (tmp_path / "existing").mkdir()
        (tmp_path / "existing" / "README.md").write_text("mine")
        again = save_task_model(m, tmp_path / "existing", d)
    finally:
        os.umask(old)
    for root in (out, again):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir() if p.name != "README.md"}
        assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert (again / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "existing", "saved", "spm"]


@pytest.mark.parametrize("where", ["model", "parent"])
def test_eval_save_never_overwrites_the_model_being_evaluated(tmp_path, capsys, monkeypatch, where):
    from tests.evals.helpers import FIXTURES, save_albert, train_spm

    base = save_albert(tmp_path / "base", train_spm(tmp_path / "spm"), cls="AlbertForPreTraining", vocab_size=300)
    before = _tree(base)
    import enc.evals.finetune

    monkeypatch.setattr(enc.evals.finetune, "train", lambda *a, **k: pytest.fail("refuse before training"))
    target = base if where == "model" else tmp_path
    rc, err = _run(capsys, ["eval", "glue", "--model", str(base), "--task", "sst2", "--data", str(FIXTURES / "glue"),
                            "--finetune", "--save", str(target)])
    assert rc == 2 and "--save would overwrite the model" in err, err
    assert _tree(base) == before


# ----------------------------------------------------------------------------- item 4: leftovers


def test_failed_run_removes_the_parents_it_created(src, tmp_path, capsys):
    _flip(src / "model.ckpt-best.data-00000-of-00001")
    rc, err = _run(capsys, ["convert", str(src), "-o", str(tmp_path / "new" / "a" / "b" / "out")])
    assert rc == 2 and "CRC" in err
    assert not (tmp_path / "new").exists()


def test_stale_temp_dirs_of_dead_processes_are_swept(src, tmp_path, capsys, private_tmp):
    pid = _dead_pid()
    stale = tmp_path / f".hf.enc-tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    extraction = private_tmp / f"enc-albert-{pid}-xyz789"
    extraction.mkdir()
    (extraction / "albert_config.json").write_text("{}")
    live = tmp_path / f".other.enc-tmp-{os.getpid()}-live00"  # a running enc's: left alone
    live.mkdir()
    rc, err = _run(capsys, ["convert", str(src), "-o", str(tmp_path / "hf"), "--no-verify"])
    assert rc == 0, err
    assert not stale.exists() and not extraction.exists() and live.exists()
    assert f"removed {stale}" in _flat(err) and f"pid {pid}" in _flat(err)


def test_output_moved_aside_by_a_killed_run_is_restored(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0
    before = _tree(out)
    pid = _dead_pid()
    os.rename(out, tmp_path / f".hf.enc-old-{pid}-qwerty")  # killed between the two renames
    rc, err = _run(capsys, ["convert", str(src), "-o", str(tmp_path / "other"), "--no-verify"])
    assert rc == 0 and f"restored {out}" in _flat(err), err
    assert _tree(out) == before


@pytest.mark.parametrize("sig,code,text", [(signal.SIGTERM, 143, "enc: interrupted (SIGTERM)"),
                                           (signal.SIGINT, 130, "enc: interrupted")])
def test_signal_mid_write_cleans_up(src, tmp_path, capsys, monkeypatch, private_tmp, sig, code, text):
    """SIGTERM is handled like Ctrl-C: temp output, tarball extraction dir and created parents are removed."""
    tgz = tmp_path / "albert.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="albert")
    import enc.convert

    real = enc.convert.write_sharded
    seen = {}

    def write_then_signal(out_dir, *a, **k):
        real(out_dir, *a, **k)
        seen["tmp"] = out_dir
        seen["extracted"] = list(private_tmp.iterdir())
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(enc.convert, "write_sharded", write_then_signal)
    rc, err = _run(capsys, ["convert", str(tgz), "-o", str(tmp_path / "new" / "out")])
    assert rc == code, err
    assert err.splitlines()[-1] == text
    assert seen["tmp"].name.startswith(".out.enc-tmp-") and not seen["tmp"].exists()
    assert len(seen["extracted"]) == 1 and list(private_tmp.iterdir()) == []
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run


def test_sigterm_from_outside_in_a_real_process(src, tmp_path):
    """A real `enc convert` process stopped by SIGTERM (timeout, docker stop) leaves nothing beside the output."""
    src_dir = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src_dir), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, time, enc.convert as c\n"
            "real = c.write_sharded\n"
            "def slow(*a, **k):\n"
            "    r = real(*a, **k); print('writing', flush=True); time.sleep(60); return r\n"
            "c.write_sharded = slow\n"
            "from enc.cli.main import run\n"
            "sys.exit(run(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, "convert", str(src), "-o", str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "enc: interrupted (SIGTERM)" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["albert"]


# ----------------------------------------------------------------------------- item 2: TF state file


def _state(d, path):
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{path}"\nall_model_checkpoint_paths: "{path}"\n')


def test_copied_release_reads_its_own_files_not_the_absolute_path(src, tmp_path, capsys):
    _state(src, src / "model.ckpt-best")  # what TF writes: an absolute path
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    _flip(copy / "model.ckpt-best.data-00000-of-00001")  # corrupting the copy must be noticed
    rc, err = _run(capsys, ["convert", str(copy), "-o", str(tmp_path / "o")])
    assert rc == 2 and "CRC" in err and str(copy) in err, err
    shutil.copy(src / "model.ckpt-best.data-00000-of-00001", copy)
    assert run(["convert", str(copy), "-o", str(tmp_path / "o"), "--no-verify"]) == 0
    files = json.loads((tmp_path / "o" / "enc_provenance.json").read_text())["source"]["files"]
    assert {f["path"] for f in files} == {str((copy / n).resolve()) for n in (
        "model.ckpt-best.index", "model.ckpt-best.data-00000-of-00001", "albert_config.json", "30k-clean.model")}


def test_state_file_pointing_outside_warns_and_records_real_paths(src, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for n in ("model.ckpt-best.index", "model.ckpt-best.data-00000-of-00001"):
        shutil.move(str(src / n), elsewhere / n)
    _state(src, "../elsewhere/model.ckpt-best")
    rc, err = _run(capsys, ["convert", str(src), "-o", str(tmp_path / "o"), "--no-verify"])
    assert rc == 0, err
    assert "points outside" in _flat(err) and str((elsewhere / "model.ckpt-best.index").resolve()) in _flat(err)
    files = json.loads((tmp_path / "o" / "enc_provenance.json").read_text())["source"]["files"]
    assert str((elsewhere / "model.ckpt-best.index").resolve()) in {f["path"] for f in files}
    capsys.readouterr()
    assert run(["inspect", str(src), "--json"]) == 0  # inspect says it too
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert "points outside" in summary["warnings"][0]
    assert str((elsewhere / "model.ckpt-best.index").resolve()) in summary["files"]


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_tarball_state_file_is_never_followed_outside(src, tmp_path, capsys, private_tmp, where):
    """A tarball with only config, spm and a state file naming the user's own checkpoint elsewhere."""
    target = src / "model.ckpt-best" if where == "absolute" else "../../../../../../../.." + str(src / "model.ckpt-best")
    evil = tmp_path / "evil"
    evil.mkdir()
    for n in ("albert_config.json", "30k-clean.model"):
        shutil.copy(src / n, evil / n)
    _state(evil, target)
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(evil, arcname="albert")
    rc, err = _run(capsys, ["convert", str(tgz), "-o", str(tmp_path / "o")])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "outside the archive" in err
    assert not (tmp_path / "o").exists() and list(private_tmp.iterdir()) == []
