"""Environment workers: one environment per slot, each in its own process, stepped in parallel.

A worker whose environment dies (JVM killed, exception) is restarted; the call that hit it returns an
EnvFailure with the reason, the episode is recorded as failed, and the run goes on. Each worker leads its own
process group, so closing it also ends the JVM it started; workers exit by themselves when the parent dies
(their pipe closes). `close()` runs on exit from the `with` block, on errors and on Ctrl-C.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any

from steptune.envs.base import Reset, StepResult, TaskRef
from steptune.envs.registry import make_env

CALL_TIMEOUT_S = 600.0  # a ScienceWorld gold-path regeneration can take ~25 s; a hung JVM is killed after this


@dataclass
class EnvFailure:
    reason: str


def _worker(conn, env_name: str, env_kwargs: dict[str, Any], parent_pid: int) -> None:
    os.setpgrp()  # our own process group: killing it takes the JVM along
    logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a dead JVM is reported to the parent, once
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    env = None
    try:
        env = make_env(env_name, **env_kwargs)
        while True:
            # forked siblings hold copies of our pipe, so a dead parent need not close it: watch the parent too
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            try:
                cmd, arg = conn.recv()
            except (EOFError, OSError):
                return
            if cmd == "close":
                return
            try:
                if cmd == "reset":
                    out: Any = env.reset(arg)
                elif cmd == "step":
                    out = env.step(arg)
                elif cmd == "expert":
                    out = env.expert_actions()
                else:
                    raise ValueError(f"unknown command {cmd}")
                conn.send(("ok", out))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which restarts us
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
                return
    finally:
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass
        os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever the simulator left running goes with us


class _Slot:
    def __init__(self, ctx, env_name: str, env_kwargs: dict[str, Any]):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, env_name, env_kwargs, os.getpid()), daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, arg: Any = None) -> None:
        self.parent.send((cmd, arg))

    def recv(self, timeout: float) -> Any:
        if not self.parent.poll(timeout):
            raise TimeoutError(f"no answer in {timeout:.0f} s")
        status, out = self.parent.recv()
        if status != "ok":
            raise RuntimeError(out)
        return out

    def kill(self) -> None:
        try:
            self.send("close")
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.pid is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its JVM
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.join(timeout=2)
        self.parent.close()


class EnvPool:
    def __init__(self, env_name: str, size: int, env_kwargs: dict | None = None, processes: bool = True):
        if size < 1:
            raise ValueError("an environment pool needs at least one slot")
        self.env_name = env_name
        self.env_kwargs = dict(env_kwargs or {})
        self.size = size
        self.processes = processes
        self.spec = make_env(env_name, **self.env_kwargs)  # lists tasks and prompts; starts no simulator
        self.restarts = 0
        # fork: starts fast and needs no `if __name__ == "__main__"` guard in user scripts; the workers only
        # run the simulator, never torch. STEPTUNE_MP_START=spawn switches if a platform needs it.
        self._ctx = mp.get_context(os.environ.get("STEPTUNE_MP_START", "fork"))
        self._slots: list[Any] = [self._start() for _ in range(size)]
        self._tasks: dict[int, TaskRef] = {}

    def _start(self):
        return _Slot(self._ctx, self.env_name, self.env_kwargs) if self.processes else make_env(
            self.env_name, **self.env_kwargs)

    def _restart(self, slot: int) -> None:
        self.restarts += 1
        old = self._slots[slot]
        if self.processes:
            old.kill()
        else:
            try:
                old.close()
            except Exception:  # noqa: BLE001
                pass
        self._slots[slot] = self._start()

    # the Env-like surface ------------------------------------------------------------------------------
    def instruction(self) -> str:
        return self.spec.instruction()

    def tasks(self, split: str) -> list[TaskRef]:
        return self.spec.tasks(split)

    def max_steps(self, task: TaskRef) -> int:
        return self.spec.max_steps(task)

    def _call_many(self, calls: list[tuple[int, str, Any]]) -> list[Any]:
        """Send every call first, then collect: the slots work in parallel."""
        results: list[Any] = [None] * len(calls)
        if not self.processes:
            for i, (slot, cmd, arg) in enumerate(calls):
                env = self._slots[slot]
                try:
                    results[i] = {"reset": env.reset, "step": env.step}[cmd](arg) if cmd != "expert" \
                        else env.expert_actions()
                except Exception as e:  # noqa: BLE001
                    results[i] = EnvFailure(f"{type(e).__name__}: {e}")
                    self._restart(slot)
            return results
        sent = []
        for i, (slot, cmd, arg) in enumerate(calls):
            try:
                self._slots[slot].send(cmd, arg)
                sent.append(i)
            except (OSError, ValueError) as e:
                results[i] = EnvFailure(f"environment worker died: {e}")
                self._restart(slot)
        for i in sent:
            slot = calls[i][0]
            try:
                results[i] = self._slots[slot].recv(CALL_TIMEOUT_S)
            except (EOFError, OSError, RuntimeError, TimeoutError) as e:
                alive = self._slots[slot].proc.is_alive()
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                results[i] = EnvFailure(f"environment worker {'failed' if alive else 'died'}: {why}")
                self._restart(slot)
        return results

    def reset(self, slot: int, task: TaskRef) -> Reset | EnvFailure:
        return self.reset_many([(slot, task)])[0]

    def reset_many(self, calls: list[tuple[int, TaskRef]]) -> list[Reset | EnvFailure]:
        self._tasks.update(calls)
        return self._call_many([(slot, "reset", task) for slot, task in calls])

    def step_many(self, calls: list[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        return self._call_many([(slot, "step", action) for slot, action in calls])

    def expert_actions(self, slot: int) -> list[str] | None:
        out = self._call_many([(slot, "expert", None)])[0]
        return None if isinstance(out, EnvFailure) else out

    def worker_pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots] if self.processes else []

    def close(self) -> None:
        for s in self._slots:
            if self.processes:
                s.kill()
            else:
                s.close()
        self._slots = []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_slots", None):
            self.close()
