"""enc convert SRC -o OUT"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import emit_json, err, human_bytes, out

HELP = """Convert an original checkpoint to a Hugging Face directory (config, safetensors, tokenizer).

SRC may be a release directory, a checkpoint prefix, a .tar.gz release, a TF-Hub module, a Megatron
NGC zip or training directory, or a Mistral release directory. By default the result is verified
with `enc parity` before it is published; a failed verification publishes nothing (exit 1).
"""


def _parse_sets(items: list[str]) -> dict:
    import json

    from enc.errors import UsageError

    out_: dict = {}
    for item in items:
        if "=" not in item:
            raise UsageError(None, f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out_[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out_[k.strip()] = v
    return out_


def convert(
    src: Path = typer.Argument(..., help="Original checkpoint (dir, prefix, .tar.gz, .zip)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (must not exist unless --force)."),
    from_: str = typer.Option(None, "--from", help="Force the source format (albert_tf, megatron, mistral)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the source dtype)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Max bytes per safetensors shard (5GB, 500MB, 2GiB)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and key map; write nothing."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run parity before publishing (default on)."),
    vocab: Path = typer.Option(None, "--vocab", help="Tokenizer vocabulary (Megatron: vocab.txt or gpt2 vocab.json)."),
    merges: Path = typer.Option(None, "--merges", help="GPT-2 merges.txt (Megatron GPT-2)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer file to use instead of the one found in SRC."),
    num_heads: int = typer.Option(None, "--num-heads", help="Attention heads, where shapes cannot tell."),
    num_kv_heads: int = typer.Option(None, "--num-kv-heads", help="Key/value heads (GQA), where shapes cannot tell."),
    rope_theta: float = typer.Option(None, "--rope-theta", help="Override params.json rope_theta."),
    sliding_window: int = typer.Option(None, "--sliding-window", help="Override the sliding window."),
    no_entity_embeddings: bool = typer.Option(False, "--no-entity-embeddings", help="LUKE/mLUKE: write the lite variant (entity vocabulary [MASK] [UNK] [PAD] [MASK2] only)."),
    set_: list[str] = typer.Option([], "--set", help="Extra converter option KEY=VALUE (repeatable)."),
    hash_sources: bool = typer.Option(False, "--hash-sources", help="sha256 every source file in the provenance."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
) -> int:
    from enc.convert import ParityFailed, build_plan, open_converter, parse_dtype
    from enc.convert import convert as run_convert
    from enc.converters.base import ConvertOptions

    overrides = {k: v for k, v in {
        "vocab": vocab, "merges": merges, "tokenizer": tokenizer, "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "rope_theta": rope_theta, "sliding_window": sliding_window,
    }.items() if v is not None}
    overrides.update(_parse_sets(set_))
    if no_entity_embeddings:
        overrides["no_entity_embeddings"] = True
    options = ConvertOptions(dtype=parse_dtype(dtype), overrides=overrides)

    if dry_run:
        from enc.io.safetensors_out import check_output, parse_size, plan_shards

        parse_size(shard_size)
        check_output(output, force, [src])
        with open_converter(src, from_, options) as conv:
            plan = build_plan(conv)
            shards = plan_shards([(k, v.nbytes) for k, v in plan.tensors.items()], parse_size(shard_size))
            result = {
                "format": conv.name, "output": str(output), "n_tensors": len(plan.tensors),
                "total_bytes": plan.total_bytes, "shards": len(shards), "config": conv.hf_config(),
                "map": [{"hf": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                         "sources": list(v.sources), "recipe": v.recipe or "copy"} for k, v in plan.tensors.items()],
                "dropped": plan.dropped,
            }
        if json_:
            emit_json(result)
            return 0
        _print_plan(result)
        return 0

    from enc.cli.common import byte_progress

    state: dict = {}
    chatty = not json_ and err.is_terminal  # progress only for a person watching; logs stay clean

    def on_plan(plan) -> None:
        state["progress"], state["advance"] = byte_progress(plan.total_bytes, "converting", enabled=chatty)
        state["progress"].start()

    def on_stage(s: str) -> None:
        if s != "writing weights" and "progress" in state:
            state["progress"].stop()
        if chatty:
            err.print(f"[dim]{s}...[/dim]")

    try:
        result = run_convert(src, output, forced=from_, options=options, shard_size=shard_size, force=force,
                             verify=verify, hash_sources=hash_sources, on_plan=on_plan,
                             on_bytes=lambda n: state["advance"](n), on_stage=on_stage)
    except ParityFailed as e:
        if "progress" in state:
            state["progress"].stop()
        if json_:
            emit_json(e.result)
        else:
            from enc.cli.parity import render_report

            render_report(e.result.parity)
        err.print(f"[red]enc: parity FAILED[/red]; nothing was written to {output} "
                  "(use --no-verify to write it anyway)")
        return 1
    finally:
        if "progress" in state:
            state["progress"].stop()
    for w in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    if json_:
        emit_json(result)
        return 0
    verdict = "not verified" if result.parity is None else f"parity {result.parity['verdict']}"
    out.print(f"[green]converted[/green] {src} -> {result.output}: {result.n_tensors} tensors, "
              f"{human_bytes(result.total_bytes)} {result.dtype}, {len(result.files)} files, {verdict} "
              f"({result.seconds:.1f}s)")
    return 0


def _print_plan(result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{result['format']} -> {result['output']} ({result['n_tensors']} tensors, "
                    f"{human_bytes(result['total_bytes'])}, {result['shards']} shard(s))")
    for col in ("HF key", "shape", "dtype", "source", "recipe"):
        t.add_column(col)
    for row in result["map"]:
        t.add_row(row["hf"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"], ", ".join(row["sources"]),
                  row["recipe"])
    out.print(t)
    if result["dropped"]:
        out.print(f"dropped {len(result['dropped'])} source tensor(s):")
        reasons: dict[str, int] = {}
        for why in result["dropped"].values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in sorted(reasons.items()):
            out.print(f"  {n:5d}  {why}")
