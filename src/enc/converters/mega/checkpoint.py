"""Reading MEGA originals with enc's safe unpickler: the fairseq ``model.pt`` and the Colab wrapper trio.

- fairseq 0.9 (``facebookresearch/mega``): ``torch.save({"args": Namespace, "model": state_dict,
  "optimizer_history": [...], "extra_state": {...}, ["last_optimizer_state", "criterion"]})``. Only
  ``args`` and ``model`` are used; the rest is read as inert data (fairseq classes there get inert
  stand-ins that run nothing) and its tensors are dropped.
- The wrapper HF's conversion script read: ``model_args.pkl`` (a plain pickle of {"mega_args": Namespace,
  "depth", "vocab_size"}), ``encoder_weights.pt`` and ``mlm_head_weights.pt`` (state dicts).
"""

from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from enc.errors import ConfigError, CorruptCheckpoint, FormatError, MissingFile, UnsafeInput
from enc.io.lazy import LazyTensor
from enc.io.megatron_pickle import ByteRange, StoredTensor, iter_tensors, load_lazy

WRAPPER_FILES = ("model_args.pkl", "encoder_weights.pt", "mlm_head_weights.pt")
FAIRSEQ_NAMES = ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt")


@dataclass
class MegaSource:
    kind: str  # "wrapper" | "fairseq_lm"
    args: dict
    tensors: dict[str, LazyTensor]
    files: list[Path]
    root: Path
    dropped: dict[str, str] = field(default_factory=dict)


def _as_dict(obj, path: Path, what: str) -> dict:
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise ConfigError(path, f"{what} is a {type(obj).__name__}, expected an argparse Namespace")


def _tensors(tree, prefix: str) -> dict[str, LazyTensor]:
    return {f"{prefix}{name}": t.lazy(f"{prefix}{name}") for name, t in iter_tensors(tree)
            if isinstance(t, StoredTensor)}


def find_fairseq_checkpoint(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".pt" else None
    if path.is_dir():
        for n in FAIRSEQ_NAMES:
            if (path / n).is_file():
                return path / n
        pts = sorted(p for p in path.glob("*.pt") if p.name not in WRAPPER_FILES)
        if len(pts) == 1:
            return pts[0]
    return None


def is_wrapper(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in WRAPPER_FILES)


def peek_fairseq(path: Path) -> dict | None:
    """The top-level dict of a torch.save file if it is a fairseq MEGA checkpoint, else None (never raises)."""
    try:
        tree = load_lazy(ByteRange.whole_file(path))
    except Exception:  # noqa: BLE001 - detection only: anything unreadable is simply not ours
        return None
    if not (isinstance(tree, dict) and "model" in tree and "args" in tree and "optimizer_history" in tree):
        return None
    args = tree["args"]
    arch = getattr(args, "arch", None) if not isinstance(args, dict) else args.get("arch")
    return tree if isinstance(arch, str) and arch.startswith("mega") else None


def read_fairseq(path: Path) -> MegaSource:
    tree = load_lazy(ByteRange.whole_file(path))
    if not isinstance(tree, dict) or "model" not in tree or "args" not in tree:
        raise FormatError(path, "not a fairseq checkpoint (no 'args' and 'model' entries)")
    if tree["args"] is None:
        raise FormatError(path, "fairseq checkpoint without 'args' (a hydra 'cfg' checkpoint is not MEGA's fairseq 0.9)")
    args = _as_dict(tree["args"], path, "'args'")
    arch = str(args.get("arch", ""))
    if not arch.startswith("mega_lm"):
        raise FormatError(path, f"fairseq architecture {arch!r}: enc converts MEGA language models (mega_lm*); "
                                "LRA / NMT / speech MEGA checkpoints are not supported yet")
    if not isinstance(tree["model"], dict):
        raise FormatError(path, "the checkpoint's 'model' entry is not a state dict")
    tensors = _tensors(tree["model"], "")
    dropped = {}
    for key in ("last_optimizer_state", "optimizer_history", "extra_state", "criterion"):
        for name, _ in iter_tensors(tree.get(key)) if key in tree else ():
            dropped[f"{key}.{name}"] = "optimizer / trainer state"
    root = path.parent
    files = [path] + [p for p in (root / "dict.txt",) if p.is_file()]
    return MegaSource("fairseq_lm", args, tensors, files, root, dropped)


class _ArgsUnpickler(pickle.Unpickler):
    """A plain pickle that may name argparse.Namespace and nothing else (Python's "restricting globals")."""

    ALLOWED = {("argparse", "Namespace"): argparse.Namespace}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id")


MAX_ARGS_PICKLE = 16 << 20


def read_args_pickle(path: Path):
    size = path.stat().st_size
    if size > MAX_ARGS_PICKLE:
        raise UnsafeInput(path, f"{size} bytes is too large for an argument pickle (limit {MAX_ARGS_PICKLE})")
    with open(path, "rb") as fh:
        try:
            return _ArgsUnpickler(fh).load()
        except pickle.UnpicklingError as e:
            msg = str(e)
            if msg.startswith(("global ", "persistent")):
                raise UnsafeInput(path, f"pickle refers to {msg}, which is not on enc's allow-list; refusing to load "
                                        "it (nothing was executed)") from None
            raise CorruptCheckpoint(path, f"corrupted pickle: {msg[:120]}") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError,
                MemoryError, RecursionError) as e:
            raise CorruptCheckpoint(path, f"truncated or corrupted pickle ({type(e).__name__})") from None


def read_wrapper(root: Path) -> MegaSource:
    for f in WRAPPER_FILES:
        if not (root / f).is_file():
            raise MissingFile(root / f, "part of the MEGA wrapper checkpoint is missing")
    meta = read_args_pickle(root / "model_args.pkl")
    if not isinstance(meta, dict) or "mega_args" not in meta:
        raise ConfigError(root / "model_args.pkl", "expected a dict with 'mega_args', 'depth' and 'vocab_size'")
    args = _as_dict(meta["mega_args"], root / "model_args.pkl", "'mega_args'")
    for key in ("depth", "vocab_size"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(root / "model_args.pkl", f"{key} must be a positive integer, got {v!r}")
        args[key] = v
    enc = load_lazy(ByteRange.whole_file(root / "encoder_weights.pt"))
    head = load_lazy(ByteRange.whole_file(root / "mlm_head_weights.pt"))
    for name, tree in (("encoder_weights.pt", enc), ("mlm_head_weights.pt", head)):
        if not isinstance(tree, dict):
            raise FormatError(root / name, "expected a state dict")
    tensors = {**_tensors(enc, ""), **_tensors(head, "mlm_head.")}
    files = [root / f for f in WRAPPER_FILES]
    files += [root / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
              if (root / f).is_file()]
    return MegaSource("wrapper", args, tensors, files, root)
