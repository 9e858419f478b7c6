"""Mistral AI raw releases ("consolidated" checkpoints + params.json) -> HF Mistral / Mixtral.

Inputs: a release directory with ``params.json`` and one of
- ``consolidated.00.pth`` (torch zip pickle; read by enc's weights-only lazy reader), or several
  ``consolidated.NN.pth`` tensor-parallel shards (same keys in every file) or layer splits
  (disjoint keys, e.g. the HF-hosted Mixtral ``consolidated.0X.pt``);
- ``consolidated.safetensors`` (v0.3, Mixtral-8x22B; read tensor by tensor).
Dense 7B layout, the reference MoE layout (``feed_forward.gate`` + ``feed_forward.experts.E.w{1,2,3}``)
and the stacked MegaBlocks layout (``block_sparse_moe.w{1,2,3}`` [E*F, D], w2 stored transposed).
Tokenizers: ``tokenizer.model`` / ``tokenizer.model.v3`` (sentencepiece). ``tekken.json`` is reported
as unsupported and the weights are converted without a tokenizer.

The conversion is the table below: wq/wk rows are permuted from Mistral's interleaved-pair
rotary layout to HF's rotate-half layout (wk with the KV head count); everything else is copied.
Experts keep the per-expert names every published HF Mixtral checkpoint uses.

Memory: a ``.pth`` is unpickled without reading any tensor (``enc.io.megatron_pickle.load_lazy``:
names, shapes, dtypes, file offsets, zip CRCs) and each tensor is read with one ``readinto`` when
the writer asks for it, its CRC checked; a safetensors source is read the same way from its
validated header (``enc.io.safetensors_in``). The resident set stays about one tensor whatever
the model's size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from enc.converters.base import (
    Activation,
    Converter,
    DropList,
    KeyTable,
    Plan,
    Probe,
    apply_table,
    copy,
    permute_rope,
)
from enc.converters.mistral_reference import converted_forward, reference_forward
from enc.errors import ConfigError, CorruptCheckpoint, FormatError, MissingFile
from enc.io.dtypes import DType
from enc.io.fastcopy import RawOp, raw_source, row_slice, transpose2d
from enc.io.jsonfile import read_json_object
from enc.io.lazy import LazyTensor, combine

PARAMS = "params.json"



# --------------------------------------------------------------------------- key tables

_L = "layers.{}."
_H = "model.layers.{}."


def key_table(n_heads: int, n_kv_heads: int) -> KeyTable:
    """Reference layout -> HF. The whole conversion."""
    return KeyTable({
        "tok_embeddings.weight": ("model.embed_tokens.weight", copy),
        "norm.weight": ("model.norm.weight", copy),
        "output.weight": ("lm_head.weight", copy),
        _L + "attention_norm.weight": (_H + "input_layernorm.weight", copy),
        _L + "attention.wq.weight": (_H + "self_attn.q_proj.weight", permute_rope(n_heads)),
        _L + "attention.wk.weight": (_H + "self_attn.k_proj.weight", permute_rope(n_kv_heads)),
        _L + "attention.wv.weight": (_H + "self_attn.v_proj.weight", copy),
        _L + "attention.wo.weight": (_H + "self_attn.o_proj.weight", copy),
        _L + "ffn_norm.weight": (_H + "post_attention_layernorm.weight", copy),
        _L + "feed_forward.w1.weight": (_H + "mlp.gate_proj.weight", copy),
        _L + "feed_forward.w2.weight": (_H + "mlp.down_proj.weight", copy),
        _L + "feed_forward.w3.weight": (_H + "mlp.up_proj.weight", copy),
        _L + "feed_forward.gate.weight": (_H + "block_sparse_moe.gate.weight", copy),
        _L + "feed_forward.experts.{}.w1.weight": (_H + "block_sparse_moe.experts.{}.w1.weight", copy),
        _L + "feed_forward.experts.{}.w2.weight": (_H + "block_sparse_moe.experts.{}.w2.weight", copy),
        _L + "feed_forward.experts.{}.w3.weight": (_H + "block_sparse_moe.experts.{}.w3.weight", copy),
    })


DROP = DropList({
    r"(^|\.)rope\.freqs$": "precomputed rotary frequencies (recomputed from rope_theta)",
    r"(^|\.)freqs_cis$": "precomputed rotary table (recomputed from rope_theta)",
})

# Tensor-parallel shards (consolidated.00.pth, .01, ...): the dimension each tensor is split on,
# None = replicated (as transformers' --modules_are_split path and Meta's model-parallel layers).
TP_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    _L + "attention_norm.weight": None,
    _L + "attention.wq.weight": 0,
    _L + "attention.wk.weight": 0,
    _L + "attention.wv.weight": 0,
    _L + "attention.wo.weight": 1,
    _L + "ffn_norm.weight": None,
    _L + "feed_forward.w1.weight": 0,
    _L + "feed_forward.w2.weight": 1,
    _L + "feed_forward.w3.weight": 0,
    _L + "feed_forward.gate.weight": None,
    _L + "feed_forward.experts.{}.w1.weight": 0,
    _L + "feed_forward.experts.{}.w2.weight": 1,
    _L + "feed_forward.experts.{}.w3.weight": 0,
}

# The stacked MegaBlocks MoE layout -> the reference layout (expert e = rows [e*F, (e+1)*F)).
STACKED_MOE: dict[str, tuple[str, str]] = {
    "layers.{}.block_sparse_moe.gate.weight": ("layers.{}.feed_forward.gate.weight", "copy"),
    "layers.{}.block_sparse_moe.w1": ("layers.{}.feed_forward.experts.{}.w1.weight", "rows"),
    "layers.{}.block_sparse_moe.w3": ("layers.{}.feed_forward.experts.{}.w3.weight", "rows"),
    "layers.{}.block_sparse_moe.w2": ("layers.{}.feed_forward.experts.{}.w2.weight", "rows_transposed"),
}


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + r"(\d+)".join(re.escape(s) for s in p.split("{}")) + "$")


_TP_RX = [(_pattern(k), v) for k, v in TP_DIM.items()]
_STACKED_RX = [(_pattern(k), v) for k, v in STACKED_MOE.items()]
_LAYER_RX = re.compile(r"^layers\.(\d+)\.")

# --------------------------------------------------------------------------- params.json


@dataclass
class Params:
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    hidden_dim: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float
    sliding_window: int | None
    num_experts: int  # 0 = dense
    num_experts_per_tok: int
    max_seq_len: int
    notes: tuple[str, ...] = ()
    guessed: tuple[str, ...] = ()  # values filled in by enc, not read from params.json

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


# params.json names of the HF-style files the transformers Mixtral converter reads
_HF_ALIASES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
               "num_key_value_heads": "n_kv_heads", "intermediate_size": "hidden_dim", "rms_norm_eps": "norm_eps",
               "max_position_embeddings": "max_seq_len"}
_KNOWN = {"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
          "rope_theta", "sliding_window", "_sliding_window", "moe", "max_seq_len", "max_batch_size", "model_type",
          "lora", "multiple_of", "ffn_dim_multiplier", "num_local_experts", "num_experts_per_tok", "torch_dtype",
          "use_biases", "quantization", "bias"}


def _int(v, name: str, path: Path) -> int:
    if isinstance(v, bool) or v is None:
        raise ConfigError(path, f"{name} must be an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(path, f"{name} must be an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f) or f <= 0:
        raise ConfigError(path, f"{name} must be a positive integer, got {v!r}")
    return int(f)


def _float(v, name: str, path: Path) -> float:
    if isinstance(v, bool):
        raise ConfigError(path, f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(path, f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ConfigError(path, f"{name} must be a positive number, got {v!r}")
    return f


def read_params(path: Path, overrides: dict) -> dict:
    """params.json as a dict with Mistral's field names (HF-style aliases renamed), overrides applied."""
    if not path.is_file():
        raise ConfigError(path, "params.json not found (every Mistral release ships one next to the weights)")
    raw = read_json_object(path)
    p = {_HF_ALIASES.get(k, k): v for k, v in raw.items()}
    if "_sliding_window" in p and "sliding_window" not in p:
        p["sliding_window"] = p["_sliding_window"]
    if "num_local_experts" in p and "moe" not in p:
        p["moe"] = {"num_experts": p["num_local_experts"], "num_experts_per_tok": p.get("num_experts_per_tok", 2)}
    for k, v in overrides.items():
        if k in ("num_heads", "num_kv_heads", "rope_theta", "sliding_window"):
            p[{"num_heads": "n_heads", "num_kv_heads": "n_kv_heads"}.get(k, k)] = v
            if k == "sliding_window" and v is not None and int(v) <= 0:
                p["sliding_window"] = None
        elif k in _KNOWN or k in _HF_ALIASES:
            p[_HF_ALIASES.get(k, k)] = v
    return p


def resolve_params(p: dict, shapes: dict[str, tuple[int, ...]], path: Path) -> Params:
    """Validate params.json against the tensor shapes; fill what the release leaves out."""
    notes: list[str] = []
    guessed: list[str] = []
    if p.get("model_type", "transformer") != "transformer":
        raise FormatError(path, f"model_type {p['model_type']!r} is not supported (enc converts Mistral transformers)")
    if p.get("vision_encoder"):
        raise FormatError(path, "vision_encoder (Pixtral) checkpoints are not supported")
    for req in ("dim", "n_layers", "n_heads"):
        if req not in p:
            raise ConfigError(path, f"params.json lacks {req!r}")
    dim, n_layers, n_heads = _int(p["dim"], "dim", path), _int(p["n_layers"], "n_layers", path), \
        _int(p["n_heads"], "n_heads", path)
    if p.get("head_dim") is None and dim % n_heads:
        raise ConfigError(path, f"dim {dim} is not a multiple of n_heads {n_heads} (and no head_dim is given)")
    head_dim = _int(p["head_dim"], "head_dim", path) if p.get("head_dim") is not None else dim // n_heads
    n_kv = _int(p["n_kv_heads"], "n_kv_heads", path) if p.get("n_kv_heads") is not None else n_heads
    if n_heads % n_kv:
        raise ConfigError(path, f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    if head_dim % 2:
        raise ConfigError(path, f"head_dim {head_dim} must be even for rotary embeddings")
    norm_eps = _float(p.get("norm_eps", 1e-5), "norm_eps", path)

    moe = p.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(path, f"moe must be an object, got {moe!r}")
    n_exp = _int(moe.get("num_experts"), "moe.num_experts", path) if moe else 0
    k_exp = _int(moe.get("num_experts_per_tok", 2), "moe.num_experts_per_tok", path) if moe else 2
    if moe and k_exp > n_exp:
        raise ConfigError(path, f"moe.num_experts_per_tok {k_exp} > num_experts {n_exp}")

    sw = p.get("sliding_window")
    if isinstance(sw, list):
        if not sw or not all(isinstance(w, (int, float, str)) or w is None for w in sw) or len(set(sw)) != 1:
            raise FormatError(path, f"per-layer sliding windows {sw} are not supported")
        sw = sw[0]
    sliding_window = None if sw in (None, 0, "0", "none", "null") else _int(sw, "sliding_window", path)

    if p.get("rope_theta") is not None:
        rope_theta = _float(p["rope_theta"], "rope_theta", path)
    else:
        # mistral-inference (Dec 2023): 1e6 unless a sliding window is set. Right for every release:
        # 7B v0.1 (window 4096) used 1e4; Mixtral's torrent params (no window, no theta) use 1e6.
        rope_theta = 1e6 if sliding_window is None else 1e4
        guessed.append(f"rope_theta {rope_theta:g} (params.json has none)")
        notes.append(f"params.json has no rope_theta; using {rope_theta:g} "
                     f"({'no sliding window' if sliding_window is None else 'sliding window set'}); "
                     "override with --rope-theta")

    emb = shapes.get("tok_embeddings.weight")
    if emb is None:
        raise ConfigError(path, "the checkpoint has no tok_embeddings.weight")
    vocab = _int(p["vocab_size"], "vocab_size", path) if p.get("vocab_size") not in (None, -1) else emb[0]
    ffn_key = "layers.0.feed_forward.experts.0.w1.weight" if n_exp else "layers.0.feed_forward.w1.weight"
    hidden_dim = _int(p["hidden_dim"], "hidden_dim", path) if p.get("hidden_dim") is not None else \
        (shapes[ffn_key][0] if ffn_key in shapes else 0)
    max_seq = _int(p.get("max_seq_len", 32768), "max_seq_len", path)
    return Params(dim, n_layers, n_heads, head_dim, hidden_dim, n_kv, norm_eps, vocab, rope_theta, sliding_window,
                  n_exp, k_exp, max_seq, tuple(notes), tuple(guessed))


def reference_shapes(p: Params, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of the reference layout and the shape params.json implies."""
    D, hd = p.dim, p.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (p.vocab_size, D), "norm.weight": (D,)}
    if not tied:
        out["output.weight"] = (p.vocab_size, D)
    for i in range(p.n_layers):
        L = f"layers.{i}."
        out.update({
            L + "attention_norm.weight": (D,), L + "ffn_norm.weight": (D,),
            L + "attention.wq.weight": (p.n_heads * hd, D), L + "attention.wk.weight": (p.n_kv_heads * hd, D),
            L + "attention.wv.weight": (p.n_kv_heads * hd, D), L + "attention.wo.weight": (D, p.n_heads * hd),
        })
        ffn = {"w1.weight": (p.hidden_dim, D), "w2.weight": (D, p.hidden_dim), "w3.weight": (p.hidden_dim, D)}
        if p.is_moe:
            out[L + "feed_forward.gate.weight"] = (p.num_experts, D)
            for e in range(p.num_experts):
                out.update({f"{L}feed_forward.experts.{e}.{k}": s for k, s in ffn.items()})
        else:
            out.update({f"{L}feed_forward.{k}": s for k, s in ffn.items()})
    return out


# --------------------------------------------------------------------------- reading weights

def _pth_tensors(path: Path) -> dict[str, LazyTensor]:
    """A consolidated ``.pth`` read by enc's lazy weights-only reader: no pickled code runs, the zip
    members must be STORED (a DEFLATED data.pkl is a decompression bomb torch never writes), every
    storage's CRC32 is checked as it is read, and a tensor may not hold more elements than its
    storage (a stride-0 ``expand`` would otherwise blow a few KB up into gigabytes of output)."""
    indexed = _indexed_pth_tensors(path)  # the plain case, without torch (enc.io.pth_index)
    if indexed is not None:
        return indexed
    from enc.io.megatron_pickle import ByteRange, StoredTensor, load_lazy

    sd = load_lazy(ByteRange.whole_file(path))
    if not isinstance(sd, dict) or not sd:
        raise FormatError(path, "expected a state dict (a mapping of names to tensors)")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, StoredTensor)]
    if bad:
        raise FormatError(path, f"entries that are not tensors: {', '.join(map(str, bad[:5]))} (a nested or "
                                "training checkpoint? enc expects consolidated weights)")
    return {k: v.lazy(k) for k, v in sd.items()}


def _indexed_pth_tensors(path: Path) -> dict[str, LazyTensor] | None:
    """Tensors of a plain ``torch.save`` state dict from its index alone; each is read (zip CRC-32
    checked) when asked for, or moved as bytes by the writer. None: not the plain case."""
    from enc.io.fastcopy import enabled
    from enc.io.pth_index import read_index

    index = read_index(path) if enabled() else None  # ENC_FASTCOPY=0: the path enc had before
    if index is None:
        return None
    out = {}
    for k, e in index.items():
        raw = raw_source(path, e.offset, e.nbytes, e.shape, e.dtype.itemsize, ("crc32", e.crc32), label=f"tensor {k}")
        if raw is None:
            return None
        out[k] = LazyTensor(e.shape, e.dtype, partial(_load_raw, raw, e.dtype), (k,), raw=raw)
    return out


def _load_raw(raw, dtype: DType) -> torch.Tensor:
    a = raw.materialize()
    if a.size == 0:
        return torch.empty(raw.shape, dtype=dtype.torch)
    return torch.frombuffer(np.ascontiguousarray(a).reshape(-1).view(np.uint8), dtype=dtype.torch).reshape(raw.shape)


def _st_tensors(path: Path) -> dict[str, LazyTensor]:
    from enc.io.safetensors_in import lazy_tensors

    return lazy_tensors(path)


def _then(a: RawOp, b: RawOp) -> RawOp:
    return RawOp(f"{a.name}|{b.name}", lambda x: b.fn(a.fn(x)))


def _file_index(p: Path) -> int:
    m = re.search(r"\.(\d+)\.(pth|pt|safetensors)$", p.name)
    return int(m.group(1)) if m else 0


def find_weight_files(root: Path) -> list[Path]:
    pth = [p for p in root.glob("consolidated*.pt*") if re.fullmatch(r"consolidated(\.\d+)?\.pth?", p.name)]
    st = [p for p in root.glob("consolidated*.safetensors") if re.fullmatch(r"consolidated(\.\d+)?\.safetensors",
                                                                              p.name)]
    if pth and st:
        raise FormatError(root, f"both {pth[0].name} and {st[0].name} are present; a release holds one format "
                                "(move the other away)")
    files = sorted(pth or st, key=_file_index)
    if not files:
        parts = sorted(root.glob("consolidated.*.pth-split*"))
        if parts:
            raise FormatError(root, f"{len(parts)} byte-split parts ({parts[0].name} ...) must be joined first: "
                                    "cat $(ls consolidated.00.pth-split* | sort -V) > consolidated.00.pth")
        raise MissingFile(root / "consolidated.00.pth", "no consolidated.*.pth or consolidated.safetensors weights")
    return files


# --------------------------------------------------------------------------- tokenizer files


def find_tokenizer(root: Path, override: str | Path | None) -> tuple[Path | None, str | None]:
    """(sentencepiece model, None) or (None, why there is none)."""
    if override:
        p = Path(override)
        if not p.is_file():
            raise MissingFile(p, "tokenizer file not found")
        if p.name.endswith(".json"):
            raise FormatError(p, "tekken.json (tiktoken-style) tokenizers are not supported; pass a sentencepiece "
                                 "tokenizer.model")
        return p, None
    for name in ("tokenizer.model", "tokenizer.model.v3"):
        if (root / name).is_file():
            return root / name, None
    others = sorted(root.glob("tokenizer.model.v*"))
    if others:
        return others[-1], None
    if (root / "tekken.json").is_file():
        return None, ("tekken.json (tiktoken-style BPE, Mistral NeMo and later) is not supported by enc; the weights "
                      "were converted without a tokenizer")
    return None, ("no tokenizer found (tokenizer.model or tokenizer.model.v3); the weights were converted without "
                  "one: re-run with --tokenizer PATH/tokenizer.model --force to add it")


CHAT_TEMPLATE_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = none %}{%- endif %}"
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}[INST]{% if system and loop.last %}{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
    "{%- elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{%- else %}{{ raise_exception('roles must be system (first), user or assistant') }}{%- endif %}"
    "{%- endfor %}"
)
CHAT_TEMPLATE_V1 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = none %}{%- endif %}"
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}[INST] {% if system and loop.first %}{{ system }}\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{%- elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{%- else %}{{ raise_exception('roles must be system (first), user or assistant') }}{%- endif %}"
    "{%- endfor %}"
)

# Texts the written tokenizer.json must tokenize exactly as sentencepiece, or it is not written.
# (Control-token strings such as "<s>" or "[INST]" typed in text are the one intended difference:
# HF tokenizers map them to their ids, sentencepiece spells them out.)
SELF_CHECK_TEXTS = [
    "Hello world", " leading space", "two  spaces\tand a tab\nnew line\n\n", "émojis 🙂 ünïcödé 日本語 中文",
    "numbers 12345 3.14159 -7", "CamelCase snake_case kebab-case", "", "a", "   ", "\u2581already", "<b> tags",
    "def f(x):\n    return x ** 2  # code", "Ωμέγα Привет مرحبا שלום", "🙂🙃🤖💡", "end.",
]


def spm_tokenizer_json(model_file: Path):
    """A ``tokenizers`` BPE equal to the sentencepiece model (Llama layout), or None if it cannot be exact."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing

    sp = spm.SentencePieceProcessor()
    sp.Load(str(model_file))
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    normal = {sp.IdToPiece(i): sp.GetScore(i) for i in range(n)
              if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))}
    merges: list[tuple[str, str, float, int, int]] = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((left, right, score, vocab[left], vocab[right]))
    merges.sort(key=lambda m: (-m[2], m[3], m[4]))
    unk = sp.IdToPiece(sp.unk_id())
    tok = Tokenizer(BPE(vocab, [(a, b) for a, b, *_ in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    if not sp.encode("a", out_type=str)[0].startswith("\u2581"):
        return None  # no dummy prefix: not the Llama/Mistral layout this writer knows
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bos = sp.IdToPiece(sp.bos_id()) if sp.bos_id() >= 0 else None
    if bos:
        tok.post_processor = TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                special_tokens=[(bos, sp.bos_id())])
    tok.add_special_tokens([AddedToken(sp.IdToPiece(i), special=True, normalized=False)
                            for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)])
    for text in SELF_CHECK_TEXTS:
        want = ([sp.bos_id()] if bos else []) + sp.encode(text)
        if tok.encode(text).ids != want:
            return None
    return tok


# --------------------------------------------------------------------------- the converter


class MistralConverter(Converter):
    name = "mistral"
    accepts = {"tokenizer": "tokenizer.model (sentencepiece) to use",
               "chat_template": "write a chat template (default: only for an instruct release, by its name)", "num_heads": "params.json n_heads",
               "num_kv_heads": "params.json n_kv_heads", "rope_theta": "params.json rope_theta",
               "sliding_window": "params.json sliding_window (0: none)",
               **{k: "params.json field" for k in sorted(_KNOWN | set(_HF_ALIASES))}}
    description = "Mistral AI raw release (params.json + consolidated.*.pth / consolidated.safetensors)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        has_weights = any(re.fullmatch(r"consolidated(\.\d+)?\.(pth?|safetensors)|consolidated\.\d+\.pth-split\d+",
                                       p.name) for p in path.iterdir())
        return has_weights

    def __init__(self, path, options=None):
        super().__init__(path, options)
        self.root = self.path
        self.params_path = self.root / PARAMS
        self.raw_params = read_params(self.params_path, self.options.overrides)
        self.files = find_weight_files(self.root)
        self._source: dict[str, LazyTensor] | None = None
        self._reference: dict[str, LazyTensor] | None = None
        self.layout = ""
        ref = self.reference_tensors()
        shapes = {k: v.shape for k, v in ref.items()}
        self.params = resolve_params(self.raw_params, shapes, self.params_path)
        self.tied = "output.weight" not in ref
        self._check_shapes(ref)
        self.spm, self.tokenizer_warning = find_tokenizer(self.root, self.options.overrides.get("tokenizer"))
        self._fast_lock = threading.Lock()
        self._checks = None  # ChecksumsAhead started by verify_ahead, used by the next reference run
        self._ref_run = None  # the numpy reference started by verify_ahead, used by the next reference run
        self._active_run = None  # the numpy reference a parity run is reading

    # ------------------------------------------------------------------ tensors
    def source_files(self) -> list[Path]:
        extra = [p for p in (self.params_path, getattr(self, "spm", None)) if p is not None]
        return list(self.files) + extra

    def source_tensors(self) -> dict[str, LazyTensor]:
        """Every tensor under its file's name; tensor-parallel shards are told apart as ``FILE:key``."""
        if self._source is not None:
            return self._source
        per_file = []
        for f in self.files:
            per_file.append(_st_tensors(f) if f.suffix == ".safetensors" else _pth_tensors(f))
        if len(per_file) == 1:
            self.layout = "single file"
            self._source = per_file[0]
            return self._source
        keysets = [set(d) for d in per_file]
        if all(k == keysets[0] for k in keysets):
            self.layout = f"{len(per_file)} tensor-parallel shards"
            self._tp = [{k: LazyTensor(t.shape, t.dtype, t.loader, (f"{f.name}:{k}",)) for k, t in d.items()}
                        for f, d in zip(self.files, per_file, strict=True)]
            self._source = {t.sources[0]: t for d in self._tp for t in d.values()}
            return self._source
        total = sum(len(k) for k in keysets)
        if len(set().union(*keysets)) != total:
            raise FormatError(self.root, "the consolidated.* files neither share their keys (tensor-parallel shards) "
                                         "nor split them (one set of layers per file)")
        self.layout = f"{len(per_file)} files split by layer"
        self._source = {k: t for d in per_file for k, t in d.items()}
        return self._source

    def reference_tensors(self) -> dict[str, LazyTensor]:
        """The checkpoint in Mistral's reference layout: TP shards joined, stacked experts split."""
        if self._reference is not None:
            return self._reference
        src = self.source_tensors()
        if self.layout.endswith("tensor-parallel shards"):
            merged = {k: self._merge_tp(k) for k in self._tp[0]}
        else:
            merged = dict(src)
        out: dict[str, LazyTensor] = {}
        for key, t in merged.items():
            hit = next(((rx.match(key), v) for rx, v in _STACKED_RX if rx.match(key)), None)
            if hit is None:
                out[key] = t
                continue
            m, (target, how) = hit
            layer = m.group(1)
            if how == "copy":
                out[target.format(layer)] = t
                continue
            out.update(self._unstack(t, target, layer, how == "rows_transposed"))
        self._reference = out
        return out

    def _merge_tp(self, key: str) -> LazyTensor:
        parts = [d[key] for d in self._tp]
        dim = next((d for rx, d in _TP_RX if rx.match(key)), "unknown")
        if dim == "unknown":
            return combine(parts, lambda ts: ts[0], parts[0].shape, "tp:unknown")  # reported as unmapped later
        if dim is None:
            where = self.root

            def same(ts: list[torch.Tensor]) -> torch.Tensor:
                for t in ts[1:]:
                    if not torch.equal(t, ts[0]):
                        raise CorruptCheckpoint(where, f"{key} is replicated across shards but differs between them")
                return ts[0]

            return combine(parts, same, parts[0].shape, "tp:replicated")
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        return combine(parts, lambda ts, d=dim: torch.cat(ts, d), shape, f"tp:cat(dim={dim})")

    def _unstack(self, t: LazyTensor, target: str, layer: str, transposed: bool) -> dict[str, LazyTensor]:
        p = self.raw_params
        moe = p.get("moe") or {}
        n = moe.get("num_experts") if isinstance(moe, dict) else None
        if not isinstance(n, int) or n <= 0 or t.shape[0] % n:
            raise ConfigError(self.params_path, f"stacked experts {t.sources[0]} {list(t.shape)} need moe.num_experts "
                                                "in params.json dividing its rows")
        ff, d = t.shape[0] // n, t.shape[1]
        out = {}
        for e in range(n):
            rows = row_slice(e * ff, (e + 1) * ff)
            if transposed:
                out[target.format(layer, e)] = t.apply(lambda w, e=e: w[e * ff:(e + 1) * ff].t().contiguous(),
                                                       (d, ff), f"expert {e} rows, transposed",
                                                       raw_op=lambda s, rows=rows: _then(rows, transpose2d()))
            else:
                out[target.format(layer, e)] = t.apply(lambda w, e=e: w[e * ff:(e + 1) * ff].contiguous(), (ff, d),
                                                       f"expert {e} rows", raw_op=lambda s, rows=rows: rows)
        return out

    def _check_shapes(self, ref: dict[str, LazyTensor]) -> None:
        p = self.params
        layers = {int(m.group(1)) for k in ref if (m := _LAYER_RX.match(k))}
        if layers and max(layers) >= p.n_layers:
            raise ConfigError(self.params_path, f"params.json says n_layers={p.n_layers} but the checkpoint has "
                                                f"layers.{max(layers)}")
        if layers != set(range(p.n_layers)):
            missing = sorted(set(range(p.n_layers)) - layers)
            raise ConfigError(self.params_path, f"params.json says n_layers={p.n_layers} but the checkpoint lacks "
                                                f"layers {missing[:5]}")
        has_experts = any(".feed_forward.experts." in k for k in ref)
        if has_experts and not p.is_moe:
            raise ConfigError(self.params_path, "the checkpoint has MoE experts but params.json has no moe section")
        if p.is_moe and not has_experts:
            raise ConfigError(self.params_path, "params.json has a moe section but the checkpoint has dense "
                                                "feed-forward layers")
        want = reference_shapes(p, self.tied)
        for key, shape in want.items():
            t = ref.get(key)
            if t is not None and tuple(t.shape) != shape:
                raise ConfigError(self.params_path, f"params.json disagrees with the weights: {key} has shape "
                                                    f"{list(t.shape)}, params imply {list(shape)}")

    # ------------------------------------------------------------------ config / plan
    def hf_config(self) -> dict:
        p = self.params
        bos, eos = self._special_ids()
        cfg = {
            "architectures": ["MixtralForCausalLM" if p.is_moe else "MistralForCausalLM"],
            "model_type": "mixtral" if p.is_moe else "mistral",
            "vocab_size": p.vocab_size, "hidden_size": p.dim, "intermediate_size": p.hidden_dim,
            "num_hidden_layers": p.n_layers, "num_attention_heads": p.n_heads, "num_key_value_heads": p.n_kv_heads,
            "head_dim": p.head_dim, "hidden_act": "silu", "max_position_embeddings": p.max_seq_len,
            "initializer_range": 0.02, "rms_norm_eps": p.norm_eps, "use_cache": True,
            "rope_theta": p.rope_theta, "sliding_window": p.sliding_window, "attention_dropout": 0.0,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None,
            "tie_word_embeddings": self.tied,
        }
        if p.is_moe:
            cfg.update({"num_local_experts": p.num_experts, "num_experts_per_tok": p.num_experts_per_tok,
                        "output_router_logits": False, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0})
        return cfg

    def tokenizer(self):
        """The release's sentencepiece tokenizer (None without one)."""
        if self.spm is None:
            return None
        if getattr(self, "_tok", None) is None:
            from enc.tokenization import LlamaSentencePiece

            self._tok = LlamaSentencePiece(self.spm)
        return self._tok

    def _special_ids(self) -> tuple[int, int]:
        tok = self.tokenizer()
        if tok is None:
            return 1, 2
        return (tok.bos_id if tok.bos_id is not None else 1), (tok.eos_id if tok.eos_id is not None else 2)

    def _model_config(self):
        from enc.models.mistral import MistralConfig

        return MistralConfig.from_dict(self.hf_config())

    def expected_keys(self) -> set[str]:
        from enc.models.mistral_keys import expected_keys  # torch-free; held equal to the model's by a test

        return expected_keys(self.hf_config())

    def plan(self) -> Plan:
        ref = self.reference_tensors()
        table = key_table(self.params.n_heads, self.params.n_kv_heads)
        plan = apply_table(ref, table, DROP, self.files[0])
        # a dropped reference tensor drops every source tensor it was made of (all TP shards)
        plan.dropped = {src: why for key, why in plan.dropped.items() for src in ref[key].sources}
        plan.notes.extend(self.params.notes)
        return plan

    def assumptions(self) -> list[str]:
        return list(self.params.guessed)

    def summary(self) -> dict:
        return {"params": asdict(self.params), "layout": self.layout, "files": [f.name for f in self.files],
                "tokenizer": str(self.spm) if self.spm else self.tokenizer_warning, "tied_output": self.tied}

    # ------------------------------------------------------------------ extra files
    def prepare_extra_files(self) -> None:
        self._fast_tokenizer()

    def _fast_tokenizer(self):
        """tokenizer.json's model (built once: ~0.5-1 s of Python for a 32k vocabulary)."""
        with self._fast_lock:
            if not hasattr(self, "_fast"):
                self._fast = spm_tokenizer_json(self.spm) if self.spm is not None else None
            return self._fast

    def write_extra_files(self, out_dir: Path) -> list[str]:
        warnings = list(self.params.notes)
        bos, eos = self._special_ids()
        gen = {"bos_token_id": bos, "eos_token_id": eos}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if self.spm is None:
            warnings.append(self.tokenizer_warning or "no tokenizer")
            return warnings
        tok = self.tokenizer()
        if tok.vocab_size != self.params.vocab_size:
            warnings.append(f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
                            f"{self.params.vocab_size}")
        shutil.copyfile(self.spm, out_dir / "tokenizer.model")
        # A chat template only for an instruct release (its directory name says so) or when asked (--chat-template):
        # a base model given one would be run with [INST] wrapping it was never trained on.
        want = self.options.overrides.get("chat_template")
        if want is None:
            want = "instruct" in self.root.resolve().name.lower()
        template = (CHAT_TEMPLATE_V3 if "[INST]" in tok.controls else CHAT_TEMPLATE_V1) if want else None
        specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.id_to_token(tok.unk_id)}
        fast = self._fast_tokenizer()
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "add_prefix_space": True,
            "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
            "model_max_length": self.params.max_seq_len, "pad_token": None, **specials,
            **({"chat_template": template} if template else {}),
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        if fast is not None:
            fast.save(str(out_dir / "tokenizer.json"))
        else:
            warnings.append("no tokenizer.json written: a tokenizers BPE could not reproduce sentencepiece's ids "
                            "exactly for this model (tokenizer.model is there)")
        return warnings

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        from enc.parity import make_probes

        bos, _ = self._special_ids()
        V = self.params.vocab_size
        return make_probes(V, self.params.max_seq_len, low=min(3, V - 1), bos_id=bos)

    teacher_forced = True  # parity runs layer-local: see enc.parity and converters/mistral_reference.py

    def verify_ahead(self) -> None:
        """Start verifying the source's checksums and computing the reference (numpy) on helper threads.

        Torch-free: `enc parity` calls this before importing torch, so both run while torch loads (see
        enc.parity_weights and converters/mistral_reference_np.py). The reference runs on the probes
        :meth:`probes` will give; :meth:`reference_activations` recomputes it for any other probes.
        """
        from enc.converters.mistral_reference_np import ReferenceRun, probe_arrays
        from enc.parity_weights import ChecksumsAhead

        if self._checks is None:
            ref = self.reference_tensors()
            first = [ref[k] for k in ("tok_embeddings.weight",) if k in ref]
            self._checks = ChecksumsAhead(first + [t for k, t in ref.items() if k != "tok_embeddings.weight"])
        if self._ref_run is None:
            bos, _ = self._special_ids()
            V = self.params.vocab_size
            probe = probe_arrays(V, self.params.max_seq_len, low=min(3, V - 1), bos_id=bos)
            if probe is not None and sys.byteorder == "little":
                self._ref_run = ReferenceRun(self.reference_tensors(), self.params, self.tied, *probe, self._checks)

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        """The float32 reference per probe: converters/mistral_reference_np.py on a helper thread (the
        math of converters/mistral_reference.py, up to float32 rounding; that one on a big-endian host)."""
        from enc.converters.mistral_reference_np import ReferenceRun

        ref = self.reference_tensors()
        checks, self._checks = self._checks, None  # one run's verdicts only
        run, self._ref_run = self._ref_run, None
        try:
            for probe in probes:
                if sys.byteorder != "little":
                    yield from reference_forward(ref, self.params, self.tied, probe, checks)
                    continue
                ids, mask = probe.input_ids.numpy(), probe.attention_mask.numpy()
                if run is None or not run.matches(ids, mask):
                    if run is not None:
                        run.close()
                    run = ReferenceRun(ref, self.params, self.tied, ids, mask, checks)
                self._active_run = run
                valid = probe.attention_mask.bool()
                for name, kind, a, topk, base in run:
                    yield Activation(name, torch.from_numpy(a), kind, valid,
                                     topk=None if topk is None else torch.from_numpy(topk), base=base)
                run.close()
                run = None
        finally:
            self._active_run = None
            if run is not None:
                run.close()
            if checks is not None:
                checks.close()

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe], teacher=None) -> Iterator[Activation]:
        for probe in probes:
            yield from _one_thread_while(converted_forward(Path(out_dir), probe, teacher), self._reference_busy)

    def close(self) -> None:
        """Stop a reference run or checksum thread that no parity run took over."""
        run, self._ref_run = self._ref_run, None
        checks, self._checks = self._checks, None
        if run is not None:
            run.close()
        if checks is not None:
            checks.close()
        super().close()

    def _reference_busy(self) -> bool:
        run = self._active_run
        return run is not None and run.running


def _one_thread_while(acts: Iterator[Activation], busy) -> Iterator[Activation]:
    """``acts`` with torch on one thread while ``busy()`` (the numpy reference runs on the other cores):
    torch's idle OpenMP workers would spin against it), on its usual threads after."""
    n = torch.get_num_threads()
    try:
        while True:
            want = 1 if n > 1 and busy() else n
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
            act = next(acts, None)
            if act is None:
                return
            yield act
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        acts.close()


__all__ = ["MistralConverter", "Params", "key_table", "read_params", "resolve_params", "spm_tokenizer_json",
           "reference_forward", "converted_forward"]
