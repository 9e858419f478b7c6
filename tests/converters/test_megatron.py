"""Megatron-LM BERT / GPT-2 -> HF: round trips through Megatron's layout, transformers as the peer, parity."""

from __future__ import annotations

import json
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
    tiny_gpt2,
    write_dir,
    write_gpt2_vocab,
    write_wordpiece_vocab,
)

H, N, L, V, P = 32, 4, 4, 128, 64  # hidden, heads, layers, padded vocab rows, positions
BERT_VOCAB, GPT2_VOCAB = 100, 120  # tokenizer sizes (< V: Megatron pads the embedding)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation (and stall on a busy machine)
    yield
    torch.set_num_threads(n)


# name: (kind, checkpoint_version, TP, PP, key spelling, args, container)
CASES = {
    "bert-v0-ngc-zip-noargs": ("bert", 0.0, 1, 1, "2020", False, "zip"),
    "bert-v1-tp2": ("bert", 1.0, 2, 1, "2020", True, "dir"),
    "bert-v3-tp4-2023names": ("bert", 3.0, 4, 1, "2023", True, "dir"),
    "bert-v3-tp2-pp2-iter": ("bert", 3.0, 2, 2, "2021", True, "iter"),
    "gpt2-v0-ngc-zip-noargs": ("gpt2", 0.0, 1, 1, "2020", False, "zip"),
    "gpt2-v1-tp2-legacy-pickle": ("gpt2", 1.0, 2, 1, "2020", True, "legacy"),
    "gpt2-v3-tp4": ("gpt2", 3.0, 4, 1, "2021", True, "dir"),
    "gpt2-v3-pp2": ("gpt2", 3.0, 1, 2, "2023", True, "dir"),
    "gpt2-mcore-tp2-deflated-zip": ("gpt2", 3.0, 2, 1, "mcore", True, "deflated"),
}


def _spec(kind, version, tp, pp, style, args, container) -> Spec:
    return Spec(kind, H, N, L, 2 * H if kind == "bert" else 3 * H, P, V, version=version, tp=tp, pp=pp, style=style,
                args=args, legacy_format=container == "legacy", iteration=1000 if container == "iter" else None)


def _vocab_args(kind: str, tmp: Path) -> list[str]:
    if kind == "bert":
        return ["--vocab", str(write_wordpiece_vocab(tmp / "bert-vocab.txt", BERT_VOCAB))]
    vocab, merges = write_gpt2_vocab(tmp / "gpt2-vocab.json", tmp / "gpt2-merges.txt", GPT2_VOCAB)
    return ["--vocab", str(vocab), "--merges", str(merges)]


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    kind, version, tp, pp, style, args, container = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = tiny_bert() if kind == "bert" else tiny_gpt2()
    spec = _spec(kind, version, tp, pp, style, args, container)
    src = write_dir(tmp / "ckpt", spec, hf_state(model))
    if container in ("zip", "deflated"):
        src = pack_zip(src, tmp / "megatron.zip", zipfile.ZIP_DEFLATED if container == "deflated" else zipfile.ZIP_STORED,
                       top="megatron_345m" if container == "deflated" else "")
    vocab = _vocab_args(kind, tmp)
    heads = [] if args else ["--num-heads", str(N)]  # head size 8: no args, so shapes cannot tell
    out = tmp / "hf"
    rc = run(["convert", str(src), "-o", str(out), "--json", *vocab, *heads])
    assert rc == 0
    return kind, model, src, out, vocab + heads, spec


def _probe_ids(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 6:] = 0
    types = torch.zeros_like(ids)
    types[0, 9:] = 1
    return ids, mask, types


def test_transformers_loads_output_and_matches_logits(converted):
    import transformers

    kind, model, _, out, _, _ = converted
    if kind == "bert":
        hf, info = transformers.MegatronBertForPreTraining.from_pretrained(out, output_loading_info=True)
        ids, mask, types = _probe_ids(BERT_VOCAB)
        with torch.no_grad():
            want = model(ids, attention_mask=mask, token_type_ids=types)
            got = hf.eval()(ids, attention_mask=mask, token_type_ids=types)
        m = mask.bool()
        assert got.prediction_logits.shape == (3, 20, V)  # BERT keeps the padded rows
        torch.testing.assert_close(got.prediction_logits[m], want.prediction_logits[m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.seq_relationship_logits, want.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    else:
        hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        ids, _, _ = _probe_ids(GPT2_VOCAB)
        vocab_out = hf.config.vocab_size
        assert vocab_out < V  # trimmed to the tokenizer
        ids = ids.clamp_max(vocab_out - 1)
        with torch.no_grad():
            want = model(ids).logits[..., :vocab_out]
            got = hf.eval()(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_tensors_equal_source_after_documented_transform(converted):
    from safetensors.torch import load_file

    kind, model, _, out, _, _ = converted
    sd = load_file(out / "model.safetensors")
    src = hf_state(model)
    if kind == "bert":
        # no transform but the merge: everything bit-identical, tied decoder written once
        assert set(sd) == set(src) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        for k, v in sd.items():
            assert torch.equal(v, src[k]), k
    else:
        n = json.loads((out / "config.json").read_text())["vocab_size"]
        assert "lm_head.weight" not in sd  # tied: written once
        assert torch.equal(sd["transformer.wte.weight"], src["transformer.wte.weight"][:n])
        for k, v in sd.items():
            if k != "transformer.wte.weight":
                assert torch.equal(v, src[k]), k


def test_output_layout_config_and_provenance(converted):
    kind, _, _, out, _, spec = converted
    files = sorted(p.name for p in out.iterdir())
    cfg = json.loads((out / "config.json").read_text())
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass" and prov["source"]["format"] == "megatron"
    assert prov["parity"]["dtype"] == "float32"
    if kind == "bert":
        assert files == ["config.json", "enc_parity.safetensors", "enc_provenance.json", "model.safetensors",
                         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
        assert cfg["architectures"] == ["MegatronBertForPreTraining"] and cfg["model_type"] == "megatron-bert"
        assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                cfg["intermediate_size"], cfg["max_position_embeddings"]) == (V, H, L, N, 2 * H, P)
        assert cfg["hidden_act"] == "gelu" and cfg["layer_norm_eps"] == 1e-5
    else:
        assert files == ["config.json", "enc_parity.safetensors", "enc_provenance.json", "generation_config.json",
                         "merges.txt", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                         "tokenizer_config.json", "vocab.json"]
        vocab = json.loads((out / "vocab.json").read_text())
        assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == len(vocab)
        assert cfg["eos_token_id"] == vocab["<|endoftext|>"] == cfg["bos_token_id"]
        assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_inner"], cfg["n_positions"]) == (H, L, N, 3 * H, P)
        assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen["eos_token_id"] == vocab["<|endoftext|>"]


def test_enc_parity_passes(converted, capsys):
    kind, _, src, out, vocab, _ = converted
    capsys.readouterr()
    extra = ["--num-heads", str(N)] if "--num-heads" in vocab else []
    rc = run(["parity", str(src), str(out), "--json", "--vocab", vocab[1], *extra])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["verdict"] == "pass"
    names = [r["name"] for r in report["rows"]]
    tail = ["final_norm", "mlm_logits", "nsp_logits"] if kind == "bert" else ["final_norm", "logits"]
    assert names == ["embeddings"] + [f"layer.{i}" for i in range(L)] + tail
    assert report["worst"]["nmse"] < 1e-10


def test_enc_models_runtime_matches_transformers(converted):
    """enc's own runtime on the converted directory (what fill-mask / generate use)."""
    from enc.models import load_model

    kind, model, _, out, _, _ = converted
    enc_model = load_model(out)
    if kind == "bert":
        ids, mask, types = _probe_ids(BERT_VOCAB)
        with torch.no_grad():
            want = model(ids, attention_mask=mask, token_type_ids=types)
            got = enc_model(ids, mask, types)
        m = mask.bool()
        torch.testing.assert_close(got["logits"][m], want.prediction_logits[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["seq_relationship_logits"], want.seq_relationship_logits, rtol=1e-4, atol=1e-4)
    else:
        ids, _, _ = _probe_ids(enc_model.config.vocab_size)
        with torch.no_grad():
            want = model(ids).logits[..., :enc_model.config.vocab_size]
            torch.testing.assert_close(enc_model(ids), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ wrong conversions


@pytest.fixture(scope="module")
def bert_v3_tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert_v3_tp2")
    model = tiny_bert(seed=5)
    src = write_dir(tmp / "ckpt", _spec("bert", 3.0, 2, 1, "2021", True, "dir"), hf_state(model))
    vocab = write_wordpiece_vocab(tmp / "vocab.txt", BERT_VOCAB)
    out = tmp / "hf"
    assert run(["convert", str(src), "-o", str(out), "--vocab", str(vocab)]) == 0
    return model, src, out, vocab


def test_converter_ignoring_qkv_order_fails_parity_and_publishes_nothing(bert_v3_tp2, tmp_path, monkeypatch, capsys):
    from enc.converters.megatron import tables

    _, src, _, vocab = bert_v3_tp2
    monkeypatch.setattr(tables, "qkv_rows_to_hf", lambda t, version, heads: t)  # treat v3 rows as v0 order
    out = tmp_path / "wrong"
    capsys.readouterr()
    rc = run(["convert", str(src), "-o", str(out), "--vocab", str(vocab), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 1 and not out.exists() and not list(tmp_path.glob(".wrong*"))
    assert result["parity"]["verdict"] == "fail" and result["parity"]["first_failure"] == "layer.0"
    assert result["parity"]["rows"][0]["passed"]  # the embeddings are still right


def test_parity_detects_swapped_query_key_in_converted_output(bert_v3_tp2, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    _, src, out, vocab = bert_v3_tp2
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sd = load_file(bad / "model.safetensors")
    q, k = "bert.encoder.layer.2.attention.self.query.weight", "bert.encoder.layer.2.attention.self.key.weight"
    sd[q], sd[k] = sd[k].clone(), sd[q].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    rc = run(["parity", str(src), str(bad), "--json", "--vocab", str(vocab)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["first_failure"] == "layer.2"
    assert [r["passed"] for r in report["rows"][:3]] == [True, True, True]  # embeddings, layer.0, layer.1


def test_parity_detects_heads_permuted_within_fused_qkv(tmp_path, capsys):
    """A per-head permutation that keeps each of q/k/v in place (right split, wrong head order) also fails."""
    from safetensors.torch import load_file, save_file

    model = tiny_gpt2(seed=9)
    src = write_dir(tmp_path / "ckpt", _spec("gpt2", 2.0, 1, 1, "2020", True, "dir"), hf_state(model))
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out)]) == 0
    sd = load_file(out / "model.safetensors")
    w = sd["transformer.h.0.attn.c_attn.weight"]  # [in, 3 * heads * hd]
    perm = w.view(H, 3, N, H // N)[:, :, [1, 0, 2, 3]]  # swap heads 0 and 1 in q, k and v alike
    sd["transformer.h.0.attn.c_attn.weight"] = perm.reshape(H, 3 * H).contiguous()
    b = sd["transformer.h.0.attn.c_attn.bias"].view(3, N, H // N)[:, [1, 0, 2, 3]]
    sd["transformer.h.0.attn.c_attn.bias"] = b.reshape(-1).contiguous()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    # the heads' outputs now reach c_proj in the wrong columns
    rc = run(["parity", str(src), str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["first_failure"] == "layer.0"


# ------------------------------------------------------------------------------------ config without args


def test_gpt2_without_args_or_vocab_assumes_heads_and_warns(tmp_path, capsys):
    model = tiny_gpt2(seed=2, hidden=128, heads=2)  # head size 64: the assumption holds
    spec = Spec("gpt2", 128, 2, L, 384, P, V, version=0.0, args=False)
    src = pack_zip(write_dir(tmp_path / "ckpt", spec, hf_state(model)), tmp_path / "m.zip")
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(tmp_path / "hf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("assumed 2 attention heads" in w for w in result["warnings"])
    assert any("no tokenizer" in w and "--merges" in w for w in result["warnings"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == V and cfg["n_head"] == 2 and cfg["activation_function"] == "gelu_new"
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_num_heads_flag_when_shapes_cannot_tell(tmp_path, capsys):
    model = tiny_bert(seed=4)  # 4 heads of 8: the head-size-64 guess would be wrong (and not divide)
    src = write_dir(tmp_path / "ckpt", _spec("bert", 2.0, 1, 1, "2020", False, "dir"), hf_state(model))
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(tmp_path / "no"), "--json"]) == 2
    assert "--num-heads" in capsys.readouterr().err
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--num-heads", "4"]) == 0
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 4
    assert run(["parity", str(src), str(out), "--num-heads", "4"]) == 0
    assert run(["parity", str(src), str(out), "--num-heads", "2"]) == 1  # version 2 rows read with 2 heads


def test_dry_run_prints_the_recipe(bert_v3_tp2, capsys):
    _, src, _, _ = bert_v3_tp2
    capsys.readouterr()
    assert run(["convert", str(src), "-o", "/nonexistent/x", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["hf"]: r for r in plan["map"]}
    q = rows["bert.encoder.layer.0.attention.self.query.weight"]
    assert q["sources"] == ["mp_rank_00/model.language_model.encoder.layers.0.self_attention.query_key_value.weight",
                            "mp_rank_01/model.language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    assert "qkv v3" in q["recipe"] and "q = rows 0/3" in q["recipe"]
    assert "cat ranks dim 1" in rows["bert.encoder.layer.0.output.dense.weight"]["recipe"]
    assert set(plan["dropped"].values()) >= {"optimizer state", "random-number-generator state"}


def test_inspect_original(bert_v3_tp2, capsys):
    _, src, _, _ = bert_v3_tp2
    capsys.readouterr()
    assert run(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    s = info["summary"]
    assert info["format"] == "megatron" and s["model"] == "bert" and s["tensor_parallel"] == 2
    assert s["checkpoint_version"] == 3.0 and s["args"]["num_attention_heads"] == N


def test_fp16_output_passes_parity(bert_v3_tp2, tmp_path):
    _, src, _, vocab = bert_v3_tp2
    out = tmp_path / "fp16"
    assert run(["convert", str(src), "-o", str(out), "--vocab", str(vocab), "--dtype", "float16"]) == 0
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass" and prov["parity"]["dtype"] == "float16"


def test_sharded_output(bert_v3_tp2, tmp_path):
    import transformers

    model, src, _, vocab = bert_v3_tp2
    out = tmp_path / "sharded"
    assert run(["convert", str(src), "-o", str(out), "--vocab", str(vocab), "--shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = transformers.MegatronBertForPreTraining.from_pretrained(out).eval()
    ids = torch.randint(0, BERT_VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).prediction_logits, model(ids).prediction_logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ serving


def test_fill_mask_on_converted_megatron_bert(bert_v3_tp2, capsys):
    from enc.tokenization import load_tokenizer

    model, _, out, _ = bert_v3_tp2
    text = "The capital of France is [MASK]."
    capsys.readouterr()
    assert run(["fill-mask", text, "--model", str(out), "--top-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    tok = load_tokenizer(out)
    ids = tok.encode(text).ids
    pos = ids.index(tok.mask_id)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).prediction_logits[0, pos, :BERT_VOCAB]  # real tokens only
    probs = logits.softmax(-1)
    top = probs.topk(5)
    preds = res["masks"][0]["predictions"]
    assert [p["token"] for p in preds] == top.indices.tolist()
    assert [p["score"] for p in preds] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert preds[0]["sequence"].startswith("the capital of france is")


def test_generate_greedy_equals_transformers(tmp_path):
    import transformers

    from enc.generation import Settings, generate
    from enc.models import load_model
    from enc.tokenization import load_tokenizer

    model = tiny_gpt2(seed=11)
    src = write_dir(tmp_path / "ckpt", _spec("gpt2", 3.0, 2, 1, "2020", True, "dir"), hf_state(model))
    vocab = _vocab_args("gpt2", tmp_path)
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), *vocab]) == 0
    tok = load_tokenizer(out)
    prompt = tok.encode("Hello the world is").ids
    assert tok.bos_id not in prompt  # GPT-2 adds no BOS
    res = generate(load_model(out), tok, prompt, Settings(max_new_tokens=24, temp=0.0, ignore_eos=True))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                       pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    assert res.token_ids == want
    assert res.text == tok.decode(want)


def test_generate_cli_streams_and_json(tmp_path, capsys):
    model = tiny_gpt2(seed=12)
    src = write_dir(tmp_path / "ckpt", _spec("gpt2", 3.0, 1, 1, "2020", True, "dir"), hf_state(model))
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), *_vocab_args("gpt2", tmp_path)]) == 0
    args = ["generate", "The world is", "--model", str(out), "-n", "12", "--temp", "0.8", "--top-k", "40", "--seed", "1"]
    capsys.readouterr()
    assert run(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated_tokens"] <= 12 and result["seed"] == 1
    assert run(args) == 0
    streamed = capsys.readouterr().out
    assert streamed == result["text"] + "\n" == "The world is" + result["generated_text"] + "\n"  # same seed, same tokens


# ------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize("cased", [False, True])
def test_wordpiece_tokenizer_matches_transformers(tmp_path, cased):
    import transformers

    from enc.tokenization import load_tokenizer

    model = tiny_bert(seed=6)
    src = write_dir(tmp_path / "ckpt", _spec("bert", 0.0, 1, 1, "2020", False, "dir"), hf_state(model))
    name = "bert-large-cased-vocab.txt" if cased else "bert-large-uncased-vocab.txt"
    vocab = write_wordpiece_vocab(tmp_path / name, BERT_VOCAB, cased=cased)
    out = tmp_path / "hf"
    assert run(["convert", str(src), "-o", str(out), "--vocab", str(vocab), "--num-heads", str(N)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is (not cased)
    ours = load_tokenizer(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.BertTokenizer(str(vocab), do_lower_case=not cased)
    for text, pair in [("The capital of France is [MASK].", None), ("Hello  WORLD, it was unable!", "the dog runs"),
                       ("Paris is a big city in Europe", "Red cat?")]:
        enc = ours.encode(text, pair)
        want = theirs(text, pair, return_offsets_mapping=True)
        assert enc.ids == want["input_ids"] == reference(text, pair)["input_ids"]
        assert enc.token_type_ids == want["token_type_ids"]
        assert enc.offsets == [tuple(o) for o in want["offset_mapping"]]
        assert ours.decode(enc.ids) == theirs.decode(enc.ids, skip_special_tokens=True)
    assert (ours.cls_id, ours.sep_id, ours.mask_id, ours.pad_id, ours.vocab_size) == (2, 3, 4, 0, BERT_VOCAB)


def test_bpe_tokenizer_matches_transformers_and_streams(tmp_path):
    import transformers

    from enc.tokenization import HFTokenizer, load_tokenizer

    vocab, merges = write_gpt2_vocab(tmp_path / "vocab.json", tmp_path / "merges.txt", GPT2_VOCAB)
    HFTokenizer.gpt2_bpe(vocab, merges).save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    reference = transformers.GPT2Tokenizer(str(vocab), str(merges))
    for text in ["Hello the world is life, me and it!", "  two  spaces, and more", "It is the end."]:
        enc = ours.encode(text)
        assert enc.ids == reference(text)["input_ids"]
        assert ours.decode(enc.ids) == text
        stream = ours.decode_stream()
        assert "".join(stream.step(i) for i in enc.ids) + stream.flush() == text
    assert ours.eos_id == ours.bos_id == json.loads(vocab.read_text())["<|endoftext|>"]
    assert ours.encode("<|endoftext|>").ids == [ours.eos_id]


def test_bert_with_bias_gelu_fusion_is_converted_with_tanh_gelu_and_warns(tmp_path, capsys):
    """Megatron's fused bias-GELU (tanh) runs in the MLPs only; its LM head keeps the exact GELU.
    HF has one hidden_act: enc picks gelu_new, says so, and parity shows where the two differ."""
    model = tiny_bert(seed=8)  # weights only: the activations come from args
    spec = _spec("bert", 3.0, 1, 1, "2021", True, "dir")
    spec.extra = {"bias_gelu_fusion": True}
    src = write_dir(tmp_path / "ckpt", spec, hf_state(model))
    out = tmp_path / "hf"
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(out), "--no-verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("bias_gelu_fusion" in w for w in result["warnings"])
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu_new"
    assert run(["parity", str(src), str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_failure"] == "mlm_logits"  # every layer (tanh MLPs) matches; only the head differs
    assert report["rows"][-1]["name"] == "nsp_logits" and report["rows"][-1]["passed"]
