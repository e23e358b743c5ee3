"""The rollout loop shared by evaluation and self-reflected synthesis.

One episode per pool slot; every round the pending turns of all active episodes go to the model in one
`backend.complete` call and all their actions to the environments in one `step_many` call. Finished
episodes leave, queued tasks take their slots. With a `teacher` (steptune.teacher.base.Teacher), each student
step is judged as soon as it has been executed: a wrong step is kept (kind "error", weight 0, critique attached)
and followed by the teacher's reflection-and-correction step (kind "reflection", weight 1), executed in the env;
then the student carries on; what the teacher did and cost is counted per episode (meta "teacher_counts"). With
an `injection` (the recovery benchmark, steptune.agent.injection), each episode begins with the expert's
steps up to the injection point, then one injected wrong action, then the agent alone.

Sampling (temperature > 0 with a seed) draws every turn from its own generator, seeded from (seed, episode id,
step index): what an episode samples does not depend on which other episodes share its batch.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from steptune.agent.injection import (
    NEUTRAL_THOUGHT,
    InjectionConfig,
    injected_error,
    injection_step,
)
from steptune.data.prompt import approx_token_count, build_conversation
from steptune.backends.base import BackendError, ChatBackend, GenerationConfig
from steptune.data.react import INVALID_FORMAT_OBSERVATION, REACT_STOP, parse_react
from steptune.data.trajectory import Step, Trajectory
from steptune.envs.base import Reset, StepResult, TaskRef
from steptune.envs.expert import explain
from steptune.teacher.base import StepToJudge, Teacher, TeacherCounts, Verdict

if TYPE_CHECKING:  # the pool lives in steptune.envs.pool; only its interface is used here
    from steptune.envs.pool import EnvPool


@dataclass
class Episode:
    task: TaskRef
    trajectory: Trajectory
    steps_taken: int = 0  # env steps, reflection steps included
    done: bool = False  # the env said the episode is over (won or lost), as opposed to running out of steps
    failure: str | None = None  # env or backend failure; the episode is recorded, not retried
    stopped: str | None = None  # "repeating": ended by `max_repeats` before its step budget
    invalid_actions: int = 0
    truncations: int = 0  # turns whose context was cut to fit the window
    dropped_steps: int = 0  # oldest steps left out of the latest prompt to fit the window
    # the expert's plan for the current state, fetched only for whom needs it (a teacher with uses_expert_plan, an
    # injected episode awaiting its way back); it comes back with each step, so each state costs no extra round trip
    plan: list[str] | None = None
    plan_fresh: bool = False  # `plan` is for the current state
    teacher: TeacherCounts | None = None  # with a teacher: its accounting for this episode
    reward_before: float = 0.0  # the reward before the step just executed (did that step make progress?)
    # recovery benchmark: {"step", "action", "error", "steps_to_plan"} once an error was injected (or {"skipped"})
    injection: dict[str, Any] | None = None
    awaiting_plan: bool = False  # injected, and the agent has not yet taken the expert's next action since

    @property
    def reward(self) -> float:
        return self.trajectory.reward

    @property
    def success(self) -> bool:
        return self.trajectory.success

    def stats(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken, "done": self.done, "failure": self.failure,
                "invalid_actions": self.invalid_actions, "truncations": self.truncations,
                "n_errors": self.trajectory.n_errors,
                **({"injection": self.injection} if self.injection is not None else {}),
                **({"stopped": self.stopped} if self.stopped is not None else {}),
                **({"teacher_counts": self.teacher.as_meta()} if self.teacher is not None else {})}


# A BackendError from the student's model fails the episodes whose conversations failed in that round (all of them
# unless the backend says which); they are recorded with failure "backend: ..." and counted, not retried; the
# others go on.


@dataclass
class RolloutTotals:
    """Where the time went, over the whole call (used by the throughput benchmark)."""

    model_seconds: float = 0.0
    env_seconds: float = 0.0  # resets included
    reset_seconds: float = 0.0
    judge_seconds: float = 0.0
    model_calls: int = 0
    agent_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_episodes(pool: EnvPool, tasks: list[TaskRef], backend: ChatBackend, gen: GenerationConfig, *,
                 teacher: Teacher | None = None, on_episode_end: Callable[[Episode], None] | None = None,
                 max_context_tokens: int | None = None, progress: bool | str = True, example: str | None = None,
                 totals: RolloutTotals | None = None, injection: InjectionConfig | None = None,
                 max_repeats: int | None = None) -> list[Episode]:
    """Run every task to the end; returns the episodes in the order of `tasks`.

    `gen.stop` defaults to the ReAct stops (end of the Action line). `max_context_tokens` defaults to the
    backend's window (`backend.context_window`) minus `gen.max_new_tokens`, when the backend knows it. `progress`:
    a bar (or lines in a log), none, or a label: lines that start with it (several runs printing at once).
    `max_repeats`: an episode whose last that many steps are one action with one observation ends there (lost,
    unless the environment said otherwise), marked `stopped: "repeating"`.
    """
    totals = totals if totals is not None else RolloutTotals()
    if not gen.stop:
        gen = GenerationConfig(**{**gen.__dict__, "stop": list(REACT_STOP)})
    window = getattr(backend, "context_window", None)
    if max_context_tokens is None and window:
        max_context_tokens = window - gen.max_new_tokens
    count_tokens = getattr(backend, "count_tokens", approx_token_count)
    teacher_plans = teacher is not None and teacher.uses_expert_plan
    # who will ask for the expert's plan; where nobody will, ScienceWorld skips building its gold path at reset
    expert = teacher_plans or injection is not None

    def wants_plan(ep: Episode) -> bool:
        return teacher_plans or ep.awaiting_plan
    instruction = pool.instruction()

    queue = list(enumerate(tasks))
    queue.reverse()  # pop() from the end takes tasks in order
    results: dict[int, Episode] = {}
    active: dict[int, tuple[int, Episode]] = {}  # slot -> (task index, episode)
    bar = _Progress(len(tasks), enabled=bool(progress), label=progress if isinstance(progress, str) else None)
    prepare = getattr(pool, "prepare", None)  # pools without spares (scripted, in-process) reset when asked

    def finish(slot: int) -> None:
        idx, ep = active.pop(slot)
        ep.trajectory.meta.update(ep.stats())
        results[idx] = ep
        bar.advance(ep)
        if on_episode_end is not None:
            on_episode_end(ep)

    def fill_free_slots() -> None:
        while queue and (free := [s for s in range(pool.size) if s not in active]):
            starting = [(slot, *queue.pop()) for slot in free[: len(queue)]]
            started = _start_episodes(pool, starting, instruction, totals, expert)  # reset in parallel
            for slot, idx, ep in started:
                active[slot] = (idx, ep)
                ep.teacher = TeacherCounts() if teacher is not None else None
            if injection is not None:
                _inject_errors(pool, [(slot, ep) for slot, _, ep in started], injection, totals)
            for slot, _, ep in started:
                if ep.failure is not None or ep.done or ep.steps_taken >= pool.max_steps(ep.task):
                    finish(slot)
        if prepare is not None:  # the next tasks reset in spare environments while the model generates
            prepare([task for _, task in reversed(queue[-pool.size:])], plans=teacher_plans, expert=expert)

    try:
        fill_free_slots()
        while active:
            slots = sorted(active)
            episodes = [active[s][1] for s in slots]
            convs = []
            for ep in episodes:
                conv, cut = build_conversation(ep.trajectory, example, max_context_tokens, count_tokens,
                                               ep.dropped_steps)
                ep.truncations += cut
                ep.dropped_steps = len(ep.trajectory.steps) - sum(m["role"] == "assistant" for m in conv)
                convs.append(conv)

            t0 = time.perf_counter()
            try:
                replies = backend.complete(convs, _per_row_seeds(gen, episodes))
            except BackendError as e:
                replies, errors = e.per_conversation(len(convs))
                for i, why in errors.items():
                    episodes[i].failure = f"backend: {why}"
                    finish(slots[i])
                ok = [i for i in range(len(slots)) if i not in errors]
                slots, episodes, replies = [slots[i] for i in ok], [episodes[i] for i in ok], [replies[i] for i in ok]
                if not slots:
                    fill_free_slots()
                    continue
            dt = time.perf_counter() - t0
            totals.model_seconds += dt
            totals.model_calls += 1

            stale = [(s, ep) for s, ep in zip(slots, episodes) if wants_plan(ep) and not ep.plan_fresh]
            if stale:  # episodes just started, or just got an injected error or a correction without a plan
                for (_, ep), plan in zip(stale, pool.expert_actions_many([s for s, _ in stale])):
                    ep.plan, ep.plan_fresh = plan, True
            plans = [ep.plan if wants_plan(ep) else None for ep in episodes]
            steps = [_student_step(reply) for reply in replies]
            _execute(pool, slots, episodes, steps, totals, wants_plan)
            if injection is not None:
                _note_back_on_plan(episodes, steps, plans)

            if teacher is not None:
                _judge_and_correct(pool, slots, episodes, steps, plans, teacher, totals, wants_plan)

            for s, ep in zip(slots, episodes):
                if max_repeats and not ep.done and repeating(ep.trajectory.steps, max_repeats):
                    ep.stopped = "repeating"
                if ep.done or ep.failure is not None or ep.stopped or ep.steps_taken >= pool.max_steps(ep.task):
                    finish(s)
            fill_free_slots()
    finally:
        bar.close()
    return [results[i] for i in range(len(tasks))]


def repeating(steps: list[Step], n: int) -> bool:
    """The last n steps are one action with one observation: nothing the agent did changed anything."""
    return len(steps) >= n and len({(st.action, st.observation) for st in steps[-n:]}) == 1


def _start_episodes(pool: EnvPool, starting: list[tuple[int, int, TaskRef]], instruction: str,
                    totals: RolloutTotals, expert: bool = True) -> list[tuple[int, int, Episode]]:
    """(slot, task index, task) -> (slot, task index, episode), every slot reset in one parallel call."""
    t0 = time.perf_counter()
    resets = pool.reset_many([(slot, task) for slot, _, task in starting], expert=expert)
    # a simulator that failed to start or had died is replaced in its worker, and nothing of the episode exists yet:
    # one more try, so that a passing fault does not turn into a lost (and counted-as-failed) test episode
    retry = [i for i, reset in enumerate(resets) if not isinstance(reset, Reset)]
    if retry:
        again = pool.reset_many([(starting[i][0], starting[i][2]) for i in retry], expert=expert)
        for i, reset in zip(retry, again):
            resets[i] = reset
    dt = time.perf_counter() - t0
    totals.env_seconds += dt
    totals.reset_seconds += dt
    out = []
    for (slot, idx, task), reset in zip(starting, resets):
        traj = Trajectory(id=f"{task.split}:{task.id}", env=task.env, task_id=task.id, split=task.split,
                          instruction=instruction, task="", meta={"task_type": task.name})
        ep = Episode(task=task, trajectory=traj)
        if isinstance(reset, Reset):
            traj.task = reset.task
        else:
            ep.failure = f"env reset: {reset.reason}"
        out.append((slot, idx, ep))
    return out


def _per_row_seeds(gen: GenerationConfig, episodes: list[Episode]) -> GenerationConfig:
    if gen.temperature <= 0 or gen.seed is None:
        return gen
    seeds = [derive_seed(gen.seed, ep.trajectory.id, len(ep.trajectory.steps)) for ep in episodes]
    return replace(gen, row_seeds=seeds)


def derive_seed(*parts: object) -> int:
    """A seed from several parts (run seed, episode id, ...), stable across processes (unlike Python's str hash)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def _inject_errors(pool: EnvPool, started: list[tuple[int, Episode]], injection: InjectionConfig,
                   totals: RolloutTotals) -> None:
    """The recovery benchmark's opening (steptune.agent.injection): the expert's steps until the injection
    step, then the injected error, all executed; one round of env calls per step for all new episodes."""
    pending = [(slot, ep, injection_step(injection, ep.task)) for slot, ep in started if ep.failure is None]
    while pending:
        slots, eps, steps, later = [], [], [], []
        for slot, ep, k in pending:
            plan = pool.expert_actions(slot)
            if not plan:
                ep.injection = {"skipped": "the expert has no plan here"}
                continue
            done = ep.trajectory.steps
            if len(done) + 1 < k and len(plan) > 1:  # at least one expert action is left for the error to precede
                last = done[-1].observation if done else ep.trajectory.task
                step = Step(thought=explain(plan[0], plan[1:], last or ""), action=plan[0], kind="expert")
                later.append((slot, ep, k))
            else:
                action, error = injected_error(injection, ep.task, pool.valid_actions(slot), plan)
                step = Step(thought=NEUTRAL_THOUGHT, action=action, kind="injected", weight=0)
                ep.injection = {"step": len(done) + 1, "action": action, "error": error, "steps_to_plan": None}
                ep.awaiting_plan = True
            slots.append(slot)
            eps.append(ep)
            steps.append(step)
        if steps:
            _execute(pool, slots, eps, steps, totals)
        pending = [(s, ep, k) for s, ep, k in later if not ep.done and ep.failure is None]


def _note_back_on_plan(episodes: list[Episode], steps: list[Step], plans: list[list[str] | None]) -> None:
    """After an injected error: the agent's first action that is the expert's next action of its moment ends the
    detour (an action further down the plan, e.g. `take coin` two rooms away, is not yet a way back)."""
    for ep, st, plan in zip(episodes, steps, plans):
        if ep.awaiting_plan and plan and " ".join(st.action.split()) == plan[0]:
            ep.awaiting_plan = False
            ep.injection["steps_to_plan"] = len(ep.trajectory.steps) - ep.injection["step"]


def _student_step(reply: str) -> Step:
    parsed = parse_react(reply)
    if parsed is None:  # kept as written so the trajectory shows what the model produced
        return Step(thought=reply.strip(), action="", kind="student", weight=1)
    return Step(thought=parsed.thought, action=parsed.action, kind="student", weight=1)


def _execute(pool: EnvPool, slots: list[int], episodes: list[Episode], steps: list[Step], totals: RolloutTotals,
             wants_plan: Callable[[Episode], bool] | None = None) -> None:
    """Append each step to its episode and run its action; an invalid step gets the format observation. Episodes
    for which `wants_plan` holds get the expert's plan from the new state in the same round trip."""
    want = {i: wants_plan is not None and wants_plan(ep) for i, ep in enumerate(episodes)}
    calls = [(s, st.action, want[i]) for i, (s, st) in enumerate(zip(slots, steps)) if st.action]
    t0 = time.perf_counter()
    if not calls:
        outcomes = iter(())
    elif any(w for _, _, w in calls):
        outcomes = iter(pool.step_many_with_plans(calls))
    else:  # the plain call: pools without an expert (benchmarks' scripted pools) need only step_many
        outcomes = iter((res, None) for res in pool.step_many([(s, a) for s, a, _ in calls]))
    dt = time.perf_counter() - t0
    totals.env_seconds += dt
    for i, (ep, st) in enumerate(zip(episodes, steps)):
        ep.trajectory.steps.append(st)
        ep.steps_taken += 1
        totals.agent_steps += 1
        ep.reward_before = ep.trajectory.reward
        if not st.action:  # nothing ran: the state, and so a fresh plan, stays as it was
            ep.invalid_actions += 1
            st.observation, st.invalid = INVALID_FORMAT_OBSERVATION, True
            continue
        outcome, plan = next(outcomes)
        ep.plan, ep.plan_fresh = plan, want[i]
        _apply(ep, st, outcome)


def _apply(ep: Episode, st: Step, outcome: StepResult | Any) -> None:
    if not isinstance(outcome, StepResult):
        st.observation = ""
        ep.failure = f"env step: {getattr(outcome, 'reason', outcome)}"
        return
    st.observation = outcome.observation
    if "invalid" in outcome.info:  # recorded either way, so a run without a refused action reads as such
        st.invalid = bool(outcome.info["invalid"])
        ep.invalid_actions += st.invalid
    ep.trajectory.reward = min(1.0, max(0.0, float(outcome.reward)))
    ep.trajectory.success = ep.trajectory.reward >= 1.0 or bool(outcome.info.get("won"))
    ep.done = bool(outcome.done)


def _judge_and_correct(pool: EnvPool, slots: list[int], episodes: list[Episode], steps: list[Step],
                       plans: list[list[str] | None], teacher: Teacher, totals: RolloutTotals,
                       wants_plan: Callable[[Episode], bool]) -> None:
    batch, items = [], []
    for i, (ep, st, plan) in enumerate(zip(episodes, steps, plans)):
        if ep.failure is not None:  # a failed env step has nothing to judge; counted so that every step is accounted
            ep.teacher.add(Verdict(why_unjudged=ep.failure), len(ep.trajectory.steps) - 1)
            continue
        batch.append(i)
        items.append(StepToJudge(task=ep.task, task_text=ep.trajectory.task, history=ep.trajectory.steps[:-1],
                                 step=st, reward_before=ep.reward_before, reward_after=ep.trajectory.reward,
                                 done=ep.done, invalid=bool(st.invalid), plan_before=plan,
                                 plan_after=ep.plan if ep.plan_fresh else None))
    if not batch:
        return
    t0 = time.perf_counter()
    verdicts = teacher.judge(items)
    totals.judge_seconds += time.perf_counter() - t0
    if len(verdicts) != len(batch):
        raise ValueError(f"teacher returned {len(verdicts)} verdicts for {len(batch)} steps")

    fix_slots, fix_eps, fixes = [], [], []
    for i, v in zip(batch, verdicts):
        ep, st, crit = episodes[i], steps[i], v.critique
        ep.teacher.add(v, len(ep.trajectory.steps) - 1)
        if crit is None or not crit.is_error:
            continue
        st.kind, st.weight, st.critique = "error", 0, crit
        if ep.done or ep.steps_taken >= pool.max_steps(ep.task) or not crit.corrected_action.strip():
            continue  # nothing left to correct in, or the teacher gave no corrected action
        thought = " ".join(p for p in (crit.reflection.strip(), crit.corrected_thought.strip()) if p)
        fix_slots.append(slots[i])
        fix_eps.append(ep)
        fixes.append(Step(thought=thought, action=crit.corrected_action.strip(), kind="reflection", weight=1))
    if fixes:
        _execute(pool, fix_slots, fix_eps, fixes, totals, wants_plan)
        for ep in fix_eps:
            ep.teacher.corrected += 1


class _Progress:
    """Episodes done, episodes/s and the running mean reward: a rich bar on a terminal; where output goes to a file
    or a pipe (a log, a batch job), or with a `label` (runs in parallel share the terminal), a plain line on stderr
    every `every` episodes (default: a tenth of the run)."""

    def __init__(self, total: int, enabled: bool, every: int | None = None, label: str | None = None):
        from rich.console import Console

        self.enabled = enabled and total > 0
        self.total = total
        self.n = 0
        self.reward_sum = 0.0
        self.failed = 0  # failed episodes, said once at the end with the first one's reason
        self.first_failure: str | None = None
        self.start = time.perf_counter()
        self.every = every or max(1, total // 10)
        self.progress = None
        self.prefix = f"{label}  " if label else ""
        if self.enabled and label is None and Console(stderr=True).is_terminal and Console().is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("episodes"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]:.2f} ep/s  reward {task.fields[reward]:.1f}"),
                                     TimeElapsedColumn())
            self.task = self.progress.add_task("rollout", total=total, rate=0.0, reward=0.0)
            self.progress.start()

    def advance(self, ep: Episode) -> None:
        self.n += 1
        self.reward_sum += ep.reward
        if ep.failure is not None:
            self.failed += 1
            self.first_failure = self.first_failure or ep.failure
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate, reward = self.n / max(1e-9, elapsed), 100 * self.reward_sum / self.n
        if self.progress is not None:
            self.progress.update(self.task, advance=1, rate=rate, reward=reward)
        elif self.n % self.every == 0 or self.n == self.total:
            print(f"{self.prefix}episodes {self.n}/{self.total}  {rate:.2f} ep/s  reward {reward:.1f}  "
                  f"{int(elapsed) // 60}:{int(elapsed) % 60:02d} elapsed", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.enabled and self.failed:
            first = (self.first_failure.strip().splitlines() or [""])[0][:200]
            print(f"{self.prefix}warning: {self.failed} of {self.n} episodes failed and count as failures "
                  f"(first: {first})", file=sys.stderr, flush=True)
