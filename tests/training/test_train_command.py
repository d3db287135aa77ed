"""``mdlora train`` as a user meets it: one-line errors, a refused resume that leaves the run
folder as it was, no silent synthetic data, and what to do after Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from mdlora.cli.training import register

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app with the training commands."""

    register(app)
    return app


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
