"""`steptune` command line. Each module below adds the commands of one pipeline area to `app`."""

import sys

import typer

from steptune.cli import agent, data, envs, pipeline, synth, train  # noqa: F401  (registers commands)
from steptune.cli.app import app
from steptune.errors import UserError

DEBUG_FLAG = "--debug"


def main() -> None:
    """The `steptune` entry point: user errors end as one line on stderr and exit status 2."""
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv.remove(DEBUG_FLAG)
    try:
        app()
    except UserError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


__all__ = ["app", "main"]
