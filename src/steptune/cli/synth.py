"""CLI commands: synth."""

from steptune.cli.app import app  # noqa: F401
