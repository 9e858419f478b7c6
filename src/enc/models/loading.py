"""Read any HF-layout model directory: config.json and safetensors (single or sharded).

Shared by every runtime in ``enc.models``. Weights can be loaded eagerly (``load_state_dict``)
or lazily one tensor at a time (``lazy_weights``), which is what layer-streamed parity uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from enc.errors import CorruptCheckpoint, MissingFile
from enc.io.jsonfile import read_json_object
from enc.io.lazy import LazyTensor


def read_config(model_dir: str | Path) -> dict:
    from enc.models.config import ConfigDict

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFile(path, "config.json not found (is this a Hugging Face model directory?)")
    cfg = ConfigDict(read_json_object(path))
    cfg.path = path
    return cfg


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards, or model.safetensors."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(index, f"invalid JSON: {e}") from None
        except (KeyError, TypeError):
            raise CorruptCheckpoint(index, "no weight_map object") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpoint(index, "weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for f in files:
            # shards are plain file names beside the index: never a path out of the directory
            if not f or f in (".", "..") or "/" in f or "\\" in f or Path(f).is_absolute():
                raise CorruptCheckpoint(index, f"weight_map names {f!r}, not a file in {d}; refusing to read it")
            if not (d / f).is_file():
                raise MissingFile(d / f, "shard named in model.safetensors.index.json is missing")
        return [d / f for f in files]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    raise MissingFile(d, "no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def lazy_weights(model_dir: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of the directory as a LazyTensor (nothing read until .load())."""
    out: dict[str, LazyTensor] = {}
    for path in weight_files(model_dir):
        if path.suffix == ".bin":
            from enc.io.torch_pickle import safe_torch_load

            sd = safe_torch_load(path, mmap=True)
            for k, t in sd.items():
                out[k] = LazyTensor(tuple(t.shape), t.dtype, (lambda t=t: t), (k,))
            continue
        from enc.io.safetensors_in import lazy_tensors

        out.update(lazy_tensors(path))
    return out


def load_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors, memory-mapped from safetensors; cast floating tensors to ``dtype`` if given."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        if path.suffix == ".bin":
            from enc.io.torch_pickle import safe_torch_load

            part = safe_torch_load(path, mmap=True)
        else:
            from enc.io.safetensors_in import read_header

            read_header(path)  # every offset checked, one-line errors naming the file
            try:
                part = load_file(str(path))
            except Exception as e:  # safetensors raises its own error types
                raise CorruptCheckpoint(path, f"cannot read safetensors: {e}") from None
        sd.update(part)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Make a checkpoint saved with or without a base-model prefix fit ``wanted`` keys.

    transformers saves e.g. ``AlbertModel`` without ``albert.`` and ``AlbertForMaskedLM`` with it;
    both load into either (``base_model_prefix``). We do the same.
    """
    has = any(k.startswith(prefix) for k in sd)
    want = any(k.startswith(prefix) for k in wanted)
    if has and not want:
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    if want and not has:
        return {(prefix + k if prefix + k in wanted else k): v for k, v in sd.items()}
    return sd


def load_into(
    module: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    path: str | Path,
    *,
    tied: dict[str, str] | None = None,
    optional_missing: tuple[str, ...] = (),
    ignore_unexpected: tuple[str, ...] = (),
) -> None:
    """Strictly load ``sd`` into ``module``.

    ``tied`` maps a parameter that may be absent to the one it is tied to (written once on disk).
    Keys starting with an entry of ``optional_missing`` may be absent (e.g. a head not in this
    checkpoint); keys starting with ``ignore_unexpected`` are dropped silently (e.g. the other head).
    """
    tied = tied or {}
    wanted = dict(module.state_dict(keep_vars=True))
    if ignore_unexpected:
        sd = {k: v for k, v in sd.items() if not (k.startswith(ignore_unexpected) and k not in wanted)}
    unexpected = sorted(set(sd) - set(wanted))
    if unexpected:
        raise CorruptCheckpoint(path, f"unexpected weights for {type(module).__name__}: {', '.join(unexpected[:5])}"
                                + (" ..." if len(unexpected) > 5 else ""))
    missing = sorted(
        k for k in set(wanted) - set(sd)
        if k not in tied and not (optional_missing and k.startswith(optional_missing))
    )
    if missing:
        raise CorruptCheckpoint(path, f"missing weights for {type(module).__name__}: {', '.join(missing[:5])}"
                                + (" ..." if len(missing) > 5 else ""))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(wanted[k].shape):
            raise CorruptCheckpoint(path, f"weight {k} has shape {tuple(v.shape)}, model expects {tuple(wanted[k].shape)}")
        if wanted[k].is_floating_point() and not v.is_floating_point():
            dt = str(v.dtype).replace("torch.", "")
            raise CorruptCheckpoint(path, f"weight {k} is {dt}, the model needs floating point (a wrong or "
                                          "damaged checkpoint; nothing is cast silently)")
    module.load_state_dict(sd, strict=False, assign=False)
    for target, source in tied.items():
        if target not in sd:
            _set_param(module, target, _get_param(module, source))


def _get_param(module: torch.nn.Module, name: str):
    *path, leaf = name.split(".")
    m = module
    for p in path:
        m = getattr(m, p)
    return getattr(m, leaf)


def _set_param(module: torch.nn.Module, name: str, value) -> None:
    *path, leaf = name.split(".")
    m = module
    for p in path:
        m = getattr(m, p)
    setattr(m, leaf, value)
