"""The LLM teacher: a (larger) model judges each student step and writes the reflection and correction.

It answers in JSON, validated against `Judgement`; an invalid answer gets one repair round (the validation
error is sent back); a second failure leaves the step unjudged and is counted — never a crash, never a label
guessed from a broken answer. With the student's own backend it is the self-teacher (the paper's first open
question: can the agent be its own teacher?).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from steptune.agent.backends.base import BackendError, ChatBackend, GenerationConfig
from steptune.data.trajectory import Critique, Step, format_observation, format_react

SYSTEM = (
    "You are an expert teacher watching a student agent act in a text environment. After each of its steps you "
    "decide whether the step was a mistake: an invalid action, an action that does not move the task forward, "
    "or one that undoes progress. Judge the step that was just taken, given the task and the history. "
    "Answer with one JSON object and nothing else:\n"
    '{"is_error": true|false, "error": "what went wrong", "reason": "why it is wrong", '
    '"reflection": "first-person text the agent could think on noticing the mistake, naming the missing '
    'subgoal", "corrected_thought": "the right reasoning now", "corrected_action": "the right next action, '
    'exactly as the environment accepts it"}\n'
    "If the step is fine, answer {\"is_error\": false} (other fields may be empty). The corrected action must be "
    "valid from the state the wrong step left the world in.")
SELF_SYSTEM = SYSTEM.replace("You are an expert teacher watching a student agent", "You are an agent reviewing "
                             "your own last step")


class Judgement(BaseModel):
    is_error: bool
    error: str = ""
    reason: str = ""
    reflection: str = ""
    corrected_thought: str = ""
    corrected_action: str = ""


def parse_judgement(text: str) -> Judgement:
    """The first JSON object in the reply (models like to wrap it in prose or ```json fences)."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError("no JSON object in the reply")
    try:
        data = json.loads(m.group(0))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from e
    j = Judgement.model_validate(data)
    if j.is_error and not j.corrected_action.strip():
        raise ValueError("is_error is true but corrected_action is empty")
    return j


def judge_prompt(task: str, history: list[Step], step: Step, golden: str | None) -> str:
    lines = [f"Task:\n{task}", ""]
    if golden:
        lines += ["A reference solution of this task by an expert (the student need not follow it exactly):",
                  golden, ""]
    if history:
        lines.append("History so far:")
        for s in history:
            lines += [format_react(s.thought, s.action), format_observation(s.observation or "")]
        lines.append("")
    lines += ["The step to judge:", format_react(step.thought, step.action),
              format_observation(step.observation or ""), "", "Your JSON judgement:"]
    return "\n".join(lines)


@dataclass
class LLMTeacher:
    backend: ChatBackend
    name: str = "llm"
    self_teacher: bool = False
    golden: dict[str, str] = field(default_factory=dict)  # task id → golden trajectory text (reference)
    max_new_tokens: int = 384
    wants_expert_plan: bool = False
    calls: int = 0
    repairs: int = 0
    failures: int = 0
    flagged: int = 0
    seconds: float = 0.0

    def __call__(self, batch) -> list[Critique | None]:
        prompts = [judge_prompt(ep.trajectory.task, ep.trajectory.steps[:-1], step,
                                self.golden.get(ep.task.id)) for ep, step, _ in batch]
        system = SELF_SYSTEM if self.self_teacher else SYSTEM
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompts]
        replies = self._complete(convs)
        out: list[Critique | None] = [None] * len(batch)
        retry = []
        for i, reply in enumerate(replies):
            try:
                out[i] = self._critique(parse_judgement(reply))
            except (ValueError, ValidationError) as e:
                retry.append((i, reply, str(e).splitlines()[0]))
        if retry:
            self.repairs += len(retry)
            repair_convs = [convs[i] + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": f"That answer was not usable ({why}). Reply with "
                                         "the JSON object only, with the fields described."}]
                            for i, reply, why in retry]
            for (i, _, _), reply in zip(retry, self._complete(repair_convs)):
                try:
                    out[i] = self._critique(parse_judgement(reply))
                except (ValueError, ValidationError):
                    self.failures += 1  # left unjudged: the step stays a plain student step
        return out

    def _complete(self, convs) -> list[str]:
        t0 = time.perf_counter()
        self.calls += len(convs)
        try:
            return self.backend.complete(convs, GenerationConfig(max_new_tokens=self.max_new_tokens))
        except BackendError as e:  # failed conversations are counted as failures by the caller's parse
            return [reply or "" for reply in e.per_conversation(len(convs))[0]]
        finally:
            self.seconds += time.perf_counter() - t0

    def _critique(self, j: Judgement) -> Critique:
        self.flagged += j.is_error
        return Critique(teacher=self.name, **j.model_dump())

    def stats(self) -> dict[str, float]:
        return {"teacher_calls": self.calls, "repairs": self.repairs, "unjudged_failures": self.failures,
                "flagged": self.flagged, "teacher_seconds": round(self.seconds, 2),
                "seconds_per_call": round(self.seconds / max(1, self.calls), 3)}
