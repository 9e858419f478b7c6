"""Text generation for every enc decoder: prefill, then one token at a time from a static KV cache.

Decoder protocol (enc.models.mistral, enc.models.gpt2)::

    cache = model.new_cache(batch_size, max_len)
    logits = model(input_ids[B, T], cache=cache, pos=pos)   # [B, T, V]; pos = tokens already cached
    model.config.vocab_size, model.config.max_position_embeddings

Sampling follows llama.cpp's flags and their order: repeat penalty over the last
``repeat_last_n`` tokens (prompt included), top-k, top-p (nucleus, on the untempered
distribution of the remaining candidates), min-p (keep tokens with p >= min_p * p_max),
temperature, then a draw from a seeded generator. ``temp <= 0`` is greedy (argmax after the
penalty). Values that disable a stage: top_k <= 0, top_p >= 1, min_p <= 0, repeat_penalty == 1.

Streaming text uses incremental detokenization: each new token's text is the difference between
decoding a short window with and without it, so sentencepiece's "▁" word boundaries and pieces
that are single bytes of a multi-byte character (shown only once the character is complete)
come out right.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from enc.errors import ConfigError, UsageError
from enc.tokenization import StreamDecoder  # noqa: F401 - re-exported: generation streams through it


@dataclass
class Settings:
    max_new_tokens: int = 128
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None  # None: a random seed (reported in the result)
    stop_ids: Sequence[int] | None = None  # None: the model's / tokenizer's EOS
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise UsageError(None, f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temp < 0:
            raise UsageError(None, f"--temp must be >= 0 (0: greedy), got {self.temp}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(None, f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(None, f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise UsageError(None, f"--repeat-penalty must be > 0, got {self.repeat_penalty}")


@dataclass
class Result:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str  # "eos", "length", "context" or "stop" (on_token asked to stop)
    seed: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- sampling


class Sampler:
    """llama.cpp's default chain: penalties -> top_k -> top_p -> min_p -> temperature -> dist."""

    def __init__(self, s: Settings, device: torch.device | str = "cpu"):
        self.s = s
        self.seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def penalize(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        s = self.s
        if s.repeat_penalty == 1.0 or s.repeat_last_n == 0 or not history:
            return logits
        recent = history[-s.repeat_last_n:] if s.repeat_last_n > 0 else history
        ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
        vals = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(vals > 0, vals / s.repeat_penalty, vals * s.repeat_penalty)
        return logits

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """Next token id from float32 logits [V]."""
        s = self.s
        logits = self.penalize(logits, history)
        if s.temp <= 0:
            return int(torch.argmax(logits))
        V = logits.shape[0]
        if 0 < s.top_k < V:
            vals, idx = torch.topk(logits, s.top_k)
        else:
            vals, idx = torch.sort(logits, descending=True)
        vals, idx = vals.float().cpu(), idx.cpu()
        if s.top_p < 1.0:
            cum = torch.cumsum(torch.softmax(vals, -1), -1)
            keep = int(torch.searchsorted(cum, torch.tensor([s.top_p])).item()) + 1
            vals, idx = vals[:keep], idx[:keep]
        if s.min_p > 0.0:
            keep = int((vals >= vals[0] + torch.log(torch.tensor(s.min_p))).sum())
            vals, idx = vals[:max(keep, 1)], idx[:max(keep, 1)]
        probs = torch.softmax(vals / s.temp, -1)
        return int(idx[torch.multinomial(probs, 1, generator=self.gen)])


# --------------------------------------------------------------------------- detokenization


# --------------------------------------------------------------------------- chat


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (jinja2)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(None, "the model's tokenizer has no chat template (tokenizer_config.json chat_template or "
                                "chat_template.jinja); run without --chat")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception

    def tok_str(i):
        return tokenizer.id_to_token(i) if i is not None else ""

    try:
        text = env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=getattr(tokenizer, "bos_token", None) or tok_str(tokenizer.bos_id),
            eos_token=getattr(tokenizer, "eos_token", None) or tok_str(tokenizer.eos_id))
    except TemplateError as e:
        raise ConfigError(None, f"chat template failed: {e}") from None
    if hasattr(tokenizer, "encode_with_specials"):
        return list(tokenizer.encode_with_specials(text))
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


# --------------------------------------------------------------------------- the loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_stop_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    eos = getattr(model.config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        ids.append(tokenizer.eos_id)
    return sorted(set(ids))


def generate(model, tokenizer, prompt_ids: Sequence[int], settings: Settings,
             on_token: Callable[[int, str], None] | None = None) -> Result:
    """Generate up to ``settings.max_new_tokens`` tokens after ``prompt_ids`` (batch 1).

    ``on_token(token_id, text)`` is called for every generated token with the text it completes
    (possibly "", e.g. the first byte of a multi-byte character); a true return value stops generation
    (stop strings). The result carries the text,
    ids, counts and prefill / decode speeds.
    """
    settings.validate()
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise UsageError(None, "the prompt is empty (no tokens)")
    cfg = model.config
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0) or (len(prompt_ids) + settings.max_new_tokens)
    if len(prompt_ids) >= limit and settings.max_new_tokens > 0:
        raise UsageError(None, f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise UsageError(None, f"prompt token ids outside the vocabulary (size {cfg.vocab_size}): {bad[:5]}")
    max_len = min(limit, len(prompt_ids) + max(settings.max_new_tokens, 1))
    stop = set(settings.stop_ids if settings.stop_ids is not None else default_stop_ids(model, tokenizer))
    if settings.ignore_eos:
        stop = set()
    device = next(iter(model.parameters()), None)
    device = device.device if device is not None else next(iter(model.buffers())).device
    sampler = Sampler(settings, device)
    stream = StreamDecoder(tokenizer, prompt_ids) if tokenizer is not None else None
    history = list(prompt_ids)
    out_ids: list[int] = []
    pieces: list[str] = []
    reason = "length"
    prefill_s = decode_s = 0.0
    n_decode = 0

    with torch.inference_mode():
        cache = model.new_cache(1, max_len)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        step = torch.empty((1, 1), dtype=torch.long, device=device)
        t0 = time.perf_counter()
        if settings.max_new_tokens > 0:
            logits = model(ids, cache=cache, pos=0)[0, -1]
            _sync(device)
        prefill_s = time.perf_counter() - t0
        pos = len(prompt_ids)
        split = getattr(model, "decode_threads", None)  # e.g. Mistral fp32: rows over 2 threads (enc.models.rowsplit)
        threads = split() if split is not None else contextlib.nullcontext()
        with threads:
            t1 = time.perf_counter()
            for n in range(settings.max_new_tokens):
                tok = sampler(logits, history)
                out_ids.append(tok)
                history.append(tok)
                text = stream.push(tok) if stream is not None else ""
                pieces.append(text)
                if on_token is not None and on_token(tok, text):
                    reason = "stop"  # the caller saw a stop string
                    break
                if tok in stop:
                    reason = "eos"
                    break
                if n + 1 == settings.max_new_tokens:
                    break
                if pos >= max_len:
                    reason = "context"
                    break
                step[0, 0] = tok
                logits = model(step, cache=cache, pos=pos)[0, -1]
                pos += 1
                n_decode += 1
        _sync(device)
        decode_s = time.perf_counter() - t1
    if stream is not None:
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if on_token is not None:
                on_token(-1, tail)
    return Result(
        text="".join(pieces), prompt_ids=prompt_ids, token_ids=out_ids, prompt_tokens=len(prompt_ids),
        generated_tokens=len(out_ids), stop_reason=reason, seed=sampler.seed,
        prefill_seconds=prefill_s, decode_seconds=decode_s,
        prefill_tokens_per_s=len(prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0,
        settings={k: v for k, v in asdict(settings).items() if k != "stop_ids"} | {"stop_ids": sorted(stop)},
    )
