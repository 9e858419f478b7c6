"""MEGA as the authors' fairseq code computes it, on fairseq's parameter names (time-major, pads = 1).

Written from ``fairseq/modules/{exponential_moving_average, moving_average_gated_attention,
normalized_feedforward_network, sequence_norm}.py`` and ``fairseq/models/mega_lm.py`` of
facebookresearch/mega as released (the EMA's p = sigmoid(delta), q = 1 - p * sigmoid(alpha)); independent of
``enc.models.mega``, which runs the transformers layout. ``w(name)`` returns a float32 source tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from enc.converters.base import Activation, Probe
from enc.lazytorch import F  # torch.nn.functional on first use: detection imports this module

_ACT = {"silu": lambda x: F.silu(x), "gelu": lambda x: F.gelu(x), "relu": lambda x: F.relu(x),
        "tanh": lambda x: torch.tanh(x)}


def _norm(w, prefix: str, kind: str, x: torch.Tensor, rms_normalize: bool = True) -> torch.Tensor:
    eps = 1e-5
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], w(prefix + "weight"), w(prefix + "bias"), eps)
    ms = x.pow(2).mean(-1, keepdim=True)
    if kind == "scalenorm":
        return w(prefix + "scalar") * x * torch.rsqrt(ms + eps)
    if kind == "rmsnorm":
        return x * w(prefix + "weight") * torch.rsqrt(ms + eps)
    raise ValueError(kind)


def _ema(w, p: str, x: torch.Tensor, pad: torch.Tensor | None, bidirectional: bool, truncation) -> torch.Tensor:
    """MultiHeadEMA.forward (no incremental state). x: T x B x D; pad: B x T with 1 at padding."""
    T, B, D = x.shape
    residual = x * w(p + "omega")
    u = x.permute(1, 2, 0)
    if pad is not None:
        u = u * (1.0 - pad.unsqueeze(1).to(u))
    delta, alpha, beta, gamma = w(p + "delta"), w(p + "alpha"), w(p + "beta"), w(p + "gamma")
    ndim = gamma.shape[1]
    L = T if truncation is None else min(truncation, T)
    pp = torch.sigmoid(delta)
    q = 1.0 - pp * torch.sigmoid(alpha)
    vander = torch.arange(L).to(pp).view(1, 1, L) * torch.log(q)
    k = torch.einsum("dnl,dn->dl", (pp * beta) * torch.exp(vander), gamma * math.sqrt(1.0 / ndim))
    fft_len, s = T, 0
    if bidirectional:
        k1, k2 = torch.split(k, [D, D], dim=0)
        k = F.pad(k1, (L - 1, 0)) + F.pad(k2.flip(-1), (0, L - 1))
        u = F.pad(u, (L - 1, 0))
        fft_len, s = T + L - 1, 2 * L - 2
    out = torch.fft.irfft(torch.fft.rfft(u, n=2 * fft_len) * torch.fft.rfft(k, n=2 * fft_len), n=2 * fft_len)
    return F.silu(out[..., s:s + T].permute(2, 0, 1) + residual)


def _rel_bias(w, p: str, kind: str, n: int, max_positions: int, zdim: int) -> torch.Tensor:
    if kind == "simple":
        table = w(p + "rel_pos_bias")
        m = max_positions
        return torch.stack([table[m - 1 - i: m - 1 - i + n] for i in range(n)])  # [i, j] = table[m-1 + j - i]
    half = zdim // 2
    freq = torch.exp(torch.arange(half).float() * -(math.log(10000) / half))
    ang = torch.arange(n).float()[:, None] * freq[None]
    sin, cos = torch.sin(ang), torch.cos(ang)

    def rot(v):
        a, b = v.expand(n, zdim).chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)

    return rot(w(p + "alpha")) @ rot(w(p + "beta")).t()


def _mega_attention(w, p: str, a: dict, x: torch.Tensor, pad: torch.Tensor | None, causal: bool) -> torch.Tensor:
    T, B, D = x.shape
    Z, H = a["z"], a["h"]
    act = _ACT[a["activation"]]
    residual = x
    if a["prenorm"]:
        x = _norm(w, p + "norm.norm.", a["norm"], x)
    v = act(F.linear(x, w(p + "v_proj.weight"), w(p + "v_proj.bias")))
    mx = _ema(w, p + "move.", x, pad, a["bidirectional"], a["truncation"])
    base = F.linear(mx, w(p + "mx_proj.weight"), w(p + "mx_proj.bias"))
    u, zr, hx = torch.split(base, [D, Z + H, D], dim=-1)
    u = torch.sigmoid(u)
    z, r = torch.split(F.silu(zr), [Z, H], dim=-1)
    z = z.unsqueeze(2) * w(p + "gamma") + w(p + "beta")
    q, k = torch.unbind(z, dim=2)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    C = a["chunk"]
    if C > 0 and T >= C:
        nc, n = T // C, C
    else:
        nc, n = 1, T
    q, k, v = q.reshape(B, nc, n, Z), k.reshape(B, nc, n, Z), v.reshape(B, nc, n, H)
    pm = pad.view(B, nc, n) if pad is not None else None
    bias = _rel_bias(w, p + "rel_pos_bias.", a["rel_pos_bias"], n, C if C > 0 else a["max_positions"], Z)
    if a["attention_activation"] == "softmax":
        qk = (q * Z ** -0.5) @ k.transpose(2, 3) + bias
        if causal:
            qk = qk + torch.triu(torch.full((n, n), float("-inf")), 1)
        if pm is not None:
            pm = torch.logical_and(pm.bool(), ~pm.bool().all(dim=-1, keepdim=True))
            qk = qk.masked_fill(pm.unsqueeze(2), float("-inf"))
        attn = torch.softmax(qk, dim=-1)
    else:
        if pm is not None:
            inverse = 1.0 - pm.to(q)
            lengths = inverse.sum(-1, keepdim=True).clamp(min=1.0).unsqueeze(-1)
        else:
            inverse, lengths = None, n
        tril = torch.tril(torch.ones(n, n)) if causal else None
        if tril is not None:
            lengths = tril.sum(-1, keepdim=True)
        qk = q @ k.transpose(2, 3) / lengths + bias
        if a["attention_activation"] == "relu2":
            attn = F.relu(qk).pow(2)
        else:  # laplace (fairseq utils.laplace: mu 0.707107, std 0.282095)
            attn = 0.5 * (1.0 + torch.erf((qk - 0.707107) / (0.282095 * math.sqrt(2.0))))
        if inverse is not None:
            attn = attn * inverse.unsqueeze(2)
        if tril is not None:
            attn = attn * tril
    h = (attn @ v).reshape(B, T, H).transpose(0, 1)
    h = act(hx + F.linear(h * r, w(p + "h_proj.weight"), w(p + "h_proj.bias")))
    out = torch.addcmul(residual, u, h - residual)
    return out if a["prenorm"] else _norm(w, p + "norm.norm.", a["norm"], out)


def _nffn(w, p: str, a: dict, x: torch.Tensor) -> torch.Tensor:
    residual = x
    if a["prenorm"]:
        x = _norm(w, p + "norm.norm.", a["norm"], x)
    x = F.linear(_ACT[a["activation"]](F.linear(x, w(p + "fc1.weight"), w(p + "fc1.bias"))), w(p + "fc2.weight"),
                 w(p + "fc2.bias"))
    x = x + residual
    return x if a["prenorm"] else _norm(w, p + "norm.norm.", a["norm"], x)


def forward(w, a: dict, probe: Probe, kind: str) -> Iterator[Activation]:
    """``kind``: "wrapper" (MegaLM + mlm_head, bidirectional) or "fairseq_lm" (MegaDecoderNoCrossAttn)."""
    ids = probe.input_ids
    valid = probe.attention_mask.bool()
    pad = (~valid).to(torch.float32) if not bool(valid.all()) else None
    if kind == "wrapper":
        x = w("embedding_layer.weight")[ids]
        layer = "encoders.{}."
        causal = False
    else:
        x = a["embed_scale"] * w("decoder.embed_tokens.weight")[ids]
        if pad is not None:
            x = x * (1.0 - pad).unsqueeze(-1)
        layer = "decoder.layers.{}."
        causal = True
    yield Activation("embeddings", x, mask=valid)
    x = x.transpose(0, 1)
    for i in range(a["layers"]):
        p = layer.format(i)
        x = _mega_attention(w, p + "mega_layer.", a, x, pad, causal)
        if a["ffn"] > 0:
            x = _nffn(w, p + "nffn.", a, x)
        yield Activation(f"layer.{i}", x.transpose(0, 1), mask=valid)
    x = x.transpose(0, 1)
    if kind == "wrapper":
        logits = F.linear(x, w("mlm_head.weight"), w("mlm_head.bias"))
    else:
        if a["final_norm"]:
            x = _norm(w, "decoder.final_norm.norm.", a["norm"], x)
        logits = F.linear(x, w("decoder.output_projection.weight"))
    yield Activation("logits", logits, "logits", valid)
