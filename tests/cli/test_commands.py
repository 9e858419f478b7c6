"""fill-mask, generate and eval behaviour behind the CLI contract (findings 13, 17, 18; issue 15 item 8)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from enc.cli.main import run
from enc.converters.mistral import CHAT_TEMPLATE_V1
from tests.cli.test_contract import EXAMPLE, enc
from tests.helpers.mistral_writer import TOKENIZER_V1, tiny_hf, write_release


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmd") / "albert-hf"
    assert run(["convert", str(EXAMPLE), "-o", str(out), "--no-verify"]) == 0
    return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    model = tiny_hf(seed=11, sliding_window=16)
    d = tmp_path_factory.mktemp("dec")
    model.save_pretrained(d)
    shutil.copyfile(TOKENIZER_V1, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE_V1}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return d


def gen(capsys, *args) -> dict:
    rc, out, err = enc(capsys, "generate", *args, "--json")
    assert rc == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------- fill-mask (finding 17)


def test_several_masks_keep_the_others_in_sequence_as_transformers(converted, capsys):
    import transformers

    text = "plants [MASK] energy through [MASK]."
    rc, out, _ = enc(capsys, "fill-mask", text, "--model", converted, "-k", "3", "--json")
    ours = json.loads(out)["results"][0]["masks"]
    theirs = transformers.pipeline("fill-mask", model=str(converted), top_k=3)(text)
    assert rc == 0 and len(ours) == len(theirs) == 2
    for mine, ref in zip(ours, theirs):
        assert [p["token"] for p in mine["predictions"]] == [r["token"] for r in ref]
        assert [p["sequence"] for p in mine["predictions"]] == [r["sequence"] for r in ref]
    assert all("[MASK]" in p["sequence"] for m in ours for p in m["predictions"])


def test_bad_lines_are_reported_with_their_number_and_the_rest_run(converted, tmp_path, capsys, monkeypatch):
    f = tmp_path / "in.txt"
    f.write_bytes(b"the [MASK] .\nno mask here\n\xff\xfe [MASK]\na [MASK] b\n")
    rc, out, err = enc(capsys, "fill-mask", "--file", f, "--model", converted, "--json")
    res = json.loads(out)
    assert rc == 2 and res["ok"] is False and res["exit_code"] == 2
    assert [r["text"] for r in res["results"]] == ["the [MASK] .", "a [MASK] b"]
    assert [(e["line"], e["error"]) for e in res["errors"]] == [
        (f"{f} line 3", "not UTF-8 (byte 1)"), (f"{f} line 2", "no [MASK] in input: 'no mask here'")]
    assert f"warning: {f} line 2: no [MASK] in input" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("x [MASK]\nnothing\n"))
    rc, out, _ = enc(capsys, "fill-mask", "--model", converted, "--json")
    assert rc == 2 and json.loads(out)["errors"][0]["line"] == "stdin line 2"


def test_fill_mask_dtype_and_device(converted, capsys):
    rc, out, _ = enc(capsys, "fill-mask", "the [MASK] .", "--model", converted, "--json")
    f32 = json.loads(out)["results"][0]["masks"][0]["predictions"]
    rc, out, _ = enc(capsys, "fill-mask", "the [MASK] .", "--model", converted, "--dtype", "bfloat16", "--device",
                     "cpu", "--json")
    bf16 = json.loads(out)["results"][0]["masks"][0]["predictions"]
    assert rc == 0 and bf16[0]["token"] == f32[0]["token"] and bf16[0]["score"] != f32[0]["score"]


# ----------------------------------------------------------------------------- generate (findings 13, 18)


def test_flags_and_aliases(decoder, capsys, tmp_path):
    a = gen(capsys, "-p", "Hello", "--model", decoder, "-n", "5", "--temperature", "0.7", "-k", "5", "-s", "3",
            "--repetition-penalty", "1.1", "-t", "1")
    b = gen(capsys, "Hello", "--model", decoder, "-n", "5", "--temp", "0.7", "--top-k", "5", "--seed", "3",
            "--repeat-penalty", "1.1")
    assert a["token_ids"] == b["token_ids"] and a["settings"]["top_k"] == 5 and a["settings"]["repeat_penalty"] == 1.1
    (tmp_path / "p.txt").write_text("Hello")
    c = gen(capsys, "-f", tmp_path / "p.txt", "--model", decoder, "-n", "5", "--temp", "0.7", "-k", "5", "-s", "3",
            "--repeat-penalty", "1.1")
    assert c["token_ids"] == a["token_ids"]
    for bad, needle in ((["--temp", "-1"], "--temp must be >= 0"), (["--top-p", "0"], "--top-p must be in (0, 1]"),
                        (["-p", "x", "-f", tmp_path / "p.txt"], "give the prompt once")):
        rc, _, err = enc(capsys, "generate", "Hi", "--model", decoder, *bad) if bad[0] != "-p" else \
            enc(capsys, "generate", "--model", decoder, *bad)
        assert rc == 2 and needle in err, err


def test_generation_config_defaults_are_honoured(decoder, tmp_path, capsys):
    d = tmp_path / "greedy"
    shutil.copytree(decoder, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False,
                                                          "max_new_tokens": 4}))
    res = gen(capsys, "Hello", "--model", d, "--ignore-eos")
    greedy = gen(capsys, "Hello", "--model", decoder, "--temp", "0", "-n", "4", "--ignore-eos")
    assert res["settings"]["temp"] == 0.0 and res["generated_tokens"] == 4 and res["token_ids"] == greedy["token_ids"]
    assert res["settings_from"]["temp"] == "generation_config.json" and res["settings_from"]["top_k"] == "default"
    # a flag wins over the file
    res = gen(capsys, "Hello", "--model", d, "--temp", "0.9", "-n", "2", "--seed", "1")
    assert res["settings"]["temp"] == 0.9 and res["settings"]["max_new_tokens"] == 2


def test_stdin_prompt_loses_one_trailing_newline_and_text_matches_the_stream(decoder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    res = gen(capsys, "--model", decoder, "-n", "3", "--temp", "0")
    assert res["prompt"] == "Hello" and res["prompt_ids"] == gen(capsys, "Hello", "--model", decoder, "-n", "3",
                                                                 "--temp", "0")["prompt_ids"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    rc, out, _ = enc(capsys, "generate", "--model", decoder, "-n", "3", "--temp", "0")
    assert rc == 0 and out == res["text"] + "\n" and res["text"] == "Hello" + res["generated_text"]


def test_stop_strings(decoder, capsys):
    full = gen(capsys, "Hello", "--model", decoder, "-n", "12", "--temp", "0", "--ignore-eos")
    text = full["generated_text"]
    assert len(text) > 4
    stop = text[2:4]
    cut = gen(capsys, "Hello", "--model", decoder, "-n", "12", "--temp", "0", "--ignore-eos", "--stop", stop)
    assert cut["generated_text"] == text[:text.index(stop)] and cut["stop_reason"] == "stop"


def test_chat_template_only_for_instruct_releases_or_when_asked(tmp_path, capsys):
    model = tiny_hf(seed=2)
    base = write_release(tmp_path / "Mistral-7B-v0.1", model)
    instruct = write_release(tmp_path / "Mistral-7B-Instruct-v0.1", model)
    for src, extra, want in ((base, [], False), (instruct, [], True), (base, ["--chat-template"], True),
                             (instruct, ["--no-chat-template"], False)):
        out = tmp_path / f"hf-{src.name}-{len(extra)}-{want}"
        assert run(["convert", str(src), "-o", str(out), "--no-verify", *extra]) == 0
        assert ("chat_template" in json.loads((out / "tokenizer_config.json").read_text())) is want, (src, extra)
    rc, _, err = enc(capsys, "generate", "Hi", "--model", tmp_path / "hf-Mistral-7B-v0.1-0-False", "--chat")
    assert rc == 2 and "no chat template" in err


# ----------------------------------------------------------------------------- eval (issue 15 item 8, finding 13)


def test_glue_max_length_is_clamped_to_the_model_positions(tmp_path, capsys):
    from tests.evals.helpers import save_albert, train_spm

    spiece = train_spm(tmp_path / "spm")
    m = save_albert(tmp_path / "m", spiece, vocab_size=300, num_labels=2, max_position_embeddings=12)
    glue = Path(__file__).resolve().parents[1] / "fixtures" / "glue"
    rc, out, err = enc(capsys, "eval", "glue", "--model", m, "--task", "sst2", "--data", glue, "--json")
    clamped = json.loads(out)
    assert rc == 0 and clamped["warnings"] == ["--max-length 128 is more than the model's 12 positions: clamped to 12"]
    rc, out, _ = enc(capsys, "eval", "glue", "--model", m, "--task", "sst2", "--data", glue, "--max-length", "12",
                     "--json", "--precision", "fp32", "--device", "cpu")
    exact = json.loads(out)
    assert rc == 0 and exact["warnings"] == [] and exact["results"][0]["metrics"] == clamped["results"][0]["metrics"]
    rc, _, err = enc(capsys, "eval", "glue", "--model", m, "--task", "sst2", "--data", glue, "--dtype", "float16")
    assert rc == 2 and "'--dtype'" in err


def test_squad_scoring_has_no_model(tmp_path, capsys):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "a", "question": "?", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"a": "c"}))
    rc, out, _ = enc(capsys, "eval", "squad", "--data", tmp_path / "dev.json", "--predictions", tmp_path / "p.json",
                     "--json")
    res = json.loads(out)
    assert rc == 0 and res["command"] == "eval squad" and res["model"] is None
    assert res["predictions"] == str(tmp_path / "p.json") and res["results"][0]["metrics"]["exact"] == 100.0
