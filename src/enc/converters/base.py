"""The converter framework: literal key tables, named transforms, strict plans.

A converter module (one per SOURCE family) subclasses :class:`Converter` and is registered in
``enc.converters.REGISTRY``. It reads the original checkpoint lazily, translates the config,
and returns a :class:`Plan`: every HF tensor as a :class:`~enc.io.lazy.LazyTensor` plus the
source keys it deliberately drops. :func:`check_plan` then enforces the two strictness rules:
a source key that nothing consumed or dropped is an error, and so is an expected HF key that
nothing produced.

Key tables are literal data (``{}`` stands for a layer/group index)::

    TABLE = {
        "bert/embeddings/word_embeddings": ("albert.embeddings.word_embeddings.weight", copy),
        "bert/encoder/.../group_{}/inner_group_{}/attention_1/self/query/kernel":
            ("albert.encoder.albert_layer_groups.{}.albert_layers.{}.attention.query.weight", transpose),
    }
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from enc.errors import MappingError
from enc.io.fastcopy import RawOp, keep
from enc.io.fastcopy import permute_rope as raw_permute_rope
from enc.io.fastcopy import transpose2d as raw_transpose
from enc.io.lazy import LazyTensor

# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Transform:
    """A named per-tensor transform with a shape rule, applied lazily."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]] = field(repr=False, default=lambda s: s)
    # the same rearrangement on raw bytes (enc.io.fastcopy.RawOp) from the input shape, when it is one
    raw: Callable[[tuple[int, ...]], RawOp | None] | None = field(repr=False, default=None)

    def __call__(self, t: LazyTensor) -> LazyTensor:
        return t.apply(self.fn, self.shape_fn(t.shape), self.name, raw_op=self.raw)


copy = Transform("copy", lambda t: t, raw=lambda s: keep())
# A view: the writer streams it out in row blocks, so no full-size transposed copy is made.
transpose = Transform("transpose", lambda t: t.t(), lambda s: (s[1], s[0]),
                      raw=lambda s: raw_transpose() if len(s) == 2 else None)


def permute_rope(n_heads: int, dim1: int | None = None, dim2: int | None = None) -> Transform:
    """Meta/Mistral interleaved-pair rotary layout -> HF rotate-half layout (for wq / wk).

    Rows of each head go from (pairs, 2) order to (2, pairs) order.
    """

    def fn(w: torch.Tensor) -> torch.Tensor:
        d1 = dim1 if dim1 is not None else w.shape[0]
        d2 = dim2 if dim2 is not None else w.shape[1]
        return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2).contiguous()

    def raw(s: tuple[int, ...]) -> RawOp | None:
        plain = dim1 is None and dim2 is None and len(s) == 2 and s[0] % (2 * n_heads) == 0
        return raw_permute_rope(n_heads) if plain else None

    return Transform(f"permute_rope({n_heads})", fn, raw=raw)


# --------------------------------------------------------------------------- key tables

Rule = tuple[str, Transform]


def _compile(pattern: str) -> re.Pattern:
    parts = pattern.split("{}")
    return re.compile("^" + r"(\d+)".join(re.escape(p) for p in parts) + "$")


class KeyTable:
    """A literal source->HF key table with one transform per row."""

    def __init__(self, table: dict[str, Rule]):
        self.table = table
        self._compiled: list | None = None  # on first use: detection imports every family's tables

    def lookup(self, key: str) -> tuple[str, Transform] | None:
        if self._compiled is None:
            self._compiled = [(_compile(src), hf, tr) for src, (hf, tr) in self.table.items()]
        for rx, hf, tr in self._compiled:
            m = rx.match(key)
            if m:
                return hf.format(*m.groups()), tr
        return None

    def rows(self) -> Iterable[tuple[str, str, str]]:
        for src, (hf, tr) in self.table.items():
            yield src, hf, tr.name


class DropList:
    """Source keys that are deliberately not converted, each with a reason."""

    def __init__(self, rules: dict[str, str]):
        self.rules = rules
        self._compiled: list | None = None  # on first use, as KeyTable's

    def reason(self, key: str) -> str | None:
        if self._compiled is None:
            self._compiled = [(re.compile(rx), why) for rx, why in self.rules.items()]
        for rx, why in self._compiled:
            if rx.search(key):
                return why
        return None


# --------------------------------------------------------------------------- plans


@dataclass
class Plan:
    tensors: dict[str, LazyTensor]  # HF key -> lazy tensor, in writing order
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def with_dtype(self, dtype: torch.dtype | None) -> Plan:
        if dtype is None:
            return self
        return Plan({k: v.to(dtype) for k, v in self.tensors.items()}, self.dropped, self.notes)


def apply_table(
    source: dict[str, LazyTensor],
    table: KeyTable,
    drop: DropList,
    path: Path,
    rename: Callable[[str], str] = lambda k: k,
) -> Plan:
    """Map every source tensor through ``table`` (after ``rename``) or ``drop``; fail on the rest."""
    tensors: dict[str, LazyTensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key, lazy in source.items():
        why = drop.reason(key)
        if why is not None:
            dropped[key] = why
            continue
        hit = table.lookup(rename(key))
        if hit is None:
            unmapped.append(key)
            continue
        hf_key, tr = hit
        if hf_key in tensors:
            raise MappingError(path, f"two source tensors map to {hf_key} (second: {key})")
        tensors[hf_key] = tr(lazy)
    if unmapped:
        raise MappingError(path, f"{len(unmapped)} unknown variable(s) no rule maps: {', '.join(sorted(unmapped)[:6])}"
                           + (" ..." if len(unmapped) > 6 else ""))
    return Plan(tensors, dropped)


def check_plan(plan: Plan, source_keys: Iterable[str], expected: set[str] | None, path: Path) -> None:
    """Every source key consumed or dropped; every expected HF key produced and nothing else."""
    consumed = {s for t in plan.tensors.values() for s in t.sources} | set(plan.dropped)
    left = sorted(set(source_keys) - consumed)
    if left:
        raise MappingError(path, f"{len(left)} source tensor(s) left unprocessed: {', '.join(left[:6])}"
                           + (" ..." if len(left) > 6 else ""))
    if expected is None:
        return
    missing = sorted(expected - set(plan.tensors))
    if missing:
        raise MappingError(path, f"the output would lack {len(missing)} tensor(s) the model needs: {', '.join(missing[:6])}"
                           + (" ..." if len(missing) > 6 else ""))
    extra = sorted(set(plan.tensors) - expected)
    if extra:
        raise MappingError(path, f"the plan produces tensor(s) the HF model does not have: {', '.join(extra[:6])}")


# --------------------------------------------------------------------------- parity I/O


@dataclass
class Probe:
    """A batch of inputs (right padded). ``attention_mask`` is 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    name: str = ""


@dataclass
class Activation:
    """One named output of a forward pass, compared position by position on ``mask``."""

    name: str  # "embeddings", "layer.0" ... "layer.N-1", "mlm_logits", "logits", ...
    tensor: torch.Tensor  # [B, T, ...] or [B, C]
    kind: str = "hidden"  # "hidden", "logits" (+ top-1/top-5 agreement) or "router" (MoE gate logits)
    mask: torch.Tensor | None = None  # [B, T] bool; None = every row
    topk: torch.Tensor | None = None  # "router" only: [B, T, k] the experts this side chose per token
    base: str | None = None  # a residual stream: the activation this one adds its layer's update to


# --------------------------------------------------------------------------- converter


@dataclass
class ConvertOptions:
    dtype: torch.dtype | None = None  # None: keep the source dtype
    overrides: dict[str, Any] = field(default_factory=dict)  # --num-heads, --rope-theta, --vocab ...


class Converter:
    """Base class of a source family. Subclasses set ``name``/``description`` and implement the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The overrides this family understands, key -> meaning: flag keys (see enc.converters.OVERRIDE_FLAGS)
    # and --set keys. Any other override is refused (exit 2). None: not declared, nothing is checked.
    accepts: ClassVar[dict[str, str] | None] = None

    def __init__(self, path: Path, options: ConvertOptions | None = None):
        self.path = Path(path)
        self.options = options or ConvertOptions()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass __init__ that fails (bad input, Ctrl-C, SIGTERM) still releases what it made
        (a tarball's extraction dir...): ``close()`` runs before the exception goes on."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_closes_on_failure", False):
            return

        def __init__(self, *args: Any, **kw: Any) -> None:
            try:
                init(self, *args, **kw)
            except BaseException:
                try:
                    self.close()
                except Exception:  # noqa: BLE001 - a half-built object; the first error is the one to report
                    pass
                raise

        __init__._closes_on_failure = True  # type: ignore[attr-defined]
        __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    # -- detection
    @classmethod
    def detect(cls, path: Path) -> bool:
        raise NotImplementedError

    # -- required hooks
    def source_tensors(self) -> dict[str, LazyTensor]:
        """Every tensor of the original checkpoint under its original name."""
        raise NotImplementedError

    def hf_config(self) -> dict:
        raise NotImplementedError

    def plan(self) -> Plan:
        raise NotImplementedError

    # -- optional hooks
    def expected_keys(self) -> set[str] | None:
        """HF keys the output must contain (tied weights excluded). None skips the check."""
        return None

    def write_extra_files(self, out_dir: Path) -> list[str]:
        """Tokenizer files, generation_config.json ... Returns warnings for the user."""
        return []

    def prepare_extra_files(self) -> None:
        """Slow work for :meth:`write_extra_files` that needs no weights (building tokenizer.json). ``enc
        convert`` runs it on a helper thread while the weights are written; it must be thread-safe
        against the converter's other methods and leave results for write_extra_files to use."""

    def source_files(self) -> list[Path]:
        return []

    def summary(self) -> dict:
        """Format-specific facts for ``enc inspect`` (config, files)."""
        return {}

    def assumptions(self) -> list[str]:
        """What was guessed rather than read (heads from shapes, a default rope_theta...).

        Parity cannot check a guess (both sides are built on it): the verdict says ``pass (assumed: ...)``.
        """
        return []

    def probes(self) -> list[Probe]:
        raise NotImplementedError

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        """Forward pass in the ORIGINAL layout, from the source tensors (independent of enc.models)."""
        raise NotImplementedError

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        """Forward pass of enc.models on the converted directory, yielding the same names."""
        raise NotImplementedError

    def close(self) -> None:
        """Release temp dirs / open files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
