"""Resuming from per-phase checkpoints ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdlora.training.config import ConfigError
from mdlora.training.loop import predict, to_batch
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config, tiny_prepared


def test_resumed_run_matches_the_uninterrupted_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: torch.device
) -> None:
    prepared = tiny_prepared()
    cfg = tiny_config(tmp_path, method="mlora", epochs=2, dropout=0.2, device=str(device))
    full = run_training(cfg, prepared=prepared)
    ckpt = full.out_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [
        "model-00-backbone.safetensors", "model-01-adapters.safetensors",
    ]  # fmt: skip
    # "interrupt" after phase 1: its checkpoint stays, phase 2's is gone
    for p in ckpt.glob("model-01-*"):
        p.unlink()
    resumed_cfg = tiny_config(
        tmp_path, method="mlora", epochs=2, dropout=0.2, resume=True, device=str(device)
    )
    capsys.readouterr()
    resumed = run_training(resumed_cfg, prepared=prepared)
    assert "resumed phase backbone" in capsys.readouterr().out
    assert resumed.phases[0] == full.phases[0]  # phase 1's report comes from its checkpoint
    test = to_batch(prepared.test, device)
    assert full.trained.model is not None and resumed.trained.model is not None
    assert resumed.trained.model.device.type == device.type
    assert np.array_equal(predict(resumed.trained.model, test), predict(full.trained.model, test))


def test_checkpoints_of_another_config_are_refused(tmp_path: Path) -> None:
    prepared = tiny_prepared()
    run_training(tiny_config(tmp_path, method="base", epochs=1), prepared=prepared)
    other = tiny_config(tmp_path, method="base", epochs=1, lr=0.01, resume=True)
    with pytest.raises(ConfigError, match="different config"):
        run_training(other, prepared=prepared)


def test_a_checkpoint_that_no_longer_fits_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume across a changed default (the rank temperature for own data) whose
    checkpoint holds other adapter shapes is refused with a message, not a raw size error."""
    import mdlora.training.run as run

    prepared = tiny_prepared()
    monkeypatch.setattr(run, "DEFAULT_ALPHA", 16.0)  # tower 32-16: ranks 2, 1
    run_training(tiny_config(tmp_path, method="mlora", epochs=1, resume=True), prepared=prepared)
    monkeypatch.setattr(run, "DEFAULT_ALPHA", 4.0)  # ranks 8, 4
    with pytest.raises(ConfigError, match="does not fit this run's model"):
        run_training(tiny_config(tmp_path, method="mlora", epochs=1, resume=True),
                     prepared=prepared)  # fmt: skip
