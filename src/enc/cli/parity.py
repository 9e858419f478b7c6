"""enc parity SRC OUT"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from enc.cli.common import (
    EXIT_CHECK_FAILED,
    JSON,
    Steps,
    command,
    err,
    finish,
    format_choice,
    overrides,
    plain,
    q,
    status,
)
from enc.cli.options import (
    CONFIG,
    FROM,
    HIDDEN_ACT,
    MERGES,
    NO_ENTITY_EMBEDDINGS,
    NUM_HEADS,
    NUM_KV_HEADS,
    PART,
    ROPE_THETA,
    RUNTIME,
    SET,
    SLIDING_WINDOW,
    TOKENIZER,
    VOCAB,
    Format,
    Runtime,
)


@command("parity")
def parity(
    src: Path = typer.Argument(..., metavar="SRC", help="The original checkpoint."),
    converted: Path = typer.Argument(..., metavar="OUT", help="The converted Hugging Face directory."),
    from_: Format = FROM,
    vocab: Path = VOCAB,
    merges: Path = MERGES,
    tokenizer: Path = TOKENIZER,
    config: Path = CONFIG,
    num_heads: int = NUM_HEADS,
    num_kv_heads: int = NUM_KV_HEADS,
    rope_theta: float = ROPE_THETA,
    sliding_window: int = SLIDING_WINDOW,
    part: str = PART,
    hidden_act: str = HIDDEN_ACT,
    set_: list[str] = SET,
    no_entity_embeddings: bool = NO_ENTITY_EMBEDDINGS,
    runtime: Runtime = RUNTIME,
    json_: bool = JSON,
) -> int:
    """Numerical proof: the original-layout forward pass against the converted model, layer by layer.

    Give the same overrides (--num-heads, --set ...) as to `enc convert`. Exit 0 = equivalent within the
    documented thresholds, 1 = not, 2 = bad input, 3 = internal error.
    """
    from enc.convert import open_converter
    from enc.converters.base import ConvertOptions
    from enc.models.loading import read_config

    read_config(converted)  # a clear error if OUT is not an HF directory
    ov = overrides(set_, vocab=vocab, merges=merges, tokenizer=tokenizer, config=config, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, rope_theta=rope_theta, sliding_window=sliding_window,
                   part=part, hidden_act=hidden_act,
                   no_entity_embeddings=True if no_entity_embeddings else None)
    runtime = format_choice(runtime)
    with status(f"reading {src}"):  # a tarball is extracted here
        conv = open_converter(src, format_choice(from_), ConvertOptions(overrides=ov))
    if runtime == "enc" and hasattr(conv, "verify_ahead"):
        conv.verify_ahead()  # source checksums and the numpy reference on helper threads while torch loads (Mistral)
        from enc import lazytorch

        if not lazytorch.loaded():
            # torch's OpenMP workers sleep between parallel regions instead of spinning for a while:
            # they would spin against the reference's threads (about 1 s of CPU per Mistral-7B run)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from enc.parity import run_parity  # imports torch

    with conv, Steps("parity") as steps:
        if runtime == "enc":
            report = run_parity(conv, converted, on_row=lambda row: steps.step(row.name)).to_dict()
        else:
            from enc.verify import parity_with_runtime

            report = parity_with_runtime(conv, converted, runtime).to_dict()
    report.update({"source": str(src), "converted": str(converted), "format": conv.name, "runtime": runtime})
    if not json_:
        render_report(report)
    return finish(report, 0 if report["verdict"] == "pass" else EXIT_CHECK_FAILED)


def render_rows(report: dict, title: str) -> None:
    """The per-activation table of a parity report (also enc verify's) and its thresholds, on stderr."""
    from rich.table import Table

    t = Table(title=title)
    routed = any(r.get("routing") is not None for r in report["rows"])  # MoE: routing agreement per layer
    cols = ("activation", "max-abs", "rel", "NMSE", "cos (min)", "top-1", "top-5") + (("routing",) if routed else ())
    for col in cols + ("",):
        t.add_column(col, justify="right" if col not in ("activation", "") else "left", no_wrap=True)
    for r in report["rows"]:
        cells = [plain(r["name"]), f"{r['max_abs']:.2e}", f"{r['rel']:.2e}", f"{r['nmse']:.2e}", f"{r['cos']:.7f}",
                 "" if r["top1"] is None else f"{r['top1']:.3f}" + (f" (+{r['top1_ties']:.3f} tie)" if r.get("top1_ties")
                                                                     else ""),
                 "" if r["top5"] is None else f"{r['top5']:.3f}"]
        if routed:
            cells.append("" if r.get("routing") is None else f"{r['routing']:.3f}")
        t.add_row(*cells, "[green]ok[/green]" if r["passed"] else f"[red]FAIL[/red] {q(r['why'])}")
    err.print(t)
    err.print(f"thresholds: {q(report['thresholds_text'])}")
    if any(r.get("top1_ties") for r in report["rows"]):
        err.print("tie: the replay's top id differs from the reference's, but the reference ranks the two within 4 "
                  "standard deviations of this run's logit error; ties count as agreeing")
    if report.get("mode") == "layer-local":
        err.print("layer-local: each layer ran from the reference's input to it (MoE: with the reference's experts); "
                  "routing = share of tokens whose router chose the reference's experts")


def render_report(report: dict) -> None:
    """The per-activation table and the verdict, on stderr."""
    render_rows(report, f"parity ({report['dtype']} output vs float32 reference)")
    if report["verdict"] == "pass":
        assumed = f" (assumed: {q('; '.join(report['assumed']))})" if report.get("assumed") else ""
        err.print(f"[green]PASS[/green]{assumed}: the converted model computes what the original does"
                  + (" under those assumptions" if assumed else ""))
    else:
        err.print(f"[red]FAIL[/red]: first divergence at [bold]{q(report['first_failure'])}[/bold]")
