"""Batched inference for the eval heads: length-bucketed batches, dynamic padding, autocast.

Sequences are sorted by length and cut into batches of ``batch_size`` (optionally capped at
``max_tokens`` = batch rows x padded length), each padded only to its own longest sequence; a
batch with no padding runs without an attention mask. Outputs come back in the input order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from enc.errors import UsageError


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(None, f"--device {device}: CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(None, f"--device must be cpu, cuda or auto, not {device!r}")
    return device


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU by default ('auto'); float32 everywhere with 'fp32'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(None, f"--precision must be auto, fp32 or bf16, not {precision!r}")
    dev = device.split(":")[0]
    use = precision == "bf16" or (precision == "auto" and dev == "cuda")
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=use)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    if batch_size < 1:
        raise UsageError(None, f"--batch-size must be at least 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens is not None and (len(cur) + 1) * longest > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def collate(items: Sequence[Encoded], pad_id: int, device: str) -> dict[str, torch.Tensor | None]:
    """Pad to the longest item; no mask when nothing is padded (SDPA's fast path)."""
    T = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    tt = torch.zeros((len(items), T), dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        tt[r, :n] = torch.tensor(e.token_type_ids)
        mask[r, :n] = 1
    padded = bool((mask == 0).any())
    return {"input_ids": ids.to(device), "token_type_ids": tt.to(device),
            "attention_mask": mask.to(device) if padded else None}


def iter_batches(items: Sequence[Encoded], batch_size: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    yield from length_batches([len(e.input_ids) for e in items], batch_size, max_tokens)


@torch.inference_mode()
def predict(model: torch.nn.Module, items: Sequence[Encoded], pad_id: int, device: str, batch_size: int = 32,
            max_tokens: int | None = None, precision: str = "auto",
            on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Run ``model`` over ``items``; returns, per item, its outputs as float32 arrays.

    A model returning one tensor [B, C] gives arrays [C]; one returning a tuple of [B, T] tensors
    (QA start/end logits) gives arrays [k, len(item)] with padding cut off.
    """
    model.eval()
    out: list[np.ndarray | None] = [None] * len(items)
    for idx in iter_batches(items, batch_size, max_tokens):
        batch = collate([items[i] for i in idx], pad_id, device)
        with autocast(device, precision):
            res = model(**batch)
        if isinstance(res, tuple):
            arr = torch.stack([r.float() for r in res], dim=1).cpu().numpy()  # [B, k, T]
            for r, i in enumerate(idx):
                out[i] = arr[r, :, : len(items[i].input_ids)]
        else:
            arr = res.float().cpu().numpy()
            for r, i in enumerate(idx):
                out[i] = arr[r]
        if on_batch is not None:
            on_batch(len(idx))
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr; yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=not enabled)
    task = bar.add_task(label, total=total)
    with bar:
        yield lambda n: bar.advance(task, n)


def clamp_length(model, max_length: int) -> tuple[int, list[str]]:
    """``max_length`` cut to the model's position embeddings (longer inputs would index past them)."""
    positions = getattr(model, "hf_config", {}).get("max_position_embeddings")
    if isinstance(positions, int) and 0 < positions < max_length:
        return positions, [f"--max-length {max_length} is more than the model's {positions} positions: "
                           f"clamped to {positions}"]
    return max_length, []


def truncate_pair(a: list, b: list | None, room: int) -> tuple[list, list | None]:
    """``tokenizers``' longest_first truncation (the legacy algorithm it ports verbatim)."""
    if b is None:
        return a[:room], None
    if len(a) + len(b) <= room:
        return a, b
    n1, n2 = len(a), len(b)
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > room else max(n1, room - n1)
    if n1 + n2 > room:
        n1 = room // 2
        n2 = n1 + room % 2
    if swap:
        n1, n2 = n2, n1
    return a[:n1], b[:n2]


def encode_pair(tok, text_a: str, text_b: str | None, max_length: int) -> Encoded:
    """``[CLS] a [SEP] (b [SEP])`` truncated longest-first to ``max_length``, as transformers does."""
    if tok.cls_id is None or tok.sep_id is None:
        raise UsageError(None, "the tokenizer has no [CLS]/[SEP] tokens; GLUE heads need them")
    a = tok.encode(text_a, add_special_tokens=False).ids
    b = tok.encode(text_b, add_special_tokens=False).ids if text_b is not None else None
    a, b = truncate_pair(a, b, max_length - (3 if b is not None else 2))
    ids = [tok.cls_id, *a, tok.sep_id]
    tt = [0] * len(ids)
    if b is not None:
        ids += [*b, tok.sep_id]
        tt += [1] * (len(b) + 1)
    return Encoded(ids, tt)
