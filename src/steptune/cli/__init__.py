"""`steptune` command line. Each module below adds the commands of one pipeline area to `app`."""

from steptune.cli.app import app
from steptune.cli import data, envs, train, agent, synth, pipeline  # noqa: E402,F401  (registers commands)

__all__ = ["app"]
