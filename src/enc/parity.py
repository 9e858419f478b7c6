"""Numerical parity: a forward pass in the ORIGINAL layout against enc's model on the output.

Both sides are generators of :class:`~enc.converters.base.Activation` with the same names in
the same order ("embeddings", "layer.0", ..., "mlm_logits"). They are consumed in lock-step,
so a converter may stream layer by layer (peak memory ~ one layer on each side).

Metrics per activation, over real (unpadded) positions, in float64:
- ``max_abs``  max |ref - out|
- ``rel``      max_abs / max |ref|
- ``nmse``     sum (ref - out)^2 / sum ref^2
- ``cos``      the minimum, over positions, of the cosine between ref and out vectors
- ``top1``/``top5`` for logits: fraction of positions with the same argmax / mean overlap of top-5 sets
- ``routing`` for MoE routers ("router" activations: gate logits plus each side's chosen experts):
  the share of positions whose top-k expert SET is the same on both sides

Thresholds depend on the dtype of the converted weights (the reference is always float32).

Layer-local (teacher-forced) mode: a converter that sets ``teacher_forced = True`` receives a
:class:`Teacher` holding the reference's activations as they are compared, and runs each of its
layers from the reference's input to that layer (cast to its own dtype) and, in MoE layers, with
the reference's choice of experts. Each layer is then judged on its own error, which does not grow
with depth, and a near-tie in a router that picks a different expert on the two sides is counted
(``routing``) instead of sending the rest of the model down another path. A router still fails
when its gate logits are off, when it picks a different number of experts, or when a choice
differs by more than the two sides' gate-logit error can explain (see :func:`measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from enc.converters.base import Activation, Probe


@dataclass(frozen=True)
class Thresholds:
    nmse: float
    rel: float
    cos: float
    top1: float | None  # None: reported, not judged

    def describe(self) -> str:
        t1 = f", top-1 >= {self.top1}" if self.top1 is not None else ""
        return f"nmse <= {self.nmse:g}, rel max-abs <= {self.rel:g}, cosine >= {self.cos}{t1}"


# Calibrated on the test fixtures (see README "Parity thresholds"). float32 must agree to
# round-off; 16-bit outputs run in 16-bit and are judged against the float32 reference.
THRESHOLDS: dict[torch.dtype, Thresholds] = {
    torch.float32: Thresholds(nmse=1e-8, rel=1e-3, cos=0.99999, top1=None),
    torch.float16: Thresholds(nmse=1e-3, rel=0.1, cos=0.995, top1=0.9),
    torch.bfloat16: Thresholds(nmse=1e-2, rel=0.25, cos=0.98, top1=0.8),
}


@dataclass
class Row:
    name: str
    kind: str
    max_abs: float
    rel: float
    nmse: float
    cos: float
    top1: float | None = None
    top5: float | None = None
    routing: float | None = None  # "router" rows: share of positions with the same top-k expert set
    # `enc verify` logits rows: share of positions whose top-1 differs from the reference's only within
    # the run's measured error (the reference's own margin between the two ids is inside it: a tie).
    # The top-1 threshold is judged on top1 + top1_ties.
    top1_ties: float | None = None
    passed: bool = True
    why: str = ""


@dataclass
class ParityReport:
    dtype: str
    thresholds: Thresholds
    rows: list[Row] = field(default_factory=list)
    mode: str = "end-to-end"  # or "layer-local" (teacher-forced, see the module docstring)
    assumed: list[str] = field(default_factory=list)  # overrides and guesses both sides were built on

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.passed), None)

    def worst(self) -> dict:
        return {
            "max_abs": max((r.max_abs for r in self.rows), default=0.0),
            "nmse": max((r.nmse for r in self.rows), default=0.0),
            "cos": min((r.cos for r in self.rows), default=1.0),
            "top1": min((r.top1 for r in self.rows if r.top1 is not None), default=None),
            "routing": min((r.routing for r in self.rows if r.routing is not None), default=None),
        }

    def to_dict(self) -> dict:
        ff = self.first_failure
        verdict = "pass" if self.passed else "fail"
        return {
            "verdict": verdict,
            # "pass (assumed: ...)" when the pass rests on overrides or guesses that parity cannot check
            "verdict_text": f"{verdict} (assumed: {'; '.join(self.assumed)})" if self.assumed else verdict,
            "assumed": list(self.assumed),
            "dtype": self.dtype,
            "mode": self.mode,
            "thresholds": asdict(self.thresholds),
            "thresholds_text": self.thresholds.describe(),
            "first_failure": ff.name if ff else None,
            "worst": self.worst(),
            "rows": [asdict(r) for r in self.rows],
        }


def _rows(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten to [positions, features] keeping only masked positions."""
    if mask is not None:
        a = a[mask.bool()]
    return a.reshape(a.shape[0], -1) if a.dim() > 1 else a.reshape(-1, 1)


class StreamMismatch(RuntimeError):
    """The two forward passes do not walk the same model (different layers or outputs)."""


def measure(ref: Activation, out: Activation, th: Thresholds) -> Row:
    if ref.name != out.name:
        raise StreamMismatch(f"parity streams out of step: reference gave {ref.name!r}, converted gave {out.name!r}")
    if tuple(ref.tensor.shape) != tuple(out.tensor.shape):
        return Row(ref.name, ref.kind, float("inf"), float("inf"), float("inf"), -1.0, passed=False,
                   why=f"shape {tuple(out.tensor.shape)} != reference {tuple(ref.tensor.shape)}")
    mask = ref.mask
    if ref.kind == "router" and mask is None:  # gate logits [..., experts]: every leading index is a position
        mask = torch.ones(ref.tensor.shape[:-1], dtype=torch.bool)
    a = _rows(ref.tensor.detach().double(), mask)
    b = _rows(out.tensor.detach().double(), mask)
    diff = a - b
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    scale = a.abs().max().item() if a.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    denom = (a * a).sum().item()
    nmse = (diff * diff).sum().item() / denom if denom > 0 else (diff * diff).sum().item()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos_pos = (a * b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    cos_pos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos_pos), cos_pos)
    cos = cos_pos.min().item() if cos_pos.numel() else 1.0
    row = Row(ref.name, ref.kind, max_abs, rel, nmse, cos)
    if ref.kind == "logits" and a.shape[1] > 1:
        row.top1 = (a.argmax(1) == b.argmax(1)).double().mean().item()
        k = min(5, a.shape[1])
        ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
        row.top5 = ((ta.unsqueeze(2) == tb.unsqueeze(1)).any(2).double().sum(1) / k).mean().item()
    why = []
    if ref.kind == "router":
        why.extend(_routing(row, ref, out, a, b, mask))
    if not (nmse <= th.nmse):
        why.append(f"nmse {nmse:.3g} > {th.nmse:g}")
    if not (rel <= th.rel):
        why.append(f"rel max-abs {rel:.3g} > {th.rel:g}")
    if not (cos >= th.cos):
        why.append(f"cosine {cos:.6f} < {th.cos}")
    if th.top1 is not None and row.top1 is not None and row.top1 < th.top1:
        why.append(f"top-1 {row.top1:.3f} < {th.top1}")
    row.passed = not why
    row.why = "; ".join(why)
    return row


def _routing(row: Row, ref: Activation, out: Activation, a: torch.Tensor, b: torch.Tensor,
             mask: torch.Tensor) -> list[str]:
    """Routing agreement of a router row (``a``/``b``: reference/converted gate logits per position).

    A position whose expert sets differ is a near-tie, and is only counted, when every expert the
    converted side took instead lies within the two sides' gate-logit error of one the reference
    took: for experts x (reference only) and y (converted only), ref[x] - ref[y] <= |err x| + |err y|
    must hold, as it does whenever both sides take the top-k of their own logits. Otherwise the
    converted router is choosing by another rule, and the row fails.
    """
    if ref.topk is None or out.topk is None:
        return ["router activation without the chosen experts"]
    ka, kb = ref.topk.shape[-1], out.topk.shape[-1]
    if ka != kb:
        row.routing = 0.0
        return [f"{kb} experts per token, reference {ka}"]
    sa, sb = _rows(ref.topk, mask).long(), _rows(out.topk, mask).long()
    n, E = a.shape
    if sa.numel() == 0:
        row.routing = 1.0
        return []
    if int(sa.max()) >= E or int(sb.max()) >= E or int(sb.min()) < 0:
        row.routing = 0.0
        return [f"expert index out of range 0..{E - 1}"]
    ma = torch.zeros(n, E, dtype=torch.bool).scatter_(1, sa, True)
    mb = torch.zeros(n, E, dtype=torch.bool).scatter_(1, sb, True)
    same = (ma == mb).all(1)
    row.routing = same.double().mean().item()
    only_a, only_b = ma & ~mb, mb & ~ma
    margin = a.masked_fill(~only_a, float("-inf")).max(1).values - a.masked_fill(~only_b, float("inf")).min(1).values
    err = (a - b).abs().max(1).values
    slack = 2 * err * (1 + 1e-3) + 1e-6 * a.abs().max(1).values
    bad = ~same & (margin > slack)
    if bad.any():
        return [f"{int(bad.sum())} of {n} positions choose experts the gate logits do not explain "
                f"(routing {row.routing:.3f})"]
    return []


def _updates(ref: Activation, out: Activation, start: torch.Tensor, dtype: torch.dtype) -> tuple[Activation, Activation]:
    """Layer-local residual layers are judged on their update (output - input), not on the whole stream.

    Both sides started from ``start`` (the converted side from it cast to ``dtype``), so the
    difference of the updates is the difference of the outputs; judged relative to the update, a
    wrong layer deep in a model is not hidden under a residual stream that has grown large.
    """
    if tuple(start.shape) != tuple(ref.tensor.shape) or tuple(out.tensor.shape) != tuple(ref.tensor.shape):
        return ref, out
    return (Activation(ref.name, ref.tensor - start, "update", ref.mask),
            Activation(out.name, out.tensor.float() - start.to(dtype).float(), "update", out.mask))


class Teacher:
    """The reference's activations as :func:`compare` takes them, for a layer-local converted side.

    The converted stream asks for the reference's input to its next layer (``hidden(name)``) and,
    in MoE layers, the reference's chosen experts (``experts(name)``); both were computed before the
    converted side is asked for that activation. Each activation is handed out once and dropped.
    """

    def __init__(self) -> None:
        self._seen: dict[str, Activation] = {}

    def push(self, act: Activation) -> None:
        self._seen[act.name] = act

    def _take(self, name: str) -> Activation:
        act = self._seen.pop(name, None)
        if act is None:
            raise RuntimeError(f"layer-local parity: the reference has not produced {name!r} yet")
        return act

    def hidden(self, name: str) -> torch.Tensor:
        return self._take(name).tensor

    def experts(self, name: str) -> torch.Tensor | None:
        return self._take(name).topk


def compare(reference: Iterator[Activation], converted: Iterator[Activation], dtype: torch.dtype,
            thresholds: Thresholds | None = None, on_row: Callable[[Row], None] | None = None,
            teacher: Teacher | None = None) -> ParityReport:
    th = thresholds or THRESHOLDS.get(dtype, THRESHOLDS[torch.float32])
    report = ParityReport(str(dtype).replace("torch.", ""), th)
    if teacher is not None:
        report.mode = "layer-local"
    ref_it, out_it = iter(reference), iter(converted)
    inputs: dict[str, torch.Tensor] = {}  # layer-local: reference activations a later one adds to
    held: Activation | None = None  # a converted activation read ahead past a router row it does not report
    while True:
        ref = next(ref_it, None)
        if ref is not None and teacher is not None:
            teacher.push(ref)
        out = (held if held is not None else next(out_it, None)) if ref is not None else held
        held = None
        if ref is None:
            if out is not None:
                held = out
            break
        if out is None:
            raise StreamMismatch(f"converted model produced no activation for {ref.name!r}")
        if ref.kind == "router" and out.name != ref.name:
            held = out  # a runtime without router outputs (transformers): routing is not compared
            continue
        if teacher is not None and ref.kind == "hidden":
            inputs[ref.name] = ref.tensor
            if ref.base is not None and ref.base in inputs:
                ref, out = _updates(ref, out, inputs.pop(ref.base), dtype)
        report.rows.append(measure(ref, out, th))
        if on_row is not None:
            on_row(report.rows[-1])
    if held is not None or next(out_it, None) is not None:
        raise StreamMismatch("converted model produced more activations than the reference")
    return report


def make_probes(
    vocab_size: int,
    max_len: int,
    *,
    lengths: Sequence[int] = (48, 17, 6),
    low: int = 0,
    cls_id: int | None = None,
    sep_id: int | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
    type_vocab_size: int = 0,
    seed: int = 0,
) -> list[Probe]:
    """Fixed, seeded probes: several lengths, right padding, both segment ids where used."""
    g = torch.Generator().manual_seed(seed)
    lengths = [max(2, min(n, max_len)) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    types = torch.zeros((len(lengths), T), dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(low, vocab_size, (n,), generator=g)
        if bos_id is not None:
            row[0] = bos_id
        if cls_id is not None:
            row[0] = cls_id
        if sep_id is not None:
            row[-1] = sep_id
            if type_vocab_size > 1 and n >= 6 and r % 2 == 0:
                mid = n // 2
                row[mid - 1] = sep_id
                types[r, mid:n] = 1
        ids[r, :n] = row
        mask[r, :n] = 1
    return [Probe(ids, mask, types if type_vocab_size > 0 else None, name=f"batch{len(lengths)}x{T}")]


def weights_dtype(out_dir: Path) -> torch.dtype:
    """The dtype of the floating weights of a converted directory."""
    from enc.models.loading import lazy_weights

    for t in lazy_weights(out_dir).values():
        if t.dtype.is_floating_point:
            return t.dtype
    return torch.float32


def run_parity(converter, out_dir: Path, thresholds: Thresholds | None = None,
               on_row: Callable[[Row], None] | None = None) -> ParityReport:
    """Reference (original layout, from ``converter``'s source) vs enc.models on ``out_dir``.

    ``on_row`` is called after each activation is judged (progress). Layer-local (teacher-forced)
    where the converter supports it (``teacher_forced``), else end-to-end.
    """
    from enc.converters import describe_assumed
    from enc.errors import FormatError

    check_same_model(converter, Path(out_dir))
    probes = converter.probes()
    dtype = weights_dtype(out_dir)
    teacher = Teacher() if getattr(converter, "teacher_forced", False) else None
    try:
        with torch.inference_mode():
            converted = (converter.converted_activations(Path(out_dir), probes, teacher=teacher)
                         if teacher is not None else converter.converted_activations(Path(out_dir), probes))
            report = compare(converter.reference_activations(probes), converted, dtype, thresholds, on_row, teacher)
    except StreamMismatch as e:
        raise FormatError(out_dir, f"the output does not come from this source ({e})") from e
    report.assumed = describe_assumed(converter.options.overrides) + converter.assumptions()
    return report


# config.json fields that fix the model's shape: an output whose values differ was not converted from the source.
# (Head counts are left out: a wrong --num-heads is a parity failure, exit 1.)
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "embedding_size",
              "n_embd", "n_layer", "n_inner", "num_local_experts")


def check_same_model(converter, out_dir: Path) -> None:
    """Refuse (exit 2) to compare a source with an output of another shape instead of crashing on it."""
    from enc.errors import FormatError
    from enc.models.loading import read_config

    have, want = read_config(out_dir), converter.hf_config()
    diff = [f"{k} {have[k]!r} (the source gives {want[k]!r})" for k in SHAPE_KEYS
            if k in have and k in want and have[k] != want[k]]
    if diff:
        raise FormatError(out_dir / "config.json", f"the output does not come from this source: {', '.join(diff)}")
