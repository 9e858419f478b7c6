"""enc fill-mask TEXT --model DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from enc.cli.common import emit_json, out


def fill_mask(
    texts: list[str] = typer.Argument(None, help="Input text(s) with [MASK]; '-' or none reads lines from stdin."),
    model: Path = typer.Option(..., "--model", "-m", help="A converted (or any HF-layout) model directory."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Predictions per mask."),
    file: Path = typer.Option(None, "--file", "-f", help="Read inputs from a file, one per line."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
    entity_span: list[str] = typer.Option([], "--entity-span", help="LUKE/mLUKE: START:END character span of an "
                                          "entity mention to predict (repeatable)."),
) -> int:
    """Predict the [MASK] tokens of each input (several masks per input allowed)."""
    from enc.errors import MissingFile, UsageError
    from enc.serve import fill_mask as run_fill_mask

    inputs = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise MissingFile(file, "input file not found")
        inputs += [ln.rstrip("\n") for ln in file.read_text().splitlines() if ln.strip()]
    if not inputs or inputs == ["-"]:
        inputs = [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    if not inputs:
        raise UsageError(None, "no input text (pass TEXT, --file, or lines on stdin)")
    if entity_span:  # LUKE / mLUKE entity prediction: enc.serve_luke
        from enc.serve_luke import fill_mask_luke

        results = fill_mask_luke(model, inputs, top_k, entity_span)
    else:
        results = run_fill_mask(model, inputs, top_k)
    if json_:
        emit_json(results)
        return 0
    for res in results:
        out.print(f"[bold]{res['text']}[/bold]")
        for m_i, mask in enumerate(res["masks"]):
            if len(res["masks"]) > 1:
                out.print(f"  mask {m_i + 1} (token {mask['position']}):")
            for p in mask["predictions"]:
                out.print(f"  {p['score']:8.4f}  {p['token_str']:<20} {p['sequence']}")
        if res.get("entities"):
            from enc.serve_luke import render_entities

            render_entities(out, res)
    return 0
