"""enc parity SRC OUT"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import emit_json, out


def parity(
    src: Path = typer.Argument(..., help="The original checkpoint."),
    converted: Path = typer.Argument(..., help="The converted Hugging Face directory."),
    from_: str = typer.Option(None, "--from", help="Force the source format."),
    vocab: Path = typer.Option(None, "--vocab", help="As for convert, where the source needs it."),
    merges: Path = typer.Option(None, "--merges", help="As for convert (Megatron GPT-2)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="As for convert."),
    num_heads: int = typer.Option(None, "--num-heads", help="As for convert, where shapes cannot tell."),
    num_kv_heads: int = typer.Option(None, "--num-kv-heads", help="As for convert."),
    rope_theta: float = typer.Option(None, "--rope-theta", help="As for convert: the same overrides must be given."),
    sliding_window: int = typer.Option(None, "--sliding-window", help="As for convert."),
    set_: list[str] = typer.Option([], "--set", help="As for convert: extra converter option KEY=VALUE."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
    runtime: str = typer.Option("enc", "--runtime", help="Run the converted side with enc's runtime or transformers'."),
) -> int:
    """Numerical proof: original-layout forward pass vs the converted model, layer by layer.

    Exit 0 = equivalent within the documented thresholds, 1 = not, 2 = error.
    """
    from enc.convert import open_converter
    from enc.converters.base import ConvertOptions
    from enc.models.loading import read_config
    from enc.parity import run_parity

    read_config(converted)  # a clear error if OUT is not an HF directory
    from enc.cli.convert import _parse_sets

    overrides = {k: v for k, v in {
        "vocab": vocab, "merges": merges, "tokenizer": tokenizer, "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "rope_theta": rope_theta, "sliding_window": sliding_window,
    }.items() if v is not None}
    overrides.update(_parse_sets(set_))
    with open_converter(src, from_, ConvertOptions(overrides=overrides)) as conv:
        if runtime == "enc":
            report = run_parity(conv, converted).to_dict()
        else:
            from enc.verify import parity_with_runtime

            report = parity_with_runtime(conv, converted, runtime).to_dict()
    report.update({"source": str(src), "converted": str(converted), "format": conv.name, "runtime": runtime})
    if json_:
        emit_json(report)
    else:
        render_report(report)
    return 0 if report["verdict"] == "pass" else 1


def render_report(report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"parity ({report['dtype']} output vs float32 reference)")
    for col in ("activation", "max-abs", "rel", "NMSE", "cos (min)", "top-1", "top-5", ""):
        t.add_column(col, justify="right" if col not in ("activation", "") else "left")
    for r in report["rows"]:
        t.add_row(r["name"], f"{r['max_abs']:.2e}", f"{r['rel']:.2e}", f"{r['nmse']:.2e}", f"{r['cos']:.7f}",
                  "" if r["top1"] is None else f"{r['top1']:.3f}", "" if r["top5"] is None else f"{r['top5']:.3f}",
                  "[green]ok[/green]" if r["passed"] else f"[red]FAIL[/red] {r['why']}")
    out.print(t)
    out.print(f"thresholds: {report['thresholds']}")
    if report["verdict"] == "pass":
        out.print("[green]PASS[/green]: the converted model computes what the original does")
    else:
        out.print(f"[red]FAIL[/red]: first divergence at [bold]{report['first_failure']}[/bold]")
