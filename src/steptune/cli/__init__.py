"""`steptune` command line. Each module below adds the commands of one pipeline area to `app`."""

import sys

import typer

from steptune.cli import agent, data, envs, pipeline, synth, train  # noqa: F401  (registers commands)
from steptune.cli.app import app
from steptune.errors import UserError, show_deprecated_keys_in_one_line

DEBUG_FLAG = "--debug"


def main() -> None:
    """The `steptune` entry point: user errors end as one line on stderr and exit status 2."""
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv.remove(DEBUG_FLAG)
    show_deprecated_keys_in_one_line()
    try:
        status = app(standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # a missing or malformed option: one line too, not typer's panel
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.secho(f"error: {e.format_message()}{hint}", fg="red", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(status if isinstance(status, int) else 0)


__all__ = ["app", "main"]
