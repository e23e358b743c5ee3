"""The Monte-Carlo teacher: judges a step by what the student itself achieves from the states before and after it.

No teacher model and no expert (as IPR, arXiv 2406.11176, and STeCa, arXiv 2502.14276, estimate step values):
  * the value of a state is the mean final reward (success, for 0/1 environments) of `rollouts` continuations of the
    student, sampled at `temperature`, from that state, within the episode's remaining step budget;
  * a state is reached by replaying the episode's executed actions from a fresh reset; every replayed observation
    must equal the recorded one, else the replay diverged and the step is left unjudged (counted, with the reason);
  * a step is an error when value(after) < value(before) - `margin`;
  * the correction is the best-valued candidate next action from the state the wrong step left: the first actions
    the student sampled there, plus the environment's valid actions when it lists at most `max_valid_candidates`;
    it is offered only when it beats carrying on from that state.
All rollouts of a batch of steps run together: one `backend.complete` per round for every live rollout and one
`step_many` for their actions, in the teacher's own environment pool. Values are cached per state (task, the
steps so far: thoughts and actions, which the student's prompt holds), and every rollout draws from seeds derived from (seed, state, rollout index, turn), so two
runs, or a run and its resume, judge alike.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field

from steptune.backends.base import BackendError, ChatBackend, GenerationConfig
from steptune.data.prompt import approx_token_count, build_conversation
from steptune.data.react import INVALID_FORMAT_OBSERVATION, REACT_STOP, parse_react
from steptune.data.trajectory import Critique, Step, Trajectory, one_line
from steptune.envs.base import Reset, StepResult, TaskRef
from steptune.errors import UserError
from steptune.teacher.base import StepToJudge, TeacherContext, TeacherSettings, Verdict, what_i_did


class MCSettings(TeacherSettings):
    """The Monte-Carlo teacher's settings (`synthesis.teacher: {name: mc, rollouts: 5, ...}`)."""

    name: Literal["mc"] = "mc"
    rollouts: int = Field(5, ge=1)  # per state (IPR and STeCa use 5)
    temperature: float = Field(1.0, gt=0)  # the rollouts sample (IPR and STeCa use 1)
    # a step is wrong when value(after) < value(before) - margin; with 5 rollouts, 0.2 asks that at least two more
    # rollouts fail after the step than before it (docs/teachers.md says how it was chosen)
    margin: float = Field(0.2, ge=0, lt=1)
    max_valid_candidates: int = Field(10, ge=0)  # the env's valid actions join the candidates when at most this many
    slots: int | None = Field(None, ge=1)  # environments for the rollouts; None: 2 per synthesis worker

    def build(self, ctx: TeacherContext) -> tuple[MCTeacher, MCTeacher]:
        if ctx.make_pool is None:
            raise ValueError("teacher 'mc' needs environments of its own (TeacherContext.make_pool)")
        teacher = MCTeacher(ctx.student, ctx.make_pool(self.slots or 2 * ctx.workers), rollouts=self.rollouts,
                            temperature=self.temperature, margin=self.margin,
                            max_valid_candidates=self.max_valid_candidates, max_new_tokens=ctx.max_new_tokens,
                            seed=ctx.seed)
        return teacher, teacher  # synthesis closes it: its environments


class CannotReplayError(UserError, ValueError):
    """The environment cannot reach a state again by replaying actions, which the MC teacher needs."""


@dataclass(frozen=True)
class _State:
    task: TaskRef
    # the steps so far as (thought, action): the actions reach the state, the thoughts are in the student's prompt (so a
    # value never depends on which episode asked first, and a resumed run judges like an uninterrupted one)
    steps: tuple[tuple[str, str], ...]

    @property
    def used(self) -> int:  # steps used so far, those without an action included: they count against the budget
        return len(self.steps)


@dataclass
class _Estimate:
    rewards: list[float] = field(default_factory=list)  # final reward per finished rollout
    first_actions: list[str] = field(default_factory=list)  # what the student did first, per finished rollout
    valid: list[str] | None = None  # the environment's valid actions in this state, where it lists them
    diverged: str | None = None
    failures: list[str] = field(default_factory=list)
    rollouts: int = 0
    rollout_steps: int = 0
    charged: bool = False  # its cost is on one verdict already

    @property
    def value(self) -> float | None:  # None: no rollout finished (diverged replay, failures)
        return None if self.diverged is not None or not self.rewards else sum(self.rewards) / len(self.rewards)


@dataclass
class _Rollout:
    state: _State
    task_text: str  # as recorded: the reset must show the same
    prefix: list[Step]  # replayed in order; the recorded observations must come back (None: not checked)
    index: int
    trajectory: Trajectory
    slot: int = -1
    steps: int = 0  # student steps taken after the replay
    reward: float = 0.0
    done: bool = False
    failure: str | None = None


def _forced(action: str) -> Step:
    """A candidate correction, replayed before the student continues (its observation is not known yet)."""
    return Step(thought=f"I should {action}.", action=action, kind="reflection", observation=None)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


@dataclass
class MCTeacher:
    """A Teacher (steptune.teacher.base) that estimates step values from the student's own rollouts.

    `pool` is an environment pool of its own (steptune.envs.pool.EnvPool or the same interface); the teacher owns it
    and closes it in `close()`."""

    backend: ChatBackend
    pool: Any
    rollouts: int = 5
    temperature: float = 1.0
    margin: float = 0.2
    max_valid_candidates: int = 10
    max_new_tokens: int = 64
    seed: int = 0
    name: str = "mc"
    uses_expert_plan: bool = False
    cache: dict[_State, _Estimate] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self):
        if not getattr(self.pool.spec, "replays_exactly", True):
            raise CannotReplayError(f"teacher 'mc' needs an environment that replays exactly from a reset; "
                                    f"{self.pool.env_name} does not")

    def close(self) -> None:
        self.pool.close()

    # ---------------------------------------------------------------------------------------------------------
    def judge(self, steps: list[StepToJudge]) -> list[Verdict]:
        t0 = time.perf_counter()
        before = [self._state(s.task, s.history) for s in steps]
        after = [self._state(s.task, [*s.history, s.step]) for s in steps]
        wanted = {}
        for s, b, a in zip(steps, before, after):
            wanted[b] = (s.task_text, s.history)
            if not s.done:
                wanted[a] = (s.task_text, [*s.history, s.step])
        self._estimate(wanted)
        verdicts: list[Verdict] = []
        fixes: dict[_State, tuple[str, list[Step]]] = {}  # candidate states of the flagged steps
        for s, b, a in zip(steps, before, after):
            v = Verdict()
            eb, ea = self.cache[b], (None if s.done else self.cache[a])
            self._charge(v, eb, ea)
            bad = next((e for e in (eb, ea) if e is not None and e.value is None), None)
            if bad is not None:
                v.why_unjudged = (f"replay diverged: {bad.diverged}" if bad.diverged else
                                  f"no rollout finished: {'; '.join(bad.failures[:2]) or 'unknown'}")
                verdicts.append(v)
                continue
            value_after = (s.reward_after if s.done else ea.value)
            v.values = (eb.value, value_after)
            if value_after < eb.value - self.margin - 1e-9:
                v.critique = Critique(is_error=True, teacher=self.name)
                if not s.done and a.used < self.pool.max_steps(s.task):
                    for c in self._candidates(ea):
                        fixes.setdefault(self._then(a, c), (s.task_text, [*s.history, s.step, _forced(c)]))
            else:
                v.critique = Critique(is_error=False, teacher=self.name)
            v.critique.reason = (f"Monte-Carlo value {eb.value:.2f} before the step, {value_after:.2f} after "
                                 f"({self.rollouts} rollouts each at T={self.temperature:g}; margin {self.margin:g})")
            verdicts.append(v)
        self._estimate(fixes)
        for s, a, v in zip(steps, after, verdicts):
            if v.critique is not None and v.critique.is_error:
                self._correct(s, a, v)
        # keep only what the next call can use: the states the episodes go on from (a student step's "before" is the
        # previous step's "after"). So an episode never inherits another's rollouts, and its accounting is the same
        # whether or not the run was resumed in between.
        self.cache = {a: self.cache[a] for s, a in zip(steps, after)
                      if not s.done and a.used < self.pool.max_steps(s.task) and a in self.cache}
        self.seconds += time.perf_counter() - t0
        return verdicts

    def _correct(self, s: StepToJudge, a: _State, v: Verdict) -> None:
        crit = v.critique
        did = what_i_did(s.step.action)
        if s.done:
            crit.error = f"'{s.step.action}' ended the episode without finishing the task"
            crit.reflection = f"{did}, and that ended my attempt before the goal was reached."
            return
        ea = self.cache[a]
        crit.error = f"'{s.step.action or '(no action)'}' made the task less likely to succeed"
        lost = "I can hardly reach the goal from here any more" if ea.value == 0 else \
            "I am less likely to reach the goal from here than I was before"
        if a.used >= self.pool.max_steps(s.task):  # no step left for a correction
            crit.reflection = f"{did}, but thinking ahead, {lost}."
            return
        scored = []
        for c in self._candidates(ea):
            e = self.cache[self._then(a, c)]
            self._charge(v, e)
            if e.value is not None:
                scored.append((e.value, c))
        best = max(scored, key=lambda vc: vc[0], default=None)  # max keeps the first of equals: candidates' order
        if best is None or best[0] <= ea.value:
            crit.reflection = f"{did}, but thinking ahead, {lost}, and no next move I can see makes it much better."
            return
        _, c = best
        crit.reason += f"; best next action '{c}' has value {best[0]:.2f}"
        crit.reflection = (f"{did}, but thinking ahead, {lost}: that step was a mistake. Of the moves open to me "
                           f"now, {c} is the one that most often leads to the goal.")
        crit.corrected_thought = f"So I should {c}."
        crit.corrected_action = c

    def _candidates(self, e: _Estimate) -> list[str]:
        """The student's own first actions, most frequent first, then the listed valid actions (if few)."""
        counts: dict[str, int] = {}
        for act in e.first_actions:
            if act:
                counts[act] = counts.get(act, 0) + 1
        out = sorted(counts, key=lambda act: -counts[act])
        if e.valid is not None and len(e.valid) <= self.max_valid_candidates:
            out += [act for act in e.valid if act not in counts]
        return out

    def _charge(self, v: Verdict, *estimates: _Estimate | None) -> None:
        """Each state's rollouts are paid once, by the first verdict that used them."""
        for e in estimates:
            if e is not None and not e.charged:
                e.charged = True
                v.rollouts += e.rollouts
                v.rollout_steps += e.rollout_steps
                v.failed_rollouts += len(e.failures)
                v.replay_diverged += e.diverged is not None

    @staticmethod
    def _state(task: TaskRef, steps: Sequence[Step]) -> _State:
        return _State(task, tuple((s.thought, s.action) for s in steps))

    @staticmethod
    def _then(state: _State, action: str) -> _State:
        return _State(state.task, (*state.steps, (_forced(action).thought, action)))

    # ---------------------------------------------------------------------------------------------------------
    def _estimate(self, wanted: dict[_State, tuple[str, list[Step]]]) -> None:
        """Fill the cache for the states not in it: `rollouts` rollouts each, all in one batched loop."""
        todo = [(st, text, prefix) for st, (text, prefix) in wanted.items() if st not in self.cache]
        jobs = []
        for st, text, prefix in todo:
            self.cache[st] = _Estimate()
            for i in range(self.rollouts):
                traj = Trajectory(id=f"mc:{st.task.id}", env=st.task.env, task_id=st.task.id, split=st.task.split,
                                  instruction=self.pool.instruction(), task="")
                jobs.append(_Rollout(st, text, prefix, i, traj))
        if not jobs:
            return
        for r in self._run(jobs):
            e = self.cache[r.state]
            e.rollouts += 1
            e.rollout_steps += r.steps
            if r.failure is None:
                e.rewards.append(r.reward)
                e.first_actions.append(r.trajectory.steps[len(r.prefix)].action if r.steps else "")
            elif r.failure.startswith("diverged: "):
                e.diverged = e.diverged or r.failure.removeprefix("diverged: ")
            else:
                e.failures.append(r.failure)

    def _run(self, jobs: list[_Rollout]) -> list[_Rollout]:
        """Every rollout to its end: as many at once as the pool has slots, one model call per round for all."""
        pool, backend = self.pool, self.backend
        window = getattr(backend, "context_window", None)
        max_context = window - self.max_new_tokens if window else None
        count_tokens = getattr(backend, "count_tokens", approx_token_count)
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed,
                               stop=list(REACT_STOP))
        queue, active, finished = list(reversed(jobs)), {}, []

        def over(r: _Rollout) -> bool:
            return r.failure is not None or r.done or r.state.used + r.steps >= pool.max_steps(r.state.task)

        while queue or active:
            starting = []
            for slot in range(pool.size):
                if queue and slot not in active:
                    r = queue.pop()
                    r.slot = slot
                    starting.append(r)
            self._replay(starting)
            for r in starting:
                if over(r):
                    finished.append(r)
                else:
                    active[r.slot] = r
            if not active:
                continue
            rs = [active[s] for s in sorted(active)]
            convs = [build_conversation(r.trajectory, None, max_context, count_tokens)[0] for r in rs]
            seeds = [_seed(self.seed, r.state, r.index, r.steps) for r in rs]
            try:
                replies: list[str | None] = backend.complete(convs, replace(gen, row_seeds=seeds))
            except BackendError as e:
                replies, errors = e.per_conversation(len(rs))
                for i, why in errors.items():
                    rs[i].failure = f"backend: {why}"
            stepping = []
            for r, reply in zip(rs, replies):
                if r.failure is not None:
                    continue
                parsed = parse_react(reply or "")
                st = Step(thought=parsed.thought if parsed else (reply or "").strip(),
                          action=parsed.action if parsed else "")
                r.trajectory.steps.append(st)
                r.steps += 1
                if st.action:
                    stepping.append((r, st))
                else:
                    st.observation = INVALID_FORMAT_OBSERVATION
            for (r, st), res in zip(stepping, pool.step_many([(r.slot, st.action) for r, st in stepping])):
                self._apply(r, st, res)
            for r in rs:
                if over(r):
                    finished.append(active.pop(r.slot))
        return finished

    def _replay(self, rollouts: list[_Rollout]) -> None:
        """Reset and replay each rollout's prefix, all slots in lockstep; check every observation against the record;
        the first rollout of each state also asks for the valid actions there."""
        if not rollouts:
            return
        resets = self.pool.reset_many([(r.slot, r.state.task) for r in rollouts], expert=False)  # no plan is asked
        for r, reset in zip(rollouts, resets):
            if not isinstance(reset, Reset):
                r.failure = f"env reset: {getattr(reset, 'reason', reset)}"
            elif r.task_text and reset.task != r.task_text:
                r.failure = (f"diverged: the reset shows {one_line(reset.task, 80)!r}, "
                             f"the record {one_line(r.task_text, 80)!r}")
            else:
                r.trajectory.task = reset.task
        for k in range(max(len(r.prefix) for r in rollouts)):
            stepping = []
            for r in rollouts:
                if r.failure is None and k < len(r.prefix):
                    rec = r.prefix[k]
                    st = Step(thought=rec.thought, action=rec.action, kind=rec.kind, weight=rec.weight)
                    r.trajectory.steps.append(st)
                    if rec.action:
                        stepping.append((r, st, rec.observation))
                    else:
                        st.observation = rec.observation
            results = self.pool.step_many([(r.slot, st.action) for r, st, _ in stepping]) if stepping else []
            for (r, st, recorded), res in zip(stepping, results):
                self._apply(r, st, res)
                if r.failure is None and recorded is not None and st.observation != recorded:
                    r.failure = (f"diverged: at step {k + 1} ({st.action!r}) the replay saw "
                                 f"{one_line(st.observation, 80)!r}, the record {one_line(recorded, 80)!r}")
        for r in rollouts:
            e = self.cache[r.state]
            if r.index == 0 and r.failure is None and not r.done:
                e.valid = self.pool.valid_actions(r.slot)

    @staticmethod
    def _apply(r: _Rollout, st: Step, res: StepResult | Any) -> None:
        if not isinstance(res, StepResult):
            st.observation = ""
            r.failure = f"env step: {getattr(res, 'reason', res)}"
            return
        st.observation = res.observation
        r.reward = min(1.0, max(0.0, float(res.reward)))
        r.done = bool(res.done) or bool(res.info.get("won"))
