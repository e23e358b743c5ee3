"""Environment workers: one environment per slot, in worker processes (or Ray actors) stepped in parallel.

An environment that fails (JVM killed, exception) is replaced inside its worker; the call that hit it returns an
EnvFailure with the reason, the episode is recorded as failed, and the run goes on. A worker that dies or hangs is
replaced with all its environments (their episodes fail on their next call). Each worker process leads its own
process group, so closing it also ends the JVMs it started; workers exit by themselves when the parent dies
(their pipe closes). `close()` runs on exit from the `with` block, on errors and on Ctrl-C.

Resets off the critical path: besides one environment per slot the pool keeps `spares` environments. `prepare`
(tasks the caller will start next) has idle spares reset those tasks, and compute their expert plans, in their
workers while the caller does other work (the model generates for the other slots); `reset_many` of a prepared
task then binds the slot to that environment, waiting only for its own reset, and the slot's old environment
becomes a spare. Which environment runs a task never changes its records: a reset starts the episode afresh.

Transports: worker processes on this machine (default) or Ray actors (`transport="ray"`, steptune.envs.ray_workers);
both answer the same messages, in order, so the failure handling here serves both.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from steptune.envs.base import Env, Reset, StepResult, TaskRef
from steptune.envs.registry import make_env

CALL_TIMEOUT_S = 600.0  # a ScienceWorld gold-path regeneration can take ~25 s; a hung JVM is killed after this
LOST = "environment worker was restarted: this episode's state is lost"


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
    if cmd == "reset_without_expert":
        return env.reset_without_expert(arg)
    if cmd == "step":
        return env.step(arg)
    if cmd == "expert":
        return env.expert_actions()
    if cmd == "valid":
        return env.valid_actions()
    raise ValueError(f"unknown command {cmd}")


def _reset_command(expert: bool) -> str:
    return "reset" if expert else "reset_without_expert"


def _close_quietly(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001
        pass


def _replacement(env, env_name: str, env_kwargs: dict[str, Any]):
    """A fresh environment in place of one that failed (closed first, so its simulator goes)."""
    _close_quietly(env)
    return make_env(env_name, **env_kwargs)


class WorkerEnvs:
    """The environments one worker holds, by id: what a worker process and a Ray actor both run."""

    def __init__(self, env_name: str, env_kwargs: dict[str, Any], ids: list[int]):
        self.env_name, self.env_kwargs = env_name, env_kwargs
        self.envs = {i: make_env(env_name, **env_kwargs) for i in ids}  # simulators start on the first reset

    def run(self, calls: list[tuple[int, str, Any]]) -> list[tuple[str, Any]]:
        """One message's calls, one after another; a failing environment is replaced, its siblings carry on."""
        replies = []
        for env_id, cmd, arg in calls:
            try:
                replies.append(("ok", _run(self.envs[env_id], cmd, arg)))
            except Exception as e:  # noqa: BLE001
                replies.append(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
                self.envs[env_id] = _replacement(self.envs[env_id], self.env_name, self.env_kwargs)
        return replies

    def close(self) -> None:
        for env in self.envs.values():
            _close_quietly(env)


def enter_worker(jvm_options: str) -> None:
    """Worker-side setup: our own process group (killing it takes the JVMs along), the JVM options."""
    os.setpgrp()
    if jvm_options:  # read by every JVM this worker's simulators start; the user's own options come last and win
        os.environ["JAVA_TOOL_OPTIONS"] = f"{jvm_options} {os.environ.get('JAVA_TOOL_OPTIONS', '')}".strip()
    logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a dead JVM is reported to the parent, once


def _worker(conn, env_name: str, env_kwargs: dict[str, Any], ids: list[int], parent_pid: int,
            jvm_options: str) -> None:
    enter_worker(jvm_options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    envs = None
    try:
        envs = WorkerEnvs(env_name, env_kwargs, ids)
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
            conn.send(envs.run(msg))
    finally:
        if envs is not None:
            envs.close()
        os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever the simulators left running goes with us


class _ProcessWorker:
    """One process holding several environments; answers each message, in order, through a pipe."""

    def __init__(self, ctx, env_name: str, env_kwargs: dict[str, Any], ids: list[int], jvm_options: str):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, env_name, env_kwargs, ids, os.getpid(), jvm_options),
                                daemon=True)
        self.proc.start()
        self.pid = self.proc.pid
        child.close()

    def send(self, calls: list[tuple[int, str, Any]]) -> None:
        self.parent.send(calls)

    def recv(self, timeout: float) -> list[tuple[str, Any]]:
        """The answer to the oldest message not yet answered."""
        if not self.parent.poll(timeout):
            raise TimeoutError(f"no answer in {timeout:.0f} s")
        return self.parent.recv()

    def alive(self) -> bool:
        return self.proc.is_alive()

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


class ProcessTransport:
    """Workers as processes of this machine."""

    def __init__(self):
        # fork: starts fast and needs no `if __name__ == "__main__"` guard in user scripts; the workers only
        # run the simulator, never torch. STEPTUNE_MP_START=spawn switches if a platform needs it.
        self.ctx = mp.get_context(os.environ.get("STEPTUNE_MP_START", "fork"))

    def start(self, env_name: str, env_kwargs: dict[str, Any], ids: list[int], jvm_options: str) -> _ProcessWorker:
        return _ProcessWorker(self.ctx, env_name, env_kwargs, ids, jvm_options)

    def close(self) -> None:
        pass


class WorkerGone(Exception):
    """A transport's worker can no longer answer (its process or actor died)."""


@dataclass
class _Message:
    """One message sent to a worker; `replies` is filled when its answer has been read."""

    worker: int
    calls: list[tuple[int, str, Any]]
    replies: list[tuple[str, Any]] | None = None


@dataclass
class _Prepared:
    task: TaskRef
    env: int
    expert: bool  # reset with the expert's plan at hand (`Env.reset`), not `Env.reset_without_expert`
    handles: list[Any] = field(default_factory=list)  # the reset's and, with plans, the expert's


class PoolSettings(BaseModel):
    """The environment a stage's episodes play (evaluation, stage 2), and where and how many play at once."""

    # where and how many episodes run at once, never what they do: left out of a pipeline stage's key
    speed_only: ClassVar[frozenset[str]] = frozenset({"workers", "env_backend", "ray_address"})
    env: str
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    workers: int = 2  # concurrent episodes (the pool's slots)
    env_backend: Literal["process", "ray"] = "process"  # environment workers: local processes or Ray actors
    ray_address: str | None = None  # with env_backend ray: the cluster (None: RAY_ADDRESS or a local instance)

    def open_pool(self, size: int | None = None) -> EnvPool:
        """A pool of `size` slots (default `workers`) of this environment, where these settings say."""
        return EnvPool(self.env, size or self.workers, self.env_kwargs or None, transport=self.env_backend,
                       ray_address=self.ray_address)


class EnvPool:
    """`size` environment slots (one episode each) and `spares` environments that reset upcoming tasks ahead
    (`prepare`), in `workers` processes; environment e lives in process e % workers.

    `workers` defaults to one process per environment: on a 2-core machine, 16 TextWorldExpress slots in 2
    processes step 1.7x faster (one pipe crossing per process instead of per environment) but reset 1.2x slower
    (a process resets its games one after another), and resets cost more in a rollout
    (benchmarks/rollout_throughput.py --env-workers); a spare that shares a process with busy environments delays
    their steps while it resets. `spares` defaults to `size` (every slot's next episode can be ready when it
    starts); their processes start at the first `prepare`. `processes=False` keeps every environment in this
    process (no isolation: a hung simulator hangs the caller; no spares).

    `transport="ray"` runs the workers as Ray actors (steptune.envs.ray_workers) on the Ray instance at
    `ray_address`, or on a local one started for this pool and stopped with it.

    `jvm_options` go to the JVMs the workers' simulators start (JAVA_TOOL_OPTIONS); None picks
    `default_jvm_options(env, size + spares)`."""

    def __init__(self, env_name: str, size: int, env_kwargs: dict | None = None, processes: bool = True,
                 workers: int | None = None, jvm_options: str | None = None, spares: int | None = None,
                 transport: str = "process", ray_address: str | None = None):
        if size < 1:
            raise ValueError("an environment pool needs at least one slot")
        if transport not in ("process", "ray"):
            raise ValueError(f"unknown environment transport {transport!r}; use process or ray")
        self.env_name = env_name
        self.env_kwargs = dict(env_kwargs or {})
        self.size = size
        self.processes = processes
        self.spec = make_env(env_name, **self.env_kwargs)  # lists tasks and prompts; starts no simulator
        self.restarts = 0
        self.resets_ahead = 0  # episodes that started in a spare prepared for them
        self.spares = 0 if not processes else size if spares is None else spares
        n_envs = size + self.spares
        self.jvm_options = default_jvm_options(self.spec, n_envs) if jvm_options is None else jvm_options
        self._slot_env = list(range(size))  # which environment each slot's episode runs in
        self._idle = deque(range(size, n_envs))  # environments bound to no slot and preparing nothing
        self._prepared: list[_Prepared] = []
        self._plans: dict[int, list[str] | None] = {}  # slot -> the plan its prepared reset brought along
        self._lost: set[int] = set()  # environments replaced with their worker: reset first
        self._workers: list[Any] = []
        self._envs: list[Any] = []
        self._transport: Any = None
        if not processes:
            self._envs = [make_env(env_name, **self.env_kwargs) for _ in range(size)]
            return
        self._n_workers = max(1, min(n_envs, workers or n_envs))
        self._inflight: list[deque[_Message]] = [deque() for _ in range(self._n_workers)]
        if transport == "ray":
            from steptune.envs.ray_workers import RayTransport

            self._transport = RayTransport(ray_address, self._n_workers)
        else:
            self._transport = ProcessTransport()
        self._workers = [None] * self._n_workers
        for w in range(min(size, self._n_workers)):
            self._start_worker(w)

    def _env_ids(self, w: int) -> list[int]:
        return [e for e in range(self.size + self.spares) if e % self._n_workers == w]

    def _start_worker(self, w: int) -> Any:
        self._workers[w] = self._transport.start(self.env_name, self.env_kwargs, self._env_ids(w), self.jvm_options)
        return self._workers[w]

    # the Env-like surface ------------------------------------------------------------------------------
    def instruction(self) -> str:
        return self.spec.instruction()

    def tasks(self, split: str) -> list[TaskRef]:
        return self.spec.tasks(split)

    def max_steps(self, task: TaskRef) -> int:
        return self.spec.max_steps(task)

    # messages to workers -------------------------------------------------------------------------------
    def _submit(self, calls: list[tuple[int, str, Any]]) -> list[Any]:
        """Send every worker its share of the calls (environment, command, argument) in one message, without
        waiting: a handle per call for `_result`."""
        handles: list[Any] = [None] * len(calls)
        by_worker: dict[int, list[int]] = {}
        for i, (env, cmd, _) in enumerate(calls):
            if env in self._lost and cmd != "reset":
                handles[i] = EnvFailure(LOST)
            else:
                self._lost.discard(env)
                by_worker.setdefault(env % self._n_workers, []).append(i)
        for w, idx in by_worker.items():
            msg = _Message(w, [calls[i] for i in idx])
            worker = self._workers[w] or self._start_worker(w)
            self._inflight[w].append(msg)
            try:
                worker.send(msg.calls)
            except (OSError, ValueError, WorkerGone) as e:
                self._replace_worker(w, f"environment worker died: {e}")
            for k, i in enumerate(idx):
                handles[i] = (msg, k)
        return handles

    def _result(self, handle: Any) -> Any:
        """A call's answer, waiting for it (and reading the answers its worker sent before it)."""
        if isinstance(handle, EnvFailure):
            return handle
        msg, k = handle
        while msg.replies is None:
            worker, queue = self._workers[msg.worker], self._inflight[msg.worker]
            try:
                queue[0].replies = worker.recv(CALL_TIMEOUT_S * len(queue[0].calls))
                queue.popleft()
            except (EOFError, OSError, TimeoutError, WorkerGone) as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._replace_worker(msg.worker, f"environment worker {'failed' if worker.alive() else 'died'}: {why}")
        status, out = msg.replies[k]
        if status == "ok":
            return out
        if status == "error":  # the worker has already replaced that environment
            self.restarts += 1
            return EnvFailure(f"environment failed: {str(out).strip().splitlines()[0]}")
        return EnvFailure(out)

    def _replace_worker(self, w: int, reason: str) -> None:
        """Every message worker `w` has not answered fails with `reason`; its environments start afresh."""
        for msg in self._inflight[w]:
            msg.replies = [("lost", reason)] * len(msg.calls)
        self._inflight[w].clear()
        self._workers[w].kill()
        self.restarts += 1
        self._start_worker(w)
        self._lost.update(self._env_ids(w))

    def _call_many(self, calls: list[tuple[int, str, Any]]) -> list[Any]:
        """Calls by slot; every worker gets its share first, then the answers are collected: they work in parallel."""
        for slot, _, _ in calls:
            self._plans.pop(slot, None)
        if not self.processes:
            results: list[Any] = []
            for slot, cmd, arg in calls:
                try:
                    results.append(_run(self._envs[slot], cmd, arg))
                except Exception as e:  # noqa: BLE001
                    results.append(EnvFailure(f"{type(e).__name__}: {e}"))
                    self.restarts += 1
                    self._envs[slot] = _replacement(self._envs[slot], self.env_name, self.env_kwargs)
            return results
        handles = self._submit([(self._slot_env[slot], cmd, arg) for slot, cmd, arg in calls])
        return [self._result(h) for h in handles]

    # episodes ------------------------------------------------------------------------------------------
    def prepare(self, tasks: list[TaskRef], plans: bool = False, expert: bool = True) -> None:
        """The tasks `reset_many` will be asked for next, in order: idle spares start resetting them now (with
        `plans`, the expert's plan from the reset state too), in their workers, without waiting. `expert=False`:
        as `reset_many(..., expert=False)` will ask."""
        expert = expert or plans
        unclaimed = list(self._prepared)
        wanted = []
        for task in tasks:
            if (match := next((p for p in unclaimed if p.task == task and p.expert == expert), None)) is not None:
                unclaimed.remove(match)
            else:
                wanted.append(task)
        for p in unclaimed:  # prepared for tasks no longer coming: spares again (their answers are read in turn)
            self._prepared.remove(p)
            self._idle.append(p.env)
        for task in wanted:
            if not self._idle:
                break
            env = self._idle.popleft()
            calls = [(env, _reset_command(expert), task)] + ([(env, "expert", None)] if plans else [])
            self._prepared.append(_Prepared(task, env, expert, self._submit(calls)))

    def reset(self, slot: int, task: TaskRef, expert: bool = True) -> Reset | EnvFailure:
        return self.reset_many([(slot, task)], expert=expert)[0]

    def reset_many(self, calls: list[tuple[int, TaskRef]], expert: bool = True) -> list[Reset | EnvFailure]:
        """Start each slot's episode: a prepared task takes over its spare (the slot's old environment becomes a
        spare), the others reset in the slot's own environment, all in parallel. `expert=False` when no expert
        plan will be asked for (`Env.reset_without_expert`: ScienceWorld then skips building its gold path)."""
        taken: dict[int, _Prepared] = {}
        for i, (slot, task) in enumerate(calls):
            if (p := next((p for p in self._prepared if p.task == task and p.expert == expert), None)) is not None:
                self._prepared.remove(p)
                self._idle.append(self._slot_env[slot])
                self._slot_env[slot] = p.env
                taken[i] = p
                self.resets_ahead += 1
        direct = [i for i in range(len(calls)) if i not in taken]
        out = dict(zip(direct, self._call_many([(calls[i][0], _reset_command(expert), calls[i][1]) for i in direct])))
        for i, p in taken.items():
            out[i] = self._result(p.handles[0])
            if len(p.handles) > 1:
                plan = self._result(p.handles[1])
                self._plans[calls[i][0]] = None if isinstance(plan, EnvFailure) else plan
        return [out[i] for i in range(len(calls))]

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
        """The expert's remaining plan for each slot (None where it cannot tell), all workers in parallel; a plan
        that came with a prepared reset costs no round trip."""
        known = {s: self._plans.pop(s) for s in slots if s in self._plans}
        ask = [s for s in slots if s not in known]
        asked = dict(zip(ask, self._call_many([(slot, "expert", None) for slot in ask]) if ask else []))
        return [known[s] if s in known else None if isinstance(asked[s], EnvFailure) else asked[s] for s in slots]

    def valid_actions(self, slot: int) -> list[str] | None:
        out = self._call_many([(slot, "valid", None)])[0]
        return None if isinstance(out, EnvFailure) else out

    def worker_pids(self) -> list[int]:
        """The started worker processes, in order; environment e lives in worker e % workers (slot i's environment
        is environment i until a prepared reset hands the slot a spare)."""
        return [w.pid for w in self._workers if w is not None]

    def close(self) -> None:
        for w in self._workers:
            if w is not None:
                w.kill()
        for env in self._envs:
            _close_quietly(env)
        self._workers, self._envs = [], []
        if getattr(self, "_transport", None) is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None) or getattr(self, "_envs", None):
            self.close()
