"""`steptune study --epoch-curve` and the equal-steps sensitivity row: the rule that picks the epoch count on the
seen split (hand-made run directories), and the real runs on a tiny TextWorldExpress setting."""

import json
from pathlib import Path

import pytest

from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.pipeline.epochs import (
    choose_epochs,
    curve_dir,
    edge_note,
    epoch_curve,
    equal_steps_dir,
    run_epoch_curve,
    run_equal_steps,
    study_sections,
)
from steptune.pipeline.report import premise_note
from steptune.pipeline.study import seed_dir, write_study


def _ep(i: int, success: bool, split: str = "seen") -> Trajectory:
    return Trajectory(id=f"{split}:twx/coin/{i}", env="twx", task_id=f"twx/coin/{i}", split=split, task="t",
                      success=success, reward=float(success), steps=[Step(action="take coin")])


def _curve_run(run: Path, wins: dict[str, int], n: int = 10, steps: int = 10) -> None:
    for m, k in wins.items():
        save_trajectories([_ep(i, i < k) for i in range(n)], run / "eval" / m / "episodes.jsonl")
        (run / "models" / m).mkdir(parents=True, exist_ok=True)
        (run / "models" / m / "train_summary.json").write_text(json.dumps({"steps": steps, "train_loss": 1.0}))


def test_the_curve_picks_the_best_mean_seen_success_and_fewer_epochs_on_a_tie(tmp_path):
    # seen successes out of 10 per seed, (golden D1, golden D1 ∪ D2), two seeds
    wins = {2: [(0, 5), (0, 5)], 4: [(4, 6), (4, 6)], 8: [(5, 6), (4, 6)]}
    for epochs, per_seed in wins.items():
        for seed, (d1, all_) in enumerate(per_seed):
            _curve_run(seed_dir(curve_dir(tmp_path, epochs), seed), {"golden_d1": d1, "golden_all": all_},
                       steps=5 * epochs)
    curve = epoch_curve(tmp_path, [0, 1], [2, 4, 8])
    scores = {p["epochs"]: p["score"] for p in curve["points"]}
    assert scores == {2: 25.0, 4: 50.0, 8: 52.5}
    assert curve["points"][0]["seen_success"] == {"golden_d1": 0.0, "golden_all": 50.0}
    assert curve["points"][2]["training"]["golden_d1"] == [{"steps": 40, "train_loss": 1.0}] * 2
    assert curve["chosen"] == 8  # 52.5 beats 50.0 by more than the 1-point tie margin
    # ...and is the largest count tried, still climbing: the curve says so
    assert curve["note"].startswith("the chosen 8 epochs is the largest count tried and beat 4 by 2.5 points")
    points = curve["points"]
    assert edge_note(points, 4) is None  # not the edge
    assert edge_note(points[:1], 2) is None  # one point: nothing to compare
    assert choose_epochs([{**p, "score": s} for p, s in zip(curve["points"], [25.0, 52.0, 52.5])]) == 4  # a tie
    assert choose_epochs([{"epochs": 2, "score": None}, {"epochs": 4, "score": 10.0}]) == 4  # an unfinished point
    with pytest.raises(Exception, match="no seen-split results"):
        choose_epochs([{"epochs": 2, "score": None}])


def test_study_report_shows_the_curve_and_the_equal_steps_row(tmp_path):
    methods = ["golden_d1", "golden_all", "step", "step_unmasked"]
    for root in (tmp_path, equal_steps_dir(tmp_path)):
        run = seed_dir(root, 0)
        run.mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"config": {"methods": methods, "eval": {"splits": ["seen"]}}}))
        wins = {"golden_d1": 1, "golden_all": 2, "step": 3, "step_unmasked": 2} if root == tmp_path else \
            {"golden_d1": 2, "golden_all": 2, "step": 2, "step_unmasked": 2}
        for m in methods:
            save_trajectories([_ep(i, i < wins[m]) for i in range(4)], run / "eval" / m / "episodes.jsonl")
            (run / "eval" / m / "summary.json").write_text("{}")  # the evaluation finished
            (run / "models" / m).mkdir(parents=True)
            (run / "models" / m / "train_summary.json").write_text(json.dumps({"steps": 30, "epochs": 2.0}))
    _curve_run(seed_dir(curve_dir(tmp_path, 2), 0), {"golden_d1": 1, "golden_all": 3})
    (tmp_path / "epoch_curve.json").write_text(json.dumps(epoch_curve(tmp_path, [0], [2])))
    s = write_study(tmp_path, [0])
    assert s["epoch_curve"]["chosen"] == 2 and s["epoch_curve"]["points"][0]["score"] == 20.0
    eq = s["equal_steps"]
    assert eq["steps_per_seed"] == [30] and eq["step_minus_golden_d1_seen"]["mean"] == 0.0
    assert s["step_minus_golden_d1_seen"]["mean"] == 50.0  # the study's own row is untouched
    md = (tmp_path / "study.md").read_text()
    assert "## Epoch count, chosen on the seen split" in md and "Chosen: **2 epochs**" in md
    assert "## Sensitivity: equal optimizer steps" in md and "| STeP − golden D1 | +0.0" in md


@pytest.mark.slow
def test_epoch_curve_and_equal_steps_runs_on_real_games(tiny_study):
    cfg, tmp_path, log = tiny_study
    curve = run_epoch_curve(cfg, [0], tmp_path, [1, 2])
    one, two = (seed_dir(curve_dir(tmp_path, e), 0) for e in (1, 2))
    manifest = json.loads((one / "manifest.json").read_text())
    assert "synthesize" not in manifest["stages"] and "train:step" not in manifest["stages"]  # no stage 2 here
    assert not (one / "eval" / "golden_d1" / "summary.json").read_text().count('"unseen"')  # seen only
    steps = {e: p["training"]["golden_d1"][0]["steps"] for e, p in zip((1, 2), curve["points"])}
    assert steps[2] == 2 * steps[1]
    # the study trained 1 epoch: that point's two trainings are the study's, copied, not trained again
    study = seed_dir(tmp_path, 0)
    for m in ("golden_d1", "golden_all"):
        assert manifest["stages"][f"train:{m}"]["reused_from"] == str(study)
        assert manifest["stages"][f"train:{m}"]["key"] == json.loads(
            (study / "manifest.json").read_text())["stages"][f"train:{m}"]["key"]
        copied, trained = (one / "models" / m / "model.safetensors"), (study / "models" / m / "model.safetensors")
        assert copied.read_bytes() == trained.read_bytes() and not copied.samefile(trained)
        assert "reused_from" not in json.loads((two / "manifest.json").read_text())["stages"][f"train:{m}"]
    assert curve["chosen"] in (1, 2) and json.loads((tmp_path / "epoch_curve.json").read_text()) == curve

    # the pipeline warns when the base agent's U2 success is outside 30-70% (STeP's premise)
    base = json.loads((seed_dir(tmp_path, 0) / "eval" / "base_agent_u2" / "summary.json").read_text())["overall"]
    out = " ".join(log.split())
    assert ("warning: STeP's premise does not hold" in out) == (premise_note(base["success_rate"]) is not None)
    run_equal_steps(cfg, [0], tmp_path)
    equal = seed_dir(equal_steps_dir(tmp_path), 0)
    trained = {m: json.loads((study / "models" / m / "train_summary.json").read_text())["steps"]
               for m in cfg.methods}
    target = max(trained.values())
    assert len(set(trained.values())) > 1  # the methods differ in steps at equal epochs...
    for m in cfg.methods:  # ...and not at equal steps
        assert json.loads((equal / "models" / m / "train_summary.json").read_text())["steps"] == target
    assert (equal / "data" / "dr.jsonl").read_bytes() == (study / "data" / "dr.jsonl").read_bytes()
    assert not (equal / "eval" / "step" / "injected.jsonl").exists()
    stages = json.loads((equal / "manifest.json").read_text())["stages"]
    # the methods whose study training took the S steps are copied from it (the same training), the others trained
    for m, n in trained.items():
        copied = (equal / "models" / m / "model.safetensors").read_bytes() == (
            study / "models" / m / "model.safetensors").read_bytes()
        assert (stages[f"train:{m}"].get("reused_from") == str(study)) == copied == (n == target), m
        assert "reused_from" not in stages[f"eval:{m}"]  # every model plays the row's games (no injected error)
    assert "synthesize" not in stages and "golden" not in stages
    s = write_study(tmp_path, [0])
    assert s["equal_steps"]["steps_per_seed"] == [target] and "step_minus_golden_d1_seen" in s["equal_steps"]
    # a study of more seeds than the row (`--equal-steps-seeds`): the row aggregates the seeds it has
    assert study_sections(tmp_path, [0, 1])["equal_steps"]["seeds"] == [0]

    # resumable: a second call finds every stage up to date and retrains nothing
    before = {m: (equal / "models" / m / "train_summary.json").stat().st_mtime_ns for m in cfg.methods}
    run_equal_steps(cfg, [0], tmp_path)
    assert before == {m: (equal / "models" / m / "train_summary.json").stat().st_mtime_ns for m in cfg.methods}


@pytest.mark.slow
def test_the_curve_can_run_on_fewer_seeds_than_the_study(tmp_path):
    """`--curve-seeds 0` with a study of seeds 0 and 1: the curve trains seed 0 only (a slow model's curve costs one
    seed, not three)."""
    import yaml
    from _tiny_study import TINY
    from typer.testing import CliRunner

    from steptune.cli.app import app

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["study", str(tmp_path / "tiny.yaml"), "--seeds", "0", "--seeds", "1",
                                      "--epoch-curve", "1", "--curve-seeds", "0", "--curve-only",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["chosen_epochs"] == 1
    points = tmp_path / "out" / "epoch-curve" / "epochs-1"
    assert (points / "seed-0" / "eval" / "golden_all" / "summary.json").exists() and not (points / "seed-1").exists()
    assert json.loads((tmp_path / "out" / "epoch_curve.json").read_text())["seeds"] == [0]


@pytest.mark.parametrize("args,message", [(["--equal-steps", "--equal-steps-seeds", "3"], "not among the study's"),
                                          (["--equal-steps-seeds", "0"], "add --equal-steps")])
def test_equal_steps_seeds_must_be_study_seeds_of_an_equal_steps_row(tmp_path, args, message):
    import yaml
    from _tiny_study import TINY
    from typer.testing import CliRunner

    from steptune.cli.app import app

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["study", str(tmp_path / "tiny.yaml"), "--seeds", "0", "--seeds", "1", *args,
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code != 0 and message in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "out").exists()  # refused before any work
