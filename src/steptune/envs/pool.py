"""Environment workers: one environment per slot, in worker processes stepped in parallel.

An environment that fails (JVM killed, exception) is replaced inside its worker; the call that hit it returns an
EnvFailure with the reason, the episode is recorded as failed, and the run goes on. A worker process that dies
or hangs is replaced with all its environments (their episodes fail on their next call). Each worker leads its
own process group, so closing it also ends the JVMs it started; workers exit by themselves when the parent dies
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

from steptune.envs.base import Env, Reset, StepResult, TaskRef
from steptune.envs.registry import make_env

CALL_TIMEOUT_S = 600.0  # a ScienceWorld gold-path regeneration can take ~25 s; a hung JVM is killed after this


@dataclass
class EnvFailure:
    reason: str


def default_jvm_options(env: Env, n_simulators: int) -> str:
    """The environment's options for crowded JVMs (`Env.crowded_jvm_options`) when there are more simulators than
    CPU cores; otherwise nothing (the JVM's defaults)."""
    return env.crowded_jvm_options if n_simulators > (os.cpu_count() or 1) else ""


def _run(env, cmd: str, arg: Any) -> Any:
    if cmd == "reset":
        return env.reset(arg)
    if cmd == "step":
        return env.step(arg)
    if cmd == "expert":
        return env.expert_actions()
    if cmd == "valid":
        return env.valid_actions()
    raise ValueError(f"unknown command {cmd}")


def _close_quietly(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001
        pass


def _replacement(env, env_name: str, env_kwargs: dict[str, Any]):
    """A fresh environment in place of one that failed (closed first, so its simulator goes)."""
    _close_quietly(env)
    return make_env(env_name, **env_kwargs)


def _worker(conn, env_name: str, env_kwargs: dict[str, Any], slots: list[int], parent_pid: int,
            jvm_options: str) -> None:
    os.setpgrp()  # our own process group: killing it takes the JVMs along
    if jvm_options:  # read by every JVM this worker's simulators start; the user's own options come last and win
        os.environ["JAVA_TOOL_OPTIONS"] = f"{jvm_options} {os.environ.get('JAVA_TOOL_OPTIONS', '')}".strip()
    logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a dead JVM is reported to the parent, once
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    envs: dict[int, Any] = {}
    try:
        envs.update((slot, make_env(env_name, **env_kwargs)) for slot in slots)
        while True:
            # forked siblings hold copies of our pipe, so a dead parent need not close it: watch the parent too
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg == "close":
                return
            replies = []
            for slot, cmd, arg in msg:  # this worker's share of one round, stepped one after another
                try:
                    replies.append(("ok", _run(envs[slot], cmd, arg)))
                except Exception as e:  # noqa: BLE001 - that environment is replaced; its siblings carry on
                    replies.append(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
                    envs[slot] = _replacement(envs[slot], env_name, env_kwargs)
            conn.send(replies)
    finally:
        for env in envs.values():
            _close_quietly(env)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever the simulators left running goes with us


class _Worker:
    """One process holding the environments of several slots."""

    def __init__(self, ctx, env_name: str, env_kwargs: dict[str, Any], slots: list[int], jvm_options: str):
        self.slots = slots
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, env_name, env_kwargs, slots, os.getpid(), jvm_options),
                                daemon=True)
        self.proc.start()
        child.close()

    def send(self, calls: list[tuple[int, str, Any]]) -> None:
        self.parent.send(calls)

    def recv(self, timeout: float) -> list[tuple[str, Any]]:
        if not self.parent.poll(timeout):
            raise TimeoutError(f"no answer in {timeout:.0f} s")
        return self.parent.recv()

    def kill(self) -> None:
        try:
            self.parent.send("close")
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.pid is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its JVMs
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.join(timeout=2)
        self.parent.close()


class EnvPool:
    """`size` environment slots (one episode each) in `workers` processes, slot i in process i % workers.

    Each round every process gets one message with its slots' calls and runs them one after another. `workers`
    defaults to one process per slot: on a 2-core machine, 16 TextWorldExpress slots in 2 processes step 1.7x
    faster (one pipe crossing per process instead of per environment) but reset 1.2x slower (a process resets
    its games one after another), and resets cost more in a rollout (benchmarks/rollout_throughput.py
    --env-workers). `processes=False` keeps every environment in this process (no isolation: a hung simulator
    hangs the caller).

    `jvm_options` go to the JVMs the workers' simulators start (JAVA_TOOL_OPTIONS); None picks
    `default_jvm_options(env, size)`."""

    def __init__(self, env_name: str, size: int, env_kwargs: dict | None = None, processes: bool = True,
                 workers: int | None = None, jvm_options: str | None = None):
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
        self._lost: set[int] = set()  # slots whose environment was replaced with their process: reset first
        self.jvm_options = default_jvm_options(self.spec, size) if jvm_options is None else jvm_options
        if processes:
            n = max(1, min(size, workers or size))
            self._workers = [self._start_worker([s for s in range(size) if s % n == w]) for w in range(n)]
        else:
            self._envs = [make_env(env_name, **self.env_kwargs) for _ in range(size)]

    def _start_worker(self, slots: list[int]) -> _Worker:
        return _Worker(self._ctx, self.env_name, self.env_kwargs, slots, self.jvm_options)

    def _worker_of(self, slot: int) -> int:
        return slot % len(self._workers)

    # the Env-like surface ------------------------------------------------------------------------------
    def instruction(self) -> str:
        return self.spec.instruction()

    def tasks(self, split: str) -> list[TaskRef]:
        return self.spec.tasks(split)

    def max_steps(self, task: TaskRef) -> int:
        return self.spec.max_steps(task)

    def _call_many(self, calls: list[tuple[int, str, Any]]) -> list[Any]:
        """Send every process its share of the calls first, then collect: the processes work in parallel."""
        results: list[Any] = [None] * len(calls)
        if not self.processes:
            for i, (slot, cmd, arg) in enumerate(calls):
                try:
                    results[i] = _run(self._envs[slot], cmd, arg)
                except Exception as e:  # noqa: BLE001
                    results[i] = EnvFailure(f"{type(e).__name__}: {e}")
                    self.restarts += 1
                    self._envs[slot] = _replacement(self._envs[slot], self.env_name, self.env_kwargs)
            return results
        by_worker: dict[int, list[int]] = {}
        for i, (slot, cmd, _) in enumerate(calls):
            if slot in self._lost and cmd != "reset":
                results[i] = EnvFailure("environment worker was restarted: this episode's state is lost")
            else:
                self._lost.discard(slot)
                by_worker.setdefault(self._worker_of(slot), []).append(i)
        sent = []
        for w, idx in by_worker.items():
            try:
                self._workers[w].send([calls[i] for i in idx])
                sent.append(w)
            except (OSError, ValueError) as e:
                self._replace_worker(w, idx, results, f"environment worker died: {e}")
        for w in sent:
            idx = by_worker[w]
            try:
                replies = self._workers[w].recv(CALL_TIMEOUT_S * len(idx))
            except (EOFError, OSError, TimeoutError) as e:
                alive = self._workers[w].proc.is_alive()
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._replace_worker(w, idx, results, f"environment worker {'failed' if alive else 'died'}: {why}")
                continue
            for i, (status, out) in zip(idx, replies):
                if status == "ok":
                    results[i] = out
                else:  # the worker has already replaced that environment
                    self.restarts += 1
                    results[i] = EnvFailure(f"environment failed: {str(out).strip().splitlines()[0]}")
        return results

    def _replace_worker(self, w: int, idx: list[int], results: list[Any], reason: str) -> None:
        """The calls `idx` sent to worker `w` fail with `reason`; its slots get fresh environments."""
        for i in idx:
            results[i] = EnvFailure(reason)
        old = self._workers[w]
        old.kill()
        self.restarts += 1
        self._workers[w] = self._start_worker(old.slots)
        self._lost.update(old.slots)

    def reset(self, slot: int, task: TaskRef) -> Reset | EnvFailure:
        return self.reset_many([(slot, task)])[0]

    def reset_many(self, calls: list[tuple[int, TaskRef]]) -> list[Reset | EnvFailure]:
        return self._call_many([(slot, "reset", task) for slot, task in calls])

    def step_many(self, calls: list[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        return self._call_many([(slot, "step", action) for slot, action in calls])

    def step_many_with_plans(self, calls: list[tuple[int, str, bool]]
                             ) -> list[tuple[StepResult | EnvFailure, list[str] | None]]:
        """Each (slot, action, want_plan): the step's result and, where wanted, the expert's plan from the state
        the step left; a worker runs a slot's calls in order, so the plan rides in the same round trip."""
        flat: list[tuple[int, str, Any]] = []
        for slot, action, want_plan in calls:
            flat.append((slot, "step", action))
            if want_plan:
                flat.append((slot, "expert", None))
        out = iter(self._call_many(flat))
        results = []
        for _, _, want_plan in calls:
            res = next(out)
            plan = next(out) if want_plan else None
            results.append((res, None if isinstance(plan, EnvFailure) else plan))
        return results

    def expert_actions(self, slot: int) -> list[str] | None:
        return self.expert_actions_many([slot])[0]

    def expert_actions_many(self, slots: list[int]) -> list[list[str] | None]:
        """The expert's remaining plan for each slot (None where it cannot tell), all workers in parallel."""
        return [None if isinstance(out, EnvFailure) else out
                for out in self._call_many([(slot, "expert", None) for slot in slots])]

    def valid_actions(self, slot: int) -> list[str] | None:
        out = self._call_many([(slot, "valid", None)])[0]
        return None if isinstance(out, EnvFailure) else out

    def worker_pids(self) -> list[int]:
        """The worker processes; slot i lives in worker_pids()[i % len(worker_pids())]."""
        return [w.proc.pid for w in self._workers] if self.processes else []

    def close(self) -> None:
        for w in getattr(self, "_workers", []):
            w.kill()
        for env in getattr(self, "_envs", []):
            _close_quietly(env)
        self._workers, self._envs = [], []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None) or getattr(self, "_envs", None):
            self.close()
