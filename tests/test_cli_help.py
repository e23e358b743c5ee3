"""`steptune --help` reads as the docstrings say: a command's summary is one paragraph, wrapped at the terminal's
width only, and brackets in help text are text, not markup. Through the real CLI."""

import os
import subprocess
import sys

CLI = [sys.executable, "-c", "from steptune.cli import main; main()"]


def help_text(*args: str, columns: int = 200) -> str:
    proc = subprocess.run([*CLI, *args, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_command_summaries_wrap_at_the_terminal_not_at_the_docstrings_line_breaks():
    lines = help_text().splitlines()
    # quickstart's docstring breaks its first paragraph after "(or," and after "converted once into the user"
    [row] = [line for line in lines if "quickstart " in line]
    assert "(or, with --preset smollm2, the pretrained SmolLM2-135M-Instruct" in row
    assert "converted once into the user cache); the last line printed" in " ".join(lines)


def test_brackets_in_help_are_text():
    assert "steptune[ray]" in help_text("synthesize")
    assert "seed-0/, seed-1/" in " ".join(help_text("study").split())
