"""The export writes the ONNX scorer (banks as inputs) beside the artifact, matching torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdlora.formats.artifact import load_artifact
from mdlora.training.export import ONNX_FILE
from mdlora.training.loop import predict, to_batch
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config, tiny_prepared

onnx_export = pytest.importorskip("mdlora.formats.onnx_export")


def test_train_export_writes_an_onnx_scorer_that_matches_the_artifact(
    tmp_path: Path, device: torch.device
) -> None:
    prepared = tiny_prepared()
    cfg = tiny_config(
        tmp_path, method="mlora", epochs=1, export=True, onnx=True, device=str(device)
    )
    result = run_training(cfg, prepared=prepared)
    artifact = result.out_dir / "artifact"
    assert (artifact / ONNX_FILE).is_file()
    model = load_artifact(artifact).model
    test = to_batch(prepared.test, torch.device("cpu")).select(torch.arange(500))
    scorer = onnx_export.OnnxScorer(artifact / ONNX_FILE, threads=1)
    got = scorer.score(test.sparse, test.dense, test.domains, test.multi_hot,
                       onnx_export.banks_from_model(model))  # fmt: skip
    np.testing.assert_allclose(got, predict(model, test), rtol=1e-4, atol=1e-5)
