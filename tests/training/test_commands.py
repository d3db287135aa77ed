"""The CLI end to end on tiny synthetic data: train (config + overrides), export, add-domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mdlora.formats.adapter_package import read_adapter_package
from mdlora.formats.artifact import load_artifact
from mdlora.training.data.synthetic import make_synthetic
from tests.training.helpers import TINY
from tests.training.helpers import training_cli as _app

runner = CliRunner()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-cli",
        "data": {"source": "synthetic", "options": dict(TINY)},
        "method": "mlora", "backbone": "wdl", "embed_dim": 4, "tower": [32, 16],
        "dropout": 0.0, "lr": "3e-3", "batch_size": 512, "epochs": 3, "seed": 0,
        "threads": 1, "progress": True, "onnx": False,
    }))  # fmt: skip
    return path


def test_train_with_config_and_overrides_then_export(config: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = runner.invoke(_app(), ["train", "--config", str(config), "method=moe", "epochs=1",
                                 "experts_per_domain=2", "--out", str(run)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "test WAUC" in res.output and "MoE-MLoRA" in res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "moe" and metrics["backbone"] == "wdl"
    assert [p["name"] for p in metrics["phases"]][-1] == "gate"
    assert all(p["epochs_run"] == 1 for p in metrics["phases"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["experts_per_domain"] == 2 and saved["lr"] == pytest.approx(3e-3)
    assert "| **WAUC** |" in (run / "results.md").read_text()
    art = load_artifact(run / "artifact")
    assert art.model.config.method == "moe" and art.model.config.experts_per_domain == 2

    res = runner.invoke(_app(), ["export", "--run", str(run), "--out", str(tmp_path / "again"),
                                 "--no-onnx"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "manifest.json").is_file()


def test_add_domain_command_writes_a_package(config: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = runner.invoke(_app(), ["train", "--config", str(config), "--out", str(run)])
    assert res.exit_code == 0, res.output
    rows = make_synthetic(n_rows=12_000, n_domains=4, seed=1, n_users=200, n_items=80)
    rows = rows[rows["domain"] == "d3"].assign(domain="new-shop")
    rows.to_parquet(tmp_path / "new.parquet", index=False)
    res = runner.invoke(_app(), [
        "add-domain", "--artifact", str(run / "artifact"), "--data", str(tmp_path / "new.parquet"),
        "--domain", "new-shop", "--out", str(tmp_path / "pkg"), "--epochs", "1",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "domain 'new-shop' added to division 'domain' as id 3" in res.output
    pkg = read_adapter_package(tmp_path / "pkg")
    assert pkg.domain == "new-shop" and pkg.config["version"] == 1
    encoder = json.loads((tmp_path / "pkg" / "encoder.json").read_text())
    assert encoder["domains"]["domain"][-1] == "new-shop"


def test_bad_override_and_missing_config_fail_with_a_message(config: Path) -> None:
    res = runner.invoke(_app(), ["train", "--config", str(config), "epoch=2"])
    assert res.exit_code == 2 and "did you mean 'epochs'" in res.output
    res = runner.invoke(_app(), ["train", "--config", "nope.yaml"])
    assert res.exit_code == 2 and "config file not found" in res.output


def test_text_labels_train_and_add_domain_with_the_runs_positive_labels(tmp_path: Path) -> None:
    rows = make_synthetic(n_rows=6_000, n_domains=3, seed=2, n_users=100, n_items=50)
    rows["label"] = rows["label"].map({1: "yes", 0: "no"})
    rows[rows["domain"] != "d2"].to_csv(tmp_path / "train.csv", index=False)
    rows[rows["domain"] == "d2"].to_csv(tmp_path / "new.csv", index=False)
    schema = {"label": "label", "divisions": ["domain"], "sparse": ["user_id", "item_id"]}
    cfg = {"name": "text-labels", "method": "mlora", "backbone": "mlp", "embed_dim": 4,
           "tower": [16], "epochs": 1, "threads": 1, "onnx": False, "progress": False,
           "data": {"source": "table", "path": str(tmp_path / "train.csv"), "schema": schema}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    res = runner.invoke(_app(), ["train", "--config", str(path), "--out", str(run)])
    assert res.exit_code == 2, res.output  # a clean error, not a traceback
    assert "label column 'label'" in res.output and "positive_labels" in res.output
    # written unquoted, as a user would: YAML reads `yes` as True
    path.write_text(yaml.safe_dump(cfg).replace("    label: label\n",
                                                "    label: label\n    positive_labels: [yes]\n"))
    res = runner.invoke(_app(), ["train", "--config", str(path), "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), [
        "add-domain", "--artifact", str(run / "artifact"), "--data", str(tmp_path / "new.csv"),
        "--domain", "d2", "--out", str(tmp_path / "pkg"), "--epochs", "1",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "domain 'd2' added" in res.output
    res = runner.invoke(_app(), [
        "add-domain", "--artifact", str(run / "artifact"), "--data", str(tmp_path / "new.csv"),
        "--domain", "d2", "--out", str(tmp_path / "pkg2"), "--positive-label", "maybe",
    ])  # fmt: skip
    assert res.exit_code == 2 and "no label equals one of positive_labels ['maybe']" in res.output
