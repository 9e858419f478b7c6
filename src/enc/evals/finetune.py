"""Fine-tuning for the eval heads: AdamW, linear warmup then linear decay, gradient accumulation.

Deterministic under a seed on the CPU (one generator shuffles, ``torch.manual_seed`` drives
initialisation and dropout). On CUDA the forward/backward runs under bf16 autocast (weights and
optimizer state stay float32); GPU kernels may still be non-deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from enc.errors import UsageError
from enc.evals.runtime import Encoded, autocast, collate


@dataclass
class FinetuneConfig:
    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"

    def check(self) -> None:
        for name, ok in (("--epochs", self.epochs > 0), ("--lr", self.lr > 0), ("--batch-size", self.batch_size >= 1),
                         ("--grad-accum", self.grad_accum >= 1), ("--warmup-ratio", 0 <= self.warmup_ratio < 1)):
            if not ok:
                raise UsageError(None, f"invalid {name}: {getattr(self, name[2:].replace('-', '_'))}")

    def as_dict(self) -> dict:
        return asdict(self)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' ``get_linear_schedule_with_warmup`` multiplier."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def classification_loss(regression: bool) -> Callable:
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if regression:
            return F.mse_loss(out.squeeze(-1).float(), target.float())
        return F.cross_entropy(out.float(), target.long())
    return loss


def qa_loss(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """transformers' QA loss: mean of start and end cross-entropy (targets clamped to the sequence)."""
    start, end = out
    T = start.shape[1]
    s, e = target[:, 0].clamp(0, T), target[:, 1].clamp(0, T)
    return (F.cross_entropy(start.float(), s, ignore_index=T) + F.cross_entropy(end.float(), e, ignore_index=T)) / 2


def train(model: torch.nn.Module, items: Sequence[Encoded], targets: Sequence, loss_fn: Callable, pad_id: int,
          cfg: FinetuneConfig, progress: bool = True, label: str = "fine-tuning") -> dict:
    """Train in place; returns {"steps", "first_loss", "final_loss", "mean_loss"} (mean: last 10% of batches)."""
    cfg.check()
    if not items:
        raise UsageError(None, "no training examples")
    device = cfg.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    n = len(items)
    batches_per_epoch = math.ceil(n / cfg.batch_size)
    total_batches = math.ceil(batches_per_epoch * cfg.epochs)
    total_steps = math.ceil(total_batches / cfg.grad_accum)
    warmup = int(cfg.warmup_ratio * total_steps)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total_steps))
    t = torch.tensor(targets)
    losses: list[float] = []
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=True,
                   disable=not progress)
    task = bar.add_task(label, total=total_batches, loss="-")
    done, accum = 0, 0
    with bar:
        while done < total_batches:
            perm = torch.randperm(n, generator=gen).tolist()
            for b in range(batches_per_epoch):
                if done >= total_batches:
                    break
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                batch = collate([items[i] for i in idx], pad_id, device)
                with autocast(device, cfg.precision):
                    out = model(**batch)
                loss = loss_fn(out, t[idx].to(device))
                (loss / cfg.grad_accum).backward()
                accum += 1
                done += 1
                if accum == cfg.grad_accum or done == total_batches:
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    accum = 0
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": total_steps, "first_loss": losses[0], "final_loss": losses[-1], "mean_loss": sum(tail) / len(tail)}
