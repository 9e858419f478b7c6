"""Write tiny random models in Megatron-LM's checkpoint layout (test helper).

From a transformers ``MegatronBertForPreTraining`` / ``GPT2LMHeadModel`` state dict to Megatron's
keys, with the fused ``query_key_value`` rows in the order each ``checkpoint_version`` stores them,
split over tensor-parallel ranks (column / row / vocab-parallel, replicated) and pipeline stages
(local layer numbers, embeddings first, heads last, ``word_embeddings_for_head`` on the last stage),
nested as Megatron's ``state_dict_for_save_checkpoint`` nests it, with an ``args`` Namespace,
optimizer and RNG state, saved by ``torch.save`` (zip or legacy format) into a training directory
(``latest_checkpointed_iteration.txt`` + ``release/`` or ``iter_NNNNNNN/``) or packed like an NGC zip.

Written independently of enc's converter: the mapping below is the inverse of HF's conversion scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import sys
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# HF suffix -> Megatron layer suffix (2020 legacy names), per model kind
BERT_LAYER = {
    "attention.ln.weight": "input_layernorm.weight",
    "attention.ln.bias": "input_layernorm.bias",
    "attention.output.dense.weight": "attention.dense.weight",
    "attention.output.dense.bias": "attention.dense.bias",
    "ln.weight": "post_attention_layernorm.weight",
    "ln.bias": "post_attention_layernorm.bias",
    "intermediate.dense.weight": "mlp.dense_h_to_4h.weight",
    "intermediate.dense.bias": "mlp.dense_h_to_4h.bias",
    "output.dense.weight": "mlp.dense_4h_to_h.weight",
    "output.dense.bias": "mlp.dense_4h_to_h.bias",
}
BERT_OTHER = {
    "bert.embeddings.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "language_model.embedding.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight": "language_model.embedding.tokentype_embeddings.weight",
    "bert.encoder.ln.weight": "language_model.transformer.final_layernorm.weight",
    "bert.encoder.ln.bias": "language_model.transformer.final_layernorm.bias",
    "bert.pooler.dense.weight": "language_model.pooler.dense.weight",
    "bert.pooler.dense.bias": "language_model.pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.layernorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.layernorm.bias",
    "cls.predictions.bias": "lm_head.bias",
    "cls.seq_relationship.weight": "binary_head.weight",
    "cls.seq_relationship.bias": "binary_head.bias",
}
GPT2_LAYER = {  # (Megatron suffix, transpose Conv1D)
    "ln_1.weight": ("input_layernorm.weight", False),
    "ln_1.bias": ("input_layernorm.bias", False),
    "attn.c_proj.weight": ("attention.dense.weight", True),
    "attn.c_proj.bias": ("attention.dense.bias", False),
    "ln_2.weight": ("post_attention_layernorm.weight", False),
    "ln_2.bias": ("post_attention_layernorm.bias", False),
    "mlp.c_fc.weight": ("mlp.dense_h_to_4h.weight", True),
    "mlp.c_fc.bias": ("mlp.dense_h_to_4h.bias", False),
    "mlp.c_proj.weight": ("mlp.dense_4h_to_h.weight", True),
    "mlp.c_proj.bias": ("mlp.dense_4h_to_h.bias", False),
}
GPT2_OTHER = {
    "transformer.wte.weight": "language_model.embedding.word_embeddings.weight",
    "transformer.wpe.weight": "language_model.embedding.position_embeddings.weight",
    "transformer.ln_f.weight": "language_model.transformer.final_layernorm.weight",
    "transformer.ln_f.bias": "language_model.transformer.final_layernorm.bias",
}

LAYERS = "language_model.transformer.layers."
COLUMN = ("attention.query_key_value.", "mlp.dense_h_to_4h.")
ROW_WEIGHTS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
VOCAB = ("language_model.embedding.word_embeddings.weight", "lm_head.bias", "word_embeddings_for_head.weight")


def to_megatron(kind: str, sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """HF state dict -> flat Megatron keys, QKV still in HF [q|k|v, heads, hd] row order."""
    out: dict[str, torch.Tensor] = {}
    if kind == "bert":
        for hf, meg in BERT_OTHER.items():
            out[meg] = sd[hf].clone()
        for i in range(n_layers):
            p = f"bert.encoder.layer.{i}."
            for hf, meg in BERT_LAYER.items():
                out[f"{LAYERS}{i}.{meg}"] = sd[p + hf].clone()
            for part in ("weight", "bias"):
                out[f"{LAYERS}{i}.attention.query_key_value.{part}"] = torch.cat(
                    [sd[p + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")], 0)
        return out
    for hf, meg in GPT2_OTHER.items():
        out[meg] = sd[hf].clone()
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        for hf, (meg, tr) in GPT2_LAYER.items():
            out[f"{LAYERS}{i}.{meg}"] = sd[p + hf].t().contiguous() if tr else sd[p + hf].clone()
        out[f"{LAYERS}{i}.attention.query_key_value.weight"] = sd[p + "attn.c_attn.weight"].t().contiguous()
        out[f"{LAYERS}{i}.attention.query_key_value.bias"] = sd[p + "attn.c_attn.bias"].clone()
    return out


def stored_qkv(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """[q|k|v, heads, hd] rows -> the order checkpoint_version stores them in (for this rank's heads)."""
    rest = tuple(t.shape[1:])
    hd = t.shape[0] // (3 * heads)
    v = t.reshape(3, heads, hd, *rest)
    if version == 0:
        return t.clone()
    if version == 1.0:  # [heads, hd, 3]
        return v.permute(1, 2, 0, *range(3, v.dim())).reshape(t.shape).contiguous()
    return v.transpose(0, 1).reshape(t.shape).contiguous()  # [heads, 3, hd]


def split_tp(flat: dict[str, torch.Tensor], tp: int, heads: int, version: float) -> list[dict[str, torch.Tensor]]:
    """One flat dict per tensor-parallel rank (Megatron's partitioning)."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in flat.items():
        if ".attention.query_key_value." in key:
            rest = tuple(t.shape[1:])
            per = t.reshape(3, heads, -1, *rest).chunk(tp, 1)
            for r in range(tp):
                local = per[r].reshape(-1, *rest)
                ranks[r][key] = stored_qkv(local, version, heads // tp)
        elif any(c in key for c in COLUMN) or key in VOCAB or key == "language_model.output_layer.weight":
            for r, part in enumerate(t.chunk(tp, 0)):
                ranks[r][key] = part.clone()
        elif key.endswith(ROW_WEIGHTS):
            for r, part in enumerate(t.chunk(tp, 1)):
                ranks[r][key] = part.contiguous()
        else:
            for r in range(tp):
                ranks[r][key] = t.clone()
    return ranks


def split_pp(flat: dict[str, torch.Tensor], pp: int, n_layers: int) -> list[dict[str, torch.Tensor]]:
    """One dict per pipeline stage, layers renumbered from 0; embeddings first, everything after last."""
    per = n_layers // pp
    stages: list[dict[str, torch.Tensor]] = [{} for _ in range(pp)]
    for key, t in flat.items():
        if key.startswith(LAYERS):
            i, rest = key[len(LAYERS):].split(".", 1)
            s = int(i) // per
            stages[s][f"{LAYERS}{int(i) - s * per}.{rest}"] = t
        elif key.startswith("language_model.embedding."):
            stages[0][key] = t
        else:
            stages[-1][key] = t
    if pp > 1:
        stages[-1]["word_embeddings_for_head.weight"] = flat["language_model.embedding.word_embeddings.weight"].clone()
    return stages


# ---------------------------------------------------------------------------- spellings and nesting

SPELLINGS = {
    "2020": [],
    "2021": [("language_model.transformer.", "language_model.encoder."), (".attention.", ".self_attention.")],
    "2023": [("language_model.transformer.", "language_model.encoder."), (".attention.", ".self_attention."),
             (".input_layernorm.", ".input_norm."), (".post_attention_layernorm.", ".post_attention_norm."),
             (".final_layernorm.", ".final_norm."), ("lm_head.layernorm.", "lm_head.norm.")],
}
MCORE = [
    ("language_model.embedding.", "embedding."),
    ("language_model.transformer.layers.", "decoder.layers."),
    ("language_model.transformer.final_layernorm.", "decoder.final_layernorm."),
    (".attention.query_key_value.", ".self_attention.linear_qkv."),
    (".attention.dense.", ".self_attention.linear_proj."),
    (".post_attention_layernorm.", ".pre_mlp_layernorm."),
    (".mlp.dense_h_to_4h.", ".mlp.linear_fc1."),
    (".mlp.dense_4h_to_h.", ".mlp.linear_fc2."),
    ("word_embeddings_for_head.weight", "output_layer.weight"),
]


def respell(key: str, style: str) -> str:
    for old, new in (MCORE if style == "mcore" else SPELLINGS[style]):
        key = key.replace(old, new)
    return key


def nest(flat: dict[str, torch.Tensor], style: str) -> dict:
    """Megatron's nested state_dict_for_save_checkpoint structure (megatron-core: flat, + _extra_state)."""
    if style == "mcore":
        out: dict = {respell(k, style): v for k, v in flat.items()}
        for k in list(out):
            if k.endswith("linear_qkv.weight"):
                out[k.replace("weight", "_extra_state")] = io.BytesIO(b"fp8 meta")
        return out
    model: dict = {}
    for key, t in flat.items():
        key = respell(key, style)
        parts = key.split(".")
        if parts[0] == "language_model" and parts[1] == "embedding":
            model.setdefault("language_model", {}).setdefault("embedding", {}).setdefault(parts[2], {})[parts[3]] = t
        elif parts[0] == "language_model" and parts[1] in ("transformer", "encoder"):
            model.setdefault("language_model", {}).setdefault(parts[1], {})[".".join(parts[2:])] = t
        elif parts[0] == "language_model":
            model.setdefault("language_model", {}).setdefault(parts[1], {})[".".join(parts[2:])] = t
        else:
            model.setdefault(parts[0], {})[".".join(parts[1:])] = t
    return model


# ---------------------------------------------------------------------------- a fake megatron enum


@contextlib.contextmanager
def fake_megatron_enums():
    """Register ``megatron.model.enums.ModelType`` so pickle can name it (the loader never imports it)."""
    names = ["megatron", "megatron.model", "megatron.model.enums"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    ModelType.__module__ = "megatron.model.enums"
    ModelType.__qualname__ = "ModelType"
    mods["megatron.model.enums"].ModelType = ModelType
    sys.modules.update(mods)
    try:
        yield ModelType
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


# ---------------------------------------------------------------------------- writing


@dataclass
class Spec:
    kind: str  # "bert" / "gpt2"
    hidden: int
    heads: int
    layers: int
    ffn: int
    max_pos: int
    padded_vocab: int
    version: float = 3.0
    tp: int = 1
    pp: int = 1
    style: str = "2020"  # 2020 / 2021 / 2023 / mcore
    args: bool = True
    legacy_format: bool = False  # torch < 1.6 serialization
    iteration: int | None = None  # None: release/
    extra: dict = field(default_factory=dict)  # extra args entries


def make_args(spec: Spec, enum_cls=None) -> argparse.Namespace:
    a = argparse.Namespace(
        num_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
        ffn_hidden_size=spec.ffn, max_position_embeddings=spec.max_pos, padded_vocab_size=spec.padded_vocab,
        pipeline_model_parallel_size=spec.pp, layernorm_epsilon=1e-5, apply_query_key_layer_scaling=True,
        openai_gelu=spec.kind == "gpt2", bias_gelu_fusion=False, make_vocab_size_divisible_by=8,
        tokenizer_type="BertWordPieceLowerCase" if spec.kind == "bert" else "GPT2BPETokenizer",
        fp16=False, params_dtype=torch.float32, seed=1234,
    )
    if spec.version >= 3.0:
        a.tensor_model_parallel_size = spec.tp
    else:
        a.model_parallel_size = spec.tp
    if enum_cls is not None:
        a.model_type = enum_cls.encoder_or_decoder
    for k, v in spec.extra.items():
        setattr(a, k, v)
    return a


def rank_states(spec: Spec, hf_state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{"mp_rank_XX[_YYY]": top-level dict as torch.save writes it}."""
    flat = to_megatron(spec.kind, hf_state, spec.layers)
    ranks = split_tp(flat, spec.tp, spec.heads, spec.version)
    out: dict[str, dict] = {}
    g = torch.Generator().manual_seed(7)
    for r, rank_flat in enumerate(ranks):
        stages = split_pp(rank_flat, spec.pp, spec.layers)  # the head copy is this rank's vocab shard
        for s, stage in enumerate(stages):
            name = f"mp_rank_{r:02d}" + (f"_{s:03d}" if spec.pp > 1 else "")
            state: dict = {"model": nest(stage, spec.style), "iteration": spec.iteration or 0}
            if spec.version > 0:
                state["checkpoint_version"] = spec.version
            state["optimizer"] = {"state": {0: {"exp_avg": torch.randn(4, generator=g), "step": 3}},
                                  "param_groups": [{"lr": 1e-4, "params": [0]}]}
            state["lr_scheduler"] = {"num_steps": 10, "max_lr": 1e-4}
            state["random_rng_state"] = (3, tuple(range(5)), None)
            state["np_rng_state"] = np.random.RandomState(0).get_state()
            state["torch_rng_state"] = torch.get_rng_state()
            out[name] = state
    return out


def write_dir(root: Path, spec: Spec, hf_state: dict[str, torch.Tensor], tracker: bool = True,
              mutate: Callable[[str, dict], None] | None = None) -> Path:
    """A Megatron training directory; returns ``root``. ``mutate(rank_name, state)`` may edit a rank first."""
    it_dir = "release" if spec.iteration is None else f"iter_{spec.iteration:07d}"
    with fake_megatron_enums() as enum_cls:
        states = rank_states(spec, hf_state)
        for name, state in states.items():
            if spec.args:
                state["args"] = make_args(spec, enum_cls)
            if mutate is not None:
                mutate(name, state)
            d = root / it_dir / name
            d.mkdir(parents=True, exist_ok=True)
            torch.save(state, d / "model_optim_rng.pt", _use_new_zipfile_serialization=not spec.legacy_format)
    if tracker:
        (root / "latest_checkpointed_iteration.txt").write_text("release" if spec.iteration is None else
                                                                str(spec.iteration))
    return root


def pack_zip(src_dir: Path, zip_path: Path, compression: int = zipfile.ZIP_STORED, top: str = "") -> Path:
    """Pack a training directory like an NGC zip (optionally under a top folder)."""
    with zipfile.ZipFile(zip_path, "w", compression) as zf:
        for p in sorted(src_dir.rglob("*")):
            if p.is_file():
                zf.write(p, (top + "/" if top else "") + p.relative_to(src_dir).as_posix())
    return zip_path


# ---------------------------------------------------------------------------- tiny HF models and vocabularies


def tiny_bert(seed: int = 0, hidden: int = 32, heads: int = 4, layers: int = 4, vocab: int = 128,
              max_pos: int = 64):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.MegatronBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, intermediate_size=2 * hidden,
                                          max_position_embeddings=max_pos, layer_norm_eps=1e-5, hidden_act="gelu")
    model = transformers.MegatronBertForPreTraining(cfg).eval()
    _unit_scale(model)
    return model


def tiny_gpt2(seed: int = 0, hidden: int = 32, heads: int = 4, layers: int = 4, vocab: int = 128, max_pos: int = 64):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=max_pos, n_embd=hidden, n_layer=layers, n_head=heads,
                                  n_inner=3 * hidden, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _unit_scale(model)
    return model


def _unit_scale(model: torch.nn.Module) -> None:
    """Weights large enough that a wrong head order or layout changes the outputs visibly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 1.5)
            elif "weight" in name:  # LayerNorm gains
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


WORDS = ["the", "capital", "of", "france", "is", "paris", "a", "city", "in", "europe", "hello", "world", "un",
         "##able", "##s", "##ed", "dog", "cat", "runs", "fast", ".", ",", "!", "?", "it", "was", "good", "bad",
         "model", "##ing", "time", "day", "big", "small", "red", "blue"]


def write_wordpiece_vocab(path: Path, n: int, cased: bool = False) -> Path:
    """A vocab.txt of ``n`` tokens: the specials, some words, then filler."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w.capitalize() if cased and i % 3 == 0 else w
                                                                  for i, w in enumerate(WORDS)]
    tokens += [f"tok{i}" for i in range(n - len(tokens))]
    path.write_text("\n".join(tokens[:n]) + "\n")
    return path


def write_gpt2_vocab(vocab_path: Path, merges_path: Path, n: int) -> tuple[Path, Path]:
    """A byte-level BPE vocab.json/merges.txt of at most ``n`` entries: space, punctuation and ASCII letters,
    some merges, and <|endoftext|> last (bytes outside the alphabet are dropped, as byte-level BPE does)."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel

    assert "Ġ" in ByteLevel.alphabet()  # byte-level's space
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    base = (["Ġ", ".", ",", "!", "?", "'"] + letters)[: n - 1]
    vocab = {c: i for i, c in enumerate(base)}
    merges: list[tuple[str, str]] = []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "s"), ("Ġ", "is"), ("a", "n"), ("Ġ", "a"),
                 ("o", "f"), ("Ġ", "of"), ("i", "n"), ("Ġ", "in"), ("e", "r"), ("o", "n"), ("e", "s"), ("Ġ", "c"),
                 ("i", "t"), ("Ġ", "it"), ("l", "l"), ("e", "ll"), ("h", "ell"), ("hell", "o"), ("o", "r"),
                 ("w", "or"), ("wor", "l"), ("worl", "d"), ("Ġ", "world"), ("m", "e"), ("Ġ", "me"), ("a", "t"),
                 ("Ġ", "at"), ("an", "d"), ("Ġ", "and"), ("i", "fe"), ("f", "e"), ("l", "ife"), ("Ġ", "life")]:
        if a in vocab and b in vocab and a + b not in vocab and len(vocab) < n - 1:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_path, merges_path
