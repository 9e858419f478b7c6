"""Random MobileBERT "original releases" for tests, written without TensorFlow.

:func:`hf_mobilebert` makes a transformers ``MobileBertForPreTraining`` with random weights (the
peer the tests compare against); :func:`tf_variables` names its tensors as google-research's
TF graph does (kernels [in, out], ``FakeLayerNorm`` for no_norm, ``ffn_layer_J``,
``extra_output_weights`` [V, H - E]); :func:`write_release` writes them as a TF V2 bundle
(tests/helpers/tf_bundle.py) with Adam slots and global_step, plus the JSON config and vocab.txt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from tests.helpers.tf_bundle import write_bundle

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "the", "capital", "of", "france", "is", "paris",
         "a", "dog", "cat", "runs", "sat", "on", "mat", "and", "sun", "rises", "in", "east", "##s", "##ing",
         "hello", "world", "mobile", "##bert", "model", "small", "fast"]

BASE = dict(vocab_size=40, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, num_attention_heads=2,
            intermediate_size=24, num_hidden_layers=2, max_position_embeddings=64, hidden_act="relu",
            type_vocab_size=2, trigram_input=True, use_bottleneck=True, use_bottleneck_attention=False,
            key_query_shared_bottleneck=True, num_feedforward_networks=4, normalization_type="no_norm",
            classifier_activation=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_mobilebert(seed: int = 0, std: float = 0.3, **overrides):
    """A transformers MobileBertForPreTraining with N(0, std) weights (norm weights around 1)."""
    from transformers import MobileBertConfig, MobileBertForPreTraining

    cfg = MobileBertConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = MobileBertForPreTraining(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if re.search(r"LayerNorm\.weight$", name) else 0.0, std)
    return model


def tf_variables(model) -> dict[str, np.ndarray]:
    """The model's tensors under their TF names, in TF layout."""
    cfg = model.config
    norm = "FakeLayerNorm" if cfg.normalization_type == "no_norm" else "LayerNorm"
    out: dict[str, np.ndarray] = {}
    for key, t in model.state_dict().items():
        a = t.detach().float().numpy().copy()
        if key.startswith("cls.predictions.decoder.") or key.endswith("position_ids"):
            continue  # tied / buffer
        if key == "cls.predictions.dense.weight":
            if a.shape[0]:
                out["cls/predictions/extra_output_weights"] = a.T.copy()
            continue
        if key == "cls.predictions.bias":
            out["cls/predictions/output_bias"] = a
            continue
        if key.startswith("cls.seq_relationship."):
            out["cls/seq_relationship/output_" + ("weights" if key.endswith("weight") else "bias")] = a
            continue
        if key.startswith("mobilebert.embeddings.embedding_transformation") and not cfg.trigram_input \
                and cfg.embedding_size == cfg.hidden_size:
            continue  # TF makes none
        name = key.replace("mobilebert.", "bert.", 1)
        name = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", name)
        name = re.sub(r"\.ffn\.(\d+)\.", r".ffn_layer_\1.", name)
        parts = name.split(".")
        leaf, scope = parts[-1], "/".join(parts[:-1])
        if parts[-2] == "LayerNorm":
            if not key.startswith("cls."):
                scope = scope[: -len("LayerNorm")] + norm
            out[f"{scope}/{'gamma' if leaf == 'weight' else 'beta'}"] = a
        elif scope.endswith("_embeddings"):
            out[scope] = a
        elif leaf == "weight":
            out[f"{scope}/kernel"] = a.T.copy()
        else:
            out[f"{scope}/bias"] = a
    return out


def original_config(model) -> dict:
    c = model.config
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "type_vocab_size", "embedding_size", "trigram_input",
            "use_bottleneck", "intra_bottleneck_size", "use_bottleneck_attention", "key_query_shared_bottleneck",
            "num_feedforward_networks", "normalization_type", "classifier_activation", "hidden_dropout_prob",
            "attention_probs_dropout_prob")
    cfg = {k: getattr(c, k) for k in keys}
    cfg["initializer_range"] = 0.02
    if cfg["hidden_act"] == "gelu_new":
        cfg["hidden_act"] = "gelu"  # TF's gelu is the tanh form
    return cfg


def write_release(dst: Path, model, *, config_name: str = "bert_config.json", slots: bool = True,
                  extra: dict[str, np.ndarray] | None = None, prefix: str = "mobilebert.ckpt",
                  num_shards: int = 1) -> Path:
    """A release directory: ``prefix``.{index,data-*} (+ Adam slots, global_step), config, vocab.txt."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = dict(tf_variables(model))
    if slots:
        rng = np.random.default_rng(1)
        for k, a in list(tensors.items()):
            tensors[f"{k}/adam_m"] = rng.standard_normal(a.shape).astype(np.float32) * 1e-3
            tensors[f"{k}/adam_v"] = np.abs(rng.standard_normal(a.shape)).astype(np.float32) * 1e-6
        tensors["global_step"] = np.array(1234, np.int64)
    tensors.update(extra or {})
    write_bundle(dst / prefix, tensors, num_shards=num_shards)
    if config_name:
        (dst / config_name).write_text(json.dumps(original_config(model), indent=2) + "\n")
    (dst / "vocab.txt").write_text("\n".join(WORDS[: model.config.vocab_size]) + "\n")
    return dst
