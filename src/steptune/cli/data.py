"""CLI commands: data."""

from steptune.cli.app import app  # noqa: F401
