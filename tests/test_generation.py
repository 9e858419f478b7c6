"""The shared generation engine: sampler semantics, streaming detokenization, the loop, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from enc.cli.main import run
from enc.converters.mistral import CHAT_TEMPLATE_V1
from enc.generation import Sampler, Settings, StreamDecoder, generate, render_chat
from enc.tokenization import LlamaSentencePiece
from tests.helpers.mistral_writer import TOKENIZER_V1, tiny_hf


@pytest.fixture(scope="module")
def sp_tok():
    return LlamaSentencePiece(TOKENIZER_V1, chat_template=CHAT_TEMPLATE_V1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    model = tiny_hf(seed=11, sliding_window=16)
    d = tmp_path_factory.mktemp("gen")
    model.save_pretrained(d)
    shutil.copyfile(TOKENIZER_V1, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE_V1}))
    return d, model


# ----------------------------------------------------------------------------- sampler


def _logits(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float32)


def test_greedy_and_top_k_1():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert Sampler(Settings(temp=0))(logits, []) == best
    s = Sampler(Settings(temp=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=1))
    assert all(s(logits, []) == best for _ in range(20))


def test_seed_reproducible_and_distribution():
    logits = _logits(0.0, 0.0, 0.0, 0.0)
    draws = [Sampler(Settings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42))(logits, []) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(Settings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    counts = torch.bincount(torch.tensor([s(logits, []) for _ in range(4000)]), minlength=4)
    assert counts.min().item() > 850  # uniform over 4: ~1000 each


def test_top_p_and_min_p_filters():
    # probs ~ [0.64, 0.24, 0.09, 0.03]
    logits = torch.log(_logits(0.64, 0.24, 0.09, 0.03))
    s = Sampler(Settings(temp=1.0, top_k=0, top_p=0.6, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(200)} == {0}  # 0.64 >= 0.6 already
    s = Sampler(Settings(temp=1.0, top_k=0, top_p=0.85, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(400)} == {0, 1}
    s = Sampler(Settings(temp=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0))  # keep p >= 0.128
    assert {s(logits, []) for _ in range(400)} == {0, 1}
    s = Sampler(Settings(temp=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(600)} == {0, 1, 2}


def test_repeat_penalty_llama_cpp_rule():
    s = Sampler(Settings(temp=0, repeat_penalty=2.0, repeat_last_n=2))
    out = s.penalize(_logits(4.0, 3.0, -1.0, 0.5), [2, 0, 0])  # last 2 = {0}
    assert out.tolist() == [2.0, 3.0, -1.0, 0.5]
    out = Sampler(Settings(temp=0, repeat_penalty=2.0, repeat_last_n=-1)).penalize(_logits(4.0, 3.0, -1.0), [2, 0])
    assert out.tolist() == [2.0, 3.0, -2.0]
    assert s(_logits(4.0, 3.0, -1.0, 0.5), [0]) == 1


def test_settings_validation():
    from enc.errors import UsageError

    with pytest.raises(UsageError):
        Settings(top_p=1.5).validate()
    with pytest.raises(UsageError):
        Settings(max_new_tokens=-1).validate()


# ----------------------------------------------------------------------------- detokenization


def test_stream_decoder_multibyte_and_spaces(sp_tok):
    text = "Hello  wörld 🙂🤖 日本語\nnew line ✓ done"
    ids = sp_tok.encode(text).ids
    assert any(sp_tok.sp.IsByte(i) for i in ids)  # emoji come as byte-fallback pieces
    prompt, rest = ids[:3], ids[3:]
    dec = StreamDecoder(sp_tok, prompt)
    deltas = [dec.push(i) for i in rest] + [dec.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert sp_tok.decode(prompt) + "".join(deltas) == text


# ----------------------------------------------------------------------------- the loop


def test_greedy_equals_transformers_generate(model_dir, sp_tok):
    from enc.models.mistral import from_pretrained

    d, hf = model_dir
    prompt = sp_tok.encode("My favourite condiment is").ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    seen: list[int] = []
    res = generate(from_pretrained(d), sp_tok, prompt, Settings(max_new_tokens=24, temp=0, stop_ids=[]),
                   on_token=lambda t, s: seen.append(t))
    assert res.token_ids == want == seen
    assert res.generated_tokens == 24 and res.stop_reason == "length" and res.prompt_tokens == len(prompt)
    assert res.text == sp_tok.decode(prompt + want)[len(sp_tok.decode(prompt)):]
    assert res.decode_tokens_per_s > 0 and res.prefill_tokens_per_s > 0


def test_stops_at_eos_and_seeded_sampling(model_dir, sp_tok):
    from enc.models.mistral import from_pretrained

    d, _ = model_dir
    model = from_pretrained(d)
    prompt = sp_tok.encode("Once upon a time").ids
    first = generate(model, sp_tok, prompt, Settings(max_new_tokens=5, temp=0, stop_ids=[])).token_ids[0]
    res = generate(model, sp_tok, prompt, Settings(max_new_tokens=5, temp=0, stop_ids=[first]))
    assert res.token_ids == [first] and res.stop_reason == "eos"
    a = generate(model, sp_tok, prompt, Settings(max_new_tokens=12, temp=0.9, seed=123, stop_ids=[]))
    b = generate(model, sp_tok, prompt, Settings(max_new_tokens=12, temp=0.9, seed=123, stop_ids=[]))
    assert a.token_ids == b.token_ids and a.seed == 123


def test_render_chat(sp_tok):
    ids = render_chat(sp_tok, [{"role": "user", "content": "Hello world"}])
    # mistral-common v1 anchor: '<s>▁[INST]▁Hello▁world▁[/INST]'
    assert ids == [1, 733, 16289, 28793, 22557, 1526, 733, 28748, 16289, 28793]


def test_render_chat_v3_anchor():
    from enc.converters.mistral import CHAT_TEMPLATE_V3
    from tests.helpers.mistral_writer import TOKENIZER_V3

    tok = LlamaSentencePiece(TOKENIZER_V3, chat_template=CHAT_TEMPLATE_V3)
    assert render_chat(tok, [{"role": "user", "content": "Hello world"}]) == [1, 3, 23325, 2294, 4]


# ----------------------------------------------------------------------------- CLI


def test_cli_json_and_stream(model_dir, capsys):
    d, _ = model_dir
    rc = run(["generate", "My favourite condiment is", "--model", str(d), "-n", "8", "--temp", "0.7", "--seed", "0",
              "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["generated_tokens"] == 8 and len(res["token_ids"]) == 8 and res["seed"] == 0
    import sentencepiece as spm

    assert res["prompt_ids"] == [1] + spm.SentencePieceProcessor(model_file=str(TOKENIZER_V1)).encode(
        "My favourite condiment is")
    rc = run(["generate", "My favourite condiment is", "--model", str(d), "-n", "8", "--temp", "0.7", "--seed", "0"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out == res["text"] + "\n" and res["text"] == "My favourite condiment is" + res["generated_text"]
    assert "tok/s" in cap.err


def test_cli_chat_and_errors(model_dir, tmp_path, capsys):
    d, _ = model_dir
    rc = run(["generate", "Hi", "--model", str(d), "-n", "3", "--chat", "--temp", "0", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["prompt_ids"][:4] == [1, 733, 16289, 28793] and res["chat"] is True
    plain = tmp_path / "plain"
    shutil.copytree(d, plain)
    (plain / "tokenizer_config.json").unlink()
    rc = run(["generate", "Hi", "--model", str(plain), "--chat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no chat template" in err[0]
    rc = run(["generate", "Hi", "--model", str(d), "--top-p", "2"])
    assert rc == 2 and "--top-p" in capsys.readouterr().err
