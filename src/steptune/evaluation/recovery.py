"""The recovery benchmark's metrics (the injected error itself: steptune.agent.injection), per split, paired with
the same tasks' episodes without injection:
  * success and reward with injection;
  * recovery rate: success with injection ÷ success without, on the tasks run both ways;
  * steps to the plan: agent steps from the injection to its first action that is the expert's next action of
    that moment (1 = the very next action undoes or routes around the error), and the share of episodes that ever
    get back on the plan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from steptune.data.react import INVALID_FORMAT_OBSERVATION
from steptune.teacher.base import REFLECTION_OPENINGS


def injection_summary(normal: list, injected: list) -> dict[str, dict[str, Any]]:
    """Per split: the metrics above, from trajectories run without and with injection."""
    without = {t.id: t for t in normal}
    by_split: dict[str, list] = defaultdict(list)
    for t in injected:
        by_split[t.split or "unknown"].append(t)
    out = {}
    for split, trajs in sorted(by_split.items()):
        info = [t.meta.get("injection") or {} for t in trajs]
        hit = [i for i in info if "action" in i]
        back = [i["steps_to_plan"] for i in hit if i.get("steps_to_plan") is not None]
        paired = [(t, without[t.id]) for t in trajs if t.id in without]
        base_success = sum(w.success for _, w in paired)
        n = len(trajs)
        out[split] = {
            "episodes": n,
            "injected": len(hit),
            "off_plan": sum(i.get("error") == "off_plan" for i in hit),
            "success_rate": round(100 * sum(t.success for t in trajs) / n, 2) if n else 0.0,
            "avg_reward": round(100 * sum(t.reward for t in trajs) / n, 2) if n else 0.0,
            "paired_episodes": len(paired),
            "success_without": round(100 * base_success / len(paired), 2) if paired else None,
            "recovery_rate": round(sum(t.success for t, _ in paired) / base_success, 3) if base_success else None,
            "back_on_plan": round(100 * len(back) / len(hit), 2) if hit else None,
            "steps_to_plan": round(sum(back) / len(back), 2) if back else None,
        }
    return out


def by_injected_action(normal: list, injected: list) -> dict[str, dict[str, int]]:
    """The recovery benchmark by the kind of wrong action injected: its first word for a valid one (`open`, `put`,
    `move`, ...), "invalid" for the action no environment accepts (steptune.agent.injection.INVALID_ACTION), "none"
    where the episode ended before the injection step. Counts episodes, those won with the error, and those whose
    task was won without it: which mistakes a method repairs, not only how many."""
    without = {t.id: t.success for t in normal}
    out: dict[str, dict[str, int]] = {}
    for t in injected:
        row = out.setdefault(injected_kind(t), {"episodes": 0, "won": 0, "won_without": 0})
        row["episodes"] += 1
        row["won"] += t.success
        row["won_without"] += without.get(t.id, False)
    return out


def injected_kind(t) -> str:
    """`by_injected_action`'s row of an injected episode."""
    injection = t.meta.get("injection") or {}
    if not injection.get("action"):
        return "none"
    return "invalid" if injection.get("error") == "invalid" else injection["action"].split()[0]


# A mistake never repaired: a greedy agent that does not notice one repeats it, step after step, until the step
# budget ends (every lost episode of the SmolLM2 study's base agent did; docs/smollm2.md)
REPEATED = 5


def ends_repeating(t) -> bool:
    """The episode was lost repeating one action over its last REPEATED steps (or an evaluation's `max_repeats`
    ended it sooner)."""
    actions = {st.action for st in t.steps[-REPEATED:]}
    return not t.success and (t.meta.get("stopped") == "repeating" or len(t.steps) >= REPEATED and len(actions) == 1)


def reflections_at_test_time(trajs: list, examples: int = 3) -> dict[str, Any]:
    """The agent's own reflections at test time: steps whose thought opens as the built-in teachers' reflections do
    (steptune.teacher.base.REFLECTION_OPENINGS; an LLM teacher's free-form reflections are not recognised).

    Counts the episodes with at least one, how many of those succeeded, and keeps up to `examples` of the successful
    ones (the step before the reflection, the reflection and what the agent did next), its own mistakes first: an
    injected step (the recovery benchmark) is not the agent's. Also counts the episodes lost repeating one action
    (`ends_repeating`): mistakes the agent did not repair, and the agent's steps whose reply had no `Action:`
    (`steps_without_action`, of `agent_steps`): a turn cut by the token budget is one. `repeated_after_reflection`:
    the episodes in which the agent took again an action it had reflected on, at the reflection's step or later
    (a reflection that did not stick: partial masking is meant to keep the agent from learning its wrong steps)."""
    found, shown, repeated = [], [], 0
    for t in trajs:
        injected_at = (t.meta.get("injection") or {}).get("step")  # 1-based
        hits = [i for i, st in enumerate(t.steps) if i > 0 and _reflects(st.thought)]
        if not hits:
            continue
        found.append(t)
        repeated += any(_takes_again(t.steps, i) for i in hits)
        if t.success:
            i = hits[0]
            prev, st = t.steps[i - 1], t.steps[i]
            shown.append({"id": t.id, "split": t.split, "step": i, "own_mistake": injected_at != i,  # step i: 1-based
                          "before": {"action": prev.action, "observation": prev.observation},
                          "reflection": st.thought, "action": st.action, "observation": st.observation,
                          "steps": len(t.steps)})
    shown.sort(key=lambda e: not e["own_mistake"])  # stable: the agent's own mistakes first, in episode order
    return {"episodes": len(trajs), "with_reflection": len(found), "succeeded": sum(t.success for t in found),
            "reflection_steps": sum(_reflects(st.thought) for t in found for st in t.steps[1:]),
            "ended_repeating": sum(map(ends_repeating, trajs)), "repeated_after_reflection": repeated,
            **dict(zip(("steps_without_action", "agent_steps"), steps_without_action(trajs))),
            "examples": shown[:examples]}


def steps_without_action(trajs: list) -> tuple[int, int]:
    """(the agent's steps whose reply had no `Action:`, all the agent's steps): an injected step is not the agent's,
    and a turn cut by the token budget is one without."""
    steps = [st for t in trajs for st in t.steps if st.kind != "injected"]
    return sum(st.observation == INVALID_FORMAT_OBSERVATION for st in steps), len(steps)


def _takes_again(steps: list, i: int) -> bool:
    """Whether the agent, reflecting at step `i` on step i-1's action, takes that action again at `i` or later (an
    injected step is not the agent's)."""
    action = steps[i - 1].action
    return bool(action) and any(st.action == action and st.kind != "injected" for st in steps[i:])


def _reflects(thought: str | None) -> bool:
    return (thought or "").lstrip().startswith(REFLECTION_OPENINGS)
