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
    from enc.models import load_model
    from enc.tokenization import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok.mask_id is None:
        raise ConfigError(Path(model_dir), "the tokenizer has no mask token; fill-mask needs a masked-LM model")
    model = load_model(model_dir, head="mlm", dtype=dtype, device=device)
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
    with torch.inference_mode():
        for idx in batches:
            T = max(len(encs[i].ids) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            types = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                e = encs[i]
                ids[r, :len(e.ids)] = torch.tensor(e.ids)
                mask[r, :len(e.ids)] = 1
                types[r, :len(e.ids)] = torch.tensor(e.token_type_ids or [0] * len(e.ids))
            logits = model(ids.to(device), mask.to(device), types.to(device))["logits"].float().cpu()
            logits[..., tok.vocab_size:] = float("-inf")  # padded vocab rows are not tokens
            for r, i in enumerate(idx):
                by_index[i] = _predictions(tok, texts[i], encs[i].ids, logits[r], top_k)
    for i in range(len(texts)):
        results.append(by_index[i])
    return results


def _predictions(tok, text: str, ids: list[int], logits: torch.Tensor, top_k: int) -> dict:
    masks = []
    # One mask: the sequence without special tokens (readable). Several: transformers keeps the special tokens so
    # the other [MASK]s stay visible in each sequence; so does enc.
    single = sum(1 for t in ids if t == tok.mask_id) == 1
    for pos, tid in enumerate(ids):
        if tid != tok.mask_id:
            continue
        probs = logits[pos].softmax(-1)
        values, indices = probs.topk(min(top_k, probs.shape[0]))
        preds = []
        for score, cand in zip(values.tolist(), indices.tolist()):
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
