"""One steptune process at a time in a run directory. `steptune run` and `steptune study` hold the run's lock while
they work in it, and `steptune prune` takes it too: both rewrite the manifest, and a prune beside a running study
would have its "released" records overwritten by the study's next save (then the released models train again).
The lock is the kernel's (flock), so a killed process never leaves it held; the file keeps who held it last, for
`steptune status` to tell a running stage from an interrupted one."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steptune.errors import UserError

LOCK_FILE = "run.lock"


class RunInUse(UserError):
    pass


_held: set[int] = set()  # the descriptors of the locks this process holds


def _let_go_in_child() -> None:
    """A forked child (an environment worker) shares the lock's open file, and so would keep the lock held after a
    kill of this process until it noticed and exited: its copy is pointed at /dev/null, which keeps the number valid
    for whatever still holds it."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _held:
        os.dup2(null, fd)
    os.close(null)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


@contextmanager
def hold_run(run_dir: Path, what: str) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block, or raise RunInUse at once, naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = holder(run_dir)
            by = f"pid {held[0]} ({held[1]})" if held else "another process"
            raise RunInUse(f"{run_dir} is in use by {by}, so {what} cannot start beside it: stop that one first, or "
                           f"let it finish") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}\n")
        fh.flush()
        _held.add(fh.fileno())
        try:
            yield
        finally:
            if fh.fileno() in _held:  # not in a forked child that came back this way
                _held.discard(fh.fileno())
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def holder(run_dir: Path) -> tuple[int, str] | None:
    """The pid and command of the live process that holds or last held `run_dir`'s lock; None if none is alive."""
    try:
        pid, _, command = (run_dir / LOCK_FILE).read_text().strip().partition(" ")
        os.kill(int(pid), 0)  # only asks whether it is alive
    except PermissionError:
        pass  # alive, another user's
    except (OSError, ValueError):
        return None
    return int(pid), command


def taken_at(run_dir: Path) -> int:
    """When the lock of `run_dir` was last taken, in whole seconds (its file is written then, and emptied at release)."""
    return int((run_dir / LOCK_FILE).stat().st_mtime)
