"""Stage 2 with an LLM teacher behind a real HTTP server process: typed backends carry each model's API key variable,
Retry-After is honoured, the teacher's accounting (judged, unjudged, failed requests, corrections) lives on each
episode and so survives a resumed run, and the rollout talks to teachers through the Teacher protocol."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from _twx_pool import twx_kwargs

from steptune.backends import BackendConfig
from steptune.data.trajectory import Step, load_trajectories
from steptune.envs.base import TaskRef
from steptune.envs.twx import TextWorldExpressEnv
from steptune.synthesis.synthesize import SynthesisConfig, synthesize
from steptune.teacher.base import COUNT_KEYS

STUDENT_SECRET = "sk-student-8c1f2e"
TEACHER_SECRET = "sk-teacher-77d0a9"


@contextmanager
def keyed_server(tmp_path: Path, script: list[str]):
    """The server process of _keyed_server.py; yields (base URL, a function returning its attempt log)."""
    log = tmp_path / f"server-{time.monotonic_ns()}.jsonl"
    env = {**os.environ, "STUDENT_KEY": STUDENT_SECRET, "TEACHER_KEY": TEACHER_SECRET}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_keyed_server.py"), str(log),
                             json.dumps(script)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.split(" on ")[1].strip(), lambda: [json.loads(x) for x in log.read_text().splitlines()]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def config(url: str, out: Path, limit: int, **teacher: object) -> SynthesisConfig:
    # one request at a time, so that the server's fault script meets the requests in a fixed order and a
    # retry follows the attempt it repeats
    return SynthesisConfig(
        student=BackendConfig(kind="openai", model="student", base_url=url, api_key_env="MY_STUDENT_KEY",
                              max_concurrency=1, max_retries=0),
        teacher={"name": "llm", "backend": BackendConfig(
            kind="openai", model="teacher", base_url=url, api_key_env="MY_TEACHER_KEY", max_concurrency=1,
            **{"max_retries": 1, "timeout_s": 5.0, **teacher})},
        env="twx", env_kwargs=twx_kwargs(max_steps=4), split="train", limit=limit, workers=2, out=str(out),
        max_new_tokens=32)


def keys(monkeypatch) -> None:
    monkeypatch.setenv("MY_STUDENT_KEY", STUDENT_SECRET)
    monkeypatch.setenv("MY_TEACHER_KEY", TEACHER_SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-wrong-one")  # what a lost api_key_env falls back to


def test_llm_teacher_gets_its_key_from_the_configured_variable_and_waits_for_retry_after(tmp_path, monkeypatch,
                                                                                         caplog):
    keys(monkeypatch)
    out = tmp_path / "run" / "synthesized.jsonl"
    with keyed_server(tmp_path, ["429"]) as (url, attempts):
        stats = synthesize(config(url, out, limit=2), progress=False)
        log = attempts()
    assert not [a for a in log if a["fault"] == "auth"]  # every request carried the right model's key
    teacher = [a for a in log if a["model"] == "teacher"]
    assert teacher[0]["fault"] == "429" and teacher[1]["t"] - teacher[0]["t"] >= 0.95  # Retry-After: 1 honoured
    # both episodes: "look around" judged wrong, corrected with "take coin", won
    assert stats["episodes"] == 2 and stats["success_rate"] == 100.0
    assert stats["teacher"] == {"judged": 2, "unjudged": 0, "flagged": 2, "corrected": 2, "requests": 2,
                                "failed_requests": 0, "invalid_replies": 0, "episodes_without_counts": 0,
                                "rollouts": 0, "rollout_steps": 0, "failed_rollouts": 0, "replay_diverged": 0}
    for t in load_trajectories(out):
        assert [(s.kind, s.action) for s in t.steps] == [("error", "look around"), ("reflection", "take coin")]
    written = [p for p in tmp_path.joinpath("run").rglob("*") if p.is_file()]
    assert written and all(s not in p.read_text() for p in written for s in (STUDENT_SECRET, TEACHER_SECRET))
    assert STUDENT_SECRET not in caplog.text and TEACHER_SECRET not in caplog.text


def test_teacher_accounting_is_cumulative_across_a_resumed_run_and_counts_every_failure(tmp_path, monkeypatch):
    keys(monkeypatch)
    out = tmp_path / "run" / "synthesized.jsonl"
    # first part: a reply that is no JSON, whose repair is no JSON either; a 500 that outlives the one retry
    with keyed_server(tmp_path, ["prose", "ok", "prose", "500", "500"]) as (url, attempts):
        first = synthesize(config(url, out, limit=2), progress=False)
        log1 = attempts()
    # the rerun finishes the split's first 4 tasks: 2 new episodes; a request that times out twice
    with keyed_server(tmp_path, ["hang", "hang"]) as (url, attempts):
        second = synthesize(config(url, out, limit=4, timeout_s=0.5), progress=False)
        log2 = attempts()

    trajs = load_trajectories(out)
    assert len(trajs) == 4 and first["episodes"] == 2 and second["episodes"] == 4
    total = second["teacher"]
    # every student step is accounted for, as judged or unjudged, over both parts
    student_steps = sum(s.kind in ("student", "error") for t in trajs for s in t.steps)
    assert total["judged"] + total["unjudged"] == student_steps
    # logical requests = HTTP attempts at the server less the retries (the 500's and the timeout's)
    attempts_made = sum(a["model"] == "teacher" for a in log1 + log2)
    assert total["requests"] == attempts_made - 2
    assert total["failed_requests"] == 2  # the 500 and the timeout, each after its retry
    assert total["invalid_replies"] == 2  # the two unusable replies
    assert total["unjudged"] >= 2 and total["flagged"] == total["corrected"]
    # the totals are the sum of both parts, not the last part (what a rewritten side file would hold)
    assert all(total[k] >= first["teacher"][k] for k in COUNT_KEYS) and total["requests"] > first["teacher"]["requests"]
    assert json.loads((out.parent / "synthesized_teacher.json").read_text()) == total
    notes = [n for t in trajs for n in t.meta["teacher_counts"].get("notes", [])]
    assert any("request failed" in n and "500" in n for n in notes)
    assert any("request failed" in n and "Timeout" in n for n in notes)
    assert any("unusable reply" in n for n in notes)
    # no data lost: every episode still ran to its end, and won (the student takes the coin by itself)
    assert all(t.success and t.meta["failure"] is None for t in trajs)


def test_a_config_names_each_registered_teacher_and_gets_its_own_settings():
    """The registry's key is what a config writes; a line whose key and settings disagree (or a teacher missing
    from the union) would hand `teacher: NAME` another teacher's settings or refuse it."""
    from pydantic import ValidationError

    from steptune.synthesis.synthesize import SynthesisSettings
    from steptune.teacher.registry import TEACHERS

    backend = {"kind": "openai", "model": "teacher", "base_url": "http://127.0.0.1:9/v1"}
    for name, settings in TEACHERS.items():
        required = {"backend": backend} if "backend" in settings.model_fields else {}
        for written in ([name] if not required else []) + [{"name": name, **required}]:
            parsed = SynthesisSettings(teacher=written).teacher
            assert type(parsed) is settings and parsed.name == name, written
    with pytest.raises(ValidationError, match="expert"):  # an unknown name lists the known ones
        SynthesisSettings(teacher="oracle")
    # the layout before teachers had settings of their own is still read
    with pytest.warns(FutureWarning, match="teacher_backend"):
        old = SynthesisSettings.model_validate({"teacher": "llm", "teacher_backend": backend})
    assert old.teacher.name == "llm" and old.teacher.backend.base_url == backend["base_url"]


def test_the_expert_teacher_takes_invalid_from_the_environment_not_from_words():
    """'You can't go that way.' is what a valid move into a wall may answer; only the environment's flag says that
    the action was not understood."""
    from steptune.teacher.base import StepToJudge
    from steptune.teacher.expert import ExpertTeacher

    env = TextWorldExpressEnv(game="coin", game_params="numLocations=1,numDistractorItems=0,includeDoors=0")
    try:
        reset = env.reset(env.tasks("train")[0])
        plan = env.expert_actions()
        bad = env.step("dance around")
        plan_after = env.expert_actions()
    finally:
        env.close()
    assert bad.info["invalid"]
    worded = Step(thought="", action=plan[0], observation="You can't go that way.", kind="student")
    flagged = Step(thought="", action="dance around", observation=bad.observation, kind="student")
    items = [StepToJudge(task=TaskRef("twx", "coin", 0), task_text=reset.task, history=[], step=step,
                         reward_before=0.0, reward_after=0.0, done=False, invalid=invalid, plan_before=plan,
                         plan_after=plan_after)
             for step, invalid in ((worded, False), (flagged, True))]
    on_plan, invalid = ExpertTeacher().judge(items)
    assert not on_plan.critique.is_error
    assert invalid.critique.is_error and "not a valid action" in invalid.critique.error


def test_expert_plans_ride_with_the_steps_batched_across_slots(tmp_path):
    """With the expert teacher, each state's plan comes back with the step that reached it: a round trip that
    carries only expert calls happens once per batch of fresh episodes, never per slot and step."""
    from _twx_pool import twx_pool

    from steptune.agent.rollout import run_episodes
    from steptune.backends.base import ChatBackend, GenerationConfig
    from steptune.teacher.expert import ExpertTeacher

    class LooksAroundThenTakes(ChatBackend):
        def complete(self, conversations, gen):
            return ["Thought: t\nAction: " + ("take coin" if any(m["role"] == "assistant" for m in c) else "look around")
                    for c in conversations]

    pool = twx_pool(3, max_steps=4)
    trips = []
    call_many = pool._call_many
    pool._call_many = lambda calls: trips.append([cmd for _, cmd, _ in calls]) or call_many(calls)
    try:
        eps = run_episodes(pool, pool.tasks("train")[:6], LooksAroundThenTakes(), GenerationConfig(max_new_tokens=8),
                           teacher=ExpertTeacher(), progress=False)
    finally:
        pool.close()
    assert all(e.success for e in eps)
    expert_only = [t for t in trips if set(t) == {"expert"}]
    resets = [t for t in trips if "reset" in t]
    assert len(expert_only) <= len(resets)  # once per batch of new episodes, all their slots at once
    assert all(len(t) == sum(c == "reset" for c in r) for t, r in zip(expert_only, resets))
    # every step carried its plan along, the corrections' steps included
    steps = [c for t in trips for c in t if c == "step"]
    assert sum(c == "expert" for t in trips for c in t) == len(steps) + sum(len(t) for t in expert_only)
