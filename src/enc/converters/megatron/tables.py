"""The Megatron -> Hugging Face key tables, tensor-parallel merge kinds, and the QKV re-ordering.

Keys are first brought to one spelling, the 2020 legacy one (``language_model.transformer``,
``attention``, ``*layernorm``), with the layer index made global across pipeline stages. Each row
of a table then says: the HF key(s), how the tensor-parallel shards combine, and the transform::

    REPLICATED  every rank holds the whole tensor: rank 0's is taken, the others must be equal
    COLUMN      ColumnParallelLinear: concatenated on dim 0 (output rows)
    ROW         RowParallelLinear: concatenated on dim 1 (input columns)
    VOCAB       vocab-parallel embedding / MLM bias / output layer: concatenated on dim 0
    QKV         column-parallel fused query_key_value: each rank's rows re-ordered from its
                checkpoint_version layout to [q|k|v, heads, head_dim] with its LOCAL head count,
                then interleaved (all q, then all k, then all v)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from enc.converters.base import DropList, Transform, copy, transpose
from enc.io.fastcopy import RawOp, keep, row_slice

REPLICATED, COLUMN, ROW, VOCAB, QKV = "replicated", "column", "row", "vocab", "qkv"

# Newer spellings -> the legacy names the tables use, applied in order (Megatron's own loader
# maps layernorm->norm and attention->self_attention the same way; megatron-core "local" and
# Transformer-Engine layer names too).
RENAMES: list[tuple[str, str]] = [
    # megatron-core (flat state dict)
    (r"^embedding\.", "language_model.embedding."),
    (r"^(decoder|encoder)\.layers\.", "language_model.transformer.layers."),
    (r"^(decoder|encoder)\.final_(layernorm|norm)\.", "language_model.transformer.final_layernorm."),
    (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),
    (r"\.self_attention\.linear_qkv\.", ".attention.query_key_value."),
    (r"\.self_attention\.linear_proj\.", ".attention.dense."),
    (r"\.pre_mlp_layernorm\.", ".post_attention_layernorm."),
    (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".post_attention_layernorm.\1"),
    (r"\.mlp\.linear_fc1\.", ".mlp.dense_h_to_4h."),
    (r"\.mlp\.linear_fc2\.", ".mlp.dense_4h_to_h."),
    (r"^output_layer\.weight$", "language_model.output_layer.weight"),
    (r"^output_layer\.bias$", "lm_head.bias"),
    (r"^pooler\.", "language_model.pooler."),
    (r"^lm_head\.layer_norm\.", "lm_head.layernorm."),
    # legacy model, 2021+ and 2023+ spellings
    (r"^language_model\.encoder\.", "language_model.transformer."),
    (r"\.self_attention\.", ".attention."),
    (r"\.input_norm\.", ".input_layernorm."),
    (r"\.post_attention_norm\.", ".post_attention_layernorm."),
    (r"\.final_norm\.", ".final_layernorm."),
    (r"^lm_head\.norm\.", "lm_head.layernorm."),
]
_RENAMES = [(re.compile(a), b) for a, b in RENAMES]

LAYER = re.compile(r"^language_model\.transformer\.layers\.(\d+)\.(.+)$")


def normalize(key: str) -> str:
    for rx, new in _RENAMES:
        key = rx.sub(new, key)
    return key


# ---------------------------------------------------------------------------------- transforms


def third(i: int) -> Transform:
    """Rows of part ``i`` (0 = query, 1 = key, 2 = value) of a merged [q|k|v, ...] tensor."""
    return Transform(f"{'qkv'[i]} = rows {i}/3", lambda t: t.chunk(3, 0)[i].contiguous(),
                     lambda s: (s[0] // 3, *s[1:]),
                     raw=lambda s: row_slice(i * (s[0] // 3), (i + 1) * (s[0] // 3)) if s and s[0] % 3 == 0 else None)


split3 = (third(0), third(1), third(2))


def slice_rows(n: int) -> Transform:
    return Transform(f"rows[:{n}]", lambda t: t[:n].contiguous(), lambda s: (n, *s[1:]),
                     raw=lambda s: row_slice(0, n) if s and n <= s[0] else None)


# ---------------------------------------------------------------------------------- tables

_L = "language_model.transformer.layers.{}."
_B = "bert.encoder.layer.{}."
_G = "transformer.h.{}."

Row = tuple[str | tuple[str, ...], str, Transform | tuple[Transform, ...]]

BERT_TABLE: dict[str, Row] = {
    "language_model.embedding.word_embeddings.weight": ("bert.embeddings.word_embeddings.weight", VOCAB, copy),
    "language_model.embedding.position_embeddings.weight": ("bert.embeddings.position_embeddings.weight", REPLICATED, copy),
    "language_model.embedding.tokentype_embeddings.weight": ("bert.embeddings.token_type_embeddings.weight", REPLICATED,
                                                             copy),
    _L + "input_layernorm.weight": (_B + "attention.ln.weight", REPLICATED, copy),
    _L + "input_layernorm.bias": (_B + "attention.ln.bias", REPLICATED, copy),
    _L + "attention.query_key_value.weight": ((_B + "attention.self.query.weight", _B + "attention.self.key.weight",
                                               _B + "attention.self.value.weight"), QKV, split3),
    _L + "attention.query_key_value.bias": ((_B + "attention.self.query.bias", _B + "attention.self.key.bias",
                                             _B + "attention.self.value.bias"), QKV, split3),
    _L + "attention.dense.weight": (_B + "attention.output.dense.weight", ROW, copy),
    _L + "attention.dense.bias": (_B + "attention.output.dense.bias", REPLICATED, copy),
    _L + "post_attention_layernorm.weight": (_B + "ln.weight", REPLICATED, copy),
    _L + "post_attention_layernorm.bias": (_B + "ln.bias", REPLICATED, copy),
    _L + "mlp.dense_h_to_4h.weight": (_B + "intermediate.dense.weight", COLUMN, copy),
    _L + "mlp.dense_h_to_4h.bias": (_B + "intermediate.dense.bias", COLUMN, copy),
    _L + "mlp.dense_4h_to_h.weight": (_B + "output.dense.weight", ROW, copy),
    _L + "mlp.dense_4h_to_h.bias": (_B + "output.dense.bias", REPLICATED, copy),
    "language_model.transformer.final_layernorm.weight": ("bert.encoder.ln.weight", REPLICATED, copy),
    "language_model.transformer.final_layernorm.bias": ("bert.encoder.ln.bias", REPLICATED, copy),
    "language_model.pooler.dense.weight": ("bert.pooler.dense.weight", REPLICATED, copy),
    "language_model.pooler.dense.bias": ("bert.pooler.dense.bias", REPLICATED, copy),
    "lm_head.dense.weight": ("cls.predictions.transform.dense.weight", REPLICATED, copy),
    "lm_head.dense.bias": ("cls.predictions.transform.dense.bias", REPLICATED, copy),
    "lm_head.layernorm.weight": ("cls.predictions.transform.LayerNorm.weight", REPLICATED, copy),
    "lm_head.layernorm.bias": ("cls.predictions.transform.LayerNorm.bias", REPLICATED, copy),
    "lm_head.bias": ("cls.predictions.bias", VOCAB, copy),
    "binary_head.weight": ("cls.seq_relationship.weight", REPLICATED, copy),
    "binary_head.bias": ("cls.seq_relationship.bias", REPLICATED, copy),
}

# GPT-2's Conv1D stores [in, out]: every Megatron Linear weight is transposed.
GPT2_TABLE: dict[str, Row] = {
    "language_model.embedding.word_embeddings.weight": ("transformer.wte.weight", VOCAB, copy),
    "language_model.embedding.position_embeddings.weight": ("transformer.wpe.weight", REPLICATED, copy),
    _L + "input_layernorm.weight": (_G + "ln_1.weight", REPLICATED, copy),
    _L + "input_layernorm.bias": (_G + "ln_1.bias", REPLICATED, copy),
    _L + "attention.query_key_value.weight": (_G + "attn.c_attn.weight", QKV, transpose),
    _L + "attention.query_key_value.bias": (_G + "attn.c_attn.bias", QKV, copy),
    _L + "attention.dense.weight": (_G + "attn.c_proj.weight", ROW, transpose),
    _L + "attention.dense.bias": (_G + "attn.c_proj.bias", REPLICATED, copy),
    _L + "post_attention_layernorm.weight": (_G + "ln_2.weight", REPLICATED, copy),
    _L + "post_attention_layernorm.bias": (_G + "ln_2.bias", REPLICATED, copy),
    _L + "mlp.dense_h_to_4h.weight": (_G + "mlp.c_fc.weight", COLUMN, transpose),
    _L + "mlp.dense_h_to_4h.bias": (_G + "mlp.c_fc.bias", COLUMN, copy),
    _L + "mlp.dense_4h_to_h.weight": (_G + "mlp.c_proj.weight", ROW, transpose),
    _L + "mlp.dense_4h_to_h.bias": (_G + "mlp.c_proj.bias", REPLICATED, copy),
    "language_model.transformer.final_layernorm.weight": ("transformer.ln_f.weight", REPLICATED, copy),
    "language_model.transformer.final_layernorm.bias": ("transformer.ln_f.bias", REPLICATED, copy),
    "language_model.output_layer.weight": ("lm_head.weight", VOCAB, copy),  # only when untied
}

TABLES = {"bert": BERT_TABLE, "gpt2": GPT2_TABLE}

# Source keys (model part, normalised) that are not converted, with the reason.
MODEL_DROP = DropList({
    r"^word_embeddings_for_head\.weight$": "the last pipeline stage's tied copy of the word embeddings "
                                           "(parity computes the logits from it, as Megatron does)",
    r"\._extra_state$": "Transformer Engine extra state (FP8 scaling metadata)",
})

# Top-level entries of model_optim_rng.pt besides 'model'.
STATE_DROP = DropList({
    r"^optimizer(\.|$)": "optimizer state",
    r"^(lr_scheduler|opt_param_scheduler)(\.|$)": "learning-rate scheduler state",
    r"(^|\.)(random_rng_state|np_rng_state|torch_rng_state|cuda_rng_state|rng_state|rng_tracker_states)(\.|$)":
        "random-number-generator state",
    r"^rerun_state_machine(\.|$)": "rerun state machine",
    r"^num_floating_point_operations_so_far$": "training counter",
    r"^(args|checkpoint_version|iteration|total_iters|tokens|num_tokens)$": "training metadata (read, not converted)",
})


@dataclass(frozen=True)
class Match:
    hf: str | tuple[str, ...]
    merge: str
    transform: Transform | tuple[Transform, ...]
    layer: int | None


_COMPILED: dict[str, list[tuple[re.Pattern, Row]]] = {
    kind: [(re.compile("^" + r"(\d+)".join(re.escape(p) for p in src.split("{}")) + "$"), row)
           for src, row in table.items()]
    for kind, table in TABLES.items()
}


def lookup(kind: str, key: str) -> Match | None:
    for rx, (hf, merge, tr) in _COMPILED[kind]:
        m = rx.match(key)
        if m:
            groups = m.groups()
            hf_keys = tuple(h.format(*groups) for h in hf) if isinstance(hf, tuple) else hf.format(*groups)
            return Match(hf_keys, merge, tr, int(groups[0]) if groups else None)
    return None


# ---------------------------------------------------------------------------------- QKV order


def qkv_rows_to_hf(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """One rank's fused QKV rows, stored per ``checkpoint_version``, -> [q|k|v, heads, head_dim] rows.

    - version 0:    stored [3, heads, hd] already (all q, all k, all v): unchanged
    - version 1.0:  stored [heads, hd, 3]
    - version >= 2: stored [heads, 3, hd] (also megatron-core's linear_qkv without GQA)
    """
    rest = tuple(t.shape[1:])
    hd = t.shape[0] // (3 * heads)
    if version == 0:
        return t
    if version == 1.0:
        return t.reshape(heads, hd, 3, *rest).movedim(2, 0).reshape(t.shape).contiguous()
    return t.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def qkv_rows_to_hf_raw(version: float, heads: int) -> RawOp:
    """:func:`qkv_rows_to_hf` on raw elements (numpy), for the byte path (enc.io.fastcopy). Version 0 stores
    the HF order already: the bytes stay as they are, so q, k and v are row ranges the kernel copies."""
    if version == 0:
        return keep()

    def fn(a):  # a numpy array (numpy is imported where the writer runs this, not when tables load)
        import numpy as np

        rest = a.shape[1:]
        hd = a.shape[0] // (3 * heads)
        if version == 0:
            return a
        if version == 1.0:
            return np.moveaxis(a.reshape(heads, hd, 3, *rest), 2, 0).reshape(a.shape)
        return a.reshape(heads, 3, hd, *rest).swapaxes(0, 1).reshape(a.shape)

    return RawOp(f"qkv v{version:g} rows", fn)


def merge_fn(merge: str, version: float, heads_local: int, what: str,
             on_mismatch: Callable[[str, int], Exception]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The function that turns the list of per-rank shards (rank order) into one tensor."""
    if merge == REPLICATED:
        def replicated(parts: list[torch.Tensor]) -> torch.Tensor:
            for r, p in enumerate(parts[1:], 1):
                if not torch.equal(p, parts[0]):
                    raise on_mismatch(what, r)
            return parts[0]
        return replicated
    if merge in (COLUMN, VOCAB):
        return lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    if merge == ROW:
        return lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if merge == QKV:
        def qkv(parts: list[torch.Tensor]) -> torch.Tensor:
            hf = [qkv_rows_to_hf(p, version, heads_local) for p in parts]
            rest = tuple(hf[0].shape[1:])
            return torch.cat([p.reshape(3, -1, *rest) for p in hf], 1).reshape(-1, *rest)
        return qkv
    raise ValueError(f"unknown merge kind {merge!r}")


def merged_shape(merge: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    first = shapes[0]
    if merge == REPLICATED:
        return first
    if merge == ROW:
        return (first[0], sum(s[1] for s in shapes), *first[2:])
    return (sum(s[0] for s in shapes), *first[1:])
