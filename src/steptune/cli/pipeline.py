"""CLI commands: pipeline."""

from steptune.cli.app import app  # noqa: F401
