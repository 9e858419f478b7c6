"""Encoder-decoder generation (enc.seq2seq, `enc generate` on a bert2bert directory) against
transformers' ``EncoderDecoderModel.generate()``: greedy and beam search, token for token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from enc.cli.main import run

FIX = Path(__file__).resolve().parent / "fixtures" / "bertgen"
TEXTS = ["the cat sat on the mat", "translation turns a sentence into another language",
         "summaries of news", "warm starting the decoder"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for layout, act in (("separate", "gelu"), ("shared", "gelu_new")):
        d = tmp_path_factory.mktemp(layout) / "hf"
        assert run(["convert", str(FIX / layout), "-o", str(d), "--num-heads", "4", "--hidden-act", act]) == 0
        out[layout] = d
    return out


def _random_bert2bert(converted, tmp, std: float, eos_bias: float) -> Path:
    """A transformers-initialised bert2bert with wider weights and an EOS bias, saved with the fixture's tokenizer."""
    from transformers import (
        BertGenerationConfig,
        BertGenerationDecoder,
        BertGenerationEncoder,
        EncoderDecoderModel,
    )

    torch.manual_seed(7)
    kw = dict(vocab_size=86, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, initializer_range=0.4, hidden_act="gelu_new")
    model = EncoderDecoderModel(encoder=BertGenerationEncoder(BertGenerationConfig(**kw)),
                                decoder=BertGenerationDecoder(BertGenerationConfig(
                                    **kw, is_decoder=True, add_cross_attention=True)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
        model.decoder.lm_head.bias[1] = eos_bias
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 0
    d = tmp / "hf"
    model.save_pretrained(str(d))
    for f in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(converted["separate"] / f, d / f)
    return d


@pytest.fixture(scope="module")
def eos_prone(converted, tmp_path_factory):
    """Beams finish (EOS) at different lengths."""
    return _random_bert2bert(converted, tmp_path_factory.mktemp("eos_prone"), 0.4, 3.0)


@pytest.fixture(scope="module")
def diverse(converted, tmp_path_factory):
    """Long outputs over many tokens, where beams and greedy part ways."""
    return _random_bert2bert(converted, tmp_path_factory.mktemp("diverse"), 0.8, 2.0)


def hf_generate(model_dir: Path, text: str, num_beams: int, max_new: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = _hf_model(model_dir)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(enc.input_ids, attention_mask=enc.attention_mask, num_beams=num_beams, do_sample=False,
                             max_new_tokens=max_new)
    assert seq[0, 0].item() == model.generation_config.decoder_start_token_id
    return seq[0, 1:].tolist()


_MODELS: dict = {}


def _hf_model(d: Path):
    from transformers import EncoderDecoderModel

    if d not in _MODELS:
        _MODELS[d] = EncoderDecoderModel.from_pretrained(str(d)).eval()
    return _MODELS[d]


def enc_generate(model_dir: Path, text: str, num_beams: int, max_new: int):
    from enc import seq2seq
    from enc.generation import Settings
    from enc.models.bert_generation import from_pretrained

    model = from_pretrained(model_dir).prepare_inference()  # as enc generate runs it
    tok = seq2seq.load_tokenizer(model_dir)
    ids = seq2seq.special_ids(model_dir, model)
    return seq2seq.generate(model, tok, tok.encode(text).ids, Settings(max_new_tokens=max_new, temp=0.0), ids,
                            num_beams)


@pytest.mark.parametrize("layout", ["separate", "shared"])
@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_converted_fixture_equals_transformers(converted, layout, num_beams):
    for text in TEXTS[:3]:
        want = hf_generate(converted[layout], text, num_beams, 10)
        got = enc_generate(converted[layout], text, num_beams, 10)
        assert got.token_ids == want, text


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_beams_finishing_at_different_lengths_equal_transformers(eos_prone, num_beams):
    seen_eos = 0
    for text in TEXTS:
        for max_new in (3, 16):
            want = hf_generate(eos_prone, text, num_beams, max_new)
            got = enc_generate(eos_prone, text, num_beams, max_new)
            assert got.token_ids == want, (text, max_new)
            seen_eos += got.stop_reason == "eos"
            assert got.stop_reason == ("eos" if want and want[-1] == 1 else "length")
    assert seen_eos >= 2  # the early-finishing paths were exercised


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_long_diverse_outputs_equal_transformers(diverse, num_beams):
    tokens = set()
    for text in TEXTS[1:]:
        want = hf_generate(diverse, text, num_beams, 16)
        got = enc_generate(diverse, text, num_beams, 16)
        assert got.token_ids == want, text
        tokens |= set(want)
    assert len(tokens) >= 8


def test_cli_json_and_streaming(eos_prone, capsys):
    from transformers import AutoTokenizer

    text = TEXTS[1]
    want = hf_generate(eos_prone, text, 3, 12)
    capsys.readouterr()
    assert run(["generate", text, "-m", str(eos_prone), "--num-beams", "3", "-n", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == want and res["settings"]["num_beams"] == 3
    tok = AutoTokenizer.from_pretrained(str(eos_prone))
    assert res["prompt_ids"] == tok(text).input_ids
    want_greedy = hf_generate(eos_prone, TEXTS[0], 1, 12)
    assert run(["generate", TEXTS[0], "-m", str(eos_prone), "--temp", "0", "-n", "12"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == tok.decode(want_greedy, skip_special_tokens=True) + "\n"


def test_cli_rejects_bad_use(eos_prone, capsys):
    capsys.readouterr()
    assert run(["generate", "x", "-m", str(eos_prone), "--num-beams", "0", "--json"]) == 2
    assert "--num-beams" in capsys.readouterr().err
    assert run(["generate", "x", "-m", str(eos_prone), "--chat"]) == 2
    assert "encoder-decoder" in capsys.readouterr().err


def test_bfloat16_output_generates_and_a_half_is_refused(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert run(["convert", str(FIX / "shared"), "-o", str(out), "--num-heads", "4", "--dtype", "bfloat16"]) == 0
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["dtype"] == "bfloat16" and prov["parity"]["verdict"] == "pass"
    capsys.readouterr()
    assert run(["generate", TEXTS[0], "-m", str(out), "--num-beams", "2", "-n", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["generated_tokens"] == len(res["token_ids"]) > 0
    half = tmp_path / "dec"
    assert run(["convert", str(FIX / "shared"), "-o", str(half), "--num-heads", "4", "--part", "decoder"]) == 0
    capsys.readouterr()
    assert run(["generate", TEXTS[0], "-m", str(half), "-n", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--part" in err and len(err.splitlines()) == 1
