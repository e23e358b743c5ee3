"""A run directory always matches its config: a changed setting never reuses what older settings wrote, a failed
stage says so, config mistakes stop the run before any work, and ids mean one thing (issue 15).

Real runs of the smoke preset through the real CLI (real TextWorldExpress, tiny Llama), cut short with --until.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from steptune.data.trajectory import Step, Trajectory, load_trajectories, save_trajectories
from steptune.envs.registry import make_env
from steptune.pipeline.config import load_config
from steptune.pipeline.run import Run

PRESET = Path(__file__).resolve().parents[1] / "src/steptune/resources/presets/smoke.yaml"
CLI = [sys.executable, "-c", "from steptune.cli import main; main()"]
FAST = ["--set", "golden.limit=12", "--set", "train.num_train_epochs=1"]


def steptune(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def smoke(run: Path, *args) -> subprocess.CompletedProcess:
    proc = steptune("run", PRESET, "--output", run, *FAST, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@pytest.mark.slow
def test_a_changed_setting_never_reuses_what_older_settings_wrote(tmp_path):
    run = tmp_path / "run"
    # a run of another size was here (as when a smoke run goes into an interrupted quickstart's folder)
    smoke(run, "--set", "model.init.hidden_size=32", "--until", "train:golden_d1")
    smoke(run, "--until", "train:golden_d1")  # used to crash: its checkpoint had the other size
    assert weights(run / "models" / "golden_d1")["model.embed_tokens.weight"].shape[1] == 64
    first = weights(run / "models" / "golden_d1")

    # a new learning rate trains again from the start (it used to resume the old final checkpoint: loss 0.0)
    smoke(run, "--set", "train.learning_rate=0.0001", "--until", "train:golden_d1")
    summary = json.loads((run / "models" / "golden_d1" / "train_summary.json").read_text())
    assert summary["train_loss"] > 0
    again = weights(run / "models" / "golden_d1")
    assert any(not (again[k] == first[k]).all() for k in first)

    # fewer golden tasks: golden.jsonl holds exactly those (it used to keep the earlier 12), and everything that
    # came from the old golden set is gone
    proc = smoke(run, "--set", "golden.limit=6", "--until", "split")
    assert len(load_trajectories(run / "data" / "golden.jsonl")) == 6
    assert len(load_trajectories(run / "data" / "d1.jsonl")) + len(load_trajectories(run / "data" / "d2.jsonl")) == 6
    assert not (run / "models").exists() or not any((run / "models").iterdir())
    assert list(manifest(run)["stages"]) == ["golden", "split"]
    assert "removed its outputs" in proc.stdout


def test_a_failed_stage_is_recorded_as_failed_and_reported_in_one_line(tmp_path):
    bad = tmp_path / "golden.jsonl"
    bad.write_text('{"id": "a", "env": "twx"\n')  # truncated record
    run = tmp_path / "run"
    proc = steptune("run", PRESET, "--output", run, "--set", "golden.source=file", "--set", f"golden.path={bad}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "golden.jsonl" in proc.stderr
    stage = manifest(run)["stages"]["golden"]
    assert stage["status"] == "failed" and stage["error"]
    status = steptune("status", run)  # the failure and what never ran, from the run's files
    assert status.returncode == 0, status.stderr
    lines = " ".join(status.stdout.split())
    assert "golden │ failed" in lines and "golden.jsonl" in lines
    assert "not started: split, init_model, train:golden_d1, eval:" in lines and "synthesize" in lines
    (tmp_path / "empty").mkdir()
    empty = steptune("status", tmp_path / "empty")
    assert empty.returncode == 2 and "no run under" in " ".join(empty.stderr.replace("│", " ").split())


@pytest.mark.parametrize("setting, key", [
    ("train.max_stpes=3", "train.max_stpes"),
    ("filter.max_errors=-1", "filter.max_errors"),
    ("env.workers=-2", "env.workers"),
    ("train.learning_rate=-0.001", "train.learning_rate"),
    ("synthesis.teacher=llm", "synthesis"),
])
def test_config_mistakes_stop_the_run_at_load_in_one_line_and_create_nothing(tmp_path, setting, key):
    run = tmp_path / "run"
    proc = steptune("run", PRESET, "--output", run, "--set", setting, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "smoke.yaml" in lines[0] and key in lines[0]
    assert not run.exists()


def test_the_synthesis_tasks_are_the_d2_tasks_whatever_the_golden_files_record_ids(tmp_path):
    """golden.source: file with record ids of the file's own (not the environment's task ids)."""
    expert = tmp_path / "expert"
    smoke(expert, "--until", "golden")
    golden = load_trajectories(expert / "data" / "golden.jsonl")
    for i, t in enumerate(golden):
        t.id = f"record-{i}"  # any file's record ids; task_id names the environment's task
    save_trajectories(golden, tmp_path / "golden.jsonl")
    run = tmp_path / "run"
    smoke(run, "--set", "golden.source=file", "--set", f"golden.path={tmp_path / 'golden.jsonl'}", "--until", "split")

    cfg = load_config(PRESET, {"golden.source": "file", "golden.path": str(tmp_path / "golden.jsonl")})
    tasks = Run(cfg, run).synthesis_config().tasks
    d2 = load_trajectories(run / "data" / "d2.jsonl")
    assert tasks and set(tasks) == {t.task_id for t in d2}
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    assert set(tasks) <= {t.id for t in env.tasks(cfg.golden.split)}


def test_a_stage_owns_exactly_what_depends_on_it(tmp_path):
    """What a changed stage takes down with it: its dependents through the files they read, and nothing else."""
    from steptune.pipeline.run import dependents

    stages = Run(load_config(PRESET), tmp_path).stages()
    assert dependents(stages, "synthesize") == [
        "synthesize", "filter", "train:step", "train:step_unmasked", "train:sequential", "eval:step",
        "eval:step_unmasked", "eval:sequential", "report"]
    # the base agent is evaluated with stage 2 (they may run at once): its U2 success (STeP's premise) comes first,
    # and its weights are free to release once all three have run
    assert dependents(stages, "train:golden_d1") == [
        "train:golden_d1", "eval:base_agent_u2", "synthesize", "eval:golden_d1", "filter", "train:step",
        "train:step_unmasked", "train:sequential", "eval:step", "eval:step_unmasked", "eval:sequential", "report"]
    assert dependents(stages, "eval:golden_all") == ["eval:golden_all", "report"]
    # stage 2, the longest, starts beside U2's evaluation, two at a time
    assert [s.name for s in stages if s.parallel][:3] == ["eval:base_agent_u2", "synthesize", "eval:golden_d1"]
    assert dependents(stages, "split")[-1] == "report" and len(dependents(stages, "split")) == len(stages) - 2


def test_after_each_training_evaluates_each_model_next_with_the_same_keys(tmp_path):
    """`eval.after_each_training` changes the order only: each method's evaluation follows its training, alone (not
    grouped with a neighbour), and every stage keeps its key, so a run can switch it on half-way."""
    from steptune.pipeline.run import config_for_key

    cfg = load_config(PRESET)
    plain = Run(cfg, tmp_path).stages()
    cfg.eval.after_each_training = True
    after = Run(cfg, tmp_path).stages()
    names = [s.name for s in after]
    assert sorted(names) == sorted(s.name for s in plain) and names != [s.name for s in plain]
    for method in ("golden_all", "step", "step_unmasked"):
        i = names.index(f"train:{method}")
        assert names[i + 1] == f"eval:{method}" and not after[i + 2].parallel
    assert names.index("eval:golden_all") < names.index("train:step")
    keyed = [name for name in names if name.startswith(("train:", "eval:")) and name != "eval:base_agent_u2"]
    for name in keyed:
        ours, theirs = (next(s for s in stages if s.name == name) for stages in (after, plain))
        assert config_for_key(ours.config(), tmp_path) == config_for_key(theirs.config(), tmp_path)
        assert ours.inputs == theirs.inputs and ours.outputs == theirs.outputs


def test_step_trains_on_d1_alone_and_says_so_when_the_filter_keeps_nothing(tmp_path):
    run = tmp_path / "run"
    # only what leads to STeP's training: no U2 evaluation, no other method, one test game a split
    proc = smoke(run, "--set", "filter.min_errors=1000", "--set", "methods=[golden_d1,step]", "--set",
                 "eval.base_agent_u2=false", "--set", "eval.limit=1", "--until", "train:step")
    assert (run / "data" / "dr.jsonl").read_text() == ""
    summary = json.loads((run / "models" / "step" / "train_summary.json").read_text())
    assert summary["trajectories"] == len(load_trajectories(run / "data" / "d1.jsonl")) > 0
    assert "dr.jsonl is empty" in " ".join(proc.stdout.split())


# Fast checks of what only a slow test (or none) pinned before ---------------------------------------------------

def test_the_run_seed_builds_the_tiny_models_initial_weights_unless_init_seed_pins_them(tmp_path):
    from steptune.models.tiny import build_tiny_model

    small = {"model.init.vocab_size": 300, "model.init.hidden_size": 16, "model.init.intermediate_size": 32,
             "model.init.num_hidden_layers": 1}
    golden = [Trajectory(id=f"g{i}", env="twx", task_id=f"twc/{i}", task=f"Tidy room {i}: a red shirt.",
                         steps=[Step(action="take red shirt", observation=f"You take it {i}.")]) for i in range(4)]
    built = {}
    for seed, init_seed in ((7, None), (7, 3)):
        run = Run(load_config(PRESET, {**small, "seed": seed, "model.init.seed": init_seed}),
                  tmp_path / f"run-{seed}-{init_seed}")
        save_trajectories(golden, run.golden)
        stage = next(s for s in run.stages() if s.name == "init_model")
        stage.fn(stage.config())
        built[seed, init_seed] = weights(run.paths.model_dir("init"))
    texts = [m.content for t in golden for m in t.messages(include_final_observation=True)]
    init = load_config(PRESET, small).model.init
    by_seed = {s: weights(build_tiny_model(texts, tmp_path / f"ref-{s}", init.model_copy(update={"seed": s})))
               for s in (0, 3, 7)}
    same = lambda a, b: all((a[k] == b[k]).all() for k in a)  # noqa: E731
    assert not same(by_seed[0], by_seed[7])  # the seed does reach the weights
    assert same(built[7, None], by_seed[7])  # the run's seed
    assert same(built[7, 3], by_seed[3])  # model.init.seed pins them


def test_a_changed_stage_setting_reruns_that_stage_and_what_follows_only(tmp_path):
    """In process, golden and split only (real TextWorldExpress expert, no model): a new split fraction redoes the
    split and keeps the golden set; a new golden limit redoes both."""
    from steptune.pipeline.run import run_pipeline

    def run(**settings):
        run_pipeline(load_config(PRESET, {"golden.limit": 8, **settings}), tmp_path, until_stage="split")
        return {name: rec["key"] for name, rec in manifest(tmp_path)["stages"].items()}  # a rerun records its key

    def sizes():
        return [len(load_trajectories(tmp_path / "data" / f"{n}.jsonl")) for n in ("golden", "d1", "d2")]

    first = run()
    assert sizes() == [8, 4, 4]
    assert run() == first  # nothing changed: nothing reran
    assert run(**{"env.backend": "ray", "env.workers": 3}) == first  # where and how many play: the same games
    second = run(**{"split.d1_fraction": 0.75})
    assert second["golden"] == first["golden"] and second["split"] != first["split"]
    assert sizes() == [8, 6, 2]
    third = run(**{"split.d1_fraction": 0.75, "golden.limit": 4})
    assert third["golden"] != second["golden"] and third["split"] != second["split"]
    assert sizes() == [4, 3, 1]


def test_status_says_which_finished_stages_the_next_run_makes_again(tmp_path):
    """`steptune status` reads a stage "done" by its record only while its key (settings and inputs) is the one the
    run's config gives now: golden and split of a real run, then the recorded config changed as the next run writes it
    (before that run got to them), then an interrupted stage whose settings changed. A partial run names as not
    started only the stages it runs."""
    from steptune.pipeline.status import RESTARTS, run_status

    from steptune.pipeline.run import run_pipeline

    run_dir = tmp_path / "run"
    run_pipeline(load_config(PRESET, {"golden.limit": 4}), run_dir, until_stage="split")

    def states(**settings):
        data = manifest(run_dir)
        data["config"] = load_config(PRESET, {"golden.limit": 4, **settings}).model_dump(mode="json")
        (run_dir / "manifest.json").write_text(json.dumps(data))
        return {r["stage"]: (r["state"], r["progress"]) for r in run_status(run_dir)[0]}

    assert states() == {"golden": ("done", ""), "split": ("done", "")}
    assert states(**{"split.d1_fraction": 0.75}) == {
        "golden": ("done", ""), "split": ("out of date", "its settings or inputs changed since: the next run makes it "
                                                          "again")}
    assert {s for s, _ in states(**{"golden.limit": 5}).values()} == {"out of date"}  # split reads what golden wrote
    assert states(**{"env.workers": 3}) == {"golden": ("done", ""), "split": ("done", "")}  # speed only: same key
    assert {"init_model", "train:golden_d1", "synthesize", "report"} <= set(run_status(run_dir)[1])
    data = manifest(run_dir)
    data["only"] = ["split", "init_model"]  # a partial run (equal steps) lists only what it runs as not started
    (run_dir / "manifest.json").write_text(json.dumps(data))
    assert run_status(run_dir)[1] == ["init_model"]

    data = manifest(run_dir)
    data["stages"]["split"]["status"] = "running"  # killed while splitting, then its settings changed
    (run_dir / "manifest.json").write_text(json.dumps(data))
    assert states()["split"] == ("interrupted", "")
    assert states(**{"split.d1_fraction": 0.75})["split"] == ("interrupted", RESTARTS)


def test_a_stage_made_by_other_code_stays_but_says_which_files_changed(tmp_path, monkeypatch, capsys):
    """Golden and split in process (real TextWorldExpress expert) from a copy of steptune's sources: after the expert's
    module changes, golden stays up to date (a rerun can cost hours, and most changes leave results as they were),
    and the run and `steptune status` name the changed file; split, whose code did not change, says nothing."""
    import shutil

    import steptune
    from steptune.pipeline import manifest as manifest_module
    from steptune.pipeline.run import run_pipeline
    from steptune.pipeline.status import run_status

    sources = tmp_path / "steptune"
    shutil.copytree(Path(steptune.__file__).parent, sources, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(manifest_module, "PACKAGE_ROOT", sources)
    run_dir, cfg = tmp_path / "run", load_config(PRESET, {"golden.limit": 4})

    run_pipeline(cfg, run_dir, until_stage="split")
    first = manifest(run_dir)["stages"]
    assert "envs/twx.py" in first["golden"]["code"] and "synthesis/golden.py" in first["golden"]["code"]
    assert list(first["split"]["code"]) == ["pipeline/split.py"]
    capsys.readouterr()

    run_pipeline(cfg, run_dir, until_stage="split")  # nothing changed: nothing to say
    assert "other code" not in capsys.readouterr().out
    with (sources / "envs" / "twx.py").open("a") as fh:
        fh.write("\n# the expert mended\n")
    run_pipeline(cfg, run_dir, until_stage="split")
    out = " ".join(capsys.readouterr().out.split())
    assert "golden was made by other code (envs/twx.py changed since): `--from golden` makes it again" in out
    assert "split was made by other code" not in out
    assert manifest(run_dir)["stages"] == first  # kept as they were
    rows = {r["stage"]: r for r in run_status(run_dir)[0]}
    assert rows["golden"]["progress"] == "made by other code: envs/twx.py changed since"
    assert rows["split"]["progress"] == ""
    # a run recorded before stages kept their code's digests: nothing is known, so nothing is said
    data = manifest(run_dir)
    del data["stages"]["golden"]["code"]
    (run_dir / "manifest.json").write_text(json.dumps(data))
    assert {r["stage"]: r for r in run_status(run_dir)[0]}["golden"]["progress"] == ""


def _pid(config, progress=None) -> dict:
    import os

    return {"pid": os.getpid()}


def _processes(config, progress=None) -> dict:
    return {"processes": config.processes}


def test_an_evaluation_run_beside_others_plays_in_its_own_process_only(tmp_path):
    """An evaluation alone may split its plain and injected episodes over `eval.processes`; beside others it is one
    of the processes already, and plays in it."""
    from steptune.evaluation.eval import EvalConfig
    from steptune.pipeline.run import Stage, _run_at_once

    run = Run(load_config(PRESET), tmp_path / "run")
    run.open()
    config = EvalConfig(model="unused", env="twx", out=str(tmp_path / "eval"), processes=2)
    stages = [Stage(f"eval:{i}", [], [], lambda: None, _processes, parallel=True) for i in range(3)]
    _run_at_once(run, stages, [(s, config, f"key{i}") for i, s in enumerate(stages)], processes=2, only=None)
    assert [run.manifest.data["stages"][s.name]["info"]["processes"] for s in stages] == [1, 1, 1]


def test_stages_run_at_once_each_get_a_fresh_process(tmp_path):
    """Evaluations that run side by side (`eval.processes`) each start in a new process, never in one that held an
    earlier evaluation's model."""
    from steptune.pipeline.run import Stage, _run_at_once

    run = Run(load_config(PRESET), tmp_path / "run")
    run.open()
    stages = [Stage(f"eval:{i}", [], [], lambda: None, _pid, parallel=True) for i in range(4)]
    _run_at_once(run, stages, [(s, None, f"key{i}") for i, s in enumerate(stages)], processes=2, only=None)
    pids = [run.manifest.data["stages"][s.name]["info"]["pid"] for s in stages]
    assert len(set(pids)) == 4
