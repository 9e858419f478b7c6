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

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFile(path, "config.json not found (is this a Hugging Face model directory?)")
    return read_json_object(path)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards, or model.safetensors."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(index, f"invalid index: {e}") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (d / f).is_file():
                raise MissingFile(d / f, "shard named in model.safetensors.index.json is missing")
        return [d / f for f in files]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    raise MissingFile(d, "no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptCheckpoint(path, "truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise CorruptCheckpoint(path, f"safetensors header length {n} is implausible")
        raw = f.read(n)
    if len(raw) != n:
        raise CorruptCheckpoint(path, "truncated safetensors header")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(path, f"invalid safetensors header: {e}") from None


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
        header = _safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CorruptCheckpoint(path, f"tensor {name}: unsupported dtype {info['dtype']}")
            out[name] = LazyTensor(tuple(info["shape"]), dtype, _st_loader(path, name), (name,))
    return out


def _st_loader(path: Path, name: str):
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    return load


def load_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors, memory-mapped from safetensors; cast floating tensors to ``dtype`` if given."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        if path.suffix == ".bin":
            from enc.io.torch_pickle import safe_torch_load

            part = safe_torch_load(path, mmap=True)
        else:
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
