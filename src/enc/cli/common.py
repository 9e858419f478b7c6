"""Shared CLI plumbing: consoles, the --json envelope, exit codes, option parsing, progress.

Imports nothing heavy (``enc --help`` stays instant).

Every command follows one shape::

    @command("name")                       # records the command name and --json for the envelope
    def name(..., json_: bool = JSON) -> int:
        ...
        warn("something the user should know")      # on stderr, and in the envelope's "warnings"
        if not json_:
            err.print(...)                            # human output: stderr only, user text through q()/plain()
        return finish(result_dict, exit_code)        # --json: the envelope on stdout; returns the exit code

and is registered in main._register with ``cls=EncCommand`` (usage lines as ``enc name [OPTIONS] ARG``).

Errors are raised (``enc.errors`` exceptions); :func:`enc.cli.main.run` turns them into one line on
stderr (and, with --json, an envelope with ``ok: false`` and ``error``) with exit code 2, anything
unexpected into exit code 3. See docs/json.md.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperCommand

# --------------------------------------------------------------------------- exit codes
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # parity (or another check) ran and failed
EXIT_BAD_INPUT = 2  # input or arguments enc recognised as bad: one line naming the file and the problem
EXIT_INTERNAL = 3  # an unexpected exception: a bug in enc (rerun with --debug for the traceback)
EXIT_INTERRUPTED = 130

NO_WRAP_WIDTH = 100_000  # not a terminal: never wrap or truncate (rich would use 80 columns)


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # On a terminal rich uses its width; anywhere else (pipes, files, CI logs) no wrapping at all.
    return Console(stderr=stderr, highlight=False, soft_wrap=not tty, width=None if tty else NO_WRAP_WIDTH)


err = _console(stderr=True)  # every human-facing line; stdout gets only --json and generated text (write_out)

STATE: dict[str, Any] = {"debug": False}


# --------------------------------------------------------------------------- escaping
def q(value: Any) -> str:
    """User text or a path, safe to put into rich markup (``[red]`` in the input stays ``[red]``)."""
    return escape(str(value))


def plain(value: Any) -> Text:
    """A table cell / renderable that is never parsed as markup."""
    return Text(str(value))


def say(template: str, *args: Any, style: str | None = None) -> None:
    """Print ``template`` (our markup) with ``{}`` fields filled by escaped ``args``, on stderr."""
    err.print(template.format(*(a if isinstance(a, (int, float)) else q(a) for a in args)), style=style)


# --------------------------------------------------------------------------- the --json envelope
@dataclass
class Invocation:
    """What the envelope needs to know about the running command."""

    command: str | None = None
    json: bool = False
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    emitted: bool = False


CURRENT = Invocation()

RESERVED = ("command", "ok", "exit_code", "warnings", "seconds", "enc_version", "error")


def begin(command: str, json_mode: bool) -> None:
    """Start recording a command (``@command`` calls it; tests may call it directly)."""
    global CURRENT
    CURRENT = Invocation(command=command, json=bool(json_mode))


def warn(message: str) -> None:
    """A warning: printed on stderr, and listed in the --json envelope's ``warnings``."""
    if message in CURRENT.warnings:
        return
    CURRENT.warnings.append(message)
    err.print(f"[yellow]warning:[/yellow] {q(message)}")


def envelope(result: Any, exit_code: int, error: dict | None = None) -> dict:
    from enc import __version__

    if result is not None and not isinstance(result, dict):
        result = {"results": result}
    body = {k: v for k, v in (result or {}).items() if k not in RESERVED}
    return {
        "command": CURRENT.command,
        "ok": exit_code == EXIT_OK,
        "exit_code": exit_code,
        "warnings": list(CURRENT.warnings),
        "seconds": round(time.perf_counter() - CURRENT.started, 3),
        "enc_version": __version__,
        **({"error": error} if error is not None else {}),
        **body,
    }


class PipeClosed(Exception):
    """stdout's reader went away (``enc ... | head``). Not an OSError, so typer does not turn it into exit 1."""


def write_out(text: str) -> None:
    """Write to stdout (the --json envelope, generated text) and flush; a closed pipe raises PipeClosed."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise PipeClosed() from None


def emit_json(obj: Any) -> None:
    write_out(json.dumps(obj, indent=2, default=_default, allow_nan=True) + "\n")


def finish(result: Any, exit_code: int = EXIT_OK, also_to: Path | None = None) -> int:
    """End a command: in --json mode print the envelope with ``result`` on stdout (and, with ``also_to``,
    write the same envelope to that file). Returns the exit code."""
    env = envelope(result, exit_code)
    if also_to is not None:
        also_to.parent.mkdir(parents=True, exist_ok=True)
        also_to.write_text(json.dumps(env, indent=2, default=_default) + "\n")
    if CURRENT.json and not CURRENT.emitted:
        CURRENT.emitted = True
        emit_json(env)
    return exit_code


def fail(kind: str, message: str, path: str | None, exit_code: int) -> None:
    """Report an error: one line on stderr; with --json also the envelope (``ok: false``) on stdout."""
    print(f"enc: error: {message}", file=sys.stderr, flush=True)
    if CURRENT.json and not CURRENT.emitted:
        CURRENT.emitted = True
        emit_json(envelope(None, exit_code, {"kind": kind, "message": message, "path": path}))


def _default(o: Any):
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, Enum):
        return o.value
    return str(o)


def command(name: str) -> Callable:
    """Decorator for a command function: records its name and whether --json was given.

    The wrapped function keeps its signature (typer reads it through ``functools.wraps``).
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> int:
            begin(name, kwargs.get("json_", False))
            return fn(*args, **kwargs)

        return run

    return wrap


# --------------------------------------------------------------------------- shared options
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout (see docs/json.md); human output "
                                          "stays on stderr.")


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def dtype_name(d: DType | str | None) -> str | None:
    """The canonical dtype name, or None for auto (keep what the weights hold)."""
    if d is None:
        return None
    v = d.value if isinstance(d, Enum) else str(d)
    v = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(v, v)
    return None if v == "auto" else v


def resolve_device(device: Device | str) -> str:
    """``auto`` -> cuda when torch sees one, else cpu; ``cuda`` without one is a usage error."""
    from enc.evals.runtime import resolve_device as resolve

    return resolve(device.value if isinstance(device, Enum) else str(device))


def parse_sets(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as a dict; VALUE is JSON where it parses (numbers, true/false), else text."""
    from enc.errors import UsageError

    out_: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(None, f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UsageError(None, f"--set expects KEY=VALUE, got {item!r}")
        try:
            out_[k] = json.loads(v)
        except json.JSONDecodeError:
            out_[k] = v
    return out_


def overrides(set_: list[str] | None = None, **flags: Any) -> dict:
    """Converter overrides: the flags that were given, then ``--set`` items."""
    ov = {k: v for k, v in flags.items() if v is not None}
    ov.update(parse_sets(set_))
    return ov


def format_choice(value: Any) -> str | None:
    return None if value is None else (value.value if isinstance(value, Enum) else str(value))


def source_formats() -> Enum:
    """The registered source formats as an Enum (choices shown in help; no converter is imported)."""
    from enc.converters import REGISTRY

    return Enum("Format", {k: k for k in REGISTRY}, type=str)


# --------------------------------------------------------------------------- progress
def chatty() -> bool:
    """Progress bars and stage lines: only for a person watching a terminal, never with --json."""
    return err.is_terminal and not CURRENT.json and not os.environ.get("ENC_NO_PROGRESS")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def byte_progress(total: int, description: str, enabled: bool = True):
    """A rich progress bar on stderr weighted by bytes. Returns (progress, advance_fn)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True, disable=not enabled)
    task = progress.add_task(description, total=total)
    return progress, (lambda n: progress.advance(task, n))


class Steps:
    """A counted progress bar (parity layers, ...) on stderr; silent unless :func:`chatty`.

    Use as a context manager; ``step(label)`` advances by one and shows the label.
    """

    def __init__(self, description: str, total: int | None = None):
        self.description, self.total = description, total
        self.progress = None

    def __enter__(self) -> Steps:
        if chatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[label]}"), console=err,
                                     transient=True)
            self.task = self.progress.add_task(self.description, total=self.total, label="")
            self.progress.start()
        return self

    def step(self, label: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, label=label)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


class status:
    """A spinner with a message on stderr for a step of unknown length (model loading, extraction)."""

    def __init__(self, message: str):
        self.message = message
        self._s = None

    def __enter__(self) -> status:
        if chatty():
            self._s = err.status(q(self.message))
            self._s.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._s is not None:
            self._s.__exit__(*exc)


# --------------------------------------------------------------------------- help formatting
class EncCommand(TyperCommand):
    """Usage lines as ``enc convert [OPTIONS] SRC`` (typer 0.29 writes ``{src}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name or "").upper()
                name = name if p.required else f"[{name}]"
                pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces
