"""The real-data experiments' code path, on a small table of the Amazon set's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdlora.training.amazon import CellSettings, grid_cell, new_domain_cell, report
from mdlora.training.data.synthetic import make_amazon_like

SMALL = CellSettings(epochs=2, patience=1, batch_size=256, threads=1, add_epochs=3)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("amazon") / "amazon_like.parquet"
    make_amazon_like(users=(150, 100, 60), history=10, seed=1).to_parquet(path)
    return path


def test_new_domain_cell_adds_office_and_keeps_the_others_identical(
    table: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    cell = new_domain_cell(table, tmp_path / "work", 1, SMALL, results=results)
    assert cell["old_domains_bit_identical"] is True
    assert cell["grown_ids"]["user"] == 60 and cell["grown_ids"]["domain"] == 1
    assert cell["grown_ids"]["item"] > 30
    assert 0.0 <= cell["auc_add_domain"] <= 1.0 and 0.0 <= cell["auc_full_retraining"] <= 1.0
    assert cell["auc_add_domain"] > 0.55  # rows of its own: better than every row alike
    # cached: read back, not re-run
    again = new_domain_cell(table, tmp_path / "elsewhere", 1, SMALL, results=results)
    assert again == cell
    text = report(results)
    assert "office to a sports + toys export" in text and "| 1 | deepfm |" in text


def test_grid_cell_reports_each_recipe_against_its_own_backbone(
    table: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    cell = grid_cell(table, results, tmp_path / "work", "mlora_fresh", 1, SMALL)
    assert set(cell["test"]["auc"]) == {"sports", "toys", "office"}
    assert cell["reference"] is not None and cell["reference"]["wauc"] is not None
    assert cell["adapt_rows"]  # the fresh slice is recorded
    assert "| deepfm | mlora_fresh | 1 |" in report(results)


@pytest.mark.parametrize("recipe", ["moe", "multilora_fresh"])
def test_moe_and_multilora_recipes_run_on_the_amazon_layout(
    table: Path, tmp_path: Path, recipe: str
) -> None:
    """MoE-MLoRA routes by category; MultiLoRA also by user activeness, reported by category."""
    results = tmp_path / "results"
    cell = grid_cell(table, results, tmp_path / "work", recipe, 1, SMALL)
    assert set(cell["test"]["auc"]) == {"sports", "toys", "office"}
    assert cell["reference"] is not None
    assert cell["phases"][0]["name"] == "backbone"
    assert len(cell["phases"]) > 1  # the adapter phases ran after the backbone
    assert f"| deepfm | {recipe} | 1 |" in report(results)
