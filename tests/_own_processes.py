"""Processes a test started itself, found by a tag in their environment (the `own_jvms` fixture sets it)."""

from __future__ import annotations

import subprocess

TAG_VAR = "STEPTUNE_TEST_PROCESS_TAG"


def tagged_pids(pattern: str, tag: str) -> set[int]:
    """The processes whose command line matches `pattern` (pgrep -f) and that were started under `tag`."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    mine = set()
    for pid in map(int, out.split()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{TAG_VAR}={tag}".encode() in f.read().split(b"\0"):
                    mine.add(pid)
        except OSError:  # ended meanwhile
            pass
    return mine
