"""fill-mask for LUKE / mLUKE: masked words and, for entity spans, the entity each mention stands for.

An entity span is a character range of the input text (``--entity-span 24:30``). Each span becomes one
entity input, ``[MASK]`` (LUKE's masked-entity prediction), placed over the span's tokens exactly as
transformers' LukeTokenizer / MLukeTokenizer place it; the entity head's scores over the entity
vocabulary give the predictions. mLUKE's vocabulary shares one id between the titles of one entity
in several languages: ``entity`` is the first of them, ``titles`` all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from enc.errors import ConfigError, UsageError


def parse_spans(items: list[str]) -> list[tuple[int, int]]:
    spans = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(None, f"--entity-span takes START:END character offsets, got {item!r}")
        s, e = int(parts[0]), int(parts[1])
        if e <= s:
            raise UsageError(None, f"--entity-span {item}: END must be after START")
        spans.append((s, e))
    return spans


def fill_mask_luke(model_dir: str | Path, texts: list[str], top_k: int = 5, entity_spans: list[str] | None = None,
                   entities: list[str] | None = None, *, dtype=None, device: str = "cpu", on_error=None) -> list[dict]:
    """Like :func:`enc.serve.fill_mask`, plus ``"entities"``: per span, the top-k entities.

    Each entity result: {"span": [s, e], "mention", "token_span": [a, b], "predictions":
    [{"score", "id", "entity", "titles"}]}. A bad input raises :class:`UsageError`, or with ``on_error`` is
    reported as ``on_error(index, message)`` and left out.
    """
    from enc.models import load_model
    from enc.serve import _predictions
    from enc.tokenization_luke import LukeTokenizer

    d = Path(model_dir)
    if not (d / "entity_vocab.json").is_file():
        raise ConfigError(d, "--entity-span needs a LUKE / mLUKE model directory (no entity_vocab.json)")
    tok = LukeTokenizer.from_dir(d)
    model = load_model(d, head="mlm", dtype=dtype, device=device)
    spans = parse_spans(entity_spans or [])
    results = []
    with torch.inference_mode():
        for n, text in enumerate(texts):
            try:
                enc = tok.encode_entities(text, spans, entities)
                ids = enc["input_ids"]
                if tok.mask_id not in ids and not spans:
                    raise UsageError(None, f"no {tok.mask_token} and no --entity-span in input: {text!r}")
                limit = model.config.max_position_embeddings - 2
                if len(ids) > limit:
                    raise UsageError(None, f"input is {len(ids)} tokens, over the model's {limit}")
            except UsageError as e:
                if on_error is None:
                    raise
                on_error(n, e.message)
                continue
            x = torch.tensor([ids], device=device)
            if spans:
                out = model(x, torch.ones_like(x), None, torch.tensor([enc["entity_ids"]], device=device),
                            torch.tensor([enc["entity_position_ids"]], device=device))
            else:
                out = model(x, torch.ones_like(x))
            logits = out["logits"][0].float().cpu()
            logits[..., tok.vocab_size:] = float("-inf")
            res = _predictions(tok, text, ids, logits, top_k)
            res["entities"] = []
            for j, ((s, e), (a, b)) in enumerate(zip(spans, enc["token_spans"])):
                probs = out["entity_logits"][0, j].float().cpu().softmax(-1)
                values, indices = probs.topk(min(top_k, probs.shape[0]))
                preds = [{"score": round(v, 6), "id": i, "entity": tok.entity_titles.get(i, ["?"])[0],
                          "titles": tok.entity_titles.get(i, [])} for v, i in zip(values.tolist(), indices.tolist())]
                res["entities"].append({"span": [s, e], "mention": text[s:e], "token_span": [a, b],
                                        "predictions": preds})
            results.append(res)
    return results


def render_entities(console, result: dict, plain=lambda s: s) -> None:
    """Human output of the entity predictions (``plain`` escapes console markup: titles hold brackets)."""
    for ent in result.get("entities", []):
        console.print(plain(f"  entity {ent['mention']!r} ({ent['span'][0]}:{ent['span'][1]}):"), soft_wrap=True)
        for p in ent["predictions"]:
            more = f" (+{len(p['titles']) - 1} titles)" if len(p["titles"]) > 1 else ""
            console.print(plain(f"  {p['score']:8.4f}  {p['entity']}{more}"), soft_wrap=True)
