"""enc convert SRC -o OUT"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from enc.cli.common import (
    EXIT_CHECK_FAILED,
    JSON,
    DType,
    EncCommand,
    Steps,
    byte_progress,
    chatty,
    command,
    dtype_name,
    err,
    finish,
    format_choice,
    human_bytes,
    overrides,
    plain,
    q,
    say,
    status,
    warn,
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
    SET,
    SLIDING_WINDOW,
    TOKENIZER,
    VOCAB,
    Format,
)

HELP = """Convert an original checkpoint to a Hugging Face directory (config, safetensors, tokenizer).

SRC may be a release directory, a checkpoint prefix, a .tar.gz release, a TF-Hub module, a Megatron NGC zip or
training directory, or a Mistral release directory. By default the result is verified with `enc parity` before it
is published; a failed verification publishes nothing (exit 1). Exit codes: 0 ok, 1 parity failed, 2 bad input,
3 internal error.
"""

class ConvertCommand(EncCommand):
    """`enc convert --help` ends with the --set keys of every format (read from the converters when shown)."""

    def format_help(self, ctx, formatter) -> None:
        self.epilog = set_keys_help()
        super().format_help(ctx, formatter)


def set_keys_help() -> str:
    from enc.converters import OVERRIDE_FLAGS, REGISTRY, converter_class

    lines = ["Overrides each format takes (anything else is refused, exit 2):"]
    for name in REGISTRY:
        try:
            cls = converter_class(name)
        except (ImportError, AttributeError):
            continue
        if cls.accepts is None:
            lines.append(f"{name}: not declared")
            continue
        flags = [OVERRIDE_FLAGS[k] for k in cls.accepts if k in OVERRIDE_FLAGS]
        sets = [f"{k} ({why})" if why != "params.json field" else k for k, why in cls.accepts.items()
                if k not in OVERRIDE_FLAGS]
        lines.append(f"{name}: flags {', '.join(flags) or 'none'}; --set keys: {', '.join(sets) or 'none'}.")
    return "\n\n".join(lines)


@command("convert")
def convert(
    src: Path = typer.Argument(..., metavar="SRC", help="Original checkpoint (directory, prefix, .tar.gz, .zip)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (must not exist unless --force)."),
    from_: Format = FROM,
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Output dtype (auto: the source dtype)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Max bytes per safetensors shard (5GB, 500MB, 2GiB)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory (a previous enc "
                                                      "output)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and key map; write nothing."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run parity before publishing."),
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
    chat_template: bool = typer.Option(None, "--chat-template/--no-chat-template",
                                       help="Write the tokenizer's chat template (default: only for an instruct "
                                            "release, by its directory name)."),
    hash_sources: bool = typer.Option(False, "--hash-sources", help="Full sha256 of every source file in the "
                                                                    "provenance (default: head and tail of large "
                                                                    "files)."),
    hash_outputs: bool = typer.Option(None, "--hash-outputs/--no-hash-outputs",
                                      help="Full sha256 of every output file in the provenance, for `enc verify` "
                                           "(default: when verifying; with --no-verify large files get a size + "
                                           "first/last MiB fingerprint)."),
    json_: bool = JSON,
) -> int:
    if not verify and "numpy" not in sys.modules:
        # Without parity nothing here multiplies matrices; numpy's import would otherwise start OpenBLAS's
        # thread, which spins ~0.1-0.2 CPU-s on the core that the checksums and transposes need.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from enc.convert import ParityFailed, build_plan, open_converter, parse_dtype
    from enc.convert import convert as run_convert
    from enc.converters.base import ConvertOptions

    ov = overrides(set_, vocab=vocab, merges=merges, tokenizer=tokenizer, config=config, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, rope_theta=rope_theta, sliding_window=sliding_window,
                   part=part, hidden_act=hidden_act,
                   no_entity_embeddings=True if no_entity_embeddings else None,
                   chat_template=chat_template)
    options = ConvertOptions(dtype=parse_dtype(dtype_name(dtype)), overrides=ov)
    forced = format_choice(from_)

    if dry_run:
        from enc.io.safetensors_out import check_output, parse_size, plan_shards

        parse_size(shard_size)
        check_output(output, force, [src])
        with status(f"reading {src}"), open_converter(src, forced, options) as conv:
            plan = build_plan(conv)
            shards = plan_shards([(k, v.nbytes) for k, v in plan.tensors.items()], parse_size(shard_size))
            result = {
                "source": str(src), "format": conv.name, "output": str(output),
                "n_tensors": len(plan.tensors), "total_bytes": plan.total_bytes, "shards": len(shards),
                "config": conv.hf_config(),
                "map": [{"hf": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                         "sources": list(v.sources), "recipe": v.recipe or "copy"} for k, v in plan.tensors.items()],
                "dropped": plan.dropped, "notes": list(plan.notes),
            }
        if not json_:
            _print_plan(result)
        return finish(result)

    live = Live()

    def on_stage(s: str) -> None:
        if s == "verifying parity":
            live.steps(s)
        elif s != "writing weights":  # the byte bar (on_plan) shows that one
            live.spin(s)

    try:
        result = run_convert(src, output, forced=forced, options=options, shard_size=shard_size, force=force,
                             verify=verify, hash_sources=hash_sources, hash_outputs=hash_outputs,
                             on_plan=lambda plan: live.bar(plan.total_bytes, "converting"),
                             on_bytes=live.advance, on_stage=on_stage, on_parity_row=lambda row: live.advance(1, row.name))
    except ParityFailed as e:
        live.stop()
        for w in e.result.warnings:
            warn(w)
        if not json_:
            from enc.cli.parity import render_report

            render_report(e.result.parity)
            say("[red]enc: parity FAILED[/red]; nothing was written to {} (use --no-verify to write it anyway)",
                output)
        return finish(_result_dict(src, e.result), EXIT_CHECK_FAILED)
    finally:
        live.stop()
    for w in result.warnings:
        warn(w)
    if not json_:
        verdict = "not verified" if result.parity is None else f"parity {result.parity['verdict_text']}"
        say("[green]converted[/green] {} -> {}: {} tensors, {} {}, {} files, {} ({:.1f}s)", src, result.output,
            result.n_tensors, human_bytes(result.total_bytes), result.dtype, len(result.files), verdict,
            result.seconds)
    return finish(_result_dict(src, result))


class Live:
    """One live display at a time on stderr (spinner, byte bar or step counter); silent unless :func:`chatty`."""

    def __init__(self):
        self.on = chatty()
        self.cur = None  # (context manager, advance function)

    def spin(self, message: str) -> None:
        if self.on:  # silent (--json, piped, ENC_NO_PROGRESS): nothing is built, rich.progress is not imported
            self._start(status(message), None)

    def bar(self, total: int, description: str) -> None:
        if self.on:
            progress, advance = byte_progress(total, description, enabled=True)
            self._start(progress, lambda n, label="": advance(n))

    def steps(self, description: str) -> None:
        if not self.on:
            return
        s = Steps(description)
        self._start(s, lambda n, label="": s.step(label))

    def advance(self, n: int, label: str = "") -> None:
        if self.cur is not None and self.cur[1] is not None:
            self.cur[1](n, label)

    def _start(self, cm, advance) -> None:
        self.stop()
        if self.on:
            cm.__enter__()
            self.cur = (cm, advance)

    def stop(self) -> None:
        if self.cur is not None:
            self.cur[0].__exit__(None, None, None)
            self.cur = None


def _result_dict(src: Path, r) -> dict:
    from dataclasses import asdict

    d = asdict(r)
    d.pop("warnings")  # the envelope carries them
    d["source"] = str(src)
    d["verified"] = r.parity is not None
    return d


def _print_plan(result: dict) -> None:
    from rich.table import Table

    t = Table(title=plain(f"{result['format']} -> {result['output']} ({result['n_tensors']} tensors, "
                          f"{human_bytes(result['total_bytes'])}, {result['shards']} shard(s))"))
    for col in ("HF key", "shape", "dtype", "source", "recipe"):
        t.add_column(col, overflow="fold")
    for row in result["map"]:
        t.add_row(plain(row["hf"]), "x".join(map(str, row["shape"])) or "scalar", row["dtype"],
                  plain(", ".join(row["sources"])), plain(row["recipe"]))
    err.print(t)
    if result["dropped"]:
        err.print(f"dropped {len(result['dropped'])} source tensor(s):")
        reasons: dict[str, int] = {}
        for why in result["dropped"].values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in sorted(reasons.items()):
            err.print(f"  {n:5d}  {q(why)}")
