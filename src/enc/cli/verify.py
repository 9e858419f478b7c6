"""enc verify OUT"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import JSON, command, err, finish, plain, q, resolve_device, status, warn
from enc.cli.options import RUNTIME, Runtime


@command("verify")
def verify(
    model: Path = typer.Argument(..., metavar="OUT", help="A directory written by enc convert (or a copy of one)."),
    runtime: Runtime = RUNTIME,
    device: str = typer.Option("auto", "--device", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 check against enc_provenance.json."),
    hash_only: bool = typer.Option(False, "--hash-only", help="Check the sha256 hashes only (no golden record needed)."),
    json_: bool = JSON,
) -> int:
    """Re-check a converted model against the golden record enc convert stored in it (no original needed).

    Runs the model on the recorded probes, compares every activation with the reference's fingerprints (same
    per-dtype thresholds as enc parity) and re-hashes every file listed in enc_provenance.json.

    Exit 0 = pass, 1 = fail (the first cause is named), 2 = cannot verify (bad input). See docs/ci.md.
    """
    from dataclasses import asdict

    from enc.errors import UsageError
    from enc.verify import verify as run_verify

    if no_hash and hash_only:
        raise UsageError(None, "--no-hash and --hash-only exclude each other")
    dev = resolve_device(device)
    with status(f"verifying {model}"):
        res = run_verify(model, runtime=runtime.value, device=dev, hashes=not no_hash, numerics=not hash_only)
    for w in res.warnings:
        warn(w)
    if not json_:
        render(res)
    return finish({k: v for k, v in asdict(res).items() if k not in ("warnings", "seconds")}, res.exit_code)


def render(res) -> None:
    """The activation table, hash summary and verdict, on stderr (warnings are printed as they are recorded)."""
    if res.numerics is not None:
        from enc.cli.parity import render_rows

        render_rows(res.numerics, f"verify ({res.numerics['dtype']} weights vs the float32 reference's fingerprints)")
    if res.numerics is not None and res.numerics.get("tokenizer") != "not recorded":
        err.print(plain(f"tokenizer: {res.numerics['tokenizer']}"))
    if res.hashes is not None:
        h = res.hashes
        bad = {f["file"]: f["why"] for f in h["failed"]}
        err.print(f"hashes: {h['checked'] - len(bad)}/{h['checked']} files match enc_provenance.json")
        if h.get("head_tail_only"):
            err.print(f"  note: {len(h['head_tail_only'])} large file(s) were converted with --no-verify and carry "
                      "only a size + first/last MiB fingerprint (convert with --hash-outputs for full sha256)")
        for name, why in bad.items():
            err.print(f"  [red]FAIL[/red] {q(name)}: {q(why)}")
    if res.verdict == "pass":
        what = " and ".join(x for x, on in (("numerics", res.numerics), ("hashes", res.hashes)) if on is not None)
        err.print(f"[green]PASS[/green]: {q(res.model)} matches its golden record ({what}; runtime {res.runtime}, "
                  f"{res.seconds:.1f}s)")
    else:
        err.print(f"[red]FAIL[/red]: {q(res.first_failure)}")
