"""GPT-2 in the Hugging Face layout (``GPT2LMHeadModel``), with a static KV cache and SDPA attention.

Parameter names are exactly transformers' (``transformer.h.{i}.attn.c_attn.weight`` ...). The four
projections are GPT-2 ``Conv1D`` layers: weights stored ``[in, out]``. ``lm_head.weight`` is tied to
``transformer.wte.weight`` unless ``tie_word_embeddings`` is false.

Decoder protocol (what ``enc.generation`` codes against)::

    cache = model.new_cache(batch_size, max_len)
    logits = model(input_ids, cache=cache, pos=0)      # prefill: [B, T, V]
    logits = model(next_ids, cache=cache, pos=T)       # one step: pos = tokens already cached
    logits = model(input_ids)                          # no cache: a plain causal forward
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError, UsageError
from enc.models.common import activation, config_errors, no_init
from enc.models.loading import lazy_weights, load_into, read_config

# transformers' GPT2Config.attribute_map
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    @classmethod
    @config_errors
    def from_dict(cls, d: dict) -> GPT2Config:
        names = {f.name for f in fields(cls)}
        kw = {ALIASES.get(k, k): v for k, v in d.items() if ALIASES.get(k, k) in names}
        cfg = cls(**kw)
        activation(cfg.activation_function)  # a clear error for an unknown name
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(None, f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        return cfg

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


def onednn_works(dtype: torch.dtype) -> bool:
    """oneDNN's packed linear exists here and gives F.linear's numbers for ``dtype`` (checked on a small case)."""
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 32, generator=g).to(dtype), torch.randn(3, 32, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with ``weight`` stored ``[in, out]``.

    :meth:`pack` swaps the weight for its ``[out, in]`` transpose, in oneDNN's blocked layout where
    available (inference only: the HF-named ``weight`` parameter is released).
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.packed: torch.Tensor | None = None
        self.onednn = False

    def pack(self, onednn: bool) -> None:
        w = self.weight.detach().t().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None) if onednn else w
        self.onednn = onednn
        del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.packed is None:
            out = torch.addmm(self.bias, flat, self.weight)
        elif self.onednn:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        else:
            out = F.linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


class KVCache:
    """Preallocated keys/values for every layer: ``[n_layer, B, n_head, max_len, head_dim]``."""

    def __init__(self, cfg: GPT2Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_size, self.max_len = batch_size, max_len


def _causal_mask(pos: int, t: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [t, pos+t] mask (True = attend) for queries at pos..pos+t-1; None when not needed."""
    if t == 1:
        return None
    q = torch.arange(pos, pos + t, device=device)[:, None]
    k = torch.arange(pos + t, device=device)[None, :]
    return k <= q


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = cfg.n_head, cfg.head_dim, layer_idx
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is None:
            if key_padding is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() & key_padding[:, None, None, :].bool()
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            ck[:, :, pos:pos + T] = k
            cv[:, :, pos:pos + T] = v
            k, v = ck[:, :, :pos + T], cv[:, :, :pos + T]
            if pos == 0 and T > 1:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(pos, T, x.device), scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Conv1D(cfg.n_embd, inner)
        self.c_proj = Conv1D(inner, cfg.n_embd)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, key_padding)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def embed(self, input_ids: torch.Tensor, pos: int = 0) -> torch.Tensor:
        T = input_ids.shape[1]
        if pos + T > self.config.n_positions:
            raise UsageError(None, f"sequence of {pos + T} tokens is longer than the model's "
                                   f"{self.config.n_positions} positions")
        positions = torch.arange(pos, pos + T, device=input_ids.device)
        return self.wte(input_ids) + self.wpe(positions)[None]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False) -> dict:
        x = self.embed(input_ids, pos)
        hidden = [x] if output_hidden_states else None
        for block in self.h:
            x = block(x, cache, pos, attention_mask)
            if hidden is not None:
                hidden.append(x)
        x = self.ln_f(x)
        if hidden is not None:
            hidden[-1] = x  # as transformers: the last entry is after the final LayerNorm
        return {"last_hidden_state": x, "hidden_states": tuple(hidden) if hidden is not None else None}


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def prepare_inference(self) -> GPT2LMHeadModel:
        """Fast batch-1 decoding on CPU: every projection (and the LM head) re-laid out for oneDNN's
        blocked matrix-vector kernel, which streams the weights faster than ``addmm`` on GPT-2's
        ``[in, out]`` layout (benchmarks/bench_gpt2_generate.py). Inference only: the Conv1D
        weights are replaced, so ``state_dict()`` no longer has them."""
        p = self.transformer.wte.weight
        onednn = p.device.type == "cpu" and onednn_works(p.dtype)
        for m in self.modules():
            if isinstance(m, Conv1D) and m.packed is None:
                m.pack(onednn)
        if onednn:
            self.lm_head_packed = torch.ops.mkldnn._reorder_linear_weight(self.lm_head.weight.detach(), None)
        return self

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "lm_head_packed", None)
        if packed is None:
            return self.lm_head(h)
        out = torch.ops.mkldnn._linear_pointwise(h.reshape(-1, h.shape[-1]), packed, None, "none", [], "")
        return out.view(*h.shape[:-1], out.shape[-1])

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        max_len = min(max_len, self.config.n_positions)
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``). ``attention_mask`` only without a cache."""
        if cache is not None:
            if attention_mask is not None:
                raise UsageError(None, "attention_mask is not supported together with a KV cache")
            if pos + input_ids.shape[1] > cache.max_len:
                raise UsageError(None, f"KV cache holds {cache.max_len} tokens; {pos + input_ids.shape[1]} requested")
        x = self.transformer(input_ids, cache, pos, attention_mask)["last_hidden_state"]
        if last_only:
            x = x[:, -1:]
        return self.logits(x)


def tied_keys(cfg: GPT2Config) -> dict[str, str]:
    return {"lm_head.weight": "transformer.wte.weight"} if cfg.tie_word_embeddings else {}


def build(cfg: GPT2Config, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> GPT2LMHeadModel:
    """The model with uninitialised weights (meta by default: shapes only)."""
    with no_init(), torch.device("meta"):  # no init: shapes only, no dynamo import
        model = GPT2LMHeadModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    prepare: bool = True, **kw) -> GPT2LMHeadModel:
    """Load any HF ``gpt2`` directory (GPT2LMHeadModel or GPT2Model weights), one tensor at a time.

    Keys and shapes are checked first (nothing read); then the weights stream into the allocated
    model, so the peak is the model plus one tensor. ``prepare`` (default) readies it for fast
    inference (:meth:`GPT2LMHeadModel.prepare_inference`).
    """
    raw = read_config(model_dir)
    cfg = GPT2Config.from_dict(raw)
    weights = lazy_weights(model_dir)
    if not any(k.startswith("transformer.") for k in weights):  # saved from GPT2Model
        weights = {f"transformer.{k}": v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old buffers
    if dtype is None:
        dtype = next((v.dtype for v in weights.values() if v.dtype.is_floating_point), torch.float32)
    model = build(cfg, device="meta", dtype=dtype)
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    load_into(model, shapes, Path(model_dir), tied=tied_keys(cfg))  # strict names and shapes; reads nothing
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, lazy in weights.items():
            params[k].copy_(lazy.load())
    return model.eval().prepare_inference() if prepare else model.eval()
