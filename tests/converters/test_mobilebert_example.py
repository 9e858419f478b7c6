"""examples/mobilebert_tiny (written and trained by real TensorFlow): converted, it reproduces TF's outputs.

tests/fixtures/tf/mobilebert_tiny_tf_outputs.npz holds what TensorFlow computed with the same weights
(examples/mobilebert_tiny/make_example.py): the ids TF saw, every layer's hidden state, the MLM logits
at every position and the NSP logits, each sentence run unpadded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mobilebert_tiny"
TF_OUT = REPO / "tests" / "fixtures" / "tf" / "mobilebert_tiny_tf_outputs.npz"


@pytest.fixture(scope="module")
def tf_out():
    with np.load(TF_OUT) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("mb") / "hf"
    assert run(["convert", str(EXAMPLE), "-o", str(out), "--json"]) == 0
    return out


def test_release_has_slots_global_step_and_original_names():
    from enc.io.tf_checkpoint import TFCheckpoint

    ck = TFCheckpoint(EXAMPLE / "mobilebert.ckpt")
    keys = set(ck.keys())
    assert int(ck.read("global_step")) == 5000
    assert "bert/encoder/layer_1/ffn_layer_2/output/FakeLayerNorm/gamma/adam_v" in keys
    assert ck.shape("cls/predictions/extra_output_weights") == (68, 24)
    assert ck.shape("bert/embeddings/embedding_transformation/kernel") == (72, 48)  # trigram: 3 x 24 -> 48
    assert not any(k.startswith("bert/pooler") for k in keys)


def test_transformers_reproduces_tensorflow(converted, tf_out):
    from transformers import MobileBertForPreTraining

    hf, info = MobileBertForPreTraining.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    n = len(tf_out["texts"])
    for i in range(n):
        ids = torch.tensor(tf_out[f"input_ids_{i}"], dtype=torch.long)[None]
        types = torch.tensor(tf_out[f"token_type_ids_{i}"], dtype=torch.long)[None]
        with torch.no_grad():
            out = hf(input_ids=ids, token_type_ids=types, output_hidden_states=True)
        hs = tf_out[f"hidden_states_{i}"]
        assert len(out.hidden_states) == hs.shape[0] == 3
        for layer, h in enumerate(out.hidden_states):
            np.testing.assert_allclose(h[0].numpy(), hs[layer], rtol=0, atol=2e-4 * max(1.0, np.abs(hs[layer]).max()))
        tf_mlm = tf_out[f"mlm_logits_{i}"]
        np.testing.assert_allclose(out.prediction_logits[0].numpy(), tf_mlm, rtol=0,
                                   atol=2e-4 * np.abs(tf_mlm).max())
        assert (out.prediction_logits[0].argmax(-1).numpy() == tf_mlm.argmax(-1)).all()
        np.testing.assert_allclose(out.seq_relationship_logits[0].numpy(), tf_out["nsp_logits"][i], rtol=0, atol=1e-3)


def test_tokenizers_give_the_ids_tensorflow_saw(converted, tf_out):
    from transformers import AutoTokenizer

    from enc.tokenization import load_tokenizer

    enc_tok, hf_tok = load_tokenizer(converted), AutoTokenizer.from_pretrained(converted)
    for i, text in enumerate(tf_out["texts"]):
        text = str(text)
        want = tf_out[f"input_ids_{i}"].tolist()
        parts = text.split(". ", 1)
        if len(parts) == 2:  # a sentence pair: A "." then B
            got = enc_tok.encode(parts[0] + ".", parts[1])
            assert got.token_type_ids == tf_out[f"token_type_ids_{i}"].tolist()
            assert hf_tok(parts[0] + ".", parts[1])["input_ids"] == want
        else:
            got = enc_tok.encode(text)
            assert hf_tok(text)["input_ids"] == want
        assert got.ids == want, text


def test_fill_mask_predicts_what_tensorflow_predicts(converted, tf_out, capsys):
    vocab = (EXAMPLE / "vocab.txt").read_text().split("\n")
    capsys.readouterr()
    texts = [str(t) for t in tf_out["texts"] if "[MASK]" in str(t)]
    assert run(["fill-mask", *texts, "--model", str(converted), "--json", "--top-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    for i, r in enumerate(res):
        k = tf_out[f"input_ids_{i}"].tolist().index(vocab.index("[MASK]"))
        tf_top = [vocab[j] for j in np.argsort(-tf_out[f"mlm_logits_{i}"][k])[:3]]
        assert [p["token_str"] for p in r["masks"][0]["predictions"]] == tf_top
    assert res[0]["text"] == "the capital of france is [MASK]."
    assert res[0]["masks"][0]["predictions"][0]["sequence"] == "the capital of france is paris."


def test_parity_of_the_example_passes(converted, capsys):
    capsys.readouterr()
    assert run(["parity", str(EXAMPLE), str(converted), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"] == "pass" and rep["worst"]["top1"] == 1.0


def test_fill_mask_of_a_text_does_not_depend_on_the_other_inputs(converted, capsys):
    """Inputs of different lengths are never padded together: a trigram model would see the padding."""
    texts = ["cows like to eat [MASK].", "the capital of france is [MASK].", "the sun rises in the [MASK]."]
    alone = []
    for t in texts:
        capsys.readouterr()
        assert run(["fill-mask", t, "--model", str(converted), "--json"]) == 0
        alone += json.loads(capsys.readouterr().out)["results"]
    assert run(["fill-mask", *texts, "--model", str(converted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == alone


@pytest.mark.parametrize("runtime", ["enc", "transformers"])
def test_verify_and_parity_with_either_runtime(converted, capsys, runtime):
    capsys.readouterr()
    assert run(["verify", str(converted), "--runtime", runtime, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    assert run(["parity", str(EXAMPLE), str(converted), "--runtime", runtime, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"] == "pass" and [r["name"] for r in rep["rows"]][:5] == [
        "embeddings", "layer.0", "layer.1", "mlm_logits", "nsp_logits"]
