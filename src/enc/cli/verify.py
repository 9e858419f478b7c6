"""enc verify OUT"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import emit_json, err, out


def verify(
    model: Path = typer.Argument(..., help="A directory written by enc convert (or a copy of one)."),
    runtime: str = typer.Option("enc", "--runtime", help="Run the model with enc's runtime or transformers' classes."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 check against enc_provenance.json."),
    hash_only: bool = typer.Option(False, "--hash-only", help="Check the sha256 hashes only (no golden record needed)."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
) -> int:
    """Re-check a converted model against the golden record enc convert stored in it (no original needed).

    Runs the model on the recorded probes, compares every activation with the reference's fingerprints (same per-dtype thresholds as enc parity) and re-hashes every file listed in enc_provenance.json.

    Exit 0 = pass, 1 = fail (the first cause is named), 2 = cannot verify (bad input). See docs/ci.md.
    """
    import time

    from enc.errors import EncError, UsageError

    t0 = time.perf_counter()
    try:
        if no_hash and hash_only:
            raise UsageError(None, "--no-hash and --hash-only exclude each other")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise UsageError(None, f"unknown device {device!r} (cpu, cuda or cuda:N)")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError(None, "--device cuda: no CUDA device is available to torch")
        from enc.verify import verify as run_verify

        res = run_verify(model, runtime=runtime, device=device, hashes=not no_hash, numerics=not hash_only)
    except EncError as e:
        if not json_:
            raise
        import sys

        print(f"enc: error: {e.one_line()}", file=sys.stderr)
        emit_json({"command": "verify", "ok": False, "exit_code": 2, "warnings": [],
                   "seconds": round(time.perf_counter() - t0, 3),
                   "error": {"kind": e.kind, "path": None if e.path is None else str(e.path), "message": e.message}})
        return 2
    if json_:
        from dataclasses import asdict

        result = {k: v for k, v in asdict(res).items() if k not in ("warnings", "seconds")}
        emit_json({"command": "verify", "ok": res.exit_code == 0, "exit_code": res.exit_code,
                   "warnings": res.warnings, "seconds": round(res.seconds, 3), "result": result})
    else:
        render(res)
    return res.exit_code


def render(res) -> None:
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    if res.numerics is not None:
        _rows(res.numerics)
    if res.numerics is not None and res.numerics.get("tokenizer") != "not recorded":
        out.print(f"tokenizer: {res.numerics['tokenizer']}", markup=False)
    if res.hashes is not None:
        h = res.hashes
        bad = {f["file"]: f["why"] for f in h["failed"]}
        out.print(f"hashes: {h['checked'] - len(bad)}/{h['checked']} files match enc_provenance.json")
        for name, why in bad.items():
            out.print(f"  [red]FAIL[/red] {name}: {why}")
    if res.verdict == "pass":
        what = " and ".join(x for x, on in (("numerics", res.numerics), ("hashes", res.hashes)) if on is not None)
        out.print(f"[green]PASS[/green]: {res.model} matches its golden record ({what}; runtime {res.runtime}, "
                  f"{res.seconds:.1f}s)")
    else:
        from rich.markup import escape

        out.print(f"[red]FAIL[/red]: {escape(str(res.first_failure))}")


def _rows(report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"verify ({report['dtype']} weights vs the float32 reference's fingerprints)")
    for col in ("activation", "max-abs", "rel", "NMSE", "cos (min)", "top-1", "top-5", ""):
        t.add_column(col, justify="right" if col not in ("activation", "") else "left")
    for r in report["rows"]:
        t.add_row(r["name"], f"{r['max_abs']:.2e}", f"{r['rel']:.2e}", f"{r['nmse']:.2e}", f"{r['cos']:.7f}",
                  "" if r["top1"] is None else f"{r['top1']:.3f}", "" if r["top5"] is None else f"{r['top5']:.3f}",
                  "[green]ok[/green]" if r["passed"] else f"[red]FAIL[/red] {r['why']}")
    out.print(t)
    out.print(f"thresholds: {report['thresholds']}")
