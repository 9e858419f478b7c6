"""Build tiny ALBERT releases in Google's original TF layout from a random transformers model.

The TF names are written out literally here (from google-research/albert modeling.py), not taken
from enc's key table, so the tests check the converter against an independent statement of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.helpers.tf_bundle import write_bundle

CORPUS = """plants create energy through photosynthesis .
the capital of france is paris , and the capital of italy is rome .
cats and dogs are common pets ; many people keep 2,000 fish too .
Water boils at 100 degrees , café au lait is coffee with milk .
the quick brown fox jumps over the lazy dog .
""".splitlines()


def train_spm(out_dir: Path, vocab_size: int = 70) -> Path:
    """A small unigram sentencepiece model with ALBERT's options (pad 0, unk 1, [CLS] [SEP] [MASK])."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(CORPUS * 20) + "\n")
    spm.SentencePieceTrainer.Train(
        input=str(text),
        model_prefix=str(out_dir / "30k-clean"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        eos_id=-1,
        bos_id=-1,
        control_symbols="[CLS],[SEP],[MASK]",
        user_defined_symbols='(,),",-,.',
        character_coverage=1.0,
        minloglevel=2,
        normalization_rule_name="nmt_nfkc",
    )
    text.unlink()
    return out_dir / "30k-clean.model"


def hf_albert(vocab: int, E: int, H: int, L: int, G: int, I: int, N: int, F: int, seed: int = 0):
    import transformers

    cfg = transformers.AlbertConfig(
        vocab_size=vocab,
        embedding_size=E,
        hidden_size=H,
        num_hidden_layers=L,
        num_hidden_groups=G,
        inner_group_num=I,
        num_attention_heads=N,
        intermediate_size=F,
        hidden_act="gelu_new",
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.AlbertForPreTraining(cfg).eval()
    with torch.no_grad():
        # transformers' init (std 0.02) makes attention almost uniform, which hides a wrong q/k
        # kernel; use unit-scale weights so every tensor matters. LayerNorm/bias get noise too.
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2 and "embeddings" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0)
        if E == H:  # TF has no projection when E == H: the HF model must be the identity there
            model.albert.encoder.embedding_hidden_mapping_in.weight.copy_(torch.eye(H))
            model.albert.encoder.embedding_hidden_mapping_in.bias.zero_()
    return model


def tf_variables(model, extras: bool = True) -> dict[str, np.ndarray]:
    """The original ALBERT variable names and [in, out] kernels for an HF AlbertForPreTraining."""
    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    v: dict[str, np.ndarray] = {
        "bert/embeddings/word_embeddings": sd["albert.embeddings.word_embeddings.weight"],
        "bert/embeddings/position_embeddings": sd["albert.embeddings.position_embeddings.weight"],
        "bert/embeddings/token_type_embeddings": sd["albert.embeddings.token_type_embeddings.weight"],
        "bert/embeddings/LayerNorm/gamma": sd["albert.embeddings.LayerNorm.weight"],
        "bert/embeddings/LayerNorm/beta": sd["albert.embeddings.LayerNorm.bias"],
        "bert/pooler/dense/kernel": sd["albert.pooler.weight"].T,
        "bert/pooler/dense/bias": sd["albert.pooler.bias"],
        "cls/predictions/transform/dense/kernel": sd["predictions.dense.weight"].T,
        "cls/predictions/transform/dense/bias": sd["predictions.dense.bias"],
        "cls/predictions/transform/LayerNorm/gamma": sd["predictions.LayerNorm.weight"],
        "cls/predictions/transform/LayerNorm/beta": sd["predictions.LayerNorm.bias"],
        "cls/predictions/output_bias": sd["predictions.bias"],
        "cls/seq_relationship/output_weights": sd["sop_classifier.classifier.weight"],
        "cls/seq_relationship/output_bias": sd["sop_classifier.classifier.bias"],
    }
    if c.embedding_size != c.hidden_size:
        v["bert/encoder/embedding_hidden_mapping_in/kernel"] = sd[
            "albert.encoder.embedding_hidden_mapping_in.weight"
        ].T
        v["bert/encoder/embedding_hidden_mapping_in/bias"] = sd[
            "albert.encoder.embedding_hidden_mapping_in.bias"
        ]
    for g in range(c.num_hidden_groups):
        for i in range(c.inner_group_num):
            tf = f"bert/encoder/transformer/group_{g}/inner_group_{i}/"
            hf = f"albert.encoder.albert_layer_groups.{g}.albert_layers.{i}."
            for part in ("query", "key", "value"):
                v[tf + f"attention_1/self/{part}/kernel"] = sd[hf + f"attention.{part}.weight"].T
                v[tf + f"attention_1/self/{part}/bias"] = sd[hf + f"attention.{part}.bias"]
            v[tf + "attention_1/output/dense/kernel"] = sd[hf + "attention.dense.weight"].T
            v[tf + "attention_1/output/dense/bias"] = sd[hf + "attention.dense.bias"]
            v[tf + "LayerNorm/gamma"] = sd[hf + "attention.LayerNorm.weight"]
            v[tf + "LayerNorm/beta"] = sd[hf + "attention.LayerNorm.bias"]
            v[tf + "ffn_1/intermediate/dense/kernel"] = sd[hf + "ffn.weight"].T
            v[tf + "ffn_1/intermediate/dense/bias"] = sd[hf + "ffn.bias"]
            v[tf + "ffn_1/intermediate/output/dense/kernel"] = sd[hf + "ffn_output.weight"].T
            v[tf + "ffn_1/intermediate/output/dense/bias"] = sd[hf + "ffn_output.bias"]
            v[tf + "LayerNorm_1/gamma"] = sd[hf + "full_layer_layer_norm.weight"]
            v[tf + "LayerNorm_1/beta"] = sd[hf + "full_layer_layer_norm.bias"]
    v = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in v.items()}
    if extras:  # what a training checkpoint also holds
        for k in list(v)[:4]:
            v[k + "/adam_m"] = np.zeros_like(v[k])
            v[k + "/adam_v"] = np.ones_like(v[k])
        v["global_step"] = np.array(1000, dtype=np.int64)
    return v


def albert_config(model, act: str = "gelu") -> dict:
    c = model.config
    return {
        "attention_probs_dropout_prob": 0,
        "hidden_act": act,
        "hidden_dropout_prob": 0,
        "embedding_size": c.embedding_size,
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_hidden_groups": c.num_hidden_groups,
        "net_structure_type": 0,
        "gap_size": 0,
        "num_memory_blocks": 0,
        "inner_group_num": c.inner_group_num,
        "down_scale_factor": 1,
        "type_vocab_size": c.type_vocab_size,
        "vocab_size": c.vocab_size,
    }


def write_release(
    out_dir: Path,
    model,
    spm_model: Path,
    prefix: str = "model.ckpt-best",
    variables: dict[str, np.ndarray] | None = None,
) -> Path:
    """A directory laid out like albert_base_v2.tar.gz unpacked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "albert_config.json").write_text(json.dumps(albert_config(model), indent=2))
    write_bundle(out_dir / prefix, variables if variables is not None else tf_variables(model))
    (out_dir / "30k-clean.model").write_bytes(spm_model.read_bytes())
    return out_dir
