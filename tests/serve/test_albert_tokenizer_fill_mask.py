"""ALBERT tokenization equals transformers' AlbertTokenizer; fill-mask equals its pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from enc.cli.main import run
from enc.errors import EncError
from tests.helpers.albert_release import hf_albert, train_spm, write_release

TEXTS = [
    "Plants create [MASK] through photosynthesis.",
    "  The   capital of  FRANCE is Paris ,   and 2,000 fish.  ",
    "Café au lait — naïve façade, ``quoted'' text",
    "[CLS] dogs [SEP] cats [MASK] [MASK] .",
    "numbers 1,234,567 and 3,5 with commas",
    "",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    spm_model = train_spm(tmp / "spm")
    src = write_release(tmp / "rel", hf_albert(70, 16, 32, 2, 1, 1, 4, 64), spm_model)
    assert run(["convert", str(src), "-o", str(tmp / "hf"), "--no-verify"]) == 0
    return tmp / "hf"


def test_ids_equal_transformers_albert_tokenizer(hf_dir):
    import transformers

    from enc.tokenization import load_tokenizer

    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = load_tokenizer(hf_dir)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    a, b = "first segment here", "and the second one"
    enc = ours.encode(a, b)
    ref = theirs(a, b, return_token_type_ids=True)
    assert enc.ids == ref["input_ids"] and enc.token_type_ids == ref["token_type_ids"]


def test_ids_equal_sentencepiece_on_the_unsplit_text(hf_dir):
    """Without special tokens: exactly sentencepiece on the preprocessed text; text glued to a
    [MASK] continues the word (no dummy-prefix piece), as in masked pretraining data."""
    import sentencepiece as spm

    from enc.tokenization import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "spiece.model"))
    tok = load_tokenizer(hf_dir)
    for text in ["the capital of france is paris.", "dogs , cats and 2,000 fish", "a (b) - c"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text.lower()), text
    glued = tok.encode("seven [MASK].", add_special_tokens=False).ids
    assert glued[-2:] == [tok.mask_id, sp.piece_to_id(".")]
    assert tok.encode("seven [MASK] .", add_special_tokens=False).ids[-2:] == [tok.mask_id, *sp.encode(" .")]


def test_offsets_point_into_the_original_text(hf_dir):
    from enc.tokenization import load_tokenizer

    tok = load_tokenizer(hf_dir)
    text = "  Café  au LAIT, 2,000 fish"
    enc = tok.encode(text)
    pieces = [tok.id_to_token(i) for i in enc.ids]
    spans = [text[s:e] for s, e in enc.offsets]
    assert pieces[0] == "[CLS]" and spans[0] == "" and enc.sequence_ids[0] is None
    words = "".join(p.replace("\u2581", "") for p in pieces[1:-1])
    assert words == "cafeaulait,2,000fish"
    # each span, normalised the same way, spells its piece
    import unicodedata

    for p, s in zip(pieces[1:-1], spans[1:-1]):
        norm = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).lower().strip()
        assert norm == p.replace("\u2581", ""), (p, s)


def test_fill_mask_equals_transformers_pipeline(hf_dir, capsys):
    import transformers

    texts = ["plants create [MASK] through photosynthesis.", "the capital of [MASK] is paris ."]
    capsys.readouterr()
    assert run(["fill-mask", *texts, "--model", str(hf_dir), "--top-k", "4", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["results"]
    pipe = transformers.pipeline("fill-mask", model=str(hf_dir), top_k=4)
    for text, res in zip(texts, ours):
        ref = pipe(text)
        got = res["masks"][0]["predictions"]
        assert [p["token"] for p in got] == [r["token"] for r in ref]
        assert [p["score"] for p in got] == pytest.approx([r["score"] for r in ref], abs=1e-5)
        assert [p["token_str"] for p in got] == [r["token_str"] for r in ref]


def test_fill_mask_several_masks_stdin_and_file(hf_dir, tmp_path, capsys, monkeypatch):
    import io

    capsys.readouterr()
    assert run(["fill-mask", "dogs [MASK] and [MASK] cats", "--model", str(hf_dir), "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert len(res) == 1 and len(res[0]["masks"]) == 2
    assert all(len(m["predictions"]) == 3 for m in res[0]["masks"])
    scores = [p["score"] for p in res[0]["masks"][0]["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001

    f = tmp_path / "inputs.txt"
    f.write_text("a [MASK] b\n\nthe [MASK] .\n")
    assert run(["fill-mask", "--file", str(f), "--model", str(hf_dir), "--json"]) == 0
    assert [r["text"] for r in json.loads(capsys.readouterr().out)["results"]] == ["a [MASK] b", "the [MASK] ."]

    monkeypatch.setattr("sys.stdin", io.StringIO("one [MASK]\ntwo [MASK]\n"))
    assert run(["fill-mask", "--model", str(hf_dir), "--json"]) == 0
    assert [r["text"] for r in json.loads(capsys.readouterr().out)["results"]] == ["one [MASK]", "two [MASK]"]


def test_fill_mask_without_mask_is_an_error(hf_dir, capsys):
    capsys.readouterr()
    assert run(["fill-mask", "no mask here", "--model", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "no [MASK]" in err


def test_inspect_source_and_converted(hf_dir, tmp_path, capsys):
    import transformers

    src = write_release(tmp_path / "rel", hf_albert(70, 16, 32, 2, 1, 1, 4, 64), hf_dir / "spiece.model")
    capsys.readouterr()
    assert run(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "albert_tf" and info["kind"] == "original"
    names = {t["name"]: t for t in info["tensors"]}
    assert names["bert/embeddings/word_embeddings"]["shape"] == [70, 16]
    assert names["global_step"]["dtype"] == "int64"
    assert run(["inspect", str(hf_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "huggingface" and info["format"] == "huggingface" and info["model_type"] == "albert"
    hf = transformers.AlbertForPreTraining.from_pretrained(hf_dir)
    # every stored parameter counted once (tied decoder weight/bias not stored)
    assert info["params"] == sum(p.numel() for p in hf.parameters())


def test_version_and_fast_help(capsys):
    import subprocess
    import sys
    import time

    from enc import __version__

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"enc {__version__}"
    code = "import sys, enc.cli.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "enc.cli.main", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 3.0


def test_unexpected_failure_is_one_line_and_debug_shows_traceback(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "albert"}))
    capsys.readouterr()
    assert run(["fill-mask", "a [MASK]", "--model", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and str(d) in err
    with pytest.raises(EncError):
        run(["--debug", "fill-mask", "a [MASK]", "--model", str(d)])
    torch.manual_seed(0)
