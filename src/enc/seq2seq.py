"""Encoder-decoder generation (BertGeneration bert2bert / roberta2roberta): greedy, sampling, beam search.

The encoder runs once over the input; the decoder starts from ``decoder_start_token_id`` and runs one
token at a time from a static KV cache (its cross-attention keys/values are computed once).

- ``num_beams == 1``: the token chain of :class:`enc.generation.Sampler` (``--temp 0`` is greedy:
  the argmax, which is what transformers' ``generate()`` does by default), streamed as it goes.
- ``num_beams > 1``: beam search with transformers' semantics (``length_penalty`` 1.0,
  ``early_stopping`` False): each step keeps the best ``max(2, 1 + n_eos) * num_beams`` continuations
  of all beams by summed log-probability; those ending in EOS (or at the length limit) among the top
  ``num_beams`` are scored ``sum_logprobs / generated_len ** length_penalty`` and kept in a pool of
  ``num_beams`` finished hypotheses; the other best ``num_beams`` continue. The search stops when
  every candidate hit a stop, or when the pool is full and the best running beam, scored at the
  current length, cannot beat the pool's worst. The answer is the pool's best.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from enc.errors import ConfigError, UsageError
from enc.generation import Result, Sampler, Settings, StreamDecoder

NEG = -1.0e9


def is_seq2seq(model_dir: str | Path) -> bool:
    """True for an encoder-decoder directory (config.json ``is_encoder_decoder``)."""
    from enc.models.loading import read_config

    cfg = read_config(model_dir)
    if cfg.get("model_type") == "bert-generation":
        raise ConfigError(Path(model_dir) / "config.json", "one half of a BertGeneration encoder-decoder: generation "
                                                           "needs the whole model (convert without --part)")
    return bool(cfg.get("is_encoder_decoder")) or cfg.get("model_type") == "encoder-decoder"


def load_tokenizer(model_dir: str | Path):
    """BertGenerationTokenizer directories: plain sentencepiece, no special tokens added (as transformers)."""
    from enc.tokenization import LlamaSentencePiece, _read_json
    from enc.tokenization import load_tokenizer as load_any

    d = Path(model_dir)
    cfg = _read_json(d / "tokenizer_config.json")
    if cfg.get("tokenizer_class") == "BertGenerationTokenizer" and (d / "spiece.model").is_file():
        return LlamaSentencePiece(d / "spiece.model", add_bos=False, add_eos=False)
    return load_any(d)


def special_ids(model_dir: str | Path, model) -> dict:
    """decoder_start / eos / pad ids: generation_config.json first, then config.json (as transformers reads them)."""
    from enc.io.jsonfile import read_json_object

    d = Path(model_dir)
    gen = read_json_object(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    raw = getattr(model, "raw", {}) or {}
    dec = model.decoder.config

    def pick(key: str, *fallbacks):
        for v in (gen.get(key), raw.get(key), *fallbacks):
            if v is not None:
                return v
        return None

    start = pick("decoder_start_token_id", gen.get("bos_token_id"), dec.bos_token_id)
    if start is None:
        raise ConfigError(d / "config.json", "no decoder_start_token_id (or bos_token_id) to start decoding from")
    eos = pick("eos_token_id", dec.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"start": int(start), "eos": [int(e) for e in eos], "pad": pick("pad_token_id", dec.pad_token_id)}


def _check_input(model, input_ids: Sequence[int]) -> None:
    cfg = model.encoder.config
    if not input_ids:
        raise UsageError(None, "the input is empty (no tokens)")
    if len(input_ids) > cfg.max_position_embeddings:
        raise UsageError(None, f"the input has {len(input_ids)} tokens; the encoder takes at most "
                               f"{cfg.max_position_embeddings}")
    bad = [i for i in input_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise UsageError(None, f"input token ids outside the vocabulary (size {cfg.vocab_size}): {bad[:5]}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate(model, tokenizer, input_ids: Sequence[int], settings: Settings, ids: dict, num_beams: int = 1,
             length_penalty: float = 1.0, on_token: Callable[[int, str], None] | None = None) -> Result:
    """Generate the output sequence for ``input_ids`` (batch 1). ``ids``: :func:`special_ids`."""
    settings.validate()
    if num_beams < 1:
        raise UsageError(None, f"--num-beams must be >= 1, got {num_beams}")
    input_ids = [int(i) for i in input_ids]
    _check_input(model, input_ids)
    limit = model.decoder.config.max_position_embeddings  # decoder positions: start token + generated
    max_new = min(settings.max_new_tokens, limit - 1)
    stop = [] if settings.ignore_eos else list(settings.stop_ids if settings.stop_ids is not None else ids["eos"])
    dev = _device(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        src = torch.tensor([input_ids], dtype=torch.long, device=dev)
        mask = None  # one unpadded input: no attention mask anywhere
        memory = model.encode(src, mask)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if num_beams == 1:
            out, reason, text, seed = _sample(model, tokenizer, memory, mask, settings, ids["start"], stop, max_new,
                                              on_token)
        else:
            out, reason = _beam(model, memory, mask, ids["start"], stop, max_new, num_beams, length_penalty)
            text, seed = (tokenizer.decode(out) if tokenizer is not None else ""), 0
            if on_token is not None and text:
                on_token(-1, text)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        decode_s = time.perf_counter() - t1
    if reason == "length" and max_new < settings.max_new_tokens and len(out) == max_new:
        reason = "context"
    n = len(out)
    return Result(
        text=text, prompt_ids=input_ids, token_ids=out, prompt_tokens=len(input_ids), generated_tokens=n,
        stop_reason=reason, seed=seed, prefill_seconds=prefill_s, decode_seconds=decode_s,
        prefill_tokens_per_s=len(input_ids) / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=n / decode_s if decode_s > 0 and n else 0.0,
        settings={k: v for k, v in asdict(settings).items() if k != "stop_ids"}
        | {"stop_ids": sorted(stop), "num_beams": num_beams, "length_penalty": length_penalty,
           "decoder_start_token_id": ids["start"]},
    )


def _sample(model, tokenizer, memory, mask, settings: Settings, start: int, stop: list[int], max_new: int,
            on_token) -> tuple[list[int], str, str, int]:
    sampler = Sampler(settings)
    stream = StreamDecoder(tokenizer, []) if tokenizer is not None else None
    cache = model.new_cache(1, max_new + 1)
    step = torch.tensor([[start]], dtype=torch.long, device=memory.device)
    out: list[int] = []
    pieces: list[str] = []
    reason = "length"
    for n in range(max_new):
        logits = model.decode(step, cache, n, memory, mask)[0, -1].float()
        tok = sampler(logits, out)
        out.append(tok)
        text = stream.push(tok) if stream is not None else ""
        pieces.append(text)
        if on_token is not None:
            on_token(tok, text)
        if tok in stop:
            reason = "eos"
            break
        step[0, 0] = tok
    if stream is not None:
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if on_token is not None:
                on_token(-1, tail)
    return out, reason, "".join(pieces), sampler.seed


def _beam(model, memory, mask, start: int, stop: list[int], max_new: int, K: int,
          length_penalty: float) -> tuple[list[int], str]:
    if max_new == 0:
        return [], "length"
    dev = memory.device
    max_len = 1 + max_new  # transformers' max_length: the start token + new tokens
    keep = max(2, 1 + len(stop)) * K
    eos = torch.tensor(stop, dtype=torch.long, device=dev)
    # memory and mask stay batch 1: the decoder computes the cross-attention keys/values once for all beams
    cache = model.new_cache(K, max_len)
    run_seq = torch.full((K, max_len), start, dtype=torch.long, device=dev)
    run_score = torch.full((K,), NEG, device=dev)
    run_score[0] = 0.0
    fin_seq = run_seq.clone()
    fin_len = torch.ones(K, dtype=torch.long, device=dev)
    fin_score = torch.full((K,), NEG, device=dev)
    fin_flag = torch.zeros(K, dtype=torch.bool, device=dev)
    top_mask = torch.arange(keep, device=dev) < K
    improvable = True
    cur = 1
    while True:
        logits = model.decode(run_seq[:, cur - 1:cur], cache, cur - 1, memory, mask)[:, -1].float()
        logp = torch.log_softmax(logits, -1) + run_score[:, None]
        V = logp.shape[-1]
        top_lp, top_idx = torch.topk(logp.reshape(-1), keep)
        parent, tok = top_idx // V, top_idx % V
        cand = run_seq[parent].clone()
        cand[:, cur] = tok
        hits = torch.isin(tok, eos) if len(stop) else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        # the beams that go on: the best K candidates that did not stop
        run_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(run_lp, K).indices
        run_seq, run_score, beam_parent = cand[nxt], run_lp[nxt], parent[nxt]
        # the pool of finished hypotheses: candidates among the top K that stopped, length-normalised
        just = hits & top_mask
        score = top_lp / float(cur + 1 - 1) ** length_penalty
        if not improvable:
            score = score + NEG
        score = score + (~just).float() * NEG
        merged = torch.cat([fin_score, score])
        sel = torch.topk(merged, K).indices
        fin_seq = torch.cat([fin_seq, cand])[sel]
        fin_len = torch.cat([fin_len, torch.full((keep,), cur + 1, dtype=torch.long, device=dev)])[sel]
        fin_flag = torch.cat([fin_flag, just])[sel]
        fin_score = merged[sel]
        cache.reorder(beam_parent)
        cur += 1
        if improvable and bool(fin_flag.all()):
            best_running = run_score[0] / float(cur - 1) ** length_penalty
            improvable = bool(best_running > fin_score.min())
        if not improvable or bool(hits.all()):
            break
    n = int(fin_len[0])
    out = fin_seq[0, 1:n].tolist()
    reason = "eos" if out and out[-1] in stop else "length"
    return out, reason


def run_cli(prompt: str, model_dir: Path, settings: Settings, num_beams: int, dtype, device, json_: bool,
            write: Callable[[str], None], status: Callable[[str], None]) -> dict:
    """``enc generate`` on an encoder-decoder directory (called by enc.cli.generate); returns the result dict."""
    from enc.models.bert_generation import from_pretrained

    tokenizer = load_tokenizer(model_dir)
    input_ids = list(tokenizer.encode(prompt, add_special_tokens=True).ids)
    settings.validate()
    net = from_pretrained(model_dir, dtype=dtype, device=device).prepare_inference()
    ids = special_ids(model_dir, net)

    def on_token(_tok: int, text: str) -> None:
        if text and not json_:
            write(text)

    result = generate(net, tokenizer, input_ids, settings, ids, num_beams, on_token=on_token)
    if not json_:
        write("\n")
        status(f"input {result.prompt_tokens} tokens, encoded at {result.prefill_tokens_per_s:.1f} tok/s | generated "
               f"{result.generated_tokens} tokens, {result.decode_tokens_per_s:.2f} tok/s | "
               f"{'beams ' + str(num_beams) if num_beams > 1 else 'seed ' + str(result.seed)} | "
               f"stop: {result.stop_reason}")
    return result.to_dict() | {"model": str(model_dir), "encoder_decoder": True, "prompt": prompt,
                               "generated_text": result.text}


__all__ = ["generate", "is_seq2seq", "load_tokenizer", "run_cli", "special_ids"]
