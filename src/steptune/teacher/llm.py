"""The LLM teacher: a (larger) model judges each student step and writes the reflection and correction.

It answers in JSON, validated against `Judgement`; an invalid answer gets one repair round (the validation
error is sent back); a second failure leaves the step unjudged and is counted — never a crash, never a label
guessed from a broken answer. A request that fails for good (the backend has retried it) leaves the step
unjudged too, counted apart from unusable replies. With the student's own backend it is the self-teacher (the
paper's first open question: can the agent be its own teacher?).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ValidationError, field_validator

from steptune.backends import BackendConfig, make_backend
from steptune.backends.base import BackendError, ChatBackend, GenerationConfig
from steptune.data.react import format_observation, format_react
from steptune.data.trajectory import Critique, Step
from steptune.teacher.base import StepToJudge, TeacherContext, TeacherSettings, Verdict

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
    m = re.search(r"\{.*\}", text, re.DOTALL)
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
    """A Teacher (steptune.teacher.base) backed by a chat model; each verdict reports the requests it cost."""

    backend: ChatBackend
    name: str = "llm"
    self_teacher: bool = False
    golden: dict[str, str] = field(default_factory=dict)  # task id → golden trajectory text (reference)
    max_new_tokens: int = 384
    uses_expert_plan: bool = False

    def judge(self, steps: list[StepToJudge]) -> list[Verdict]:
        system = SELF_SYSTEM if self.self_teacher else SYSTEM
        convs = [[{"role": "system", "content": system},
                  {"role": "user", "content": judge_prompt(s.task_text, s.history, s.step, self.golden.get(s.task.id))}]
                 for s in steps]
        verdicts = [Verdict() for _ in steps]
        retry = []
        for i, (reply, failed) in enumerate(self._complete(convs)):
            v = verdicts[i]
            v.requests += 1
            if failed is not None:  # the backend already retried; asking again in a repair round would not help
                v.failed_requests += 1
                v.why_unjudged = f"request failed: {failed}"
                continue
            try:
                v.critique = self._critique(parse_judgement(reply))
            except (ValueError, ValidationError) as e:
                v.invalid_replies += 1
                retry.append((i, reply, str(e).splitlines()[0]))
        if retry:
            repair_convs = [convs[i] + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": f"That answer was not usable ({why}). Reply with "
                                         "the JSON object only, with the fields described."}]
                            for i, reply, why in retry]
            for (i, _, why), (reply, failed) in zip(retry, self._complete(repair_convs)):
                v = verdicts[i]
                v.requests += 1
                if failed is not None:
                    v.failed_requests += 1
                    v.why_unjudged = f"unusable reply ({why}), then the repair request failed: {failed}"
                    continue
                try:
                    v.critique = self._critique(parse_judgement(reply))
                except (ValueError, ValidationError) as e:
                    v.invalid_replies += 1
                    v.why_unjudged = f"unusable reply twice: {str(e).splitlines()[0]}"
        return verdicts

    def _complete(self, convs) -> list[tuple[str, str | None]]:
        """(reply, None) or ("", why the request failed), per conversation."""
        try:
            return [(r, None) for r in self.backend.complete(convs, GenerationConfig(max_new_tokens=self.max_new_tokens))]
        except BackendError as e:  # the other conversations' replies are kept
            replies, errors = e.per_conversation(len(convs))
            return [(r or "", errors.get(i, "no reply") if r is None else None) for i, r in enumerate(replies)]

    def _critique(self, j: Judgement) -> Critique:
        return Critique(teacher=self.name, **j.model_dump())


class LLMSettings(TeacherSettings):
    """A (larger) model behind its own backend, e.g. {kind: openai, model: Qwen2-72B-Instruct, base_url:
    http://host:8000/v1, api_key_env: OPENAI_API_KEY} (the variable's *name*; keys never go in configs)."""

    name: Literal["llm"] = "llm"
    backend: BackendConfig

    @field_validator("backend")
    @classmethod
    def _openai_has_url(cls, backend: BackendConfig) -> BackendConfig:
        if backend.kind == "openai" and not backend.base_url:
            raise ValueError("a teacher backend of kind openai needs base_url, e.g. http://localhost:8000/v1")
        return backend

    def build(self, ctx: TeacherContext) -> tuple[LLMTeacher, ChatBackend]:
        backend = make_backend(self.backend)
        return LLMTeacher(backend, name=self.name, golden=ctx.golden_references()), backend


class SelfSettings(TeacherSettings):
    """The student judges its own steps (the paper's first open question: can the agent be its own teacher?)."""

    name: Literal["self"] = "self"

    def build(self, ctx: TeacherContext) -> tuple[LLMTeacher, None]:
        return LLMTeacher(ctx.student, name=self.name, self_teacher=True, golden=ctx.golden_references()), None
