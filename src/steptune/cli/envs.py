"""CLI commands: envs."""

from steptune.cli.app import app  # noqa: F401
