"""Parity for Mistral / Mixtral: the original forward in Mistral's layout, and enc's runtime on the output.

``reference_forward`` is mistral-inference's math on the un-permuted checkpoint (interleaved complex
RoPE, top-k of the gate LOGITS then a softmax over those k), in float32, one tensor at a time.
``converted_forward`` runs :mod:`enc.models.mistral` on the converted directory, one layer's weights
at a time, in the directory's dtype.

Both yield, per layer, ``layer.i.router`` (MoE layers: the gate logits and the experts chosen per
token) and ``layer.i`` (the residual stream after the layer). Given a :class:`enc.parity.Teacher`,
the converted side runs layer-local: each layer starts from the reference's input to that layer and
an MoE layer uses the reference's experts (its own choice is still reported in ``layer.i.router``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from enc.converters.base import Activation, Probe
from enc.io.lazy import LazyTensor
from enc.lazytorch import F  # torch.nn.functional on first use (detection imports this module)

if TYPE_CHECKING:
    from enc.converters.mistral import Params
    from enc.parity import Teacher
    from enc.parity_weights import ChecksumsAhead

# rows of the output matrix turned into float32 at a time for the reference logits
_LOGIT_ROWS = 4096


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (2j, 2j+1) rotated as complex numbers; x [B, T, heads, hd]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def reference_forward(ref: dict[str, LazyTensor], p: Params, tied: bool, probe: Probe,
                      checks: ChecksumsAhead | None = None) -> Iterator[Activation]:
    """Mistral as mistral-inference computes it, on un-permuted wq/wk, one tensor at a time (float32).

    Only the probe's real tokens go through the matrix products (packed, [N, D]); attention works on
    the padded [B, T] layout, where causality keeps right padding out of every real token's view.
    Padded positions of the activations are zeros (they are not compared).
    """
    from enc.parity_weights import Float32Weights

    # reused buffers: each weight is read, checked and made float32 in the same memory; a dense
    # model's weights are read (and checked) one ahead, on a helper thread, while this one computes
    names = [f"layers.{i}.{k}" for i in range(p.n_layers) for k in _DENSE_ORDER] + ["norm.weight"]
    wbuf = Float32Weights(None if p.is_moe or any(n not in ref for n in names) else [ref[n] for n in names], checks)
    try:
        yield from _reference_layers(ref, p, tied, probe, wbuf)
    finally:
        wbuf.close()


# the order reference_forward reads a dense layer's weights in
_DENSE_ORDER = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                "feed_forward.w2.weight")


def _reference_layers(ref: dict[str, LazyTensor], p: Params, tied: bool, probe: Probe, wbuf) -> Iterator[Activation]:
    ids = probe.input_ids
    B, T = ids.shape
    H, KV, hd = p.n_heads, p.n_kv_heads, p.head_dim
    valid = probe.attention_mask.bool()
    where = valid.reshape(-1).nonzero().squeeze(1)

    def get(name: str) -> torch.Tensor:  # valid until the next get (every use below is immediate)
        return wbuf.get(ref[name])

    def lin(h: torch.Tensor, name: str) -> torch.Tensor:  # h @ W.T in float32
        return wbuf.linear(h, ref[name])

    def padded(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(B * T, *t.shape[1:])
        out[where] = t
        return out.view(B, T, *t.shape[1:])

    tokens = ids.reshape(-1)[where]
    x = torch.empty(tokens.numel(), p.dim)
    for r, chunk in wbuf.rows(ref["tok_embeddings.weight"], _LOGIT_ROWS):  # checksum verified after the last
        hit = (tokens >= r) & (tokens < r + chunk.shape[0])
        x[hit] = chunk[tokens[hit] - r].float()  # only the probe's rows become float32
    yield Activation("embeddings", padded(x), mask=valid)
    fc = _freqs_cis(hd, T, p.rope_theta)
    i_ = torch.arange(T)[:, None]
    j_ = torch.arange(T)[None, :]
    allowed = j_ <= i_
    if p.sliding_window is not None:
        allowed &= j_ > i_ - p.sliding_window
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
    for layer in range(p.n_layers):
        L = f"layers.{layer}."
        h = _rms(x, get(L + "attention_norm.weight"), p.norm_eps)
        xq = padded(lin(h, L + "attention.wq.weight")).view(B, T, H, hd)
        xk = padded(lin(h, L + "attention.wk.weight")).view(B, T, KV, hd)
        xv = padded(lin(h, L + "attention.wv.weight")).view(B, T, KV, hd)
        xq, xk = _rotary(xq, fc), _rotary(xk, fc)
        keys = torch.repeat_interleave(xk, H // KV, dim=2)
        values = torch.repeat_interleave(xv, H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", xq, keys) * hd**-0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1)
        attn = torch.einsum("bhts,bshd->bthd", probs, values).reshape(B * T, H * hd)[where]
        x = x + lin(attn, L + "attention.wo.weight")
        h = _rms(x, get(L + "ffn_norm.weight"), p.norm_eps)
        if p.is_moe:
            gate_logits = lin(h, L + "feed_forward.gate.weight")
            weights, selected = torch.topk(gate_logits, p.num_experts_per_tok)
            yield Activation(f"layer.{layer}.router", padded(gate_logits), "router", valid, topk=padded(selected))
            x = x + _reference_moe(h, weights, selected, L, lin, p)
        else:
            x = x + _reference_ffn(h, lin, L + "feed_forward.")
        yield Activation(f"layer.{layer}", padded(x), mask=valid,
                         base="embeddings" if layer == 0 else f"layer.{layer - 1}")
    x = _rms(x, get("norm.weight"), p.norm_eps)
    yield Activation("final_norm", padded(x), mask=valid)
    parts = [x @ wbuf.to_float32(chunk).t()  # checksum verified after the last chunk, before the yield
             for _, chunk in wbuf.rows(ref["tok_embeddings.weight" if tied else "output.weight"], _LOGIT_ROWS)]
    yield Activation("logits", padded(torch.cat(parts, -1)), "logits", valid)


def _reference_ffn(h: torch.Tensor, lin, prefix: str) -> torch.Tensor:
    """``lin(h, name)``: h @ W.T in float32."""
    return lin(F.silu(lin(h, prefix + "w1.weight")) * lin(h, prefix + "w3.weight"), prefix + "w2.weight")


def _reference_moe(flat: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, L: str, lin,
                   p: Params) -> torch.Tensor:
    """mistral-inference MoeLayer after the gate: softmax over the k chosen logits; experts loaded one at a time."""
    weights = torch.softmax(weights, dim=1, dtype=torch.float)
    results = torch.zeros_like(flat)
    for e in range(p.num_experts):
        rows, nth = torch.where(selected == e)
        if rows.numel() == 0:
            continue
        results[rows] += weights[rows, nth, None] * _reference_ffn(flat[rows], lin, f"{L}feed_forward.experts.{e}.")
    return results


def converted_forward(out_dir: Path, probe: Probe, teacher: Teacher | None = None,
                      device: str | torch.device = "cpu") -> Iterator[Activation]:
    """enc.models.mistral on the converted directory, one layer's weights loaded at a time (on ``device``).

    Token-wise work (feed-forward, experts, LM head) runs on the real tokens only; attention on the
    right-padded batch (causal: no real token sees the padding).
    With ``teacher``, layer-local: every layer (and the final norm, and the LM head) starts from the
    reference's input to it, cast to the directory's dtype; MoE layers use the reference's experts.
    """
    from enc.models.loading import lazy_weights
    from enc.models.mistral import DecoderLayer, RMSNorm, Rotary, config_from_dir, hf_tensors, load_weights
    from enc.parity_weights import LayerArena

    cfg = config_from_dir(out_dir)
    # each layer's weights mapped from the page cache (or read into the memory the previous layer's used)
    arena = LayerArena(mapped=True)
    lazy = lazy_weights(out_dir)
    in_arena = {k for k in lazy if ".mlp.experts." not in k}  # (fused experts are sliced per expert: not here)
    lazy = {k: arena.wrap(t) if k in in_arena else t for k, t in lazy.items()}
    loaders = hf_tensors(lazy, cfg)
    valid = probe.attention_mask.bool()
    B, T = probe.input_ids.shape
    where = valid.reshape(-1).nonzero().squeeze(1).to(device)

    def reload(*names: str) -> None:  # the arena takes the next tensors over the memory of the last ones
        arena.reset(arena.need(lazy[n] for n in names if n in in_arena))

    reload("model.embed_tokens.weight")
    emb = loaders["model.embed_tokens.weight"]().to(device)
    dtype = emb.dtype
    x = F.embedding(probe.input_ids.to(device), emb)
    del emb  # (tied: read again for the LM head)
    yield Activation("embeddings", x.float(), mask=valid)

    def start(prev: str, x: torch.Tensor) -> torch.Tensor:
        return x if teacher is None else teacher.hidden(prev).to(device=device, dtype=dtype)

    def packed(fn, *batched: torch.Tensor | None) -> torch.Tensor:
        """fn on the real tokens only ([1, N, ...]); the result back in the padded [B, T, ...] layout."""
        got = fn(*(None if t is None else t.reshape(B * T, *t.shape[2:])[where][None] for t in batched))[0]
        out = got.new_zeros(B * T, *got.shape[1:])
        out[where] = got
        return out.view(B, T, *got.shape[1:])

    class RealRows(torch.nn.Module):
        """A token-wise projection of the padded [B, T, D] batch on the real tokens only (padded rows are
        zeros): the attention projections then cost what the packed MLP costs, not twice as much."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return packed(self.inner, t)

    cos, sin = Rotary(cfg.head_dim, cfg.rope_theta, device).get(0, T, dtype)
    prev = "embeddings"
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        reload(*(k for k in lazy if k.startswith(prefix)))
        load_weights(layer, {k: v for k, v in loaders.items() if k.startswith(prefix)}, out_dir, None, device, prefix)
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # token-wise: the real tokens only
            setattr(attn, proj, RealRows(getattr(attn, proj)))
        x = start(prev, x)
        # padded: causal, right padding (no real token sees a padded one; padded rows are not compared)
        h = x + attn(layer.input_layernorm(x), cos, sin, None, 0, 0)
        n = layer.post_attention_layernorm(h)
        if cfg.is_moe:
            moe = layer.block_sparse_moe
            own = packed(lambda t, moe=moe: moe.route(t[0])[1][None], n)
            yield Activation(f"layer.{i}.router", moe.gate(n).float(), "router", valid, topk=own)
            forced = None if teacher is None else teacher.experts(f"layer.{i}.router")
            if forced is not None:
                forced = forced.to(device)
            if forced is not None and forced.shape[-1] != moe.top_k:
                forced = None  # a different k: the router row has failed already; run the model as it is
            x = h + packed(lambda t, f, moe=moe: moe(t, experts=f), n, forced)
        else:
            x = h + packed(layer.mlp, n)
        del layer
        yield Activation(f"layer.{i}", x.float(), mask=valid)
        prev = f"layer.{i}"
    with torch.device("meta"):
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    reload("model.norm.weight")
    load_weights(norm, {"model.norm.weight": loaders["model.norm.weight"]}, out_dir, None, device, "model.norm.")
    x = norm(start(prev, x))
    yield Activation("final_norm", x.float(), mask=valid)
    x = start("final_norm", x)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings or "lm_head.weight" not in loaders else "lm_head.weight"
    del norm
    reload(head)
    w = loaders[head]().to(device)
    yield Activation("logits", packed(lambda t: F.linear(t, w), x).float(), "logits", valid)

