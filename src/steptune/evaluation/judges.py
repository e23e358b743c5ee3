"""How good is a judge? Its flags against the expert-grounded teacher's verdicts on the same steps.

Each synthesized trajectory is replayed in the real environment; before and after every step the student chose
(kinds "student" and "error"; the teacher's own corrections are replayed, not judged) the environment's expert
re-plans, and the expert-grounded teacher (steptune.teacher.expert) judges the step as it would have during
synthesis. Precision: of the steps the judge flagged, the share the expert flags too; recall: of the steps the expert
flags, the share the judge flagged. A step the judge left unjudged stays a plain step, so it counts as not flagged;
a step the expert cannot judge (no plan) is left out, and so is the rest of a trajectory whose replay diverged.

A judge that scores states (the Monte-Carlo teacher records each judged step's value before and after it) also gets a
margin sweep: the flags it would have raised at other margins, on the same steps, against the same expert verdicts.
Those steps are the ones the run reached with its own margin; a run at another margin would correct other steps and
reach other states, so the sweep compares margins on one set of states, not whole runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steptune.data.trajectory import Trajectory
from steptune.envs.base import Reset, StepResult, TaskRef
from steptune.teacher.base import StepToJudge
from steptune.teacher.expert import ExpertTeacher

JUDGED_KINDS = ("student", "error")
SWEEP_MARGINS = (0.0, 0.2, 0.4, 0.6, 0.8)


@dataclass
class Agreement:
    tp: int = 0  # flagged by both
    fp: int = 0  # flagged by the judge only
    fn: int = 0  # flagged by the expert only
    tn: int = 0
    expert_unjudged: int = 0  # steps the expert had no plan for
    diverged: int = 0  # trajectories whose replay did not reproduce the record (their remaining steps left out)
    examples: list[dict] = field(default_factory=list)  # a few disagreements, to read
    valued: list[tuple[float, float, bool]] = field(default_factory=list)  # (value before, after, expert flag)

    def add(self, judge: bool, expert: bool, example: dict) -> None:
        if judge and expert:
            self.tp += 1
        elif judge:
            self.fp += 1
        elif expert:
            self.fn += 1
        else:
            self.tn += 1
        if judge != expert and len(self.examples) < 10:
            self.examples.append({**example, "judge": judge, "expert": expert})

    def summary(self) -> dict:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        f1 = 2 * p * r / (p + r) if p and r else None
        steps = self.tp + self.fp + self.fn + self.tn
        return {"steps": steps, "judge_flags": self.tp + self.fp, "expert_flags": self.tp + self.fn,
                "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                "precision": None if p is None else round(p, 3), "recall": None if r is None else round(r, 3),
                "f1": None if f1 is None else round(f1, 3),
                "agreement": round((self.tp + self.tn) / steps, 3) if steps else None,
                "expert_unjudged": self.expert_unjudged, "diverged_trajectories": self.diverged,
                **({"margin_sweep": self.margin_sweep()} if self.valued else {}),
                "disagreements": self.examples}

    def margin_sweep(self, margins=SWEEP_MARGINS) -> list[dict]:
        """Precision, recall and F1 had the judge flagged `after < before - margin`, for each margin."""
        rows = []
        for m in margins:
            at = Agreement()
            for before, after, expert in self.valued:
                at.add(after < before - m - 1e-9, expert, {})
            s = at.summary()
            rows.append({"margin": m, **{k: s[k] for k in ("judge_flags", "tp", "fp", "fn", "precision", "recall",
                                                           "f1")}})
        return rows


def _task_of(t: Trajectory) -> TaskRef:
    env, name, variation = t.task_id.split("/", 2)
    return TaskRef(env, name, int(variation) if variation.lstrip("-").isdigit() else variation, t.split)


def compare_with_expert(trajs: list[Trajectory], pool) -> Agreement:
    """Replay every trajectory in `pool` (steptune.envs.pool.EnvPool), `pool.size` at a time in lockstep."""
    expert, out = ExpertTeacher(), Agreement()
    for i in range(0, len(trajs), pool.size):
        chunk = trajs[i : i + pool.size]
        resets = pool.reset_many([(slot, _task_of(t)) for slot, t in enumerate(chunk)])
        live = {slot for slot, r in enumerate(resets) if isinstance(r, Reset)}
        out.diverged += len(chunk) - len(live)
        plans = dict(zip(sorted(live), pool.expert_actions_many(sorted(live))))
        rewards = dict.fromkeys(live, 0.0)
        for k in range(max(len(t.steps) for t in chunk)):
            calls = [(slot, chunk[slot].steps[k]) for slot in sorted(live) if k < len(chunk[slot].steps)]
            ran = [(slot, st) for slot, st in calls if st.action]
            results = dict(zip([s for s, _ in ran], pool.step_many_with_plans([(s, st.action, True) for s, st in ran])))
            for slot, st in calls:
                t = chunk[slot]
                before, after = plans[slot], plans[slot]
                reward_after, done, invalid = rewards[slot], False, not st.action
                if st.action:
                    res, after = results[slot]
                    if not isinstance(res, StepResult) or res.observation != st.observation:
                        live.discard(slot)
                        out.diverged += 1
                        continue
                    reward_after, done, invalid = res.reward, res.done, bool(res.info.get("invalid"))
                if st.kind in JUDGED_KINDS:
                    # as the rollout passes it: an action the environment refused is an error whatever the plan
                    item = StepToJudge(task=_task_of(t), task_text=t.task, history=t.steps[:k], step=st,
                                       reward_before=rewards[slot], reward_after=reward_after, done=done,
                                       invalid=invalid, plan_before=before, plan_after=after)
                    v = expert.judge_one(item)
                    if v.critique is None:
                        out.expert_unjudged += 1
                    else:
                        values = t.meta.get("teacher_counts", {}).get("step_values", {}).get(str(k))
                        if values is not None:
                            out.valued.append((values[0], values[1], v.critique.is_error))
                        out.add(st.kind == "error", v.critique.is_error,
                                {"trajectory": t.id, "step": k + 1, "action": st.action,
                                 "expert_next": (before or [""])[0]})
                plans[slot], rewards[slot] = after, reward_after
    return out
