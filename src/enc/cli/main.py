"""The ``enc`` command. Thin: parse, call, render. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys

import typer

from enc import __version__, lazytorch
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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 1 parity/check failed, 2 error)."""
    import click

    from enc.errors import EncError

    lazytorch.install()  # torch loads on first use, not on `import torch` (see enc.lazytorch)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="enc")
    except click.exceptions.Exit as e:
        return _exit(e.exit_code)
    except click.exceptions.Abort:
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
    except KeyboardInterrupt:
        print("enc: interrupted", file=sys.stderr)
        return _exit(130)
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
