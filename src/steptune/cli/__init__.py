"""`steptune` command line. Each module below adds the commands of one pipeline area to `app`."""

import sys
import warnings

import typer

from steptune.cli import agent, data, envs, pipeline, synth, train  # noqa: F401  (registers commands)
from steptune.cli.app import app
from steptune.errors import DeprecatedKeyWarning, UserError

DEBUG_FLAG = "--debug"


def _one_line_warnings(message, category, filename, lineno, file=None, line=None, _show=warnings.showwarning):
    """A renamed config key is one line (`warning: ...`), not Python's two lines pointing into steptune."""
    if issubclass(category, DeprecatedKeyWarning):
        typer.secho(f"warning: {message}", fg="yellow", err=True)
    else:
        _show(message, category, filename, lineno, file, line)


def main() -> None:
    """The `steptune` entry point: user errors end as one line on stderr and exit status 2."""
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv.remove(DEBUG_FLAG)
    warnings.showwarning = _one_line_warnings
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
