"""Evaluation runs: summary numbers, resumption after SIGKILL without lost or duplicated episodes, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _react_model import react_model_fixture
from _twx_pool import twx_kwargs

from steptune.data.trajectory import load_trajectories
from steptune.evaluation.eval import EvalConfig, evaluate


@pytest.fixture(scope="module")
def react_model_dir(tmp_path_factory):
    return react_model_fixture(tmp_path_factory)


def test_eval_writes_episodes_and_summary(react_model_dir, tmp_path):
    cfg = EvalConfig(model=str(react_model_dir), env="twx", splits=["seen", "unseen"], limit=3, workers=2,
                     out=str(tmp_path / "run"), max_new_tokens=40, env_kwargs=twx_kwargs())
    summary = evaluate(cfg, progress=False)
    trajs = load_trajectories(tmp_path / "run" / "episodes.jsonl")
    first = {"seen": 1000, "unseen": 2000}  # each split's own block of seeds
    assert sorted(t.id for t in trajs) == sorted(f"{s}:twx/coin/{first[s] + i}" for s in first for i in range(3))
    for split in ("seen", "unseen"):
        part = [t for t in trajs if t.split == split]
        agg = summary["splits"][split]
        assert agg["episodes"] == 3
        assert agg["avg_reward"] == pytest.approx(100 * sum(t.reward for t in part) / 3, abs=0.01)
        assert agg["success_rate"] == pytest.approx(100 * sum(t.success for t in part) / 3, abs=0.01)
        assert summary["task_types"][split]["coin"]["episodes"] == 3
    assert summary["overall"]["success_rate"] > 50 and summary["overall"]["steps_without_action"] == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    t = trajs[0]
    assert t.instruction and t.task and t.steps and {"steps_taken", "invalid_actions", "truncations"} <= t.meta.keys()

    # A finished run is not re-run: the same file comes back untouched.
    before = (tmp_path / "run" / "episodes.jsonl").read_bytes()
    assert evaluate(cfg, progress=False) == summary
    assert (tmp_path / "run" / "episodes.jsonl").read_bytes() == before


def test_turns_cut_by_the_token_budget_are_counted_and_said_on_the_console(react_model_dir, tmp_path, capsys):
    cfg = EvalConfig(model=str(react_model_dir), env="twx", splits=["seen"], limit=2, workers=2,
                     out=str(tmp_path / "run"), max_new_tokens=3, env_kwargs=twx_kwargs())  # "Thought: I ..." cut
    summary = evaluate(cfg, progress=False)
    steps = [s for t in load_trajectories(tmp_path / "run" / "episodes.jsonl") for s in t.steps]
    assert steps and all(s.action == "" for s in steps) and summary["overall"]["success_rate"] == 0
    assert summary["overall"]["steps_without_action"] == len(steps)
    err = " ".join(capsys.readouterr().err.split())
    assert f"run (episodes.jsonl): {len(steps)} of {len(steps)} agent steps had no `Action:`" in err
    assert "max_new_tokens = 3" in err


def test_an_evaluation_in_shards_writes_what_one_process_writes_and_gathers_a_killed_one(react_model_dir, tmp_path):
    """`processes: 2`: two spawned processes play the plain and the injected episodes in shards, each shard into a
    file of its own, gathered at the end into the files and summary one process writes. A shard's file that a kill
    left (its last line torn) is gathered by the rerun, which plays the torn episode again."""
    import threading

    import psutil

    from steptune.agent.injection import InjectionConfig
    from steptune.evaluation.eval import part_path, part_paths

    def config(name: str, processes: int) -> EvalConfig:
        return EvalConfig(model=str(react_model_dir), env="twx", splits=["seen", "unseen"], limit=3, workers=2,
                          out=str(tmp_path / name), max_new_tokens=40, env_kwargs=twx_kwargs(),
                          inject=InjectionConfig(step=None, max_step=2, seed=0), processes=processes)

    def records(name: str, file: str) -> dict:
        return {t.id: t.model_dump() for t in load_trajectories(tmp_path / name / file)}

    spawned, env_workers, done = set(), set(), threading.Event()

    def watch() -> None:  # a spawned process runs multiprocessing's spawn_main (its env workers, forked, too)
        while not done.is_set():
            for child in psutil.Process().children():
                try:
                    if "spawn_main" in " ".join(child.cmdline()):
                        spawned.add(child.pid)
                        # an environment worker leads a process group of its own; a library's short-lived
                        # subprocess does not (`ldconfig -p`, as trio's import looks for libpthread)
                        env_workers.update(c.pid for c in child.children() if _leads_its_group(c.pid))
                except psutil.Error:
                    pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        two = evaluate(config("two", 2), progress=False)
    finally:
        done.set()
        watcher.join()
    assert len(spawned) == 2
    # one pool a process, for its plain and its injected episodes: 2 slots and 2 spares, one env process each
    assert 0 < len(env_workers) <= 2 * 4
    one = evaluate(config("one", 1), progress=False)
    for file in ("episodes.jsonl", "injected.jsonl"):
        assert len(records("one", file)) == 6 and records("two", file) == records("one", file)
        assert not part_paths(tmp_path / "two" / file)
    assert {k: v for k, v in two.items() if k != "name"} == {k: v for k, v in one.items() if k != "name"}

    injected = tmp_path / "two" / "injected.jsonl"
    lines = injected.read_text().splitlines(keepends=True)
    injected.write_text("".join(lines[:3]))
    part_path(injected, 1).write_text("".join(lines[3:5]) + lines[5][:40])  # killed while writing the 6th
    evaluate(config("two", 2), progress=False)
    assert records("two", "injected.jsonl") == records("one", "injected.jsonl") and not part_paths(injected)


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


RUNNER = """
import torch
torch.set_num_threads(1)
from steptune.evaluation.eval import EvalConfig, evaluate
cfg = EvalConfig(model={model!r}, env="twx", splits=["seen"], limit={limit}, workers={workers}, out={out!r},
                 max_new_tokens=24, temperature=1.0, seed=0, env_kwargs={env_kwargs!r}, processes={processes})
evaluate(cfg, progress=False)
"""


@pytest.mark.slow
def test_eval_resumes_after_sigkill_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    # Sampling from a random model writes long invalid turns, so episodes take long enough to kill mid-run.
    limit, out = 12, tmp_path / "run"
    script = RUNNER.format(model=str(tiny_model_dir), limit=limit, out=str(out), env_kwargs=twx_kwargs(max_steps=20),
                           workers=2, processes=1)
    episodes = out / "episodes.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if episodes.exists() and episodes.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "eval finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = {json.loads(line)["id"] for line in episodes.read_text().splitlines() if line.strip()}
    assert 3 <= len(done_before) < limit

    subprocess.run([sys.executable, "-c", script], env=env, check=True, stderr=subprocess.DEVNULL, timeout=300)
    ids = [t.id for t in load_trajectories(episodes)]
    assert len(ids) == len(set(ids)) == limit and done_before <= set(ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["seen"]["episodes"] == limit


def test_bad_model_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="openai:MODEL@BASE_URL"):
        evaluate(EvalConfig(model="openai:nourl", env="twx", out=str(tmp_path / "r"), limit=1, workers=1),
                 progress=False)


@pytest.mark.slow
def test_eval_cli_on_real_env_pool(react_model_dir, tmp_path):
    from typer.testing import CliRunner

    from steptune.cli import app

    out = tmp_path / "run"
    cfg_file = tmp_path / "eval.json"  # the game comes from a config file, the rest from the command line
    cfg_file.write_text(json.dumps({"env_kwargs": twx_kwargs()}))
    args = ["eval", "--model", str(react_model_dir), "--env", "twx", "--split", "unseen", "--limit", "2",
            "--workers", "2", "--out", str(out), "--max-new-tokens", "40", "--quiet", "--config", str(cfg_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["unseen"]["episodes"] == 2 == len(load_trajectories(out / "episodes.jsonl"))
    assert "unseen: reward" in result.output


@pytest.mark.slow
def test_the_shards_of_a_stopped_evaluation_end_with_it_and_the_rerun_gathers_them(tiny_model_dir, tmp_path):
    """SIGTERM to the process that started a sharded evaluation (`steptune study` stopped) ends its shards and
    their environment workers too: none plays on and writes into the run. The rerun gathers what they wrote."""
    import psutil

    from steptune.evaluation.eval import part_paths

    limit, out = 16, tmp_path / "run"
    episodes = out / "episodes.jsonl"
    script = RUNNER.format(model=str(tiny_model_dir), limit=limit, out=str(out), env_kwargs=twx_kwargs(max_steps=20),
                           workers=1, processes=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    descendants = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if sum(p.read_text().count("\n") for p in part_paths(episodes)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the evaluation finished before it could be stopped"
        shards = psutil.Process(proc.pid).children()
        descendants = psutil.Process(proc.pid).children(recursive=True)  # the shards' environment workers too
        assert sum("spawn_main" in " ".join(p.cmdline()) for p in shards) == 2 < len(descendants)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        _, alive = psutil.wait_procs(descendants, timeout=20)
        assert not alive, f"still running after their parent ended: {[p.cmdline()[-2:] for p in alive]}"
    finally:
        for p in [proc, *descendants]:
            try:
                p.kill()
            except (psutil.Error, ProcessLookupError):
                pass
    written = {p: p.read_bytes() for p in part_paths(episodes)}
    time.sleep(2)
    assert {p: p.read_bytes() for p in part_paths(episodes)} == written  # nobody writes into the run any more

    subprocess.run([sys.executable, "-c", script], env=env, check=True, stderr=subprocess.DEVNULL, timeout=300)
    ids = [t.id for t in load_trajectories(episodes)]
    assert len(ids) == len(set(ids)) == limit and not part_paths(episodes)
