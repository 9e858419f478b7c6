"""BertGeneration in the Hugging Face layouts: ``BertGenerationEncoder``, ``BertGenerationDecoder``
and the ``EncoderDecoderModel`` that pairs them (bert2bert / roberta2roberta).

A post-LN BERT without token types or pooler. The decoder adds causal self-attention, a
cross-attention block after it (``crossattention.self`` / ``crossattention.output``) and an LM head
with no transform: ``logits = h @ word_embeddings^T + bias`` (``lm_head.decoder.weight`` tied to
``bert.embeddings.word_embeddings.weight``, ``lm_head.decoder.bias`` to ``lm_head.bias``).

Decoding protocol (what ``enc.seq2seq`` codes against)::

    memory = model.encode(input_ids, attention_mask)           # [B, S, H]
    cache = model.new_cache(batch_size, max_len)
    logits = model.decode(ids, cache=cache, pos=0, memory=memory, memory_mask=attention_mask)
    cache.reorder(beam_idx)                                   # beam search
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.errors import ConfigError
from enc.models.common import activation, build
from enc.models.config import check_heads
from enc.models.loading import lazy_weights, load_into, read_config


@dataclass
class BertGenerationConfig:
    vocab_size: int = 50358
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> BertGenerationConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        activation(cfg.hidden_act)
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Embeddings(nn.Module):
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, pos: int = 0) -> torch.Tensor:
        positions = torch.arange(pos, pos + ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions)[None])


class SelfAttn(nn.Module):  # HF "attention.self" / "crossattention.self": the q, k, v projections
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class DenseNorm(nn.Module):  # HF "attention.output" / "output": dense, dropout, LayerNorm(x + residual)
    def __init__(self, n_in: int, cfg: BertGenerationConfig):
        super().__init__()
        self.dense = nn.Linear(n_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.self = SelfAttn(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim

    def split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.split(self.self.query(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, T, H = x.shape
        return self.output(y.transpose(1, 2).reshape(B, T, H), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: BertGenerationConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.attention = Attention(cfg)
        if cfg.add_cross_attention:
            self.crossattention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x, mask=None, cache: Seq2SeqCache | None = None, pos: int = 0, memory=None, memory_mask=None):
        a = self.attention
        k, v = a.split(a.self.key(x)), a.split(a.self.value(x))
        if cache is not None:
            T = x.shape[1]
            cache.k[self.idx][:, :, pos:pos + T] = k
            cache.v[self.idx][:, :, pos:pos + T] = v
            k, v = cache.k[self.idx][:, :, :pos + T], cache.v[self.idx][:, :, :pos + T]
        x = a.attend(x, k, v, mask)
        if memory is not None:
            c = self.crossattention
            if cache is not None and cache.ck[self.idx] is not None:
                ck, cv = cache.ck[self.idx], cache.cv[self.idx]
            else:
                ck, cv = c.split(c.self.key(memory)), c.split(c.self.value(memory))
                if ck.shape[0] == 1 and x.shape[0] > 1:  # one memory for every beam: computed once, shared
                    ck, cv = ck.expand(x.shape[0], -1, -1, -1), cv.expand(x.shape[0], -1, -1, -1)
                if cache is not None:
                    cache.ck[self.idx], cache.cv[self.idx] = ck, cv
            x = c.attend(x, ck, cv, memory_mask)
        return self.output(self.intermediate(x), x)


class Stack(nn.Module):  # HF "encoder" (also inside the decoder: bert.encoder)
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] 1/0 -> boolean [B, 1, 1, S] (True = attend)."""
    return None if attention_mask is None else attention_mask[:, None, None, :].bool()


def _causal(pos: int, t: int, device) -> torch.Tensor:
    q = torch.arange(pos, pos + t, device=device)[:, None]
    return torch.arange(pos + t, device=device)[None, :] <= q


class BertGenerationEncoder(nn.Module):
    """``BertGenerationEncoder`` (also the ``bert`` body of the decoder, where it is causal)."""

    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Stack(cfg)

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False, cache=None, pos: int = 0,
                memory=None, memory_mask=None):
        x = self.embeddings(input_ids, pos)
        hidden = [x]
        if self.config.is_decoder:
            mask = None if input_ids.shape[1] == 1 else _causal(pos, input_ids.shape[1], input_ids.device)
            if cache is None and attention_mask is not None:
                mask = _key_mask(attention_mask) if mask is None else mask & _key_mask(attention_mask)
        else:
            mask = _key_mask(attention_mask)
        mem_mask = _key_mask(memory_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask, cache, pos, memory, mem_mask)
            hidden.append(x)
        return {"last_hidden_state": x, "hidden_states": hidden if output_hidden_states else None}


class LMHead(nn.Module):
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = self.decoder.bias  # HF ties lm_head.decoder.bias to lm_head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


class BertGenerationDecoder(nn.Module):
    def __init__(self, cfg: BertGenerationConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertGenerationEncoder(cfg)
        self.lm_head = LMHead(cfg)

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False, cache=None, pos: int = 0,
                memory=None, memory_mask=None):
        out = self.bert(input_ids, attention_mask, output_hidden_states, cache, pos, memory, memory_mask)
        out["logits"] = self.lm_head(out["last_hidden_state"])
        return out


class Seq2SeqCache:
    """Static self-attention keys/values per decoder layer, plus the cross-attention keys/values of the memory."""

    def __init__(self, cfg: BertGenerationConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.ck: list[torch.Tensor | None] = [None] * n
        self.cv: list[torch.Tensor | None] = [None] * n

    def reorder(self, idx: torch.Tensor) -> None:
        """Beam search: keep the self-attention rows of the surviving beams. The cross-attention keys/values
        are those of the one input, the same for every beam, and stay as they are."""
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                if t is not None:
                    lst[i] = t.index_select(0, idx)


class EncoderDecoderModel(nn.Module):
    """``EncoderDecoderModel`` with a BertGeneration encoder and decoder (state-dict keys ``encoder.*``, ``decoder.*``)."""

    def __init__(self, enc_cfg: BertGenerationConfig, dec_cfg: BertGenerationConfig, raw: dict | None = None):
        super().__init__()
        self.encoder = BertGenerationEncoder(enc_cfg)
        self.decoder = BertGenerationDecoder(dec_cfg)
        self.raw = raw or {}
        self.config = dec_cfg
        self.decoder_start_token_id = self.raw.get("decoder_start_token_id")

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)["last_hidden_state"]

    def new_cache(self, batch: int, max_len: int) -> Seq2SeqCache:
        p = self.decoder.lm_head.decoder.weight
        return Seq2SeqCache(self.decoder.config, batch, max_len, p.dtype, p.device)

    def decode(self, ids, cache: Seq2SeqCache | None = None, pos: int = 0, memory=None, memory_mask=None):
        return self.decoder(ids, cache=cache, pos=pos, memory=memory, memory_mask=memory_mask)["logits"]

    def prepare_inference(self) -> EncoderDecoderModel:
        """Decoding runs small matrix products (one row per beam): on CPUs with oneDNN, hold the decoder's
        weights in oneDNN's packed layout (what enc.models.gpt2 does). The decoder's own linear weights
        are released (inference only); the LM head keeps the word embeddings it is tied to."""
        from enc.models.gpt2 import onednn_works

        p = self.decoder.lm_head.decoder.weight
        if p.device.type != "cpu" or not onednn_works(p.dtype):
            return self
        for name, mod in self.decoder.named_modules():
            if isinstance(mod, nn.Linear):
                _pack(mod, release=name != "lm_head.decoder")
        return self


def _pack(linear: nn.Linear, release: bool) -> None:
    linear.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), None)
    if release:
        del linear.weight
    linear.forward = _packed_forward.__get__(linear)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


TIED = {"lm_head.decoder.weight": "bert.embeddings.word_embeddings.weight", "lm_head.decoder.bias": "lm_head.bias"}


def tied_keys(model: nn.Module, prefix: str = "") -> dict[str, str]:
    if isinstance(model, EncoderDecoderModel):
        return tied_keys(model.decoder, "decoder.")
    if isinstance(model, BertGenerationDecoder):
        return {prefix + k: prefix + v for k, v in TIED.items()
                if model.config.tie_word_embeddings or k.endswith("bias")}
    return {}


def build_model(raw: dict, device: str = "meta") -> nn.Module:
    """The module a config.json describes: EncoderDecoderModel, BertGenerationEncoder or BertGenerationDecoder."""
    if raw.get("model_type") == "encoder-decoder":
        enc, dec = raw.get("encoder"), raw.get("decoder")
        if not isinstance(enc, dict) or not isinstance(dec, dict):
            raise ConfigError(None, "encoder-decoder config.json needs 'encoder' and 'decoder' objects")
        for side, c in (("encoder", enc), ("decoder", dec)):
            if c.get("model_type") != "bert-generation":
                raise ConfigError(None, f"the {side} is {c.get('model_type')!r}; enc runs bert-generation encoder-decoders")
        dec_cfg = BertGenerationConfig.from_dict(dec)
        if not dec_cfg.is_decoder or not dec_cfg.add_cross_attention:
            raise ConfigError(None, "the decoder config needs is_decoder and add_cross_attention")
        with torch.device(device):
            return _init(EncoderDecoderModel, BertGenerationConfig.from_dict(enc), dec_cfg, raw)
    cfg = BertGenerationConfig.from_dict(raw)
    arch = (raw.get("architectures") or [""])[0]
    cls = BertGenerationDecoder if (arch == "BertGenerationDecoder" or cfg.is_decoder) else BertGenerationEncoder
    return build(cls, cfg, device)


def _init(cls, *args):
    from enc.models.common import no_init

    with no_init():
        return cls(*args)


def _normalize_keys(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Map checkpoint names to module names (a BertGenerationEncoder may be saved with a ``bert.`` prefix)."""
    if isinstance(model, BertGenerationEncoder) and names and all(n.startswith("bert.") for n in names):
        return {n: n[len("bert."):] for n in names}
    return {n: n for n in names}


def from_pretrained(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu", **kw) -> nn.Module:
    """Load an HF bert-generation / encoder-decoder directory one tensor at a time (strict names and shapes)."""
    raw = read_config(model_dir)
    model = build_model(raw, "meta")
    weights = lazy_weights(model_dir)
    names = _normalize_keys(model, set(weights))
    weights = {names[k]: v for k, v in weights.items()}
    if dtype is None:
        dtype = next((v.dtype for v in weights.values() if v.dtype.is_floating_point), torch.float32)
    tied = tied_keys(model)
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    load_into(model, shapes, Path(model_dir), tied=tied)
    model = model.to_empty(device=device).to(dtype)
    dec = model.decoder if isinstance(model, EncoderDecoderModel) else model
    if isinstance(dec, BertGenerationDecoder):
        dec.lm_head.decoder.bias = dec.lm_head.bias
        if dec.config.tie_word_embeddings:
            dec.lm_head.decoder.weight = dec.bert.embeddings.word_embeddings.weight
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, lazy in weights.items():
            params[k].copy_(lazy.load())
    return model.eval()
