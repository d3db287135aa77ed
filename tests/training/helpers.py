"""Small real objects for the training tests: seeded synthetic data and tiny configs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pandas as pd
import typer

from mdlora.training.config import TrainConfig, config_from_dict
from mdlora.training.data.prepared import PreparedData
from mdlora.training.data.synthetic import make_synthetic, synthetic_schema
from mdlora.training.data.tabular import TableSchema, prepare_table

#: synthetic data small enough for a unit test, with strong domain effects
TINY = {"n_rows": 12_000, "n_domains": 3, "seed": 0, "n_users": 200, "n_items": 80}


@functools.cache
def tiny_frame(**overrides: Any) -> pd.DataFrame:
    return make_synthetic(**{**TINY, **overrides})


def tiny_prepared(two_divisions: bool = False, **overrides: Any) -> PreparedData:
    """Synthetic data prepared like a user table (``domain`` primary; optionally
    ``user_segment`` as a second, auxiliary division for MultiLoRA)."""
    schema = synthetic_schema()
    if two_divisions:
        schema = TableSchema(**{**schema.to_dict(), "divisions": ["domain", "user_segment"]})
    return prepare_table(tiny_frame(**overrides), schema, seed=0, name="tiny")


def tiny_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"source": "synthetic", "options": dict(TINY)},
        "method": "mlora", "backbone": "deepfm", "embed_dim": 4, "tower": [32, 16],
        "dropout": 0.0, "lr": 0.003, "batch_size": 512, "epochs": 2, "patience": 2,
        "seed": 0, "threads": 1, "progress": False, "export": False, "onnx": False,
        "out": str(tmp_path / "run"),
    }  # fmt: skip
    for key, value in overrides.items():
        if key == "data":
            raw["data"] = value
        else:
            raw[key] = value
    return config_from_dict(raw)


def domain_effect_prepared() -> PreparedData:
    """Synthetic data with strong per-domain effects (3 domains of similar size)."""
    df = tiny_frame(n_rows=16_000, n_domains=3, seed=5, domain_strength=2.0)
    return prepare_table(df, synthetic_schema(), seed=0, name="domain-effects")


def training_cli() -> typer.Typer:
    """A typer app with the training commands (``mdlora.cli.training``), for CliRunner."""
    from mdlora.cli.training import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app with the training commands."""

    register(app)
    return app
