"""BertGeneration TF-Hub modules (bert2bert) -> HF EncoderDecoderModel, against TensorFlow's own outputs.

The fixtures were written by real TensorFlow (tests/fixtures/bertgen/make_fixtures.py), which also
saved the forward pass it computed (NAME.npz). transformers is the peer that loads the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "bertgen"
ACT = {"separate": "gelu", "shared": "gelu_new"}  # the GELU form each fixture was written with


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def convert(layout: str, out: Path, *extra: str) -> int:
    return run(["convert", str(FIX / layout), "-o", str(out), "--num-heads", "4", *extra])


@pytest.fixture(scope="module", params=["separate", "shared"])
def converted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "hf"
    assert convert(request.param, out, "--hidden-act", ACT[request.param], "--json") == 0
    return request.param, out


def _tf(layout: str) -> dict:
    return dict(np.load(FIX / f"{layout}.npz"))


def _hf_logits(out: Path, d: dict):
    from transformers import EncoderDecoderModel

    model, info = EncoderDecoderModel.from_pretrained(str(out), output_loading_info=True)
    assert {k: set(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    with torch.no_grad():
        o = model.eval()(input_ids=torch.tensor(d["enc_ids"]), attention_mask=torch.tensor(d["enc_mask"]),
                         decoder_input_ids=torch.tensor(d["dec_ids"]))
    return o.encoder_last_hidden_state.numpy(), o.logits.numpy()


def test_transformers_reproduces_tensorflow_logits(converted):
    layout, out = converted
    d = _tf(layout)
    enc, logits = _hf_logits(out, d)
    real = d["enc_mask"].astype(bool)
    assert np.abs(enc - d["encoder_out"])[real].max() < 1e-4
    assert np.abs(logits - d["logits"]).max() < 1e-4
    assert (logits.argmax(-1) == d["logits"].argmax(-1)).all()


def test_output_files_and_configs(converted):
    layout, out = converted
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "enc_parity.safetensors", "enc_provenance.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "encoder-decoder" and cfg["architectures"] == ["EncoderDecoderModel"]
    enc, dec = cfg["encoder"], cfg["decoder"]
    assert (enc["vocab_size"], enc["hidden_size"], enc["num_hidden_layers"], enc["num_attention_heads"],
            enc["intermediate_size"], enc["max_position_embeddings"]) == (86, 32, 2, 4, 64, 40)
    assert enc["hidden_act"] == dec["hidden_act"] == ACT[layout]
    assert dec["is_decoder"] and dec["add_cross_attention"] and not enc["is_decoder"]
    assert cfg["tie_encoder_decoder"] is (layout == "shared")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"decoder_start_token_id": 2, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass" and prov["source"]["format"] == "bertgeneration_tf"
    assert prov["dropped_source_tensors"] == 1  # global_step


def test_tensors_equal_the_tf_variables(converted):
    from safetensors.torch import load_file

    from enc.io.tf_checkpoint import TFCheckpoint

    layout, out = converted
    sd = load_file(str(out / "model.safetensors"))
    ck = TFCheckpoint(FIX / layout / "variables" / "variables")
    tf = "module/bert/"
    word = torch.from_numpy(ck.read(tf + "embeddings/word_embeddings"))
    assert torch.equal(sd["encoder.embeddings.word_embeddings.weight"], word)
    assert torch.equal(sd["decoder.bert.embeddings.word_embeddings.weight"], word)
    assert "decoder.lm_head.decoder.weight" not in sd  # tied: written once
    assert torch.equal(sd["decoder.lm_head.bias"], torch.zeros(86))
    dec_stack = "decoder" if layout == "separate" else "encoder"
    q = torch.from_numpy(ck.read(tf + f"{dec_stack}/layer_1/attention/self/query/kernel"))
    assert torch.equal(sd["decoder.bert.encoder.layer.1.attention.self.query.weight"], q.t())
    x = torch.from_numpy(ck.read(tf + "decoder/layer_0/attention/encdec_output/dense/kernel"))
    assert torch.equal(sd["decoder.bert.encoder.layer.0.crossattention.output.dense.weight"], x.t())
    if layout == "shared":  # one stack read by both halves
        assert torch.equal(sd["encoder.encoder.layer.1.output.dense.weight"],
                           sd["decoder.bert.encoder.layer.1.output.dense.weight"])


def test_tokenizer_loads_in_transformers(converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    _, out = converted
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__ == "BertGenerationTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "separate" / "assets" / "spm.model"))
    text = "the quick brown fox reads a sentence"
    assert tok(text).input_ids == sp.encode(text)  # no special tokens added
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_wrong_gelu_form_is_visible_against_tensorflow(tmp_path):
    out = tmp_path / "hf"
    assert convert("separate", out, "--hidden-act", "gelu_new") == 0  # the module used erf
    d = _tf("separate")
    _, logits = _hf_logits(out, d)
    assert np.abs(logits - d["logits"]).max() > 1e-3


def test_parity_cli_passes_and_catches_a_broken_output(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    layout, out = converted
    capsys.readouterr()
    assert run(["parity", str(FIX / layout), str(out), "--num-heads", "4", "--hidden-act", ACT[layout],
                "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rep["rows"]]
    assert names == ["encoder.embeddings", "encoder.layer.0", "encoder.layer.1", "decoder.embeddings",
                     "decoder.layer.0", "decoder.layer.1", "logits"]
    assert rep["verdict"] == "pass" and rep["worst"]["max_abs"] < 1e-4
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sd = load_file(str(broken / "model.safetensors"))
    k = "decoder.bert.encoder.layer.0.crossattention.self.value.weight"
    sd[k] = sd[k].t().contiguous()  # a missing transpose in the cross-attention
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert run(["parity", str(FIX / layout), str(broken), "--num-heads", "4", "--hidden-act", ACT[layout],
                "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["first_failure"] == "decoder.layer.0"


@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_part_encoder_and_decoder(layout, tmp_path):
    from transformers import BertGenerationDecoder, BertGenerationEncoder

    d = _tf(layout)
    act = ["--hidden-act", ACT[layout]]
    assert convert(layout, tmp_path / "enc", "--part", "encoder", *act) == 0
    assert convert(layout, tmp_path / "dec", "--part", "decoder", *act) == 0
    enc, info = BertGenerationEncoder.from_pretrained(str(tmp_path / "enc"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dec, info = BertGenerationDecoder.from_pretrained(str(tmp_path / "dec"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["BertGenerationEncoder"]
    assert not (tmp_path / "enc" / "generation_config.json").exists()
    with torch.no_grad():
        h = enc.eval()(input_ids=torch.tensor(d["enc_ids"]), attention_mask=torch.tensor(d["enc_mask"]))[0]
        real = d["enc_mask"].astype(bool)
        assert np.abs(h.numpy() - d["encoder_out"])[real].max() < 1e-4
        logits = dec.eval()(input_ids=torch.tensor(d["dec_ids"]), encoder_hidden_states=h,
                            encoder_attention_mask=torch.tensor(d["enc_mask"])).logits
    assert np.abs(logits.numpy() - d["logits"]).max() < 1e-4


def test_heads_default_needs_a_multiple_of_64(tmp_path, capsys):
    capsys.readouterr()
    assert run(["convert", str(FIX / "shared"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--num-heads" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- bad input: exit 2, one line


def _fails(capsys, args, *needles):
    capsys.readouterr()
    rc = run(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _copy(layout: str, dst: Path) -> Path:
    shutil.copytree(FIX / layout, dst)
    return dst


def test_module_without_variables(tmp_path, capsys):
    mod = _copy("shared", tmp_path / "mod")
    shutil.rmtree(mod / "variables")
    _fails(capsys, ["convert", str(mod), "-o", str(tmp_path / "out"), "--num-heads", "4"], "variables")
    assert not (tmp_path / "out").exists()


def test_corrupted_shard(tmp_path, capsys):
    mod = _copy("shared", tmp_path / "mod")
    data = mod / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    _fails(capsys, ["convert", str(mod), "-o", str(tmp_path / "out"), "--num-heads", "4"], "truncated")
    assert not (tmp_path / "out").exists()
    mod2 = _copy("separate", tmp_path / "mod2")
    data = mod2 / "variables" / "variables.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF  # flipped bits inside a tensor: the crc32c check fails
    data.write_bytes(bytes(raw))
    _fails(capsys, ["convert", str(mod2), "-o", str(tmp_path / "out2"), "--num-heads", "4"], "variables.data")
    assert not (tmp_path / "out2").exists()


def test_unknown_architecture(tmp_path, capsys):
    from tests.helpers.tf_bundle import write_bundle

    mod = tmp_path / "mod"
    (mod / "assets").mkdir(parents=True)
    (mod / "tfhub_module.pb").write_bytes(b"\x08\x03")
    write_bundle(mod / "variables" / "variables", {"module/resnet/conv1/kernel": np.zeros((3, 3), np.float32)})
    _fails(capsys, ["convert", str(mod), "-o", str(tmp_path / "out")], "not a checkpoint enc recognises")
    _fails(capsys, ["convert", str(mod), "-o", str(tmp_path / "out"), "--from", "bertgeneration_tf"], "bertseq2seq")
    # a bert2bert module with one variable no rule knows
    mod2 = _copy("shared", tmp_path / "mod2")
    from enc.io.tf_checkpoint import TFCheckpoint

    ck = TFCheckpoint(mod2 / "variables" / "variables")
    tensors = {k: ck.read(k) for k in ck.keys()}
    tensors["module/bert/decoder/layer_0/attention/mystery/kernel"] = np.zeros((2, 2), np.float32)
    shutil.rmtree(mod2 / "variables")
    write_bundle(mod2 / "variables" / "variables", tensors)
    _fails(capsys, ["convert", str(mod2), "-o", str(tmp_path / "out2"), "--num-heads", "4"], "mystery")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_detection_keeps_albert_hub_modules_apart(tmp_path):
    from enc.converters import detect

    assert detect(FIX / "separate").name == "bertgeneration_tf"
    assert detect(FIX / "shared").name == "bertgeneration_tf"
    hub = _copy("shared", tmp_path / "albert_like")
    (hub / "assets" / "albert_config.json").write_text("{}")
    from enc.converters.bertgeneration_tf import BertGenerationTFConverter

    assert not BertGenerationTFConverter.detect(hub)
    tf_fix = FIX.parent / "tf" / "hub_module"  # the ALBERT-named SavedModel of the TF reader tests
    assert not BertGenerationTFConverter.detect(tf_fix)
