"""MEGA (Ma et al. 2022) in the Hugging Face 4.x layout: ``MegaForMaskedLM`` / ``MegaForCausalLM``.

transformers removed MEGA in 5.0; this runs the directories it wrote (``mega.layers.{i}.mega_layer.*``,
``ema_gate.*``, ``qk_weight/qk_bias``...) with the same computation, and the fairseq-only parts enc's
converter adds (``embed_scale``, ``final_norm``; keys transformers 4.x never had).

A block: (pre- or post-) norm -> multi-dimension damped EMA (a long convolution, by FFT) -> single-head
gated attention whose query and key share one ``z`` projection (softmax, relu^2 or laplace; simple or
rotary relative position bias; optionally within fixed-size chunks) -> gated residual -> normalized FFN.
Activations run batch-first here ([B, T, D]); transformers ran them sequence-first.

One difference from transformers 4.x is deliberate and switched by config: 4.x's ``MegaRMSNorm`` drops its
normalisation (``input * rsqrt(...)`` is computed and discarded), so an ``rmsnorm`` model computes
``x * weight``. Directories written by transformers keep that behaviour (``rmsnorm_normalize`` absent/false),
so they reproduce what 4.x computed; fairseq checkpoints converted by enc set ``rmsnorm_normalize: true``,
the original ``x * weight * rsqrt(mean(x^2) + eps)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.models.common import build

ACT = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh,
       "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_accurate": lambda x: F.gelu(x, approximate="tanh")}


def laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


ATTN_ACT = {"relu2": lambda x: F.relu(x).square(), "laplace": laplace}


@dataclass
class MegaConfig:
    vocab_size: int = 30522
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 256
    ema_projection_size: int = 16
    bidirectional: bool = True
    shared_representation_size: int = 64
    use_chunking: bool = False
    chunk_size: int = -1
    truncation: int | None = None
    normalize_before_mega: bool = True
    normalization_type: str = "scalenorm"
    norm_affine: bool = True
    activation: str = "silu"
    attention_activation: str = "softmax"
    use_normalized_ffn: bool = True
    nffn_hidden_size: int = 256
    normalize_before_ffn: bool = True
    max_positions: int = 2048
    add_token_type_embeddings: bool = False
    type_vocab_size: int = 2
    relative_positional_bias: str = "rotary"
    add_lm_hidden_dense_layer: bool = True
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    # fairseq parts transformers 4.x never had (written by enc's fairseq converter)
    embed_scale: float | None = None
    final_norm: bool = False
    rmsnorm_normalize: bool = False

    @property
    def max_position_embeddings(self) -> int:
        return self.max_positions

    @classmethod
    def from_dict(cls, d: dict) -> MegaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ScaleNorm(nn.Module):
    def __init__(self, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        self.scalar = nn.Parameter(torch.ones(1)) if affine else None

    def forward(self, x):
        ms = x.square().mean(-1, keepdim=True)
        if self.scalar is not None:
            x = self.scalar * x
        return x * torch.rsqrt(ms + self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool, normalize: bool):
        super().__init__()
        self.eps, self.normalize = eps, normalize
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        ms = x.square().mean(-1, keepdim=True)
        if self.weight is not None:
            x = x * self.weight
        return x * torch.rsqrt(ms + self.eps) if self.normalize else x


class SequenceNorm(nn.Module):
    """``norm.norm.*`` as MegaSequenceNorm nests it (eps 1e-5 for every kind)."""

    def __init__(self, c: MegaConfig, eps: float = 1e-5):
        super().__init__()
        kind = c.normalization_type
        if kind == "layernorm":
            self.norm = nn.LayerNorm(c.hidden_size, eps, elementwise_affine=c.norm_affine)
        elif kind == "scalenorm":
            self.norm = ScaleNorm(eps, c.norm_affine)
        elif kind == "rmsnorm":
            self.norm = RMSNorm(c.hidden_size, eps, c.norm_affine, c.rmsnorm_normalize)
        else:
            raise ValueError(f"normalization_type {kind!r} is not supported (layernorm, scalenorm, rmsnorm)")

    def forward(self, x):
        return self.norm(x)


class SimpleRelativePositionalBias(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.max_positions = c.max_positions if c.chunk_size < 0 else c.chunk_size
        self.rel_pos_bias = nn.Parameter(torch.zeros(2 * c.max_positions - 1))

    def forward(self, n: int) -> torch.Tensor:
        if n > self.max_positions:
            raise ValueError(f"sequence length {n} is over the model's {self.max_positions}")
        m = self.max_positions
        bias = self.rel_pos_bias[m - n: m + n - 1]  # offsets -(n-1) .. n-1
        idx = torch.arange(n)
        return bias[idx[None, :] - idx[:, None] + n - 1]  # [i, j] = bias(j - i)


class RotaryRelativePositionalBias(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.dim = c.shared_representation_size
        self.max_positions = c.max_positions
        self.alpha = nn.Parameter(torch.zeros(1, self.dim))
        self.b_param = nn.Parameter(torch.zeros(1, self.dim))

    def _rotary(self, x: torch.Tensor, n: int) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / half))
        ang = torch.arange(max(n, self.max_positions), dtype=torch.float32)[:, None] * freq[None]
        sin, cos = torch.sin(ang)[:n].to(x.dtype), torch.cos(ang)[:n].to(x.dtype)
        a, b = x.expand(n, self.dim).chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)

    def forward(self, n: int) -> torch.Tensor:
        return self._rotary(self.alpha, n) @ self._rotary(self.b_param, n).t()


class MultiDimensionDampedEma(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.c = c
        k = 2 * c.hidden_size if c.bidirectional else c.hidden_size
        n = c.ema_projection_size
        self.scale = math.sqrt(1.0 / n)
        self.damping_factor = nn.Parameter(torch.zeros(k, n, 1))
        self.decay_factor = nn.Parameter(torch.zeros(k, n, 1))
        self.ema_expansion_matrix = nn.Parameter(torch.zeros(k, n, 1))
        self.kernel_projection_matrix = nn.Parameter(torch.zeros(k, n))
        self.residual_weight = nn.Parameter(torch.zeros(c.hidden_size))

    def kernel(self, length: int) -> torch.Tensor:
        """[kernel_dim, length]: sum_n (p*beta) q^t gamma / sqrt(n), p = sigmoid(delta), q = 1 - p sigmoid(alpha).

        Cached per length while not training (as transformers 4.x did), keyed on the parameters' storage: a model
        loaded anew or moved gets a new kernel."""
        params = (self.damping_factor, self.decay_factor, self.ema_expansion_matrix, self.kernel_projection_matrix)
        key = (length, self.damping_factor.dtype, self.damping_factor.device, *(t.data_ptr() for t in params))
        cache = self.__dict__.setdefault("_kernels", {})
        if not self.training and key in cache:
            return cache[key]
        k = self._kernel(length)
        if not self.training:
            cache.clear()
            cache[key] = k
        return k

    def _kernel(self, length: int) -> torch.Tensor:
        p = torch.sigmoid(self.damping_factor)
        q = 1.0 - p * torch.sigmoid(self.decay_factor)
        vander = torch.arange(length).to(p).view(1, 1, length) * torch.log(q)
        k = (p * self.ema_expansion_matrix) * torch.exp(vander)
        return torch.einsum("dnl,dn->dl", k, self.kernel_projection_matrix * self.scale)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        residual = x * self.residual_weight
        u = x.transpose(1, 2)  # [B, D, T]
        if mask is not None:
            u = u * mask[:, None, :].to(u.dtype)
        L = T if self.c.truncation is None else min(self.c.truncation, T)
        k = self.kernel(L)
        fft_len, start = T, 0
        if self.c.bidirectional:
            k1, k2 = k.split([D, D], dim=0)
            k = F.pad(k1, (L - 1, 0)) + F.pad(k2.flip(-1), (0, L - 1))
            u = F.pad(u, (L - 1, 0))
            fft_len, start = T + L - 1, 2 * L - 2
        n = 2 * fft_len
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k.float(), n=n), n=n)
        y = y[..., start:start + T].to(x.dtype)
        return F.silu(torch.add(residual, y.transpose(1, 2)))  # residual first: the result is [B, T, D] contiguous


class MovingAverageGatedAttention(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.c = c
        self.act = ACT[c.activation]
        self.norm = SequenceNorm(c)
        self.ema_gate = MultiDimensionDampedEma(c)
        self.v_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.mx_proj = nn.Linear(c.hidden_size, c.shared_representation_size + c.intermediate_size + 2 * c.hidden_size)
        self.h_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.qk_weight = nn.Parameter(torch.zeros(2, c.shared_representation_size))
        self.qk_bias = nn.Parameter(torch.zeros(2, c.shared_representation_size))
        if c.relative_positional_bias == "simple":
            self.rel_pos_bias = SimpleRelativePositionalBias(c)
        elif c.relative_positional_bias == "rotary":
            self.rel_pos_bias = RotaryRelativePositionalBias(c)
        else:
            raise ValueError(f"relative_positional_bias {c.relative_positional_bias!r} (simple, rotary)")

    def _attention(self, q, k, mask, causal):
        """q, k [B, C, n, Z]; mask [B, C, n] (1 = token) or None; causal [n, n] (1 = visible) or None."""
        n = k.shape[2]
        bias = self.rel_pos_bias(n)
        if self.c.attention_activation == "softmax":
            qk = (q * self.c.shared_representation_size ** -0.5) @ k.transpose(-1, -2) + bias
            if causal is not None:
                qk = qk.masked_fill(~causal.bool(), float("-inf"))
            if mask is not None:
                pad = mask == 0
                pad = pad & ~pad.all(dim=-1, keepdim=True)  # an all-padding chunk attends normally
                qk = qk.masked_fill(pad[:, :, None, :], float("-inf"))
            return torch.softmax(qk, dim=-1)
        if mask is not None:
            lengths = mask.sum(-1, keepdim=True).clamp(min=1.0).unsqueeze(-1).to(q.dtype)
        else:
            lengths = n
        if causal is not None:
            lengths = causal.sum(-1, keepdim=True).to(q.dtype)
        w = ATTN_ACT[self.c.attention_activation](q @ k.transpose(-1, -2) / lengths + bias)
        if mask is not None:
            w = w * mask[:, :, None, :].to(w.dtype)
        if causal is not None:
            w = w * causal.to(w.dtype)
        return w

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        c = self.c
        B, T, D = x.shape
        Z, H = c.shared_representation_size, c.intermediate_size
        residual = x
        h = self.norm(x) if c.normalize_before_mega else x
        v = self.act(self.v_proj(h))
        ema = self.ema_gate(h, mask)
        u, zr, hx = self.mx_proj(ema).split([D, Z + H, D], dim=-1)
        u = torch.sigmoid(u)
        z, r = F.silu(zr).split([Z, H], dim=-1)
        q, k = (z.unsqueeze(2) * self.qk_weight + self.qk_bias).unbind(dim=2)
        if c.use_chunking and T >= c.chunk_size:
            if T % c.chunk_size:
                raise ValueError(f"with chunking the length must be a multiple of {c.chunk_size}, got {T}")
            n_chunks, n = T // c.chunk_size, c.chunk_size
        else:
            n_chunks, n = 1, T
        q, k = q.reshape(B, n_chunks, n, Z), k.reshape(B, n_chunks, n, Z)
        v = v.reshape(B, n_chunks, n, H)
        m = mask.reshape(B, n_chunks, n) if mask is not None else None
        causal = torch.tril(torch.ones(n, n, dtype=torch.long, device=x.device)) if c.is_decoder else None
        attn = self._attention(q, k, m, causal)
        out = (attn @ v).reshape(B, T, H)
        out = self.act(hx + self.h_proj(out * r))
        out = residual + u * (out - residual)
        return out if c.normalize_before_mega else self.norm(out)


class NormalizedFeedForwardNetwork(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.c = c
        self.act = ACT[c.activation]
        self.norm = SequenceNorm(c)
        self.fc1 = nn.Linear(c.hidden_size, c.nffn_hidden_size)
        self.fc2 = nn.Linear(c.nffn_hidden_size, c.hidden_size)

    def forward(self, x):
        h = self.norm(x) if self.c.normalize_before_ffn else x
        out = self.fc2(self.act(self.fc1(h))) + x
        return out if self.c.normalize_before_ffn else self.norm(out)


class MegaBlock(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.mega_layer = MovingAverageGatedAttention(c)
        self.nffn = NormalizedFeedForwardNetwork(c) if c.use_normalized_ffn else None

    def forward(self, x, mask):
        x = self.mega_layer(x, mask)
        return self.nffn(x) if self.nffn is not None else x


class MegaEmbeddings(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.add_token_type_embeddings:
            self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)

    def forward(self, ids, token_type_ids=None):
        x = self.word_embeddings(ids)
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings(token_type_ids if token_type_ids is not None else torch.zeros_like(ids))
        return x


class MegaModel(nn.Module):
    def __init__(self, c: MegaConfig):
        super().__init__()
        self.config = c
        self.embedding_layer = MegaEmbeddings(c)
        self.layers = nn.ModuleList(MegaBlock(c) for _ in range(c.num_hidden_layers))
        if c.final_norm:
            self.final_norm = SequenceNorm(c)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False) -> dict:
        c = self.config
        T = input_ids.shape[1]
        if c.use_chunking and T > c.chunk_size and T % c.chunk_size:
            # fairseq pads to a whole number of chunks (transformers 4.x raised): masked pads change no real token
            extra = c.chunk_size - T % c.chunk_size
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            input_ids = F.pad(input_ids, (0, extra), value=c.pad_token_id or 0)
            mask = F.pad(mask, (0, extra), value=0)
            tt = F.pad(token_type_ids, (0, extra)) if token_type_ids is not None else None
            out = self.forward(input_ids, mask, tt, output_hidden_states)
            out["last_hidden_state"] = out["last_hidden_state"][:, :T]
            if out["hidden_states"] is not None:
                out["hidden_states"] = [h[:, :T] for h in out["hidden_states"]]
            return out
        x = self.embedding_layer(input_ids, token_type_ids)
        if self.config.embed_scale is not None:
            x = x * self.config.embed_scale
        hs = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, attention_mask)
            if hs is not None:
                hs.append(x)
        if self.config.final_norm:
            x = self.final_norm(x)
        return {"last_hidden_state": x, "hidden_states": hs}


class _MegaLM(nn.Module):
    head = "mlm_head"

    def __init__(self, config: MegaConfig):
        super().__init__()
        self.config = config
        self.mega = MegaModel(config)
        if config.add_lm_hidden_dense_layer:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        setattr(self, self.head, nn.Linear(config.hidden_size, config.vocab_size))
        if config.tie_word_embeddings:
            getattr(self, self.head).weight = self.mega.embedding_layer.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False) -> dict:
        out = self.mega(input_ids, attention_mask, token_type_ids, output_hidden_states)
        h = out["last_hidden_state"]
        if self.config.add_lm_hidden_dense_layer:
            h = torch.tanh(self.dense(h))
        out["logits"] = getattr(self, self.head)(h)
        return out


class MegaForMaskedLM(_MegaLM):
    head = "mlm_head"


class PrefixCache:
    """The generation protocol's cache for MEGA: the tokens so far. Each step re-runs the prefix (exact, O(T^2);
    MEGA's incremental EMA state is not implemented)."""

    def __init__(self, batch_size: int, max_len: int, device):
        self.ids = torch.empty((batch_size, 0), dtype=torch.long, device=device)


class MegaForCausalLM(_MegaLM):
    head = "lm_head"

    def new_cache(self, batch_size: int, max_len: int) -> PrefixCache:
        return PrefixCache(batch_size, max_len, self.mega.embedding_layer.word_embeddings.weight.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                cache: PrefixCache | None = None, pos: int = 0):
        if cache is None:
            return super().forward(input_ids, attention_mask, token_type_ids, output_hidden_states)
        cache.ids = torch.cat([cache.ids[:, :pos], input_ids], dim=1)
        return super().forward(cache.ids)["logits"][:, pos:]


def from_pretrained(model_dir, dtype: torch.dtype | None = None, device: str = "cpu", head: str | None = None):
    """Load a MEGA directory (transformers 4.x ``MegaForMaskedLM`` / ``MegaForCausalLM`` or enc's output)."""
    from enc.errors import ConfigError
    from enc.models.loading import load_into, load_state_dict, read_config

    raw = read_config(model_dir)
    cfg = MegaConfig.from_dict(raw)
    archs = raw.get("architectures") or []
    causal = head == "causal" or (head is None and (cfg.is_decoder or "MegaForCausalLM" in archs))
    if head == "mlm" and cfg.is_decoder:
        raise ConfigError(Path(model_dir) / "config.json", "this MEGA model is a causal (decoder) model, not a masked LM")
    cls = MegaForCausalLM if causal else MegaForMaskedLM
    try:
        model = build(cls, cfg)
    except ValueError as e:
        raise ConfigError(Path(model_dir) / "config.json", str(e)) from None
    sd = load_state_dict(model_dir)
    sd = {k: v for k, v in sd.items() if not k.endswith("rel_pos_bias._float_tensor")}
    tied = {f"{cls.head}.weight": "mega.embedding_layer.word_embeddings.weight"} if cfg.tie_word_embeddings else {}
    load_into(model, sd, Path(model_dir), tied=tied)
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)
