"""Stage 2 on the real TextWorldExpress: the expert-grounded teacher, the LLM teacher, synthesis, filtering."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from steptune.agent.rollout import run_episodes
from steptune.backends import BackendConfig
from steptune.backends.base import BackendError, ChatBackend, GenerationConfig
from steptune.data.trajectory import Step, Trajectory, load_trajectories, planned_path
from steptune.envs.base import TaskRef
from steptune.envs.pool import EnvPool
from steptune.envs.twx import TextWorldExpressEnv
from steptune.evaluation.recovery import reflections_at_test_time
from steptune.synthesis.filtering import FilterConfig, filter_trajectories
from steptune.synthesis.synthesize import SynthesisConfig, synthesize
from steptune.teacher.base import StepToJudge
from steptune.teacher.expert import ExpertTeacher
from steptune.teacher.llm import LLMTeacher, parse_judgement


def to_judge(step: Step, task_text: str = "Tidy up.") -> StepToJudge:
    return StepToJudge(task=TaskRef("twx", "twc", 0), task_text=task_text, history=[], step=step, reward_before=0.0,
                       reward_after=0.0, done=False)


class ScriptedStudent(ChatBackend):
    """A test double of the MODEL only: follows the expert but makes chosen mistakes at chosen turns."""

    def __init__(self, pool: EnvPool, mistakes: dict[int, str]):
        self.pool, self.mistakes, self.turn = pool, mistakes, {}

    def complete(self, conversations, gen):
        out = []
        for slot, conv in enumerate(conversations):
            n = sum(m["role"] == "assistant" for m in conv)
            plan = self.pool.expert_actions(slot) or ["look around"]
            action = self.mistakes.get(n, plan[0])
            out.append(f"Thought: step {n}.\nAction: {action}")
        return out


def test_expert_teacher_flags_wrong_steps_and_corrects_with_the_experts_action():
    task = TaskRef("twx", "twc", 0, "train")
    with EnvPool("twx", 1, {"game": "twc", "max_steps": 12}) as pool:
        pool.reset(0, task)
        gold = pool.expert_actions(0)
        other = "chest of drawers" if "chest of drawers" not in " ".join(gold) else "wardrobe"
        student = ScriptedStudent(pool, {0: "dance around", 2: f"open {other}"})
        teacher = ExpertTeacher()
        [ep] = run_episodes(pool, [task], student, GenerationConfig(max_new_tokens=32), teacher=teacher,
                            progress=False)
    steps = ep.trajectory.steps
    kinds = [s.kind for s in steps]
    assert kinds.count("error") == 2 and ep.success
    for i, s in enumerate(steps):
        assert s.weight == (0 if s.kind == "error" else 1)  # weight 0 exactly on the flagged steps
        if s.kind == "error":
            fix = steps[i + 1]
            assert fix.kind == "reflection" and fix.action == s.critique.corrected_action
            assert s.critique.reflection and s.critique.reason and s.observation
    first_err = steps[kinds.index("error")]
    assert "not a valid action" in first_err.critique.error
    second = [s for s in steps if s.kind == "error"][1]
    assert second.action.startswith("open ") and "does not advance" in second.critique.error
    assert "subgoal" in second.critique.reason and "put" in second.critique.reflection  # names what is missing
    # a STeP agent that learned these steps would reflect in the same words at test time: what the report counts
    seen = reflections_at_test_time([ep.trajectory])
    assert (seen["with_reflection"], seen["succeeded"], seen["reflection_steps"]) == (1, 1, 2)
    [example] = seen["examples"]
    assert example["own_mistake"] and example["before"]["action"] == "dance around"
    assert example["reflection"] == steps[kinds.index("reflection")].thought
    plain = ep.trajectory.model_copy(update={"steps": [s for s in steps if s.kind != "reflection"]})
    assert reflections_at_test_time([plain])["with_reflection"] == 0  # the student's and the expert's own thoughts
    # the synthesized trajectory replays in the environment to the same observations
    env = TextWorldExpressEnv(game="twc", max_steps=12)
    try:
        env.reset(task)
        for s in steps:
            assert env.step(s.action).observation == s.observation
    finally:
        env.close()


def test_llm_teacher_parses_repairs_and_counts_failures():
    assert parse_judgement('Sure! ```json\n{"is_error": false}\n```').is_error is False
    with pytest.raises(ValueError, match="corrected_action"):
        parse_judgement('{"is_error": true, "error": "x"}')

    class Replies(ChatBackend):
        def __init__(self, replies):
            self.replies = list(replies)
            self.seen = []

        def complete(self, conversations, gen):
            self.seen += conversations
            return [self.replies.pop(0) for _ in conversations]

    good = json.dumps({"is_error": True, "error": "wrong box", "reason": "shirts go in the wardrobe",
                       "reflection": "I put it in the wrong place.", "corrected_thought": "Take it back.",
                       "corrected_action": "take shirt"})
    backend = Replies(["not json at all", good, "{broken", "still broken", '{"is_error": false}'])
    teacher = LLMTeacher(backend)
    step = Step(thought="hm", action="put shirt in drawer", observation="Done.", kind="student")
    verdicts = teacher.judge([to_judge(step)] * 3)
    crits = [v.critique for v in verdicts]
    # first round: broken, good, broken; repair round for items 0 and 2: still broken, valid "not an error"
    assert crits[0] is None  # unjudged after a failed repair: never a guessed label
    assert "unusable reply twice" in verdicts[0].why_unjudged
    assert crits[1].is_error and crits[1].corrected_action == "take shirt" and crits[1].teacher == "llm"
    assert crits[2].is_error is False
    assert [(v.requests, v.invalid_replies, v.failed_requests) for v in verdicts] == [(2, 2, 0), (1, 0, 0), (2, 1, 0)]
    assert "That answer was not usable" in backend.seen[-1][-1]["content"]


def test_llm_teacher_keeps_the_judgements_of_a_partly_failed_batch():
    good = json.dumps({"is_error": True, "error": "wrong box", "reason": "r", "reflection": "f",
                       "corrected_thought": "t", "corrected_action": "take shirt"})

    class SecondRequestRefused(ChatBackend):
        calls = 0

        def complete(self, conversations, gen):
            self.calls += 1
            if self.calls == 1:  # as OpenAICompatBackend reports one refused request of a batch
                raise BackendError("HTTP 400", [good, None], {1: "HTTP 400"})
            return ['{"is_error": false}'] * len(conversations)

    backend = SecondRequestRefused()
    teacher = LLMTeacher(backend)
    step = Step(thought="hm", action="put shirt in drawer", observation="Done.", kind="student")
    first, second = teacher.judge([to_judge(step)] * 2)
    assert first.critique.is_error and first.critique.corrected_action == "take shirt"  # kept, not asked again
    # the backend has already retried a failed request: it is counted and left unjudged, not re-asked
    assert second.critique is None and (second.requests, second.failed_requests) == (1, 1) and backend.calls == 1
    assert "request failed: HTTP 400" in second.why_unjudged


@pytest.mark.slow
def test_llm_teacher_against_a_real_local_model_never_crashes(tiny_model_dir):
    from steptune.backends.local import LocalBackend

    teacher = LLMTeacher(LocalBackend(str(tiny_model_dir)), max_new_tokens=24)
    step = Step(thought="north", action="move north", observation="You can't go that way.", kind="student")
    verdicts = teacher.judge([to_judge(step, "Find the coin.")] * 2)
    # a random model writes no valid JSON: unjudged, counted, no crash
    assert all(v.critique is None and v.requests == 2 and v.invalid_replies == 2 for v in verdicts)


def test_filtering_keeps_successes_with_few_errors():
    def t(i, success, n_err):
        steps = [Step(action="a", kind="error", weight=0), Step(action="b", kind="reflection")] * n_err
        return Trajectory(id=str(i), env="twx", task_id=str(i), task="t", success=success, reward=float(success),
                          steps=steps + [Step(action="c", kind="student")])
    trajs = [t(0, True, 0), t(1, True, 1), t(2, True, 2), t(3, True, 3), t(4, False, 1)]
    kept, report = filter_trajectories(trajs, FilterConfig(max_errors=2))
    assert [x.id for x in kept] == ["0", "1", "2"]
    assert report["dropped"] == {"more than 2 errors": 1, "not successful": 1}
    kept, _ = filter_trajectories(trajs, FilterConfig(max_errors=2, keep_error_free=False))
    assert [x.id for x in kept] == ["1", "2"]


SYNTH = """
import sys
from steptune.backends import parse_backend_spec
from steptune.synthesis.synthesize import SynthesisConfig, synthesize
synthesize(SynthesisConfig(student=parse_backend_spec(sys.argv[1]), env="twx", env_kwargs={"game": "twc", "max_steps": 6},
                           split="train", limit=12, workers=2, out=sys.argv[2], max_new_tokens=24), progress=False)
"""


@pytest.mark.slow
def test_killed_synthesis_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    out = tmp_path / "synth.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SYNTH, f"local:{tiny_model_dir}", str(out)],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(out.read_text().splitlines())
    assert 3 <= n_before < 12
    stats = synthesize(SynthesisConfig(student=BackendConfig(model=str(tiny_model_dir)), env="twx",
                                       env_kwargs={"game": "twc", "max_steps": 6}, split="train", limit=12,
                                       workers=2, out=str(out), max_new_tokens=24), progress=False)
    ids = [t.id for t in load_trajectories(out)]
    assert len(ids) == len(set(ids)) == 12 == stats["episodes"]
    assert planned_path(out).read_text().strip() == "12"  # what `steptune status` counts against
    assert ids[:n_before] == [json.loads(line)["id"] for line in out.read_text().splitlines()[:n_before]]
    # the teacher's accounting covers the killed part too: every student step of the file is in the totals
    trajs = load_trajectories(out)
    student_steps = sum(s.kind in ("student", "error") for t in trajs for s in t.steps)
    teacher = stats["teacher"]
    assert teacher["episodes_without_counts"] == 0 and teacher["judged"] + teacher["unjudged"] == student_steps
    assert teacher["flagged"] == sum(t.n_errors for t in trajs)
