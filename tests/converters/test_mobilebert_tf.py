"""MobileBERT TF checkpoints -> HF: geometries against transformers, parity, detection, bad input."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run
from tests.helpers.mobilebert_release import WORDS, hf_mobilebert, tf_variables, write_release

GEOMETRIES = {
    # the OPT release's shape: bottleneck, shared key/query bottleneck, 4 FFNs, trigram, no_norm, no pooler
    "opt-F4": dict(),
    # BERT-like: no bottleneck, 1 FFN, no trigram, E == H (no embedding_transformation, no extra weights),
    # real LayerNorm, TF gelu, tanh pooler
    "plain-F1-layernorm": dict(use_bottleneck=False, trigram_input=False, embedding_size=32, num_feedforward_networks=1,
                               normalization_type="layer_norm", hidden_act="gelu_new", classifier_activation=True),
    # bottleneck feeding q, k and v (use_bottleneck_attention), no shared bottleneck, 2 FFNs, E != H without trigram
    "bottleneck-attention-F2": dict(use_bottleneck_attention=True, key_query_shared_bottleneck=False,
                                    num_feedforward_networks=2, trigram_input=False, classifier_activation=True),
    # shared bottleneck with real LayerNorm, 3 FFNs, relu6 (the QAT activation)
    "shared-F3-layernorm-relu6": dict(num_feedforward_networks=3, normalization_type="layer_norm", hidden_act="relu6",
                                      num_hidden_layers=3),
    # no bottleneck but trigram input, no_norm, 2 FFNs
    "plain-trigram-F2": dict(use_bottleneck=False, num_feedforward_networks=2, num_attention_heads=4),
}


def _inputs(vocab: int = 34):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


def _convert(src: Path, out: Path, *extra: str) -> int:
    return run(["convert", str(src), "-o", str(out), "--json", *extra])


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = hf_mobilebert(**GEOMETRIES[request.param])
    src = write_release(tmp / "release", model)
    out = tmp / "hf"
    assert _convert(src, out) == 0
    return model, src, out


def test_transformers_loads_with_no_missing_keys_and_matches(converted):
    from transformers import MobileBertForPreTraining

    model, _, out = converted
    hf, info = MobileBertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    ids, mask, types = _inputs()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    m = mask.bool()
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(y[m], x[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.prediction_logits[m], a.prediction_logits[m], rtol=0, atol=1e-4)
    torch.testing.assert_close(b.seq_relationship_logits, a.seq_relationship_logits, rtol=0, atol=1e-4)


def test_enc_runtime_equals_transformers(converted):
    from enc.models.mobilebert import from_pretrained

    model, _, out = converted
    ids, mask, types = _inputs()
    enc_model = from_pretrained(out)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = enc_model(ids, mask, types)
    m = mask.bool()
    torch.testing.assert_close(b["logits"][m], a.prediction_logits[m], rtol=0, atol=1e-4)
    torch.testing.assert_close(b["seq_relationship_logits"], a.seq_relationship_logits, rtol=0, atol=1e-4)


def test_layout_config_provenance_and_exact_tensors(converted):
    from safetensors.torch import load_file

    model, src, out = converted
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "enc_parity.safetensors", "enc_provenance.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mobilebert" and cfg["architectures"] == ["MobileBertForPreTraining"]
    for k in ("num_feedforward_networks", "normalization_type", "trigram_input", "use_bottleneck",
              "key_query_shared_bottleneck", "classifier_activation", "embedding_size", "intra_bottleneck_size"):
        assert cfg[k] == getattr(model.config, k), k
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass" and prov["source"]["format"] == "mobilebert_tf"
    n_vars = len(tf_variables(model))
    assert prov["dropped_source_tensors"] == 2 * n_vars + 1  # adam_m + adam_v per variable, and global_step
    sd = load_file(str(out / "model.safetensors"))
    assert "cls.predictions.decoder.weight" not in sd and "cls.predictions.decoder.bias" not in sd  # tied
    ref = model.state_dict()
    unused = not model.config.trigram_input and model.config.embedding_size == model.config.hidden_size
    for k, v in sd.items():
        if unused and k.startswith("mobilebert.embeddings.embedding_transformation."):
            # TF has none when E == H without trigrams; transformers' unused one is written as the identity
            assert torch.equal(v, torch.eye(32) if k.endswith("weight") else torch.zeros(32)), k
            continue
        assert torch.equal(v, ref[k]), k


def test_opt_transforms_are_explicit_in_the_dry_run(tmp_path, capsys):
    model = hf_mobilebert(seed=2)
    qat = "bert/encoder/layer_0/attention/self/query/MobileBertWeightFakeQuantWithMinMaxVars/max"
    extra = {"teacher/bert/embeddings/word_embeddings": np.zeros((40, 16), np.float32),
             qat: np.array(6.0, np.float32)}
    src = write_release(tmp_path / "r", model, extra=extra)
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(tmp_path / "o"), "--dry-run", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "o").exists()
    rows = {r["hf"]: r for r in res["map"]}
    assert rows["cls.predictions.dense.weight"]["sources"] == ["cls/predictions/extra_output_weights"]
    assert rows["cls.predictions.dense.weight"]["recipe"] == "transpose"
    assert rows["cls.predictions.dense.weight"]["shape"] == [16, 40]
    assert rows["mobilebert.encoder.layer.1.ffn.2.output.LayerNorm.weight"]["sources"] == [
        "bert/encoder/layer_1/ffn_layer_2/output/FakeLayerNorm/gamma"]
    assert rows["mobilebert.encoder.layer.0.attention.self.value.weight"]["shape"] == [16, 32]  # reads the 32-wide input
    assert rows["cls.seq_relationship.weight"]["recipe"] == "copy"
    assert "mobilebert.pooler.dense.weight" not in rows  # classifier_activation false: no pooler
    why = res["dropped"]
    assert why["global_step"] == "training step counter"
    assert why["bert/embeddings/word_embeddings/adam_m"] == "Adam optimizer slot"
    assert why["teacher/bert/embeddings/word_embeddings"].startswith("distillation teacher")
    assert why[qat] == "quantization-aware-training range"


@pytest.mark.parametrize("what", ["transposed-query", "swapped-bottleneck", "nonorm-gamma-beta"])
def test_a_broken_conversion_fails_parity(tmp_path, capsys, what):
    from safetensors.torch import load_file, save_file

    model = hf_mobilebert(seed=3)
    src = write_release(tmp_path / "r", model)
    out = tmp_path / "o"
    assert _convert(src, out) == 0
    sd = load_file(str(out / "model.safetensors"))
    L = "mobilebert.encoder.layer.1."
    if what == "transposed-query":
        sd[L + "attention.self.query.weight"] = sd[L + "attention.self.query.weight"].t().contiguous()
    elif what == "swapped-bottleneck":
        a, b = L + "bottleneck.input.dense.weight", L + "bottleneck.attention.dense.weight"
        sd[a], sd[b] = sd[b], sd[a]
    else:
        a, b = L + "output.LayerNorm.weight", L + "output.LayerNorm.bias"
        sd[a], sd[b] = sd[b], sd[a]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert run(["parity", str(src), str(out), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"] == "fail" and rep["first_failure"] == "layer.1"
    assert all(r["passed"] for r in rep["rows"] if r["name"] in ("embeddings", "layer.0"))


def test_parity_command_passes_and_reports_every_layer(tmp_path, capsys):
    model = hf_mobilebert(seed=4)
    src = write_release(tmp_path / "r", model)
    out = tmp_path / "o"
    assert _convert(src, out, "--no-verify") == 0
    capsys.readouterr()
    assert run(["parity", str(src), str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rep["rows"]]
    # three unpadded probe batches, each through every layer
    assert names == ["embeddings", "layer.0", "layer.1", "mlm_logits", "nsp_logits"] * 3
    assert rep["format"] == "mobilebert_tf" and rep["worst"]["nmse"] < 1e-10


def test_input_forms_prefix_index_state_file_and_tarball(tmp_path):
    from safetensors.torch import load_file

    model = hf_mobilebert(seed=5)
    src = write_release(tmp_path / "r", model, config_name="uncased_L-24_H-128_B-512_A-4_F-4_OPT.json",
                        num_shards=2)
    (src / "checkpoint").write_text('model_checkpoint_path: "/gone/elsewhere/mobilebert.ckpt"\n')
    ref = None
    forms = {"dir": src, "prefix": src / "mobilebert.ckpt", "index": src / "mobilebert.ckpt.index"}
    tgz = tmp_path / "uncased_L-24_H-128_B-512_A-4_F-4_OPT.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="mobilebert")
    forms["tarball"] = tgz
    for name, path in forms.items():
        out = tmp_path / f"o-{name}"
        assert _convert(path, out) == 0, name
        sd = load_file(str(out / "model.safetensors"))
        if ref is None:
            ref = sd
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd), name


def test_detection_by_variable_names_and_config_fields(tmp_path, capsys):
    from enc.converters import detect
    from tests.helpers.albert_release import hf_albert
    from tests.helpers.albert_release import write_release as write_albert

    model = hf_mobilebert(seed=6)
    no_cfg = write_release(tmp_path / "nocfg", model, config_name="")
    assert detect(no_cfg).name == "mobilebert_tf"  # by its variable names
    cfg_file = tmp_path / "cfg.json"
    write_release(tmp_path / "withcfg", model, config_name="cfg.json")
    (tmp_path / "withcfg" / "cfg.json").rename(cfg_file)
    capsys.readouterr()
    assert _convert(no_cfg, tmp_path / "o1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MobileBERT config JSON found" in err[0] and "--config FILE" in err[0]
    assert not (tmp_path / "o1").exists()
    assert _convert(no_cfg, tmp_path / "o2", "--config", str(cfg_file)) == 0
    assert run(["parity", str(no_cfg), str(tmp_path / "o2"), "--config", str(cfg_file)]) == 0
    # an ALBERT release is not MobileBERT, and the other way round
    from tests.helpers.albert_release import train_spm

    albert = write_albert(tmp_path / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 64), train_spm(tmp_path / "spm"))
    assert detect(albert).name == "albert_tf"
    assert detect(write_release(tmp_path / "with", model)).name == "mobilebert_tf"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    model = hf_mobilebert(seed=7)
    out = tmp_path / "out"

    src = write_release(tmp_path / "novocab", model)
    (src / "vocab.txt").unlink()
    capsys.readouterr()
    assert _convert(src, out) == 2
    assert "vocab.txt" in (line := _one_line(capsys)) and "--vocab" in line

    src = write_release(tmp_path / "mismatch", model)
    cfg = json.loads((src / "bert_config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "bert_config.json").write_text(json.dumps(cfg))
    assert _convert(src, out) == 2
    line = _one_line(capsys)
    assert "bert_config.json" in line and "the config disagrees with the checkpoint" in line

    src = write_release(tmp_path / "normkind", model)
    cfg = json.loads((src / "bert_config.json").read_text())
    cfg["normalization_type"] = "layer_norm"
    (src / "bert_config.json").write_text(json.dumps(cfg))
    assert _convert(src, out) == 2
    assert "normalization_type is layer_norm but the checkpoint has" in _one_line(capsys)

    src = write_release(tmp_path / "truncated", model)
    data = src / "mobilebert.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    assert _convert(src, out) == 2
    assert "mobilebert.ckpt" in _one_line(capsys)

    src = write_release(tmp_path / "unknown", model, extra={"bert/encoder/layer_0/mystery/kernel": np.ones((2, 2),
                                                                                                       np.float32)})
    assert _convert(src, out) == 2
    assert "bert/encoder/layer_0/mystery/kernel" in _one_line(capsys)

    src = write_release(tmp_path / "badvocab", model)
    (src / "vocab.txt").write_text("\n".join(WORDS + [f"w{i}" for i in range(20)]) + "\n")  # 54 > vocab_size 40
    assert _convert(src, out) == 2
    assert "vocab.txt" in _one_line(capsys)
    assert not out.exists()


def test_tokenizer_matches_transformers_mobilebert_tokenizers(tmp_path):
    from transformers import AutoTokenizer, MobileBertTokenizerFast

    from enc.tokenization import load_tokenizer

    src = write_release(tmp_path / "r", hf_mobilebert(seed=8))
    out = tmp_path / "o"
    assert _convert(src, out) == 0
    enc_tok = load_tokenizer(out)
    fast = MobileBertTokenizerFast(vocab=str(src / "vocab.txt"), do_lower_case=True)  # transformers builds its own
    auto = AutoTokenizer.from_pretrained(out)
    texts = ["The capital of France is Paris.", "A dog runs, and a cat sat on the mat!", "Hello   WORLD\tmobilebert",
             "the sun rises in the east [MASK].", "Dogs running: small, fast models", "unknown words héllo"]
    for t in texts:
        ids = enc_tok.encode(t).ids
        assert ids == fast(t)["input_ids"] == auto(t)["input_ids"], t
        assert enc_tok.decode(ids) == fast.decode(ids, skip_special_tokens=True), t
    pair = enc_tok.encode("the dog", "sat on the mat")
    assert pair.ids == fast("the dog", "sat on the mat")["input_ids"]
    assert pair.token_type_ids == fast("the dog", "sat on the mat")["token_type_ids"]
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_layer_norm_models_report_transformers_eps_difference(tmp_path, capsys):
    """transformers' MobileBERT hard-codes eps 1e-5 in two LayerNorms (TF: 1e-12): with realistic small
    weights parity measures it and fails honestly; --no-verify writes the exact weights with a warning."""
    model = hf_mobilebert(seed=9, std=0.05, use_bottleneck=False, trigram_input=False, embedding_size=32,
                          num_feedforward_networks=1, normalization_type="layer_norm")
    src = write_release(tmp_path / "r", model)
    capsys.readouterr()
    assert _convert(src, tmp_path / "o") == 1
    res = json.loads(capsys.readouterr().out)
    assert res["parity"]["first_failure"] == "embeddings" and not (tmp_path / "o").exists()
    assert 1e-8 < res["parity"]["rows"][0]["nmse"] < 1e-5
    assert _convert(src, tmp_path / "o", "--no-verify") == 0
    assert "eps 1e-5" in " ".join(json.loads(capsys.readouterr().out)["warnings"])
