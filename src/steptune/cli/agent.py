"""CLI commands: agent."""

from steptune.cli.app import app  # noqa: F401
