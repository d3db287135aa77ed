"""On data with per-domain effects, MLoRA and MoE-MLoRA beat one shared backbone (Base)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from mdlora.training.run import RunResult, run_training
from tests.training.helpers import domain_effect_prepared, tiny_config

# what every run shares: data, backbone, tower, ranks, seed, epochs per phase
COMMON = {"epochs": 6, "ranks": [8, 4], "lr": 0.003, "seed": 0}


@functools.cache
def _run(root: Path, method: str) -> RunResult:
    extra = {"phase_lr": {"gate": 0.03}} if method == "moe" else {}
    cfg = tiny_config(root / method, method=method, **COMMON, **extra)
    return run_training(cfg, prepared=domain_effect_prepared())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("methods")


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_adapters_beat_base_on_test_wauc(root: Path, method: str) -> None:
    base = _run(root, "base").test["domain"]
    ours = _run(root, method).test["domain"]
    assert base.wauc is not None and ours.wauc is not None
    assert ours.wauc > base.wauc + 0.005, f"{method} {ours.wauc:.4f} vs base {base.wauc:.4f}"
    # not one domain carried by the others: the mean per-domain AUC improves as well
    assert ours.mean_auc is not None and base.mean_auc is not None
    assert ours.mean_auc > base.mean_auc


def test_runs_are_reproducible_with_a_fixed_seed(root: Path, tmp_path: Path) -> None:
    again = run_training(tiny_config(tmp_path, method="base", **COMMON),
                         prepared=domain_effect_prepared())  # fmt: skip
    assert again.test["domain"].to_dict() == _run(root, "base").test["domain"].to_dict()


def test_phase_reports_and_reference_backbone(root: Path) -> None:
    moe = _run(root, "moe")
    names = [p.name for p in moe.phases]
    assert names == ["backbone", "expert:0", "expert:1", "expert:2", "gate"]
    assert moe.reference_label == "Base (phase 1)" and moe.reference is not None
    assert all(p.trainable > 0 and p.epochs_run >= 1 for p in moe.phases)
    gate = moe.phases[-1]
    assert gate.trainable == 3 * 4 + (4 * 3 + 3)  # gate embedding + projection


def test_phases_that_improved_nothing_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An adapter phase whose steps are too small to move the validation AUC keeps its start,
    and the run says so (otherwise MLoRA = Base with no explanation)."""
    cfg = tiny_config(tmp_path, epochs=1, phase_lr={"adapters": 1e-30}, progress=True)
    result = run_training(cfg)
    assert result.phases[1].best_epoch == 0
    assert result.unchanged_phases() == [result.phases[1].name]
    assert "kept their starting weights" in capsys.readouterr().out
