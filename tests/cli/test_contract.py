"""The CLI as a contract: usage errors, exit codes, the --json envelope, escaping, stdout/stderr, flags."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from enc.cli.main import run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "albert_tiny"
ENVELOPE = {"command", "ok", "exit_code", "warnings", "seconds", "enc_version"}


def enc(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def enc_proc(*args, stdin: str = "") -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "enc.cli.main", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "albert-hf"
    assert run(["convert", str(EXAMPLE), "-o", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- usage errors (finding 9)


def test_typer_is_in_the_tested_range():
    import re
    from importlib.metadata import version

    pin = re.search(r'"typer>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins typer to a tested range"
    have = tuple(int(x) for x in version("typer").split(".")[:2])
    assert tuple(int(x) for x in pin.group(1).split(".")[:2]) <= have < tuple(int(x) for x in pin.group(2).split("."))


def test_bare_enc_prints_usage_not_an_exception():
    p = enc_proc()
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("Usage: enc [OPTIONS] COMMAND [ARGS]...") and "convert" in p.stderr
    assert "Error" not in p.stderr and "Exception" not in p.stderr


def test_typo_and_missing_argument_print_usage_and_one_error_line():
    p = enc_proc("convert", "--jsn")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["Usage: enc convert [OPTIONS] SRC", "Try 'enc convert --help' for help.",
                                     "enc: error: no such option: --jsn (Possible options: --json, --set)"]
    p = enc_proc("parity", str(EXAMPLE))
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == "enc: error: missing argument 'OUT'."
    p = enc_proc("convert", str(EXAMPLE), "-o", "x", "--dtype", "float8")
    assert p.returncode == 2 and "'--dtype'" in p.stderr.splitlines()[-1] and "bfloat16" in p.stderr


def test_help_is_clean_and_completion_is_on():
    p = enc_proc("convert", "--help")
    assert p.returncode == 0
    assert "Usage: enc convert [OPTIONS] SRC" in p.stdout and "{src}" not in p.stdout and "<bool>" not in p.stdout
    assert "--from <albert_tf|bertgeneration_tf|megatron|mistral|" in p.stdout  # choices shown (every registered format)
    assert "megatron: flags --vocab, --merges, --tokenizer, --num-heads, --hidden-act; --set keys: model" in " ".join(p.stdout.split())
    p = enc_proc("parity", "--help")
    assert "As for convert" not in p.stdout and "Usage: enc parity [OPTIONS] SRC OUT" in p.stdout
    assert "--install-completion" in enc_proc("--help").stdout


# ----------------------------------------------------------------------------- escaping, streams, wrapping


def test_user_text_is_never_rich_markup(converted, capsys):
    rc, out, err = enc(capsys, "fill-mask", "a week [/b] has seven [MASK].", "[red]x[/red] [MASK] y", "--model",
                       converted)
    assert rc == 0 and out == ""  # human output goes to stderr
    assert "a week [/b] has seven [MASK]." in err and "[red]x[/red] [MASK] y" in err


def test_output_path_with_brackets(tmp_path, capsys):
    out = tmp_path / "out[/x]"
    rc, stdout, err = enc(capsys, "convert", EXAMPLE, "-o", out)
    assert rc == 0 and stdout == "" and (out / "config.json").is_file()
    assert str(out) in err


def test_no_wrapping_or_truncation_in_pipes(tmp_path):
    p = enc_proc("convert", EXAMPLE, "-o", tmp_path / "x", "--dry-run")
    assert p.returncode == 0 and p.stdout == ""
    assert "…" not in p.stderr
    key = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense.weight"
    assert any(key in line for line in p.stderr.splitlines())
    assert max(len(line) for line in p.stderr.splitlines()) > 80  # one row per line, not cut at 80 columns


# ----------------------------------------------------------------------------- the --json envelope (finding 12)


def test_every_command_has_the_envelope(converted, tmp_path, capsys):
    cases = [
        (["convert", EXAMPLE, "-o", tmp_path / "c", "--json"], "convert", 0),
        (["convert", EXAMPLE, "-o", tmp_path / "d", "--dry-run", "--json"], "convert", 0),
        (["parity", EXAMPLE, converted, "--json"], "parity", 0),
        (["inspect", converted, "--json"], "inspect", 0),
        (["fill-mask", "the [MASK] .", "--model", converted, "--json"], "fill-mask", 0),
        (["convert", tmp_path / "missing", "-o", tmp_path / "e", "--json"], "convert", 2),
        (["convert", EXAMPLE, "-o", tmp_path / "f", "--set", "nope=1", "--json"], "convert", 2),
        (["convert", EXAMPLE, "-o", tmp_path / "g", "--no-such", "--json"], "convert", 2),
    ]
    for args, name, code in cases:
        rc, out, _ = enc(capsys, *args)
        res = json.loads(out)
        assert rc == code and ENVELOPE <= set(res) and res["command"] == name, args
        assert res["ok"] is (code == 0) and res["exit_code"] == code and isinstance(res["warnings"], list)
        if code:
            assert set(res["error"]) == {"kind", "message", "path"}
    rc, out, _ = enc(capsys, "convert", tmp_path / "missing", "-o", tmp_path / "e", "--json")
    assert json.loads(out)["error"] == {"kind": "missing", "message": f"{tmp_path / 'missing'}: no such file or "
                                                                      "directory", "path": str(tmp_path / "missing")}
    rc, out, _ = enc(capsys, "parity", EXAMPLE, converted, "--json")
    rep = json.loads(out)
    assert rep["thresholds"] == {"nmse": 1e-8, "rel": 1e-3, "cos": 0.99999, "top1": None}
    assert rep["verdict"] == "pass" and rep["verdict_text"] == "pass" and rep["assumed"] == []
    rc, out, _ = enc(capsys, "convert", EXAMPLE, "-o", tmp_path / "h", "--json")
    res = json.loads(out)
    assert res["dropped"]["global_step"] == "training step counter" and res["format"] == "albert_tf"


# ----------------------------------------------------------------------------- exit codes (issue 15, item 8)


def test_internal_error_exits_3_with_a_debug_hint(monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr("enc.convert.open_converter", boom)
    rc, out, err = enc(capsys, "inspect", EXAMPLE)
    assert rc == 3 and out == ""
    assert err.splitlines() == ["enc: error: internal error (KeyError: 'surprise'); this is a bug in enc: rerun with "
                                "--debug for the traceback"]
    rc, out, _ = enc(capsys, "inspect", EXAMPLE, "--json")
    assert rc == 3 and json.loads(out)["error"]["kind"] == "internal"


def test_broken_pipe_exits_0(monkeypatch, capsys):
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sys.__stdout__.fileno()

    saved = sys.__stdout__
    devnull = open("/dev/null", "w")  # noqa: SIM115 - stands in for the fd the handler redirects
    monkeypatch.setattr(sys, "__stdout__", devnull)
    monkeypatch.setattr(sys, "stdout", Closed())
    try:
        assert run(["inspect", str(EXAMPLE), "--json"]) == 0
    finally:
        sys.__stdout__ = saved
        devnull.close()


def test_broken_pipe_in_a_real_pipe():
    # `true` exits at once: enc writes into a pipe nobody reads (EPIPE), as with `enc inspect X | head -1`
    cmd = f"{sys.executable} -m enc.cli.main inspect {EXAMPLE} --json | true; echo ${{PIPESTATUS[0]}}"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert p.stdout.strip() == "0" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


# ----------------------------------------------------------------------------- overrides (issue 15, item 7)


def test_overrides_that_do_not_apply_are_refused(tmp_path, capsys):
    rc, _, err = enc(capsys, "convert", EXAMPLE, "-o", tmp_path / "a", "--num-heads", "4")
    assert rc == 2 and err.strip().splitlines() == [
        "enc: error: --num-heads does not apply to albert_tf checkpoints (it takes: --tokenizer; --set keys: none)"]
    rc, _, err = enc(capsys, "convert", EXAMPLE, "-o", tmp_path / "a", "--set", "hidden_size=8")
    assert rc == 2 and "--set hidden_size does not apply to albert_tf" in err
    rc, _, err = enc(capsys, "parity", EXAMPLE, tmp_path, "--vocab", EXAMPLE / "30k-clean.model")
    assert rc == 2
    assert not (tmp_path / "a").exists()


def test_parity_of_an_unrelated_output_says_so(tmp_path, capsys):
    from tests.converters.test_mistral import tiny_hf, write_release

    src = write_release(tmp_path / "mistral", tiny_hf(seed=1))
    assert run(["convert", str(src), "-o", str(tmp_path / "m-hf"), "--no-verify"]) == 0
    rc, _, err = enc(capsys, "parity", EXAMPLE, tmp_path / "m-hf")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "does not come from this source" in err and "model_type 'mistral' (the source gives 'albert')" in err


# ----------------------------------------------------------------------------- honest verdicts (item 6)


def test_pass_resting_on_an_override_says_so(tmp_path, capsys):
    from tests.converters.test_mistral import tiny_hf, write_release

    model = tiny_hf(tied=True, seed=5)
    src = write_release(tmp_path / "rel", model, sliding_window=False, rope_theta=False)
    out = tmp_path / "hf"
    rc, stdout, err = enc(capsys, "convert", src, "-o", out, "--rope-theta", "10000", "--json")
    res = json.loads(stdout)
    assert rc == 0 and res["assumed"] == ["--rope-theta 10000.0"]
    assert res["parity"]["verdict_text"] == "pass (assumed: --rope-theta 10000.0)"
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["assumed"] == ["--rope-theta 10000.0"] and prov["overrides"] == {"rope_theta": "10000.0"}
    assert prov["parity"]["verdict_text"] == "pass (assumed: --rope-theta 10000.0)"
    rc, _, err = enc(capsys, "parity", src, out, "--rope-theta", "10000")
    assert rc == 0 and "PASS (assumed: --rope-theta 10000.0)" in err
    # a guess (no rope_theta in params.json) is an assumption too, and every warning is recorded
    out2 = tmp_path / "hf2"
    rc, stdout, err = enc(capsys, "convert", src, "-o", out2, "--no-verify", "--json")
    prov = json.loads((out2 / "enc_provenance.json").read_text())
    assert prov["assumed"] == ["rope_theta 1e+06 (params.json has none)"]
    assert any("no rope_theta" in w for w in prov["warnings"]) and prov["warnings"] == json.loads(stdout)["warnings"]


def test_warnings_are_printed_when_parity_fails(tmp_path, monkeypatch, capsys):
    from enc import parity
    from tests.converters.test_mistral import tiny_hf, write_release

    src = write_release(tmp_path / "rel", tiny_hf(seed=6), sliding_window=False, rope_theta=False)
    real = parity.run_parity

    def broken(conv, out_dir, thresholds=None, on_row=None):
        report = real(conv, out_dir, thresholds, on_row)
        report.rows[-1].passed, report.rows[-1].why = False, "made to fail"
        return report

    monkeypatch.setattr(parity, "run_parity", broken)
    rc, out, err = enc(capsys, "convert", src, "-o", tmp_path / "o")
    assert rc == 1 and out == "" and not (tmp_path / "o").exists()
    assert "warning: params.json has no rope_theta" in err and "parity FAILED" in err


# ----------------------------------------------------------------------------- crash fixes (item 8)


def test_generate_on_an_encoder_says_it_is_not_a_decoder(converted, capsys):
    rc, out, err = enc(capsys, "generate", "hello", "--model", converted)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"enc: error: {converted}: is not a decoder (model_type 'albert', "
                                        "architectures ['AlbertForPreTraining']): generate needs a causal LM; for a "
                                        "masked LM use `enc fill-mask`"]


# ----------------------------------------------------------------------------- inspect (finding 16)


def test_inspect_counts_model_parameters_and_hides_temp_paths(converted, tmp_path, capsys):
    import tarfile

    rc, out, _ = enc(capsys, "inspect", EXAMPLE, "--json")
    src = json.loads(out)
    rc, out, _ = enc(capsys, "inspect", converted, "--json")
    hf = json.loads(out)
    # the original's model parameters are the converted model's (adam_m/adam_v/global_step are not)
    assert src["params"] == hf["params"] == 64192 and src["other_values"] == 2 * 64192 + 1
    assert hf["config"]["model_type"] == "albert" and hf["model_type"] == "albert" and hf["format"] == "huggingface"
    tgz = tmp_path / "albert.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(EXAMPLE, arcname="albert_tiny")
    rc, out, err = enc(capsys, "inspect", tgz, "--json")
    info = json.loads(out)
    assert rc == 0 and info["summary"]["checkpoint"] == f"{tgz}:albert_tiny/model.ckpt-best"
    rc, out, err = enc(capsys, "inspect", tgz, "--no-tensors")
    assert "/tmp/enc-" not in err and "config.hidden_size" in err and "64,192 model parameters" in err


def test_inspect_shows_nested_config_values(tmp_path, capsys):
    from tests.converters.test_megatron import _spec, hf_state, tiny_bert, write_dir

    src = write_dir(tmp_path / "ckpt", _spec("bert", 3.0, 1, 1, "2020", True, "dir"), hf_state(tiny_bert()))
    rc, out, err = enc(capsys, "inspect", src, "--no-tensors")
    assert rc == 0 and "dims.hidden" in err and "args.num_attention_heads" in err


def test_every_option_of_every_command_is_described():
    import typer.main

    from enc.cli.main import app

    root = typer.main.get_command(app)
    seen = 0
    stack = [(root.name, root)]
    while stack:
        name, cmd = stack.pop()
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            stack.append((f"{name} {sub_name}", sub))
        for p in cmd.params:
            if p.param_type_name == "option" and "--help" not in p.opts:
                assert (p.help or "").strip(), f"{name} {p.opts} has no help text"
                seen += 1
    assert seen > 80
    for args in (["generate", "--help"], ["fill-mask", "--help"], ["eval", "glue", "--help"], ["inspect", "--help"]):
        out = enc_proc(*args).stdout
        assert "<bool>" not in out and "{" not in out.splitlines()[0], args


def test_braces_in_an_override_do_not_break_the_summary(tmp_path, capsys):
    from tests.converters.test_mistral import tiny_hf, write_release

    src = write_release(tmp_path / "rel", tiny_hf(seed=7), rope_theta=False)
    rc, out, err = enc(capsys, "convert", src, "-o", tmp_path / "o", "--set", 'lora={"rank": 1}', "--rope-theta",
                       "10000")
    assert rc == 0 and out == ""
    assert "parity pass (assumed: --rope-theta 10000.0; --set lora={'rank': 1})" in " ".join(err.split())
