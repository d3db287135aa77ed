"""quickstart: the shipped config matches what the command trains, and the command runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import mdlora.training.quickstart as qs
from mdlora.formats.artifact import load_artifact
from mdlora.training.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synthetic-quickstart.yaml"


def test_configs_quickstart_yaml_is_what_quickstart_trains(tmp_path: Path) -> None:
    shipped = load_config(CONFIG, [f"out={tmp_path}", "export=false", "name=quickstart"])
    assert shipped.fingerprint() == qs.quickstart_config(tmp_path).fingerprint()


def test_quickstart_without_serving_trains_compares_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a smaller data set than the real quickstart's, same steps
    monkeypatch.setattr(qs, "QUICKSTART_DATA", {**qs.QUICKSTART_DATA, "n_rows": 8000})
    monkeypatch.setitem(qs.QUICKSTART_TRAINING, "epochs", 1)
    result = qs.quickstart(tmp_path / "art")
    out = capsys.readouterr().out
    assert "on test WAUC" in out and "3/4 exporting" in out
    assert result.reference is not None
    art = load_artifact(tmp_path / "art")
    assert art.model.config.method == "mlora" and art.encoder is not None
    # the generated table is written beside the run, the same rows training used
    table = pd.read_parquet(tmp_path / "art-run" / "data.parquet")
    assert len(table) == 8000 and {"user_id", "item_id", "domain"} <= set(table.columns)
    assert "mdlora publish-features --artifact" in out
    # and the README's new domain: its users and items are all unknown to the export
    new = pd.read_parquet(tmp_path / "art-run" / "new_domain.parquet")
    assert set(new["domain"]) == {qs.NEW_DOMAIN}
    assert not set(new["user_id"]) & set(table["user_id"])
    assert not set(new["item_id"]) & set(table["item_id"])
    assert f"--domain {qs.NEW_DOMAIN}" in out
