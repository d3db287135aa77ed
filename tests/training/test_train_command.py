"""``mdlora train`` as a user meets it: one-line errors, a refused resume that leaves the run
folder as it was, no silent synthetic data, and what to do after Ctrl-C."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from tests.training.helpers import TINY
from tests.training.helpers import training_cli as _app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train-command") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-cli",
        "data": {"source": "synthetic", "options": dict(TINY)},
        "method": "base", "backbone": "wdl", "embed_dim": 4, "tower": [16], "dropout": 0.0,
        "lr": 0.003, "batch_size": 512, "epochs": 1, "seed": 0, "threads": 1,
        "progress": False, "onnx": False,
    }))  # fmt: skip
    return path


def _one_line_error(res: Result, *parts: str) -> None:
    """The command failed with exit status 2 and a single ``error: ...`` line, no traceback."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for part in parts:
        assert part in lines[0], res.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=abc", "epochs must be an integer >= 1, got 'abc'"),
        ("patience=abc", "patience must be an integer >= 1, got 'abc'"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("data.options.max_rows=abc", "data.options.max_rows must be an integer >= 1"),
        ("data.options.n_rows=abc", "data.options.n_rows must be an integer >= 1"),
        ("data.preset=nope", "data.preset 'nope' is not a preset; use one of"),
    ],
)
def test_bad_values_are_one_line_errors(override: str, message: str, tmp_path: Path) -> None:
    res = runner.invoke(_app(), ["train", "--config", str(CONFIGS / "ml1m-mlora-gender-moe.yaml"),
                                 override, "--out", str(tmp_path / "run")])  # fmt: skip
    _one_line_error(res, message)
    assert not (tmp_path / "run").exists()


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = runner.invoke(_app(), ["train", "--config", str(tiny), "--out", str(run)])
    assert res.exit_code == 0, res.output
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert run / "config.yaml" in before and run / "metrics.json" in before
    res = runner.invoke(_app(), ["train", "--config", str(tiny), "backbone=dcn", "epochs=1",
                                 "--out", str(run), "--resume"])  # fmt: skip
    _one_line_error(res, "written under a different config")
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before  # config.yaml still the finished run's, nothing else touched
    # a resume under the same config is taken, and writes the folder as before
    res = runner.invoke(_app(), ["train", "--config", str(tiny), "--out", str(run), "--resume"])
    assert res.exit_code == 0 and "resumed phase backbone" in res.output, res.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "wdl" and saved["resume"] is True


def test_an_empty_config_file_is_refused_not_trained_on_generated_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    res = runner.invoke(_app(), ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    _one_line_error(res, "does not say which rows to train on", "data.source")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_says_how_to_continue_and_the_command_resumes(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mdlora.training.run as run_module

    real = run_module.train_phase

    def interrupted_in_phase_two(*args: Any, **kwargs: Any) -> Any:
        if args[1].name != "backbone":  # Ctrl-C in the second phase (adapters)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_phase", interrupted_in_phase_two)
    run = tmp_path / "my run"
    args = ["train", "--config", str(tiny), "method=mlora", "--out", str(run)]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 130, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, res.output
    assert f"1 finished phase(s) are checkpointed in {run}; continue with: mdlora train" in lines[0]
    command = shlex.split(lines[0].partition("continue with: ")[2])
    assert command[:2] == ["mdlora", "train"] and command[-1] == "--resume"
    assert "method=mlora" in command and str(run) in command
    monkeypatch.setattr(run_module, "train_phase", real)
    res = runner.invoke(_app(), command[1:])  # what the user is told to run
    assert res.exit_code == 0 and "resumed phase backbone" in res.output, res.output


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mdlora.training.run as run_module

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train_phase", interrupted)
    res = runner.invoke(_app(), ["train", "--config", str(tiny), "--out", str(tmp_path / "r")])
    assert res.exit_code == 130, res.output
    assert "interrupted before any phase finished: nothing to resume in" in res.output
