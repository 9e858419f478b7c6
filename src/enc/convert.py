"""The conversion pipeline: detect -> plan -> check -> write (temp dir) -> verify -> publish."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from enc import __version__
from enc.converters import check_overrides, describe_assumed, detect
from enc.converters.base import Converter, ConvertOptions, Plan, check_plan
from enc.io.dtypes import DType
from enc.io.fastcopy import known_sha256
from enc.io.publish import (
    PROVENANCE_FILE,
    atomic_dir,
    check_inputs_outside,
    check_output,
    sweep_stale,
    sweep_stale_tempdirs,
)
from enc.io.safetensors_out import parse_size, write_sharded

# by name (enc.io.dtypes): parsing --dtype does not import torch
DTYPES = {"float32": DType("float32"), "fp32": DType("float32"), "float16": DType("float16"),
          "fp16": DType("float16"), "bfloat16": DType("bfloat16"), "bf16": DType("bfloat16")}

FULL_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed whole; larger ones are fingerprinted


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name in ("auto", "source"):
        return None
    from enc.errors import UsageError

    if name not in DTYPES:
        raise UsageError(None, f"unknown dtype {name!r} (choose float32, float16 or bfloat16)")
    return DTYPES[name].torch


def fingerprint(path: Path, full: bool = False) -> dict:
    """sha256 of small files; for large ones sha256 of size + first and last MiB (fast), unless full."""
    size = path.stat().st_size
    h = hashlib.sha256()
    if full or size <= FULL_HASH_LIMIT:
        known = known_sha256(path)  # a file enc just wrote was hashed as it was written (enc.io.fastcopy)
        if known is not None:
            return {"file": path.name, "bytes": size, "sha256": known}
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return {"file": path.name, "bytes": size, "sha256": h.hexdigest()}
    with open(path, "rb") as f:
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"file": path.name, "bytes": size, "sha256_head_tail": h.hexdigest()}


@dataclass
class ConvertResult:
    output: str
    format: str
    n_tensors: int
    total_bytes: int
    files: list[str]
    dtype: str
    dropped: dict[str, str]  # source tensor -> why it has no place in the output
    seconds: float
    parity: dict | None = None
    warnings: list[str] = field(default_factory=list)
    published: bool = True
    assumed: list[str] = field(default_factory=list)  # overrides and guesses (parity cannot check them)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: plan, write, extras, parity, record, publish


def open_converter(src: Path, forced: str | None, options: ConvertOptions) -> Converter:
    cls = detect(src, forced)
    check_overrides(cls, options.overrides)
    return cls(src, options)


def build_plan(conv: Converter, model_keys: bool = True) -> Plan:
    """The checked plan. ``model_keys=False`` leaves the check against the model's keys to the caller."""
    plan = conv.plan()
    check_plan(plan, conv.source_tensors().keys(), conv.expected_keys() if model_keys else None, conv.path)
    return plan.with_dtype(conv.options.dtype)


def convert(
    src: Path,
    out: Path,
    *,
    forced: str | None = None,
    options: ConvertOptions | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = True,
    hash_sources: bool = False,
    hash_outputs: bool | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_parity_row: Callable | None = None,
) -> ConvertResult:
    """Convert ``src`` into the HF directory ``out``. Nothing is left behind on failure.

    When ``verify`` is set and parity fails, the output is not published (``published`` False).
    ``hash_outputs`` (default: ``verify``): the full sha256 of every output file goes into
    ``enc_provenance.json`` for ``enc verify``. Without it large files get a size + first/last MiB
    fingerprint: hashing is a second pass over every byte (~1.7 GB/s, slower than copying them).
    """
    full_hashes = verify if hash_outputs is None else hash_outputs
    t0 = time.perf_counter()
    options = options or ConvertOptions()
    parse_size(shard_size)
    check_output(out, force, [src])
    swept = sweep_stale(Path(os.path.abspath(out)).parent) + sweep_stale_tempdirs()
    stage = on_stage or (lambda s: None)
    phases: dict[str, float] = {}
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 4)
        mark[0] = now

    stage("reading the source")  # a tarball is extracted here
    with open_converter(src, forced, options) as conv:
        check_inputs_outside(out, conv.source_files())
        plan = build_plan(conv, model_keys=False)
        # on a helper thread while the bytes move: the model's key list (torch may load for it) and the
        # slow, weight-independent part of the extra files (e.g. building tokenizer.json)
        jobs = [conv.expected_keys, conv.prepare_extra_files] + ([_load_torch] if verify else [])
        model_keys, *_ = _background(*jobs)  # parity follows: torch loads meanwhile, not after
        lap("plan")
        if on_plan:
            on_plan(plan)
        result: ConvertResult | None = None
        with atomic_dir(out, force=force) as tmp:
            stage("writing weights")
            mark[0] = time.perf_counter()
            written = write_sharded(tmp, plan.tensors, shard_size, {"format": "pt"},
                                    _checking(on_bytes, model_keys, plan, conv), hash_files=full_hashes)
            _check_model_keys(plan, model_keys.result(), conv)  # strict as ever: nothing is published if not
            config = conv.hf_config()
            config.setdefault("torch_dtype", str(_out_dtype(plan)).replace("torch.", ""))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            lap("write")
            stage("writing tokenizer")
            warnings = swept + conv.write_extra_files(tmp)
            lap("extras")
            parity = None
            record = None
            if verify:
                stage("verifying parity")
                from enc.parity import run_parity
                from enc.verify import Recorder

                recorder = Recorder(conv)  # keeps the reference's fingerprints for `enc verify`
                parity = run_parity(recorder, tmp, on_row=on_parity_row).to_dict()
                lap("parity")
                if parity["verdict"] == "pass" and recorder.entries:
                    record = recorder.write(tmp, fmt=conv.name, dtype=str(_out_dtype(plan)).replace("torch.", ""),
                                            parity=parity).name
            stage("hashing outputs")
            from enc.verify import output_hashes

            assumed = describe_assumed(conv.options.overrides) + conv.assumptions()
            if hash_sources:
                stage("hashing source files")
            provenance = {
                "enc_version": __version__,
                "source": {"format": conv.name, "path": str(Path(src).resolve()),
                           "files": [{**fingerprint(p, hash_sources), "path": str(Path(p).resolve())}
                                     for p in conv.source_files()]},  # the absolute path of every file read
                "dtype": str(_out_dtype(plan)).replace("torch.", ""),
                "dropped_source_tensors": len(plan.dropped),
                "overrides": {k: str(v) for k, v in conv.options.overrides.items()},
                "assumed": assumed,
                "warnings": list(warnings),
                "parity": None if parity is None else {k: parity[k] for k in ("verdict", "verdict_text", "assumed",
                                                                             "dtype", "thresholds", "worst",
                                                                             "first_failure")},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "golden_record": record,
                "output_hashes": "sha256" if full_hashes else "sha256 of files up to 64 MiB; larger: size, first and "
                                                              "last MiB (converted without --hash-outputs)",
                "outputs": output_hashes(tmp, full_hashes),  # also what --force may delete later (enc.io.publish)
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            result = ConvertResult(
                output=str(out), format=conv.name, n_tensors=written.n_tensors, total_bytes=written.total_size,
                files=sorted(os.listdir(tmp)), dtype=provenance["dtype"], dropped=dict(plan.dropped),
                seconds=0.0, parity=parity, warnings=warnings, assumed=assumed, phases=phases,
            )
            lap("record")  # golden record, output hashes, provenance
            if parity is not None and parity["verdict"] != "pass":
                result.published = False
                raise ParityFailed(result)
    lap("publish")
    result.seconds = time.perf_counter() - t0
    return result


class ParityFailed(Exception):
    """Parity failed: the output was built, judged wrong, and removed (exit code 1)."""

    def __init__(self, result: ConvertResult):
        super().__init__("parity failed")
        self.result = result


def _out_dtype(plan: Plan) -> torch.dtype:
    for t in plan.tensors.values():
        if t.dtype.is_floating_point:
            return t.dtype
    return DType("float32")


# --------------------------------------------------------------------------- overlap


def _background(*fns: Callable[[], object]) -> list[Future]:
    """Run ``fns`` one after the other on a helper thread. The writer's byte moves release the GIL, so
    Python work there (importing torch, building a tokenizer) overlaps them; a short switch interval
    hands the GIL back to the writer promptly after each of its system calls meanwhile."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, 0.0005))
    pool = ThreadPoolExecutor(1, thread_name_prefix="enc-overlap")
    futs = [pool.submit(fn) for fn in fns]
    futs[-1].add_done_callback(lambda f: sys.setswitchinterval(old))
    pool.shutdown(wait=False)
    return futs


def _load_torch() -> None:
    """Import torch and the parity code (a no-op if loaded): the key lists are torch-free now, so
    nothing else loads torch while the bytes move."""
    import enc.parity  # noqa: F401
    import enc.verify  # noqa: F401

    torch.__version__  # noqa: B018 - the first attribute read runs the real import (enc.lazytorch)


def _check_model_keys(plan: Plan, expected: set[str] | None, conv: Converter) -> None:
    check_plan(plan, (), expected, conv.path)


def _checking(on_bytes: Callable[[int], None] | None, model_keys: Future, plan: Plan, conv: Converter):
    """``on_bytes`` that also checks the plan against the model's keys as soon as they are known, so a
    plan the model cannot load stops the writer early."""
    checked = [False]

    def progress(n: int) -> None:
        if not checked[0] and model_keys.done():
            checked[0] = True
            _check_model_keys(plan, model_keys.result(), conv)
        if on_bytes:
            on_bytes(n)

    return progress
