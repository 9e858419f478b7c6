"""Mistral (dense) and Mixtral (top-k routed MoE) in the Hugging Face layout.

Parameter names are exactly the HF state-dict keys (``model.layers.{i}.self_attn.q_proj.weight``,
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` ...). RMSNorm, rotate-half RoPE (HF
layout: q/k rows were permuted at conversion), grouped-query attention through SDPA, optional
sliding window (a query sees the last ``sliding_window`` keys, itself included, as transformers
and mistral-inference's cache path do), SwiGLU MLP or a top-k routed mixture of experts.

Decoder protocol (shared with every enc decoder, used by :mod:`enc.generation`)::

    cache = model.new_cache(batch_size, max_len)          # static, preallocated K/V
    logits = model(input_ids, cache=cache, pos=0)         # [B, T, V] float32; pos = tokens cached

Fast CPU decoding: :meth:`MistralForCausalLM.prepare_inference` fuses q/k/v and gate/up into one
matrix each and, where oneDNN is available, re-lays every weight out in oneDNN's blocked format
(``torch.ops.mkldnn._reorder_linear_weight``): batch-1 decode is memory-bandwidth bound and the
blocked matrix-vector kernel streams weights markedly faster than the plain one (measured by
benchmarks/bench_mistral_decode.py). ``from_pretrained`` calls it unless ``prepare=False``.
Weights left plain (float32 on the CPU: decode splits them by rows, enc.models.rowsplit) are placed on
2 MiB huge pages (enc.models.hugepages), same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError, CorruptCheckpoint
from enc.models import hugepages, rowsplit
from enc.models.common import config_errors

Loader = Callable[[], torch.Tensor]

# --------------------------------------------------------------------------- config


@dataclass
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    num_local_experts: int = 0  # 0: dense Mistral; >0: Mixtral
    num_experts_per_tok: int = 2
    model_type: str = "mistral"

    @classmethod
    @config_errors
    def from_dict(cls, d: dict) -> MistralConfig:
        """Like transformers' MistralConfig/MixtralConfig: their class defaults apply to absent keys."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and (v is not None or k == "sliding_window")}
        mixtral = d.get("model_type") == "mixtral"
        if mixtral:
            kw.setdefault("num_local_experts", 8)
            kw.setdefault("rope_theta", 1e6)
            kw.setdefault("rms_norm_eps", 1e-5)
        elif "sliding_window" not in d:
            kw["sliding_window"] = 4096  # MistralConfig's class default
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rope, dict):
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ConfigError(None, f"rope type {kind!r} is not supported by enc's Mistral runtime")
            if "rope_theta" in rope and "rope_theta" not in d:
                kw["rope_theta"] = rope["rope_theta"]
        cfg = cls(**kw)
        if not cfg.head_dim:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.num_key_value_heads is None or cfg.num_key_value_heads <= 0:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(None, f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                                    f"num_key_value_heads {cfg.num_key_value_heads}")
        if cfg.hidden_act not in ("silu", "swish"):
            raise ConfigError(None, f"hidden_act {cfg.hidden_act!r} is not supported (Mistral uses silu)")
        if cfg.sliding_window is not None and cfg.sliding_window <= 0:
            cfg.sliding_window = None
        return cfg

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


# --------------------------------------------------------------------------- fast linear


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x W^T with W stored in oneDNN's blocked layout (CPU) or plain (elsewhere)."""

    def __init__(self, weight: torch.Tensor, onednn: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.onednn = onednn
        w = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None) if onednn else weight.detach()
        self.register_buffer("weight", w, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if x.numel() == self.in_features and rowsplit.active():  # one token inside generate's decode loop
            return rowsplit.matvec(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


def _cat(ws: list[torch.Tensor], onednn: bool) -> torch.Tensor:
    """Rows of ``ws`` in one matrix; plain (decode-streamed) CPU weights on huge pages (enc.models.hugepages)."""
    return torch.cat(ws, 0) if onednn else hugepages.cat(ws)


def _own(w: torch.Tensor, onednn: bool) -> torch.Tensor:
    return w if onednn else hugepages.copy(w)


def _onednn_works(dtype: torch.dtype) -> bool:
    """oneDNN packing exists and gives F.linear's numbers for this dtype (checked once on a small case)."""
    if not _onednn_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        x = torch.randn(3, 32, generator=g).to(dtype)
        packed = PackedLinear(w, True)
        return bool(torch.allclose(packed(x).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


# --------------------------------------------------------------------------- modules


class Linear(nn.Linear):
    """nn.Linear without random initialisation (weights always come from a checkpoint)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary:
    """cos/sin tables for rotate-half RoPE, computed in float32, grown on demand."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu"):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.cos = self.sin = torch.empty(0, head_dim, device=device)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, pos: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if pos + n > self.cos.shape[0]:
            length = max(pos + n, 2 * self.cos.shape[0], 256)
            t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
            self._cast = {}
        if dtype not in self._cast:
            self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self._cast[dtype]
        return cos[pos:pos + n], sin[pos:pos + n]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Static preallocated keys/values: [layers, B, kv_heads, max_len, head_dim] each."""

    def __init__(self, cfg: MistralConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.batch_size = batch_size


def attention_mask(pos: int, T: int, start: int, S: int, window: int | None, device) -> torch.Tensor:
    """[T, S - start] bool: query pos+i sees key j when j <= pos+i and j > pos+i-window."""
    q = torch.arange(pos, pos + T, device=device)[:, None]
    k = torch.arange(start, S, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


class Attention(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(D, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(D, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_heads * self.hd, D, bias=False)
        self.qkv: PackedLinear | None = None
        self.o_fast: PackedLinear | None = None

    def fuse(self, onednn: bool) -> None:
        w = _cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], onednn)
        self.qkv = PackedLinear(w, onednn)
        self.o_fast = PackedLinear(_own(self.o_proj.weight, onednn), onednn)
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                layer: int, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, KV, hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        start = 0
        if cache is not None:
            if pos + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {pos + T}")
            cache.k[layer, :B, :, pos:pos + T] = k
            cache.v[layer, :B, :, pos:pos + T] = v
            S = pos + T
            if self.window is not None:
                start = max(0, pos - self.window + 1)
            k, v = cache.k[layer, :B, :, start:S], cache.v[layer, :B, :, start:S]
        else:
            S = T
        if T == 1:
            # one query per head: fold the query heads of each kv group into the "sequence" axis (no repeat)
            rep = H // KV
            o = F.scaled_dot_product_attention(q.reshape(B, KV, rep, hd), k, v)
            o = o.reshape(B, 1, H * hd)
        else:
            if pos == 0 and start == 0 and S == T and (self.window is None or self.window >= T):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
            else:
                mask = attention_mask(pos, T, start, S, self.window, x.device)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
            o = o.transpose(1, 2).reshape(B, T, H * hd)
        return self.o_fast(o) if self.o_fast is not None else self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F_, bias=False)
        self.up_proj = Linear(D, F_, bias=False)
        self.down_proj = Linear(F_, D, bias=False)
        self.gate_up: PackedLinear | None = None
        self.down_fast: PackedLinear | None = None

    def fuse(self, onednn: bool) -> None:
        self.gate_up = PackedLinear(_cat([self.gate_proj.weight, self.up_proj.weight], onednn), onednn)
        self.down_fast = PackedLinear(_own(self.down_proj.weight, onednn), onednn)
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down_fast(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.w1 = Linear(D, F_, bias=False)
        self.w2 = Linear(F_, D, bias=False)
        self.w3 = Linear(D, F_, bias=False)
        self.w13: PackedLinear | None = None
        self.w2_fast: PackedLinear | None = None

    def fuse(self, onednn: bool) -> None:
        self.w13 = PackedLinear(_cat([self.w1.weight, self.w3.weight], onednn), onednn)
        self.w2_fast = PackedLinear(_own(self.w2.weight, onednn), onednn)
        del self.w1, self.w2, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            g, u = self.w13(x).chunk(2, dim=-1)
            return self.w2_fast(F.silu(g) * u)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """Top-k routing as HF Mixtral: softmax over all experts in float32, top-k, renormalise."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))

    def fuse(self, onednn: bool) -> None:
        for e in self.experts:
            e.fuse(onednn)

    def route(self, h: torch.Tensor, experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) per token. ``experts`` [N, k] imposes the choice (parity's teacher-forced
        routing); the weights are still this router's own probabilities of those experts, renormalised."""
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        if experts is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        else:
            idx = experts.to(torch.long)
            w = probs.gather(-1, idx)
        return (w / w.sum(-1, keepdim=True)).to(h.dtype), idx

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        h = x.reshape(-1, D)
        w, idx = self.route(h, None if experts is None else experts.reshape(B * T, -1))
        out = torch.zeros_like(h)
        if h.shape[0] == 1:
            for j, e in enumerate(idx[0].tolist()):
                out += self.experts[e](h) * w[0, j]
        else:
            for e in torch.unique(idx).tolist():
                tok, slot = torch.where(idx == e)
                out.index_add_(0, tok, self.experts[e](h[tok]) * w[tok, slot, None])
        return out.view(B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        if cfg.is_moe:
            self.block_sparse_moe = SparseMoe(cfg)
        else:
            self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, pos: int = 0) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, pos)
        return h + self.ffn(self.post_attention_layernorm(h))


class MistralModel(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MistralForCausalLM(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.config = cfg
        self.model = MistralModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_fast: PackedLinear | None = None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    # -- decoder protocol
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, w.dtype, w.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32). ``hidden_states``, if given, receives the embeddings and each layer's output."""
        x = self.model.embed_tokens(input_ids)
        if hidden_states is not None:
            hidden_states.append(x)
        cos, sin = self.rotary.get(pos, input_ids.shape[1], x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, pos)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.model.norm(x)
        logits = self.lm_fast(x) if self.lm_fast is not None else self.lm_head(x)
        return logits.float()

    def decode_threads(self):
        """Context for the one-token steps of enc.generation: float32 CPU weights split by rows over two threads."""
        w = self.lm_fast.weight if self.lm_fast is not None else None
        if w is None or self.lm_fast.onednn or w.dtype != torch.float32 or w.device.type != "cpu":
            return contextlib.nullcontext(False)
        return rowsplit.decode_threads()

    # -- fast inference
    def prepare_inference(self, onednn: bool | None = None) -> MistralForCausalLM:
        """Fuse q/k/v and gate/up, and (CPU) re-lay weights out for oneDNN. Irreversible; drops the HF params."""
        w = self.model.embed_tokens.weight
        if onednn is None:
            # float32 stays plain: decode splits it by rows over two threads (enc.models.rowsplit), which
            # holds up on a busy machine where oneDNN's fp32 kernel loses 2-3x (issue 16)
            onednn = w.device.type == "cpu" and w.dtype != torch.float32 and _onednn_works(w.dtype)
        for layer in self.model.layers:
            layer.self_attn.fuse(onednn)
            layer.ffn.fuse(onednn)
        tied = self.lm_head.weight is self.model.embed_tokens.weight  # stays shared (no second copy)
        self.lm_fast = PackedLinear(self.lm_head.weight if tied else _own(self.lm_head.weight, onednn), onednn)
        del self.lm_head
        self.rotary = Rotary(self.config.head_dim, self.config.rope_theta, w.device)
        return self


# --------------------------------------------------------------------------- loading


def build(cfg: MistralConfig, device: str | torch.device = "meta") -> MistralForCausalLM:
    with torch.device(device):
        model = MistralForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def expected_keys(cfg: MistralConfig) -> set[str]:
    """The HF keys a checkpoint for ``cfg`` holds (the tied lm_head is not stored)."""
    keys = set(build(cfg).state_dict())
    if cfg.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def hf_tensors(lazy: dict, cfg: MistralConfig, prefix: str = "") -> dict[str, Loader]:
    """name -> loader for the keys under ``prefix``, accepting both HF Mixtral expert layouts.

    Published checkpoints (transformers 4.x) store ``block_sparse_moe.experts.{e}.w{1,2,3}.weight``;
    transformers 5 may store ``mlp.gate.weight`` and fused ``mlp.experts.gate_up_proj`` [E, 2F, D] /
    ``mlp.experts.down_proj`` [E, D, F]. Both become the per-expert names here.
    """
    out: dict[str, Loader] = {}
    F_ = cfg.intermediate_size
    for key, t in lazy.items():
        if not key.startswith(prefix):
            continue
        if cfg.is_moe and ".mlp.experts.gate_up_proj" in key:
            base = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            for e in range(cfg.num_local_experts):
                out[f"{base}{e}.w1.weight"] = lambda t=t, e=e: t.load()[e, :F_]
                out[f"{base}{e}.w3.weight"] = lambda t=t, e=e: t.load()[e, F_:]
        elif cfg.is_moe and ".mlp.experts.down_proj" in key:
            base = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(cfg.num_local_experts):
                out[f"{base}{e}.w2.weight"] = lambda t=t, e=e: t.load()[e]
        elif cfg.is_moe and key.endswith(".mlp.gate.weight"):
            out[key.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")] = t.load
        else:
            out[key] = t.load
    return out


def load_weights(module: nn.Module, loaders: dict[str, Loader], path: Path, dtype: torch.dtype | None,
                 device: str | torch.device, prefix: str = "", optional: tuple[str, ...] = ()) -> None:
    """Strictly assign ``loaders`` (names with ``prefix``) to a meta-device ``module``, one tensor at a time."""
    wanted = dict(module.state_dict(keep_vars=True))
    names = {k[len(prefix):]: k for k in loaders}
    unexpected = sorted(set(names) - set(wanted))
    if unexpected:
        raise CorruptCheckpoint(path, f"unexpected weights for {type(module).__name__}: {', '.join(unexpected[:5])}")
    missing = sorted(k for k in set(wanted) - set(names) if k not in optional)
    if missing:
        raise CorruptCheckpoint(path, f"missing weights for {type(module).__name__}: {', '.join(missing[:5])}")
    for name, full in names.items():
        t = loaders[full]()
        if tuple(t.shape) != tuple(wanted[name].shape):
            raise CorruptCheckpoint(path, f"weight {full} has shape {tuple(t.shape)}, model expects "
                                          f"{tuple(wanted[name].shape)}")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device).contiguous()
        *parents, leaf = name.split(".")
        m = module
        for p in parents:
            m = getattr(m, p)
        setattr(m, leaf, nn.Parameter(t, requires_grad=False))


def config_from_dir(model_dir: str | Path) -> MistralConfig:
    from enc.models.loading import read_config

    try:
        return MistralConfig.from_dict(read_config(model_dir))
    except (TypeError, ValueError) as e:
        raise ConfigError(Path(model_dir) / "config.json", f"invalid Mistral config: {e}") from None
    except ConfigError as e:
        raise ConfigError(Path(model_dir) / "config.json", e.message) from None


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    prepare: bool = True) -> MistralForCausalLM:
    """Load any HF-layout Mistral/Mixtral directory (safetensors, single or sharded)."""
    from enc.models.loading import lazy_weights

    cfg = config_from_dir(model_dir)
    model = build(cfg)
    loaders = hf_tensors(lazy_weights(model_dir), cfg)
    if cfg.tie_word_embeddings:
        loaders.pop("lm_head.weight", None)
    optional = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    load_weights(model, loaders, Path(model_dir), dtype, device, optional=optional)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta, device)
    model.eval()
    if prepare:
        model.prepare_inference()
    return model
