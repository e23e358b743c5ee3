"""CLI commands: train."""

from steptune.cli.app import app  # noqa: F401
