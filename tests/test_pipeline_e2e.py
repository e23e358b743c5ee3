"""The whole STeP pipeline, through the real CLI, on the smoke preset (real TextWorldExpress, tiny Llama)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from steptune.data.tokenize import IGNORE_INDEX, encode_trajectory
from steptune.data.trajectory import iter_trajectories, load_trajectories
from steptune.evaluation.recovery import injected_kind
from steptune.pipeline.methods import title

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from steptune.cli import main; main()"]
METHODS = ["golden_d1", "golden_all", "step", "step_unmasked", "sequential"]


def quickstart(out: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, "quickstart", "--preset", "smoke", "--output", str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = quickstart(out)
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log[-3000:]
    return out, log


def episodes(run: Path, method: str, file: str = "episodes.jsonl") -> dict[str, tuple]:
    trajs = load_trajectories(run / "eval" / method / file)
    ids = [t.id for t in trajs]
    assert len(ids) == len(set(ids)), "an evaluation episode was duplicated"
    return {t.id: (t.reward, tuple(s.action for s in t.steps)) for t in trajs}


def test_smoke_pipeline_produces_every_artifact(smoke_run):
    run, log = smoke_run
    golden = load_trajectories(run / "data" / "golden.jsonl")
    assert len(golden) == 24 and all(t.success for t in golden)
    d1, d2 = (load_trajectories(run / "data" / f"{n}.jsonl") for n in ("d1", "d2"))
    assert not {t.task_id for t in d1} & {t.task_id for t in d2} and len(d1) + len(d2) == 24
    dr = load_trajectories(run / "data" / "dr.jsonl")
    assert dr and all(t.success for t in dr)
    tok = AutoTokenizer.from_pretrained(run / "models" / "init")
    for t in dr:  # wrong steps stay in context untrained, each followed by a trained correction
        enc = encode_trajectory(t, tok)
        for (start, end, _), step, nxt in zip(enc.step_spans, t.steps, t.steps[1:] + [None]):
            trained = any(label != IGNORE_INDEX for label in enc.labels[start:end])
            assert trained == (step.weight == 1)
            if step.kind == "error":
                assert step.weight == 0 and nxt is not None and nxt.kind == "reflection"
    for m in METHODS:
        model = run / "models" / m
        assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
        summary = json.loads((run / "eval" / m / "summary.json").read_text())
        assert set(summary["splits"]) == {"seen", "unseen"}
        assert all(s["episodes"] == 8 for s in summary["splits"].values())
    assert json.loads((run / "models" / "step_unmasked" / "train_summary.json").read_text())["masked_error_steps"] == 0
    assert json.loads((run / "models" / "step" / "train_summary.json").read_text())["masked_error_steps"] > 0
    report = (run / "report" / "report.md").read_text()
    assert all(title(m) in report for m in METHODS) and "Synthesis" in report
    assert (run / "report" / "report.html").stat().st_size > 10_000  # plots embedded
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert "STeP (D1 ∪ Dr, partial masking)" in log and "report.html" in log
    # every method trained the same number of epochs over its own data
    assert {json.loads((run / "models" / m / "train_summary.json").read_text())["epochs"] for m in METHODS} == {6.0}
    # the recovery benchmark ran for every method, on the same injected errors
    injected = {m: load_trajectories(run / "eval" / m / "injected.jsonl") for m in METHODS}
    errors = {m: sorted((t.id, t.meta["injection"]["action"]) for t in trajs) for m, trajs in injected.items()}
    assert len(errors["step"]) == 16 and all(e == errors["step"] for e in errors.values())
    assert "Recovery benchmark" in report and "## Reflections at test time" in report
    # ... and by the kind of injected action: each method's wins with the error / without it, on the same tasks
    plain = {m: {t.id: t.success for t in load_trajectories(run / "eval" / m / "episodes.jsonl")} for m in METHODS}
    for verb in {injected_kind(t) for t in injected["step"]}:
        cells = []
        for m in METHODS:
            mine = [t for t in injected[m] if injected_kind(t) == verb]
            cells.append(f"{sum(t.success for t in mine)} / {sum(plain[m][t.id] for t in mine)}")
        assert f"| {verb} | {len(mine)} | " + " | ".join(cells) + " |" in report.splitlines(), verb
    base = json.loads((run / "eval" / "base_agent_u2" / "summary.json").read_text())
    assert base["overall"]["episodes"] == len({t.task_id for t in d2})
    headline = json.loads(log.strip().splitlines()[-1])  # the last line: flat headline figures
    assert headline["base_agent_success_u2"] == base["overall"]["success_rate"]
    assert {f"{k}_{m}" for k in ("success_seen", "success_unseen", "recovery") for m in METHODS} <= headline.keys()


def test_rerun_skips_finished_stages(smoke_run):
    run, _ = smoke_run
    t0 = time.perf_counter()
    proc = quickstart(run)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert log.count("up to date, skipped") >= 15 and time.perf_counter() - t0 < 60


def _without_evaluations(clean: Path, run: Path, methods: list[str]) -> None:
    """A copy of the finished smoke run whose `methods` must be evaluated again (their outputs are gone)."""
    shutil.copytree(clean, run)
    for m in methods:
        shutil.rmtree(run / "eval" / m)


RERUN = ["golden_d1", "step"]  # two evaluations: the preset runs them side by side


def test_kill9_mid_run_then_resume_gives_the_same_records(smoke_run, tmp_path):
    clean, _ = smoke_run
    run = tmp_path / "killed"
    _without_evaluations(clean, run, RERUN)
    proc = quickstart(run, start_new_session=True)
    # golden D1's evaluation runs alone (its neighbours are done), so it plays in shards, each into a file of its
    # own, the injected episodes first
    shards = run / "eval" / "golden_d1"
    deadline = time.time() + 600
    while time.time() < deadline and sum(p.read_text().count("\n") for p in shards.glob("*.part*.jsonl")) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and everything it started
    proc.wait()
    assert json.loads((run / "manifest.json").read_text())["stages"]["eval:golden_d1"]["status"] == "running"
    # `steptune status` tells what the kill left: the evaluation interrupted with the episodes a rerun keeps
    # (of how many the evaluation plays, and how many it has won so far), its shards' included
    wide = {**os.environ, "COLUMNS": "200"}  # one table row a stage
    killed = subprocess.run([*CLI, "status", str(run)], capture_output=True, text=True, check=True, env=wide).stdout
    row = next(line for line in killed.splitlines() if line.startswith("eval:golden_d1 "))
    planned = len(load_trajectories(clean / "eval" / "golden_d1" / "episodes.jsonl"))
    said = []
    for file, what in (("episodes", "episodes written"), ("injected", "with the injected error")):
        written = {t.id: t for p in shards.glob(f"{file}*.jsonl") for t in iter_trajectories(p, errors=[])}
        if (shards / f"{file}.jsonl.planned").exists():
            won = f" ({sum(t.success for t in written.values())} won)" if written else ""
            said.append(f"{len(written)} of {planned} {what}{won}")
    assert " interrupted " in row and said
    assert row.split("│")[-1].strip() == "; ".join(said)
    assert all(" done " in line for line in killed.splitlines() if line.startswith("train:"))
    proc = quickstart(run)
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log[-3000:]
    finished = subprocess.run([*CLI, "status", str(run)], capture_output=True, text=True, check=True).stdout
    assert "interrupted" not in finished and "not started" not in finished and "report" in finished
    assert "eval:golden_d1" in log and "train:golden_d1: up to date, skipped" in log
    for m in RERUN:
        assert episodes(run, m) == episodes(clean, m)
        assert episodes(run, m, "injected.jsonl") == episodes(clean, m, "injected.jsonl")


def test_evaluations_side_by_side_write_what_one_after_another_writes(smoke_run, tmp_path):
    clean, log = smoke_run
    # the preset runs 2 at once, with labelled lines: the base agent's two evaluations with stage 2, then the rest
    assert "3 stages, 2 at a time" in log and "4 stages, 2 at a time" in log and "eval:step  episodes" in log
    assert log.index("3 stages, 2 at a time") < log.index("✓ synthesize") < log.index("─ filter")
    run = tmp_path / "one_by_one"
    _without_evaluations(clean, run, RERUN)
    proc = quickstart(run, "--set", "eval.processes=1")
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log[-3000:]
    assert "at a time" not in log and "eval:golden_all: up to date, skipped" in log  # only RERUN ran again
    for m in RERUN:
        assert episodes(run, m) == episodes(clean, m)
        assert episodes(run, m, "injected.jsonl") == episodes(clean, m, "injected.jsonl")
