"""Write random tiny Mistral / Mixtral models in Mistral AI's raw ("consolidated") layouts.

The weights come from a transformers MistralForCausalLM / MixtralForCausalLM, so a converted
output can be checked against the very model it came from. q/k rows are inverse-permuted back
to Mistral's interleaved-pair rotary layout. Variants: params.json with or without rope_theta /
sliding_window, GQA, tied output, tensor-parallel .pth shards, consolidated.safetensors, the
reference MoE layout (feed_forward.experts.E.w*) and the stacked MegaBlocks one
(block_sparse_moe.w1/w2/w3 [E*F, D], w2 transposed), layer-split files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mistral"
TOKENIZER_V1 = FIXTURES / "tokenizer.model.v1"  # 32000 pieces (Mistral 7B v0.1/v0.2, Mixtral 8x7B)
TOKENIZER_V3 = FIXTURES / "tokenizer.model.v3"  # 32768 pieces (Mistral 7B v0.3)


def tiny_hf(*, moe: bool = False, vocab: int = 32000, hidden: int = 64, layers: int = 2, heads: int = 4,
            kv_heads: int = 2, head_dim: int = 16, inter: int = 96, experts: int = 4, top_k: int = 2,
            rope_theta: float = 10000.0, sliding_window: int | None = None, tied: bool = False, seed: int = 0,
            max_pos: int = 512):
    """A random transformers model in float32 (eager attention), weights scaled to give lively logits."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=rope_theta,
                  sliding_window=sliding_window, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if moe:
        cfg = MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k)
        model = MixtralForCausalLM(cfg)
    else:
        cfg = MistralConfig(**common)
        model = MistralForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def inverse_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Mistral interleaved-pair rows (undoes permute_rope)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2).contiguous()


def hf_state(model) -> dict[str, torch.Tensor]:
    """HF state dict with per-expert Mixtral names (transformers 5 keeps experts fused in memory)."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    F_ = cfg.intermediate_size
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            for e in range(v.shape[0]):
                out[f"{base}{e}.w1.weight"] = v[e, :F_].clone()
                out[f"{base}{e}.w3.weight"] = v[e, F_:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(v.shape[0]):
                out[f"{base}{e}.w2.weight"] = v[e].clone()
        elif k.endswith("mlp.gate.weight") and getattr(cfg, "num_local_experts", 0):
            out[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = v
        else:
            out[k] = v
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_raw(model, *, stacked_moe: bool = False) -> dict[str, torch.Tensor]:
    """The model in Mistral's reference state-dict layout."""
    cfg = model.config
    hf = hf_state(model)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    raw = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        raw["output.weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        h, r = f"model.layers.{i}.", f"layers.{i}."
        raw[r + "attention_norm.weight"] = hf[h + "input_layernorm.weight"]
        raw[r + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        raw[r + "attention.wq.weight"] = inverse_permute(hf[h + "self_attn.q_proj.weight"], H)
        raw[r + "attention.wk.weight"] = inverse_permute(hf[h + "self_attn.k_proj.weight"], KV)
        raw[r + "attention.wv.weight"] = hf[h + "self_attn.v_proj.weight"]
        raw[r + "attention.wo.weight"] = hf[h + "self_attn.o_proj.weight"]
        if getattr(cfg, "num_local_experts", 0):
            E = cfg.num_local_experts
            ex = [{w: hf[f"{h}block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3")} for e in range(E)]
            if stacked_moe:
                raw[r + "block_sparse_moe.gate.weight"] = hf[h + "block_sparse_moe.gate.weight"]
                raw[r + "block_sparse_moe.w1"] = torch.cat([x["w1"] for x in ex], 0)
                raw[r + "block_sparse_moe.w3"] = torch.cat([x["w3"] for x in ex], 0)
                raw[r + "block_sparse_moe.w2"] = torch.cat([x["w2"].t() for x in ex], 0)
            else:
                raw[r + "feed_forward.gate.weight"] = hf[h + "block_sparse_moe.gate.weight"]
                for e, x in enumerate(ex):
                    for w, t in x.items():
                        raw[f"{r}feed_forward.experts.{e}.{w}.weight"] = t
        else:
            raw[r + "feed_forward.w1.weight"] = hf[h + "mlp.gate_proj.weight"]
            raw[r + "feed_forward.w2.weight"] = hf[h + "mlp.down_proj.weight"]
            raw[r + "feed_forward.w3.weight"] = hf[h + "mlp.up_proj.weight"]
    return raw


def params_for(model, *, rope_theta: bool = True, sliding_window: bool = True) -> dict:
    cfg = model.config
    p = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
         "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
         "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size}
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    if rope_theta:
        p["rope_theta"] = theta
    if sliding_window and cfg.sliding_window is not None:
        p["sliding_window"] = cfg.sliding_window
    if getattr(cfg, "num_local_experts", 0):
        p["moe"] = {"num_experts_per_tok": cfg.num_experts_per_tok, "num_experts": cfg.num_local_experts}
    return p


_TP_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}


def _tp_dim(key: str) -> int | None:
    parts = key.split(".")
    name = parts[-2] if parts[-1] == "weight" else parts[-1]
    return _TP_DIM.get(name)


def write_release(out: Path, model, *, fmt: str = "pth", tp: int = 1, stacked_moe: bool = False,
                  layer_split: int = 0, rope_theta: bool = True, sliding_window: bool = True,
                  tokenizer: Path | None = TOKENIZER_V1, tokenizer_name: str = "tokenizer.model",
                  dtype: torch.dtype = torch.float32, params_patch: dict | None = None,
                  extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a raw release directory; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = {k: v.to(dtype).contiguous() for k, v in to_raw(model, stacked_moe=stacked_moe).items()}
    raw.update(extra or {})
    params = params_for(model, rope_theta=rope_theta, sliding_window=sliding_window)
    params.update(params_patch or {})
    (out / "params.json").write_text(json.dumps(params, indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / tokenizer_name)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(raw, str(out / "consolidated.safetensors"))
        return out
    if layer_split:
        groups: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in raw.items():
            g = int(k.split(".")[1]) // layer_split if k.startswith("layers.") else 0
            groups.setdefault(g, {})[k] = v
        for g, d in groups.items():
            torch.save(d, out / f"consolidated.{g:02d}.pt")
        return out
    if tp == 1:
        torch.save(raw, out / "consolidated.00.pth")
        return out
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for k, v in raw.items():
        dim = _tp_dim(k)
        pieces = [v] * tp if dim is None else list(torch.chunk(v, tp, dim=dim))
        for s in range(tp):
            shards[s][k] = pieces[s].clone()
    for s, d in enumerate(shards):
        torch.save(d, out / f"consolidated.{s:02d}.pth")
    return out
