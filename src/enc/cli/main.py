"""The ``enc`` command. Thin: parse, call, render. Heavy imports happen inside commands.

Exit codes: 0 ok, 1 a check ran and failed (parity), 2 bad input or usage (one line naming the file and
the problem), 3 an internal error (a bug: one line, rerun with --debug for the traceback), 130 interrupted.
"""

from __future__ import annotations

import os
import sys

import typer

from enc import __version__, lazytorch
from enc.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    STATE,
    EncCommand,
    PipeClosed,
    begin,
    fail,
)

app = typer.Typer(
    name="enc",
    help="Original transformer checkpoints to the Hugging Face layout, proven correct.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,  # plain click help: no <bool> on flags, paragraphs re-flowed to the terminal
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"enc {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also: ENC_DEBUG=1)."),
) -> None:
    STATE["debug"] = debug or bool(os.environ.get("ENC_DEBUG"))


def _register() -> None:
    from enc.cli import convert, fill_mask, generate, inspect, parity
    from enc.cli.eval import app as eval_app
    from enc.cli.verify import verify as verify_command

    app.command("convert", cls=convert.ConvertCommand, help=convert.HELP)(convert.convert)
    app.command("parity", cls=EncCommand)(parity.parity)
    app.command("inspect", cls=EncCommand)(inspect.inspect)
    app.command("fill-mask", cls=EncCommand)(fill_mask.fill_mask)
    app.command("generate", cls=EncCommand)(generate.generate)
    app.command("verify", cls=EncCommand)(verify_command)
    app.add_typer(eval_app, name="eval", help="GLUE and SQuAD evaluation (fine-tune, then score).")


_register()


def _click_exceptions():
    """click's exception classes as this typer uses them (typer >= 0.23 bundles its own click)."""
    try:
        from typer._click import exceptions  # type: ignore[attr-defined]
    except ImportError:  # typer that depends on the click package
        from click import exceptions
    return exceptions


def _invocation(argv: list[str]) -> str:
    """The command name for the --json envelope, read from argv (also before typer has parsed it)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return "enc"
    return " ".join(words[:2]) if words[0] == "eval" and len(words) > 1 else words[0]


def _usage_error(e) -> int:
    """A usage error as click would show it, without click's 'Error:' banner: usage, hint, one line."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
        print(f"Try '{ctx.command_path} --help' for help.", file=sys.stderr)
    msg = e.format_message()
    fail("usage", msg[:1].lower() + msg[1:] if msg else "bad usage", None, EXIT_BAD_INPUT)
    return EXIT_BAD_INPUT


def _broken_pipe() -> int:
    """The reader went away (``enc inspect X | head -1``): not an error; silence the final flush."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_OK


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (timeout, CI cancel, docker stop, systemd): unwound exactly like Ctrl-C, so every
    temp dir and partial output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_CAUGHT: list[int] = []  # signals received during this run (typer turns the KeyboardInterrupt into exit 130)


def _raise_terminated(signum, frame) -> None:
    _CAUGHT.append(signum)
    raise Terminated(signum)


def _interrupted(signum: int) -> int:
    import signal

    name = signal.Signals(signum).name if signum != signal.SIGINT else ""
    print(f"enc: interrupted{f' ({name})' if name else ''}", file=sys.stderr)
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + int(signum)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 1 check failed, 2 bad input, 3 internal error,
    130 Ctrl-C, 128+N on signal N: SIGTERM and SIGHUP are handled like Ctrl-C, temp files removed)."""
    import signal
    import threading

    old: dict = {}
    _CAUGHT.clear()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                old[sig] = signal.signal(sig, _raise_terminated)
            except (ValueError, OSError):
                pass
    try:
        code = _run(argv)
        if _CAUGHT:  # interrupted, however typer/click reported it (typer: exit 130, no message)
            code = _interrupted(_CAUGHT[0])
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    from enc.errors import EncError

    lazytorch.install()  # torch loads on first use, not on `import torch` (see enc.lazytorch)
    exc = _click_exceptions()
    argv = list(sys.argv[1:] if argv is None else argv)
    begin(_invocation(argv), "--json" in argv)
    STATE["debug"] = bool(os.environ.get("ENC_DEBUG"))  # the root callback sets it from --debug
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="enc")
    except typer.Exit as e:
        return _exit(e.exit_code)
    except typer.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt) or _CAUGHT:  # Ctrl-C: run() says "enc: interrupted"
            if not _CAUGHT:
                _CAUGHT.append(getattr(e.__cause__, "signum", 2))
            return EXIT_INTERRUPTED
        print("enc: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except exc.NoArgsIsHelpError as e:  # bare `enc` / `enc eval`: the help, on stderr
        print(e.ctx.get_help(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except exc.UsageError as e:
        return _usage_error(e)
    except exc.ClickException as e:
        fail("usage", e.format_message(), None, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except EncError as e:
        if STATE["debug"]:
            raise
        fail(e.kind, e.one_line(), None if e.path is None else str(e.path), EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        if not _CAUGHT:
            _CAUGHT.append(getattr(e, "signum", 2))  # run() prints "enc: interrupted"
        return EXIT_INTERRUPTED
    except (BrokenPipeError, PipeClosed):
        return _broken_pipe()
    except Exception as e:  # noqa: BLE001 - a bug: one line, exit 3; --debug shows the traceback
        if STATE["debug"]:
            raise
        text = str(e).strip()
        msg = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        fail("internal", f"internal error ({msg}); this is a bug in enc: rerun with --debug for the traceback",
             None, EXIT_INTERNAL)
        return EXIT_INTERNAL
    return _exit(rv if isinstance(rv, int) else 0)


def _exit(code: int | None) -> int:
    return int(code or 0)


def main() -> None:
    code = run()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _broken_pipe()
    sys.exit(code)


if __name__ == "__main__":
    main()
