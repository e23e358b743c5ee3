"""Environment workers as Ray actors (`env.backend: ray`, `pip install 'steptune[ray]'`).

An actor holds a few environments (steptune.envs.pool.WorkerEnvs) and answers the pool's messages in order, as a
worker process does, so the pool's failure handling serves both: when an actor dies, the calls it had not answered
fail, their episodes are recorded as failed, and the pool starts a replacement actor.

The pool connects to the Ray instance at `address` (e.g. ray://head:10001 or head:6379) or, without one, to the
instance RAY_ADDRESS names or a local instance started here; a local instance started here is stopped when the
pool closes. Actors lead their own process group, so closing one also ends the JVMs its simulators started.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from typing import Any

from steptune.envs.pool import WorkerEnvs, WorkerGone, enter_worker
from steptune.errors import UserError

CLOSE_TIMEOUT_S = 10.0


class RayMissingError(UserError, ImportError):
    pass


class RayStartError(UserError, RuntimeError):
    pass


class _EnvActor:
    def __init__(self, env_name: str, env_kwargs: dict[str, Any], ids: list[int], jvm_options: str):
        enter_worker(jvm_options)
        self.envs = WorkerEnvs(env_name, env_kwargs, ids)

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def run(self, calls: list[tuple[int, str, Any]]) -> list[tuple[str, Any]]:
        return self.envs.run(calls)

    def close(self) -> None:
        self.envs.close()


class _RayWorker:
    """One actor; the same surface as a worker process (send, recv in order, alive, kill)."""

    def __init__(self, actor_cls, env_name: str, env_kwargs: dict[str, Any], ids: list[int], jvm_options: str):
        import ray

        self.ray = ray
        self.actor = actor_cls.remote(env_name, env_kwargs, ids, jvm_options)
        self._where = self.actor.where.remote()
        self.refs: deque = deque()
        self.dead = False

    @property
    def pid(self) -> int:
        return self.ray.get(self._where)[0]

    def send(self, calls: list[tuple[int, str, Any]]) -> None:
        self.refs.append(self.actor.run.remote(calls))

    def recv(self, timeout: float) -> list[tuple[str, Any]]:
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            out = self.ray.get(self.refs[0], timeout=timeout)
        except GetTimeoutError as e:
            raise TimeoutError(f"no answer in {timeout:.0f} s") from e
        except RayActorError as e:
            self.dead = True
            raise WorkerGone("the Ray actor died") from e
        self.refs.popleft()
        return out

    def alive(self) -> bool:
        return not self.dead

    def kill(self) -> None:
        ray = self.ray
        pid = node = None
        try:
            pid, node = ray.get(self._where, timeout=CLOSE_TIMEOUT_S)
            if not self.dead:
                ray.get(self.actor.close.remote(), timeout=CLOSE_TIMEOUT_S)  # ends its simulators
                pid = None
        except Exception:  # noqa: BLE001 - dead or hung: its process group is killed below
            pass
        ray.kill(self.actor, no_restart=True)
        if pid is not None and node == ray.get_runtime_context().get_node_id():
            try:  # on this machine: whatever the dead actor's simulators left running goes too
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class RayTransport:
    """Workers as Ray actors, one CPU each (a local instance started here counts one per worker)."""

    def __init__(self, address: str | None, n_workers: int):
        try:
            import ray
        except ImportError as e:
            raise RayMissingError("env backend 'ray' needs Ray: pip install 'steptune[ray]'") from e
        self.ray = ray
        self.started_here = False
        if not ray.is_initialized():
            local = address is None and not os.environ.get("RAY_ADDRESS")
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False, **({"num_cpus": max(n_workers, os.cpu_count() or 1)} if local else {}))
            except Exception as e:
                ray.shutdown()  # a half-started local instance leaves its GCS and monitors running otherwise
                where = "a local Ray instance" if local else f"the Ray instance at {address or os.environ['RAY_ADDRESS']}"
                raise RayStartError(f"could not start or reach {where}: {' '.join(str(e).split())}") from e
            self.started_here = True
        self.actor_cls = ray.remote(num_cpus=1, max_restarts=0, scheduling_strategy="SPREAD")(_EnvActor)

    def start(self, env_name: str, env_kwargs: dict[str, Any], ids: list[int], jvm_options: str) -> _RayWorker:
        return _RayWorker(self.actor_cls, env_name, env_kwargs, ids, jvm_options)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False
