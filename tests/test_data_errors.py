"""User errors with data and paths: every one is a FormatError / UserError naming the file and line, and through
the CLI one `error: ...` line, exit status 2, no traceback, and nothing created.

tests/malformed/ holds the corpus of broken inputs; EXPECTED says where each one must be reported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_formats import ETO_RECORD, sample

import steptune
from steptune.data.formats import read_any
from steptune.data.trajectory import FormatError, load_trajectories, save_trajectories

CORPUS = Path(__file__).parent / "malformed"
SRC = str(Path(steptune.__file__).resolve().parents[1])

EXPECTED = {  # file: (line, what the message says)
    "empty.jsonl": (1, "empty"),
    "blank.jsonl": (1, "empty"),
    "empty_list.json": (1, "empty JSON list"),
    "binary.jsonl": (1, "not UTF-8"),
    "latin1.jsonl": (2, "not UTF-8"),
    "nul.jsonl": (3, "NUL byte"),
    "truncated_array.json": (37, "truncated"),
    "system_only.jsonl": (2, "only system turns"),
    "weight_string.jsonl": (3, "weight must be 0 or 1, got '1'"),
    "weight_true.jsonl": (3, "weight must be 0 or 1, got True"),
    "weight_half.jsonl": (3, "weight must be 0 or 1, got 0.5"),
    "loss_string.jsonl": (3, "loss must be true or false, got 'false'"),
    "weight_null.jsonl": (3, "weight must be 0 or 1, got None"),
    "flags_disagree.jsonl": (3, "flags disagree"),
    "steptune_weight_string.jsonl": (1, "steps.0.weight"),
    "steptune_weight_true.jsonl": (2, "steps.0.weight"),
    "reward_percent.jsonl": (1, "divide it by 100"),
    "pretty_object.json": (1, "unknown record format"),
    "not_records.json": (1, "item 0: record is not a JSON object"),
    "two_markers.json": (1, "both say \"Now, it's your turn\""),
}


def test_the_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_file_is_one_error_naming_file_and_line(name):
    line, what = EXPECTED[name]
    with pytest.raises(FormatError) as err:
        read_any(CORPUS / name)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{CORPUS / name}:{line}: ") or f"; {CORPUS / name}:{line}: " in message
    assert what in message


def test_jsonl_loader_reports_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "ours.jsonl"
    save_trajectories([sample(), sample()], path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"\xff\xfe garbage\n" + lines[1])
    with pytest.raises(FormatError, match=r"ours\.jsonl:2: not UTF-8"):
        load_trajectories(path)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "from steptune.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def created(root: Path, before: set[str]) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} - before


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "eto.jsonl").write_text(json.dumps(ETO_RECORD) + "\n")
    for name in ("latin1.jsonl", "truncated_array.json", "system_only.jsonl", "empty.jsonl", "weight_string.jsonl"):
        (tmp_path / name).write_bytes((CORPUS / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize("name", ["latin1.jsonl", "truncated_array.json", "system_only.jsonl", "empty.jsonl",
                                  "weight_string.jsonl"])
def test_convert_bad_data(workdir, name):
    before = created(workdir, set())
    res = run_cli("convert", name, "out/x.jsonl", "--to", "sharegpt", cwd=workdir)
    assert_one_line_error(res, f"{name}:{EXPECTED[name][0]}: ")
    assert created(workdir, before) == set()


def test_cli_path_and_option_errors(workdir, tiny_model_dir):
    before = created(workdir, set())
    cases = [
        (["convert", "missing.jsonl", "out.jsonl"], "missing.jsonl: no such file"),
        (["convert", "eto.jsonl", "out.jsonl", "--to", "parquet"], "unknown output format 'parquet'"),
        (["inspect", "missing.jsonl", "--model", str(tiny_model_dir)], "missing.jsonl: no such file"),
        (["inspect", "latin1.jsonl", "--model", str(tiny_model_dir)], "latin1.jsonl:2: not UTF-8"),
        (["inspect", "eto.jsonl", "--model", "/no/such/model"], "--model /no/such/model: no such file"),
        (["inspect", "eto.jsonl", "--model", str(tiny_model_dir), "-i", "3"], "--index 3: eto.jsonl has 1"),
        (["inspect", "eto.jsonl", "--model", str(tiny_model_dir), "--chat-template", "nope"],
         "unknown chat template 'nope'"),
        (["init-model", "--corpus", "empty.jsonl", "--out", "model"], "empty.jsonl:1: the file is empty"),
        (["from-gguf", "--package", "no_such_package_xyz", "--out", "conv"], "'no_such_package_xyz' is not installed"),
        (["from-gguf", "--gguf", "eto.jsonl", "--out", "conv"], "not a .gguf file"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(*args, cwd=workdir), fragment)
    assert created(workdir, before) == set()


def test_eval_refuses_bad_model_or_env_before_writing(workdir, tiny_model_dir):
    before = created(workdir, set())
    cases = [
        (["--model", "/no/such/model", "--env", "twx"], "--model /no/such/model: no such file or directory"),
        (["--model", "local:./missing-model", "--env", "twx"], "--model ./missing-model: no such file"),
        (["--model", str(tiny_model_dir), "--env", "nethack"], "--env nethack: unknown environment"),
        (["--model", str(workdir / "eto.jsonl"), "--env", "twx"], "a file, not a model directory"),
        (["--model", str(tiny_model_dir), "--env", "twx", "--config", "nope.json"], "--config nope.json: no such"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli("eval", *args, "--out", "run", "--limit", "1", cwd=workdir), fragment)
    assert_one_line_error(run_cli("eval", "--env", "twx", cwd=workdir), "missing --model, --out")
    assert created(workdir, before) == set()  # no run directory, no config.json, no episodes.jsonl


def test_train_refuses_bad_data_or_model_before_writing(workdir, tiny_model_dir):
    cases = [
        (["--model", str(tiny_model_dir), "--data", "system_only.jsonl"], "system_only.jsonl:2: conversation has"),
        (["--model", str(tiny_model_dir), "--data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--model", "./no-model", "--data", "eto.jsonl"], "--model ./no-model: no such file"),
        (["--data", "eto.jsonl"], "invalid training config: model: Field required"),
        (["missing.yaml", "--data", "eto.jsonl"], "missing.yaml: no such file"),
        (["empty.yaml"], "invalid training config: model: Field required"),  # used to be an AttributeError
    ]
    (workdir / "empty.yaml").write_text("")
    before = created(workdir, set())
    for args, fragment in cases:
        assert_one_line_error(run_cli("train", *args, "--output", "trained", cwd=workdir), fragment)
    assert created(workdir, before) == set()  # no empty output directory left behind
