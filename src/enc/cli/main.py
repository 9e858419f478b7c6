"""The ``enc`` command. Thin: parse, call, render. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys

import typer

from enc import __version__
from enc.cli.common import STATE, err

app = typer.Typer(
    name="enc",
    help="Original transformer checkpoints to the Hugging Face layout, proven correct.",
    no_args_is_help=True,
    add_completion=False,
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
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    STATE["debug"] = debug or bool(os.environ.get("ENC_DEBUG"))


def _register() -> None:
    from enc.cli import convert, fill_mask, generate, inspect, parity
    from enc.cli.eval import app as eval_app
    from enc.cli.verify import verify as verify_command

    app.command("convert", help=convert.HELP)(convert.convert)
    app.command("parity")(parity.parity)
    app.command("inspect")(inspect.inspect)
    app.command("fill-mask")(fill_mask.fill_mask)
    app.command("generate")(generate.generate)
    app.command("verify")(verify_command)
    app.add_typer(eval_app, name="eval", help="GLUE and SQuAD evaluation (fine-tune, then score).")


_register()


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


def _interrupted(e: BaseException) -> int:
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    name = signal.Signals(signum).name if signum != signal.SIGINT else ""
    print(f"enc: interrupted{f' ({name})' if name else ''}", file=sys.stderr)
    return 128 + int(signum)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 1 parity/check failed, 2 error, 128+N on signal N)."""
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
            code = _interrupted(Terminated(_CAUGHT[0]))
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    import click

    from enc.errors import EncError

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="enc")
    except click.exceptions.Exit as e:
        return _exit(e.exit_code)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt) or _CAUGHT:  # click turns Ctrl-C into Abort
            return 130
        err.print("enc: aborted")
        return _exit(130)
    except click.ClickException as e:
        e.show(file=sys.stderr)
        return _exit(2)
    except EncError as e:
        if STATE["debug"]:
            raise
        print(f"enc: error: {e.one_line()}", file=sys.stderr)
        return _exit(2)
    except KeyboardInterrupt as e:
        if not _CAUGHT:
            _CAUGHT.append(getattr(e, "signum", 2))
        return 130
    except Exception as e:  # noqa: BLE001 - one line for anything unexpected; --debug shows it
        if STATE["debug"]:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"enc: error: {type(e).__name__}: {msg} (run with --debug for a traceback)", file=sys.stderr)
        return _exit(2)
    return _exit(rv if isinstance(rv, int) else 0)


def _exit(code: int | None) -> int:
    return int(code or 0)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
