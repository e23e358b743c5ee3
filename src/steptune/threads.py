"""How torch's CPU threads wait: set once, before torch (and its OpenMP runtime) loads.

By default an OpenMP worker thread that runs out of work spins for a while before it sleeps. On a machine where
another program holds a core, that spinning thread and the program share the core in equal time slices, so every
small parallel region (a tiny model runs thousands of them per step) waits a time slice for it: measured here, a
quickstart-sized training step and a generation call were 5-40x slower with 2 spinning threads than with 1 thread
(benchmarks/under_load.py). A passive thread sleeps at once and, having slept, is scheduled as soon as it is woken.
Passive waiting changes when threads run, never what they compute: records stay the same.

OpenMP reads these variables once, when the library loads (at `import torch`), so `steptune/__init__.py` sets them:
importing steptune before torch (the CLI, `python -m steptune...`, scripts) is enough, and child processes (env
workers, `accelerate launch`) inherit them. A value the user set wins.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# libgomp (torch's Linux wheels) reads OMP_WAIT_POLICY; Intel's OpenMP (some conda builds) reads KMP_BLOCKTIME
THREAD_WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
ADDED: dict[str, str] = {}  # what steptune set in this process's environment (not the user's own settings)


def set_thread_wait_defaults(environ: dict | None = None) -> dict[str, str]:
    """Set the passive wait policy where the user has not chosen one; returns what was set."""
    environ = os.environ if environ is None else environ
    if environ.get("STEPTUNE_THREAD_DEFAULTS", "1") == "0":  # opt out (benchmarks/under_load.py compares both)
        return {}
    added = {k: v for k, v in THREAD_WAIT_DEFAULTS.items() if k not in environ}
    environ.update(added)
    if environ is os.environ:
        ADDED.update(added)
    return added


def beside_parent(parent_pid: int) -> None:
    """Set up a pool process spawned to run beside others (stages, an evaluation's shards): one torch thread, one
    core; and it ends when `parent_pid` does. A pool process busy with its task never reads its pool's queue, so
    without the watch the shards of a stopped study played on and wrote into its run. Ended this way, a process
    leaves at most a torn last line, which the rerun plays again; its environment workers watch it in turn."""
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_end_with, args=(parent_pid,), name="end-with-parent", daemon=True).start()


def _end_with(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is handed to init (or a subreaper): its parent id changes
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
