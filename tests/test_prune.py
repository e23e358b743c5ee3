"""`steptune prune` on a copy of the tiny study's real run (tests/_tiny_study.py): the weights of finished models
go, the run stays up to date and its study is written again from what is left, and a stage that needs the weights
again says how to get them back."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steptune.errors import UserError
from steptune.pipeline.manifest import Manifest
from steptune.pipeline.prune import prune_run, weight_files
from steptune.pipeline.run import run_pipeline
from steptune.pipeline.status import run_status
from steptune.pipeline.study import aggregate, run_study, seed_dir

CLI = [sys.executable, "-c", "from steptune.cli import main; main()"]


def copy_of(tiny_study, tmp_path):
    cfg, out, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy, symlinks=True, ignore=shutil.ignore_patterns("epoch-curve", "equal-steps", "teachers*"))
    return cfg, copy


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


@pytest.mark.slow
def test_prune_deletes_finished_weights_and_the_study_is_written_again_without_training(tiny_study, tmp_path):
    cfg, out = copy_of(tiny_study, tmp_path)
    run = seed_dir(out, 0)
    before = json.loads((out / "study.json").read_text())
    stages = manifest(run)["stages"]

    rows = prune_run(run)
    released = {r.model.name: r for r in rows}
    assert set(released) == {"init", *cfg.methods} and {r.state for r in rows} == {"released"}
    for r in rows:
        assert r.bytes > 0 and not weight_files(r.model) and not list(r.model.rglob("*.safetensors"))
    assert all((run / "models" / m / "train_summary.json").exists() for m in cfg.methods)
    assert set(manifest(run)["released"]) == {f"models/{m}" for m in released}
    manifest_released = manifest(run)["released"]

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        again = run_study(cfg, [0], out)
    assert manifest(run)["stages"] == stages  # nothing ran again: every stage skipped as up to date
    for key in ("success", "per_seed_success", "stage2", "stage2_quality", "training", "base_agent_success_u2"):
        assert again[key] == before[key], key
    assert {r.state for r in prune_run(run)} == {"already released"}

    # a stage that needs the weights again (a new evaluation setting) trains them again in place, by the unchanged
    # training stage: the same model, so what else read it (stage 2) stays up to date
    changed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 3})})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_pipeline(changed, run)
    text = " ".join(log.getvalue().split())
    after = manifest(run)
    assert "eval:golden_d1 must run and reads golden_d1, whose weights `steptune prune` released" in text
    assert "golden_d1: the same loss at all" in text  # the training repeated exactly
    assert not after.get("released") and after["retrained"] == manifest_released  # the digests readers hashed
    # the study says which models trained again, and whether their losses repeated
    retrained = {r["model"]: r for r in aggregate(out, [0])["retrained_in_place"]}
    assert set(retrained) == set(cfg.methods) and all(r["same_losses"] for r in retrained.values())
    logged = [json.loads(x) for x in (run / "models/golden_d1/train_log.jsonl").read_text().splitlines()]
    assert retrained["golden_d1"]["logged_steps"] == sum("loss" in x for x in logged) > 0
    rows = {r["stage"]: r for r in run_status(run)[0]}
    assert "golden_d1 trained again in place: the same losses" in rows["train:golden_d1"]["progress"]
    for name in ("golden", "split", "synthesize", "filter"):
        assert after["stages"][name] == stages[name], name
    for method in cfg.methods:
        assert after["stages"][f"train:{method}"]["key"] == stages[f"train:{method}"]["key"]
        assert after["stages"][f"eval:{method}"]["key"] != stages[f"eval:{method}"]["key"]
        assert weight_files(run / "models" / method)
    assert {r.state for r in prune_run(run)} == {"released"}
    assert manifest(run)["released"] == manifest_released and not manifest(run)["retrained"]

    # a retraining in place that was killed (its log rewritten up to where it stopped) resumes the next time, once:
    # nothing trains it a second time, and its losses are compared with the released model's, kept aside
    model = run / "models" / "golden_d1"
    full_log = (model / "train_log.jsonl").read_text()
    assert (model / "train_log.released.jsonl").read_text() == full_log
    data = manifest(run)
    data["stages"]["train:golden_d1"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(data))
    (model / "train_log.jsonl").write_text(full_log.splitlines(keepends=True)[0])
    # a copy taken now is of the model its readers saw: the whole log, not the part the retraining has written
    proc = subprocess.run([sys.executable, "scripts/copy_without_weights.py", str(out), str(tmp_path / "mid")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert (seed_dir(tmp_path / "mid", 0) / "models" / "golden_d1" / "train_log.jsonl").read_text() == full_log
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_pipeline(changed.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 4})}), run)
    text = " ".join(log.getvalue().split())
    assert text.count("train:golden_d1 ─") == 1 and manifest(run)["stages"]["train:golden_d1"]["status"] == "done"
    assert "golden_d1: the same loss at all" in text
    assert manifest(run)["retrained"] == manifest_released and not manifest(run).get("released")


@pytest.mark.slow
def test_a_model_whose_reader_has_not_finished_keeps_its_weights(tiny_study, tmp_path):
    cfg, out = copy_of(tiny_study, tmp_path)
    run = seed_dir(out, 0)
    data = manifest(run)
    data["stages"]["eval:step"]["status"] = "running"  # as when a study is killed in the middle of it
    (run / "manifest.json").write_text(json.dumps(data))

    proc = subprocess.run([*CLI, "prune", str(out), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not manifest(run).get("released") and weight_files(run / "models" / "golden_d1")  # a dry run
    text = " ".join(proc.stdout.split())
    assert "would release" in text and "waiting for eval:step" in text and "would free" in text

    rows = {r.model.name: r for r in prune_run(run)}
    assert rows["step"].state == "kept" and rows["step"].waiting_for == ("eval:step",)
    assert rows["golden_all"].state == rows["golden_d1"].state == "released" and weight_files(run / "models" / "step")
    # the tiny model's start model too: train:step made a model that is still needed (it may train again)
    assert rows["init"].state == "kept" and rows["init"].waiting_for == ("train:step",)

    status = subprocess.run([*CLI, "status", str(run)], capture_output=True, text=True, timeout=300)
    assert "weights released" in status.stdout and status.returncode == 0


@pytest.mark.slow
def test_a_copy_without_weights_resumes_where_only_unreleased_models_train_again(tiny_study, tmp_path):
    """scripts/copy_without_weights.py: what a long study keeps between machines. Released models come along
    (their readers stay done); a finished model still read by an unfinished stage is released in the copy and
    trains again in place there, so nothing else runs again."""
    cfg, out = copy_of(tiny_study, tmp_path)
    run = seed_dir(out, 0)
    data = manifest(run)
    data["stages"]["eval:step"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(data))
    prune_run(run)
    dest = tmp_path / "copy"
    proc = subprocess.run([sys.executable, "scripts/copy_without_weights.py", str(out), str(dest)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    # the tiny model's start (init) was kept by prune too: step trains again from it
    assert "released in the copy (they train again in place where needed): init, step" in proc.stdout
    copy = seed_dir(dest, 0)
    assert not list(dest.rglob("*.safetensors")) and (dest / "study.json").exists()
    assert (copy / "models" / "step" / "train_summary.json").exists()
    assert (copy / "models" / "golden_all" / "train_summary.json").exists()
    assert manifest(copy)["released"]["models/step"] == Manifest(run).digest(run / "models" / "step")

    before = manifest(copy)["stages"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_study(cfg, [0], dest)
    after = manifest(copy)["stages"]
    rerun = {name for name in after if after[name].get("started") != before[name].get("started")}
    assert rerun == {"init_model", "train:step", "eval:step", "report"}, rerun
    assert (copy / "models" / "step" / "model.safetensors").exists()


def test_a_run_whose_config_this_version_cannot_read_is_left_alone(tmp_path):
    model = tmp_path / "models" / "golden_d1"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"train:golden_d1": {"status": "done"}},
                                                        "config": {"a_setting_from_elsewhere": 1}}))
    with pytest.raises(UserError, match="nothing deleted"):
        prune_run(tmp_path)
    assert (model / "model.safetensors").exists()


def test_a_run_in_use_is_neither_pruned_nor_run_twice_and_status_names_its_process(tmp_path):
    """While a process works in a run directory (a study, say), `steptune prune` and a second run there are refused
    in one line naming that process, before they read or write anything; `steptune status` tells its running stage
    from one a kill interrupted. The lock is the kernel's: a killed holder leaves none."""
    import signal

    import psutil

    from steptune.pipeline.config import load_config
    from steptune.pipeline.lock import RunInUse
    from steptune.pipeline.status import run_status

    run = tmp_path / "run"
    run.mkdir()
    # the holder forks a child that outlives it (an environment worker does, for a moment, after a kill)
    holder = subprocess.Popen([sys.executable, "-c", "import os, time; from pathlib import Path; "
                               "from steptune.pipeline.lock import hold_run\n"
                               f"with hold_run(Path({str(run)!r}), 'x'):\n"
                               "    if os.fork() == 0:\n        time.sleep(120); os._exit(0)\n"
                               "    print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # the stage it runs, and one that an earlier process left "running" when it was stopped
        stages = {"stages": {"eval:golden_d1": {"status": "running", "started": "2026-12-06T20:00:00"},
                             "train:golden_d1": {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}}}
        (run / "manifest.json").write_text(json.dumps(stages))
        child = next(iter(psutil.Process(holder.pid).children()))
        with pytest.raises(RunInUse, match=rf"in use by pid {holder.pid} .*steptune prune cannot start beside it"):
            prune_run(run)
        (tmp_path / "c.yaml").write_text("model: {base: some/model}\n")
        with pytest.raises(RunInUse, match=rf"pid {holder.pid} .*this run cannot start beside it"):
            run_pipeline(load_config(tmp_path / "c.yaml"), run)
        assert json.loads((run / "manifest.json").read_text()) == stages  # neither wrote a thing
        assert [r["state"] for r in run_status(run)[0]] == ["interrupted", f"running (pid {holder.pid})"]
        with pytest.raises(UserError, match="nothing deleted"):  # a dry run reads only: past the lock to the config
            prune_run(run, dry_run=True)
        # `steptune prune` on a study leaves its running seed as it is and goes on with the others
        cli = subprocess.run([*CLI, "prune", str(tmp_path)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "COLUMNS": "400"})
        assert cli.returncode == 0 and f"all kept: {run} is in use by pid {holder.pid}" in cli.stdout, cli.stdout
        holder.kill()
        holder.wait()
        assert child.is_running()
        assert [r["state"] for r in run_status(run)[0]] == ["interrupted", "interrupted"]
        with pytest.raises(UserError, match="nothing deleted"):  # past the lock now, the child still there
            prune_run(run)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the child too
        holder.wait()
