"""Streaming, sharded safetensors writer with Hugging Face's sharding and index rules.

Every shape and dtype is known from the lazy tensors before a byte is read, so each file's
header is written first and the tensors follow one at a time: peak memory is about the
largest single tensor (plus whatever its transform needs), whatever the model's size.

Sharding follows ``huggingface_hub.split_torch_state_dict_into_shards``: tensors are taken in
order; one larger than the limit gets a shard of its own; otherwise a new shard starts when the
next tensor would overflow the current one. One shard is written as ``model.safetensors``; more
as ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` whose
``metadata.total_size`` is the sum of tensor bytes and whose ``weight_map`` is sorted by key.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from enc.errors import UsageError
from enc.io.dtypes import st_code
from enc.io.fastcopy import RawWriter
from enc.io.lazy import LazyTensor

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 (decimal, as huggingface_hub), '500MiB' -> 500*2**20, 1000 -> 1000."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if not m:
        raise UsageError(None, f"invalid size {size!r} (examples: 5GB, 500MB, 2GiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n <= 0:
        raise UsageError(None, f"size must be positive: {size!r}")
    return n


def plan_shards(sizes: list[tuple[str, int]], max_shard: int) -> list[list[str]]:
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, n in sizes:
        if n > max_shard:
            shards.append([name])
            continue
        if current and current_size + n > max_shard:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += n
    if current:
        shards.append(current)
    return shards or [[]]


@dataclass
class WriteResult:
    files: list[str]
    total_size: int
    n_tensors: int


def _header(tensors: dict[str, LazyTensor], order: list[str], metadata: dict[str, str]) -> tuple[bytes, int]:
    head: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        code = st_code(t.dtype)  # by name: t.dtype may be a torch dtype or an enc.io.dtypes.DType
        if code is None:
            raise UsageError(None, f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        head[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-aligned
    return raw, offset


CHUNK_BYTES = 16 * 2**20


def _write_tensor(f, t: torch.Tensor) -> None:
    """Write a tensor's bytes in C order. A non-contiguous one (e.g. a transposed view) is made
    contiguous a block of rows at a time, so a transpose never needs a second full-size copy."""
    t = t.detach().cpu()
    if t.numel() == 0:
        return
    if t.dim() == 0:
        t = t.reshape(1)
    if t.is_contiguous():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return
    row_bytes = max(1, t[0].numel() * t.element_size())
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, t.shape[0], step):
        block = t[i:i + step].contiguous().reshape(-1)
        f.write(memoryview(block.view(torch.uint8).numpy()))


def _raw_recipe(lazy: LazyTensor):
    r = getattr(lazy, "raw", None)
    return r if r is not None and r.itemsize == lazy.dtype.itemsize else None


def write_safetensors_file(
    path: Path,
    tensors: dict[str, LazyTensor],
    names: list[str],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    hash_file: bool = True,
) -> int:
    # Larger itemsize first keeps every tensor naturally aligned in the data section.
    order = sorted(names, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header, data_size = _header(tensors, order, metadata or {"format": "pt"})
    # tensors whose source bytes are known move as bytes (enc.io.fastcopy); the rest are loaded
    raw = RawWriter([_raw_recipe(tensors[n]) for n in order], [tensors[n].shape for n in order], hash_file)
    with open(path, "wb") as f, contextlib.closing(raw):
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for i, name in enumerate(order):
            lazy = tensors[name]
            if raw.write(f, i):
                if on_bytes:
                    on_bytes(lazy.nbytes)
                continue
            t = lazy.load()
            if tuple(t.shape) != lazy.shape or t.dtype != lazy.dtype:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {lazy.shape} {lazy.dtype}")
            _write_tensor(f, t)
            del t
            if on_bytes:
                on_bytes(lazy.nbytes)
        raw.finish(f)  # checksums of kernel-copied tensors; the file's sha256, hashed as it was written
    return data_size


def write_sharded(
    out_dir: Path,
    tensors: dict[str, LazyTensor],
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    hash_files: bool = True,
) -> WriteResult:
    """``hash_files``: compute each file's sha256 while it is written (``enc.io.fastcopy.known_sha256``)."""
    max_shard = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    shards = plan_shards([(k, v.nbytes) for k, v in tensors.items()], max_shard)
    total = sum(v.nbytes for v in tensors.values())
    if len(shards) == 1:
        write_safetensors_file(out_dir / "model.safetensors", tensors, shards[0], meta, on_bytes, hash_files)
        return WriteResult(["model.safetensors"], total, len(tensors))
    n = len(shards)
    files = []
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors_file(out_dir / fname, tensors, names, meta, on_bytes, hash_files)
        files.append(fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return WriteResult(files + ["model.safetensors.index.json"], total, len(tensors))


# --------------------------------------------------------------------------- atomic output
# Output checks and atomic publishing live in enc.io.publish; re-exported here for existing callers.
from enc.io.publish import atomic_dir, check_output  # noqa: E402,F401
