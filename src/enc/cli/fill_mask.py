"""enc fill-mask TEXT --model DIR"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from enc.cli.common import (
    EXIT_BAD_INPUT,
    JSON,
    Device,
    DType,
    command,
    err,
    finish,
    plain,
    q,
    resolve_device,
    status,
    warn,
)


@command("fill-mask")
def fill_mask(
    texts: list[str] = typer.Argument(None, metavar="TEXT", help="Input text(s) with [MASK] (several masks per "
                                                                 "text allowed); '-' or none reads lines from "
                                                                 "stdin."),
    model: Path = typer.Option(..., "--model", "-m", help="A converted (or any HF-layout) masked-LM directory."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Predictions per mask."),
    file: Path = typer.Option(None, "--file", "-f", help="Read inputs from a file, one per line (blank lines "
                                                         "skipped)."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Compute dtype (auto: the weights' dtype)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: cuda when available, else cpu."),
    entity_span: list[str] = typer.Option([], "--entity-span", metavar="START:END", help="LUKE/mLUKE: the "
                                          "character span of an entity mention to predict (repeatable; applies to "
                                          "every input)."),
    json_: bool = JSON,
) -> int:
    """Predict the [MASK] tokens of each input, as transformers' fill-mask pipeline does.

    A bad input line (no mask, too long, not UTF-8) is reported with its line number; the others still run
    and the exit code is 2.
    """
    from enc.cli.common import dtype_name
    from enc.errors import MissingFile, UsageError
    from enc.serve import fill_mask as run_fill_mask

    inputs: list[tuple[str, str]] = [(f"argument {i + 1}", t) for i, t in enumerate(texts or []) if t != "-"]
    bad: list[dict] = []
    if file is not None:
        if not file.is_file():
            raise MissingFile(file, "input file not found")
        inputs += _lines(file.read_bytes(), str(file), bad)
    if not inputs or "-" in (texts or []):
        if sys.stdin.isatty() and not json_:
            err.print("reading inputs from stdin, one per line (end with Ctrl-D)")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        inputs += _lines(data, "stdin", bad)
    if not inputs and not bad:
        raise UsageError(None, "no input text (pass TEXT, --file, or lines on stdin)")
    dev = _device(device)
    if len(inputs) <= 8 and "numpy" not in sys.modules and "OMP_NUM_THREADS" not in os.environ:
        # A few sentences are a dozen-row GEMM per layer: a second BLAS thread costs more to start and to
        # spin (on a busy machine, several times the work) than it saves. Many inputs keep BLAS's default.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    def on_error(i: int, problem: str) -> None:
        bad.append({"line": inputs[i][0], "text": inputs[i][1], "error": problem})

    with status(f"loading {model}"):
        run, extra = run_fill_mask, {}
        if entity_span:  # LUKE / mLUKE entity prediction: enc.serve_luke
            from enc.serve_luke import fill_mask_luke as run

            extra = {"entity_spans": entity_span}
        dt = _dtype(dtype_name(dtype))
        if entity_span and dt is not None:
            dt = dt.torch
        results = run(model, [t for _, t in inputs], top_k, dtype=dt,
                      device=dev, on_error=on_error, **extra) if inputs else []
    if not results and len(bad) == 1:
        raise UsageError(None, bad[0]["error"] if bad[0]["line"] == "argument 1" else f"{bad[0]['line']}: "
                                                                                     f"{bad[0]['error']}")
    for b in bad:
        warn(f"{b['line']}: {b['error']}")
    if not results:
        raise UsageError(None, f"none of the {len(bad)} inputs could be used")
    if not json_:
        for res in results:
            err.print(f"[bold]{q(res['text'])}[/bold]", soft_wrap=True)
            for m_i, mask in enumerate(res["masks"]):
                if len(res["masks"]) > 1:
                    err.print(f"  mask {m_i + 1} (token {mask['position']}):")
                for p in mask["predictions"]:
                    err.print(plain(f"  {p['score']:8.4f}  {p['token_str']:<20} {p['sequence']}"), soft_wrap=True)
            if res.get("entities"):
                from enc.serve_luke import render_entities

                render_entities(err, res, plain)
    return finish({"model": str(model), "results": results, "errors": bad}, EXIT_BAD_INPUT if bad else 0)


def _device(device: Device) -> str:
    """resolve_device's answer, without importing torch where the torch build tells it: a CPU-only torch
    sees no CUDA, so ``auto`` is cpu (the numpy fill-mask path, enc.models.albert_numpy, then never loads torch)."""
    name = getattr(device, "value", device)
    if name == "cpu" or (name == "auto" and _cpu_only_torch()):
        return "cpu"
    return resolve_device(device)


def _cpu_only_torch() -> bool:
    """Whether the installed torch is a CPU-only build (so ``--device auto`` means cpu), read from
    ``torch/version.py`` without importing torch. False whenever that cannot be told for sure."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        locs = list(spec.submodule_search_locations or []) if spec else []
        text = (Path(locs[0]) / "version.py").read_text() if locs else ""
    except (OSError, ValueError, ImportError):
        return False
    return all(re.search(rf"^{name}\s*(:[^=\n]*)?=\s*None\s*$", text, re.M) for name in ("cuda", "hip"))


def _dtype(name: str | None):
    """None for auto; otherwise the element type, as enc.io.dtypes.DType (equal to the torch dtype; torch is
    imported only where the torch path runs)."""
    if name is None:
        return None
    from enc.io.dtypes import DType as ElementType

    return ElementType(name)


def _lines(data: bytes, where: str, bad: list[dict]) -> list[tuple[str, str]]:
    """Non-blank lines of ``data`` as (label, text); a line that is not UTF-8 goes to ``bad`` instead."""
    out: list[tuple[str, str]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        label = f"{where} line {n}"
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            bad.append({"line": label, "text": None, "error": f"not UTF-8 (byte {e.start + 1})"})
            continue
        if text.strip():
            out.append((label, text))
    return out
