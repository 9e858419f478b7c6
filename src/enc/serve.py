"""Serving converted models from the command line: fill-mask (encoders)."""

from __future__ import annotations

from pathlib import Path

import torch

from enc.errors import ConfigError, UsageError


def fill_mask(model_dir: str | Path, texts: list[str], top_k: int = 5, *, dtype=None, device: str = "cpu",
              on_error=None) -> list[dict]:
    """Top-k predictions for every mask token of every text, like transformers' fill-mask pipeline.

    Each result: {"text", "masks": [{"position", "predictions": [{"score", "token", "token_str", "sequence"}]}]}.
    A text without a mask, or longer than the model takes, raises :class:`UsageError`; with ``on_error``
    it is reported as ``on_error(index, message)`` instead and left out, and the others still run.
    """
    from enc.tokenization import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok.mask_id is None:
        raise ConfigError(Path(model_dir), "the tokenizer has no mask token; fill-mask needs a masked-LM model")
    from enc.models.albert_numpy import load as load_numpy

    fast = load_numpy(model_dir, dtype=dtype, device=device)  # torch-free where it is exact (ALBERT fp32 CPU)
    if fast is not None:
        max_len = fast.config.max_position_embeddings
    else:
        from enc.io.dtypes import as_torch
        from enc.models import load_model

        model = load_model(model_dir, head="mlm", dtype=None if dtype is None else as_torch(dtype), device=device)
        max_len = getattr(model.config, "max_position_embeddings", 512)
    encs = [tok.encode(t) for t in texts]
    good = []
    for i, (t, e) in enumerate(zip(texts, encs)):
        if tok.mask_id not in e.ids:
            problem = f"no {tok.mask_token} in input: {t!r}"
        elif len(e.ids) > max_len:
            problem = f"input is {len(e.ids)} tokens, over the model's {max_len}"
        else:
            good.append(i)
            continue
        if on_error is None:
            raise UsageError(None, problem)
        on_error(i, problem)
    texts_all, encs_all = texts, encs
    texts, encs = [texts_all[i] for i in good], [encs_all[i] for i in good]
    results = []
    pad = tok.pad_id or 0
    # Batches of equal-length inputs only: nothing is padded, so a text's predictions never depend on
    # the other texts given with it (MobileBERT's trigram embedding, for one, sees a padded neighbour).
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < 32 and len(encs[batches[-1][0]].ids) == len(encs[i].ids):
            batches[-1].append(i)
        else:
            batches.append([i])
    by_index: dict[int, dict] = {}
    if fast is not None:
        for idx in batches:
            by_index.update(_fill_numpy(fast, tok, idx, texts, encs, pad, top_k))
    else:
        with torch.inference_mode():
            for idx in batches:
                by_index.update(_fill_torch(model, tok, idx, texts, encs, pad, top_k, device))
    for i in range(len(texts)):
        results.append(by_index[i])
    return results


def _batch(idx: list[int], encs, pad: int):
    """Token ids, attention mask and token types of the encodings ``idx``, right-padded (int64 numpy)."""
    import numpy as np

    T = max(len(encs[i].ids) for i in idx)
    ids = np.full((len(idx), T), pad, dtype=np.int64)
    mask = np.zeros((len(idx), T), dtype=np.int64)
    types = np.zeros((len(idx), T), dtype=np.int64)
    for r, i in enumerate(idx):
        e = encs[i]
        ids[r, :len(e.ids)] = e.ids
        mask[r, :len(e.ids)] = 1
        types[r, :len(e.ids)] = e.token_type_ids or [0] * len(e.ids)
    return ids, mask, types


def _fill_torch(model, tok, idx: list[int], texts, encs, pad: int, top_k: int, device: str) -> dict[int, dict]:
    ids, mask, types = (torch.from_numpy(a) for a in _batch(idx, encs, pad))
    logits = model(ids.to(device), mask.to(device), types.to(device))["logits"].float().cpu()
    logits[..., tok.vocab_size:] = float("-inf")  # padded vocab rows are not tokens
    return {i: _predictions(tok, texts[i], encs[i].ids, logits[r], top_k) for r, i in enumerate(idx)}


def _fill_numpy(model, tok, idx: list[int], texts, encs, pad: int, top_k: int) -> dict[int, dict]:
    """The torch path's steps with the numpy ALBERT (enc.models.albert_numpy): logits only at the masks."""
    import numpy as np

    ids, mask, types = _batch(idx, encs, pad)
    rows = [(r, pos) for r, i in enumerate(idx) for pos, t in enumerate(encs[i].ids) if t == tok.mask_id]
    logits = model.logits(ids, mask, types, rows)
    logits[:, tok.vocab_size:] = -np.inf  # padded vocab rows are not tokens
    at = {row: n for n, row in enumerate(rows)}

    def top(r: int, pos: int, k: int) -> tuple[list[float], list[int]]:
        x = logits[at[r, pos]]
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        k = min(k, probs.shape[0])
        best = np.argpartition(-probs, k - 1)[:k]
        best = best[np.lexsort((best, -probs[best]))]  # highest first; equal scores: lower id first
        return probs[best].tolist(), best.tolist()

    return {i: _predictions_from(tok, texts[i], encs[i].ids, lambda pos, r=r: top(r, pos, top_k))
            for r, i in enumerate(idx)}


def _predictions(tok, text: str, ids: list[int], logits: torch.Tensor, top_k: int) -> dict:
    """The torch path's predictions from a sequence's [T, V] logits (enc.serve_luke uses it too)."""

    def top(pos: int) -> tuple[list[float], list[int]]:
        probs = logits[pos].softmax(-1)
        values, indices = probs.topk(min(top_k, probs.shape[0]))
        return values.tolist(), indices.tolist()

    return _predictions_from(tok, text, ids, top)


def _predictions_from(tok, text: str, ids: list[int], top) -> dict:
    """``top(pos)`` -> (scores, token ids), best first, for the mask at position ``pos``."""
    masks = []
    # One mask: the sequence without special tokens (readable). Several: transformers keeps the special tokens so
    # the other [MASK]s stay visible in each sequence; so does enc.
    single = sum(1 for t in ids if t == tok.mask_id) == 1
    for pos, tid in enumerate(ids):
        if tid != tok.mask_id:
            continue
        values, indices = top(pos)
        preds = []
        for score, cand in zip(values, indices):
            filled = list(ids)
            filled[pos] = cand
            preds.append({
                "score": round(score, 6),
                "token": cand,
                "token_str": tok.decode([cand], skip_special_tokens=False).strip(),
                "sequence": tok.decode(filled, skip_special_tokens=single),
            })
        masks.append({"position": pos, "predictions": preds})
    return {"text": text, "masks": masks}
