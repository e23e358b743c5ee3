"""Pipeline building blocks: the U1/U2 split, config validation, the manifest's stage keys."""

from pathlib import Path

import pytest

from steptune.data.trajectory import Step, Trajectory
from steptune.pipeline.config import ConfigError, load_config
from steptune.pipeline.manifest import Manifest, file_digest, stage_key
from steptune.pipeline.split import split_by_task


def traj(task_type: str, i: int, sample: int = 0) -> Trajectory:
    return Trajectory(id=f"{task_type}/{i}#{sample}", env="sciworld", task_id=f"{task_type}/{i}", task="t",
                      steps=[Step(action="look around")], meta={"task_type": task_type})


def test_split_is_by_task_stratified_and_seeded():
    trajs = [traj(tt, i, s) for tt, n in (("boil", 10), ("melt", 4), ("find", 1)) for i in range(n) for s in range(2)]
    d1, d2 = split_by_task(trajs, 0.5, seed=3)
    assert len(d1) + len(d2) == len(trajs)
    u1, u2 = {t.task_id for t in d1}, {t.task_id for t in d2}
    assert not u1 & u2  # both samples of a task land on the same side
    for tt, n1 in (("boil", 5), ("melt", 2), ("find", 1)):
        assert sum(t.startswith(tt) for t in u1) == n1
    assert split_by_task(trajs, 0.5, seed=3) == (d1, d2)
    assert split_by_task(trajs, 0.5, seed=4)[0] != d1
    with pytest.raises(ValueError):
        split_by_task(trajs, 1.0)


def test_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: x}\nenv: {name: twx, workerz: 2}\nfilter: {max_errors: two}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "env.workerz" in str(err.value) and "filter.max_errors" in str(err.value)
    (tmp_path / "none.yaml").write_text("env: {name: twx}\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "notyaml.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "notyaml.yaml")


def test_overrides_and_manifest_keys(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model: {base: some/model}\n")
    cfg = load_config(cfg_path, {"filter.max_errors": 1, "env.workers": 3})
    assert cfg.filter.max_errors == 1 and cfg.env.workers == 3
    # a teacher named alone in the file (teacher: mc) takes a setting of its own from --set
    cfg_path.write_text("model: {base: some/model}\nsynthesis: {teacher: mc}\n")
    teacher = load_config(cfg_path, {"synthesis.teacher.margin": 0}).synthesis.teacher
    assert (teacher.name, teacher.margin) == ("mc", 0)
    with pytest.raises(ConfigError, match="margin"):  # a setting the teacher does not have is still refused
        load_config(tmp_path / "c.yaml", {"synthesis.teacher.name": "expert", "synthesis.teacher.margin": 0})
    with pytest.raises(ConfigError, match="cannot set model.base.x: base is not a section"):  # other strings stay
        load_config(cfg_path, {"model.base.x": 1})
    data = tmp_path / "d.jsonl"
    data.write_text("a\n")
    k1 = stage_key({"x": 1}, [file_digest(data)])
    data.write_text("b\n")
    k2 = stage_key({"x": 1}, [file_digest(data)])
    assert k2 != k1 and stage_key({"x": 2}, [file_digest(data)]) != k2
    m = Manifest(tmp_path)
    t0 = m.start("golden", "k")
    assert not m.is_done("golden", "k", [data])
    m.finish("golden", t0, [data])
    assert Manifest(tmp_path).is_done("golden", "k", [data])
    assert not Manifest(tmp_path).is_done("golden", "other", [data])
    assert not Manifest(tmp_path).is_done("golden", "k", [data, Path(tmp_path / "missing")])
    # a stage resumed after a kill counts its runs (its time is the last run's); a new key starts the count again
    Manifest(tmp_path).start("eval", "k")
    resumed = Manifest(tmp_path)
    resumed.finish("eval", resumed.start("eval", "k"), [data])
    assert Manifest(tmp_path).data["stages"]["eval"]["parts"] == 2
    assert "parts" not in Manifest(tmp_path).data["stages"]["golden"]
    Manifest(tmp_path).start("eval", "other")
    assert "parts" not in Manifest(tmp_path).data["stages"]["eval"]


def test_run_until_a_stage_stops_there_and_says_so(tmp_path):
    """`steptune run --until split` on the smoke preset: real TextWorldExpress golden trajectories, no model."""
    import json
    import subprocess
    import sys

    preset = Path(__file__).resolve().parents[1] / "src/steptune/resources/presets/smoke.yaml"
    cli = [sys.executable, "-c", "from steptune.cli import main; main()", "run", str(preset), "--output", str(tmp_path)]
    proc = subprocess.run([*cli, "--until", "split"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert list(stages) == ["golden", "split"] and all(s["status"] == "done" for s in stages.values())
    assert (tmp_path / "data" / "d1.jsonl").exists() and not (tmp_path / "models").exists()
    assert "no evaluation yet" in " ".join(proc.stdout.split())  # rich wraps at the terminal width
    proc = subprocess.run([*cli, "--until", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr and "train:golden_d1" in proc.stderr
    # a mistyped stage writes nothing: no run directory, no manifest rewritten with this config
    fresh = tmp_path / "fresh"
    cli[cli.index("--output") + 1] = str(fresh)
    for flag in ("--until", "--from"):
        proc = subprocess.run([*cli, flag, "nope"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr
    assert not fresh.exists()


def test_stage_keys_survive_moving_the_run_and_ignore_speed_settings(tmp_path):
    import steptune
    from steptune.pipeline.run import Run, config_for_key

    preset = Path(steptune.__file__).parent / "resources" / "presets" / "smoke.yaml"

    def keys(run_dir: Path, **overrides) -> dict[str, str]:
        run = Run(load_config(preset, overrides), run_dir)
        # training and the methods' evaluations: stages whose settings name paths and need no data to be built
        return {s.name: stage_key(config_for_key(s.config(), run.dir), []) for s in run.stages()
                if s.name.startswith(("train:", "eval:")) and s.name != "eval:base_agent_u2"}

    here = keys(tmp_path / "a")
    assert any("<run>/models/" in str(config_for_key(s.config(), tmp_path / "a"))
               for s in Run(load_config(preset), tmp_path / "a").stages() if s.name == "eval:step")  # the eval stages name the run's models
    assert keys(tmp_path / "elsewhere" / "b") == here  # a copied or moved run directory is still up to date
    assert keys(tmp_path / "a", **{"eval.processes": 1, "env.workers": 3}) == here
    changed = keys(tmp_path / "a", **{"eval.limit": 5})
    assert all((changed[n] != here[n]) == n.startswith("eval:") for n in here)
    # the local backend's cache bound changes no reply; the student's dtype does, but its default "auto" is what runs
    # did before it existed, so their keys leave it out and such runs stay up to date
    assert keys(tmp_path / "a", **{"student.prefix_cache_gb": 0.5}) == here
    student = config_for_key(Run(load_config(preset), tmp_path / "a").student("step"))
    assert "dtype" not in student and "prefix_cache_gb" not in student
    bf16 = keys(tmp_path / "a", **{"student.dtype": "bfloat16"})
    assert all((bf16[n] != here[n]) == n.startswith("eval:") for n in here)
    # the same for an evaluation's max_repeats (the preset's is 3): None is how every evaluation ran before it
    # existed, so it is left out of the keys, while any number changes the evaluations'
    unbounded = keys(tmp_path / "a", **{"eval.max_repeats": None})
    eval_step = next(s.config() for s in Run(load_config(preset, {"eval.max_repeats": None}), tmp_path / "a").stages()
                     if s.name == "eval:step")
    assert "max_repeats" not in config_for_key(eval_step)
    for other in (unbounded, keys(tmp_path / "a", **{"eval.max_repeats": 10})):
        assert all((other[n] != here[n]) == n.startswith("eval:") for n in here)
    # both exceptions are the classes' own: another setting that happens to share a name stays in a key, be it in
    # another config class or in an environment's kwargs (a plain dict, hashed whole)
    from pydantic import BaseModel

    class Other(BaseModel):
        dtype: str = "auto"
        prefix_cache_gb: float = 2.0
        workers: int = 4

    assert config_for_key({"other": Other(), "student": Run(load_config(preset), tmp_path / "a").student("step")}) \
        == {"other": {"dtype": "auto", "prefix_cache_gb": 2.0, "workers": 4}, "student": student}
    kwargs = load_config(preset).env.kwargs
    for name in ("workers", "num_threads", "progress"):
        game = keys(tmp_path / "a", **{"env.kwargs": {**kwargs, name: 3}})
        assert all((game[n] != here[n]) == n.startswith("eval:") for n in here), name
