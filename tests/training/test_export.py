"""Export: the artifact scores exactly as the trained model; per-domain baselines; ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdlora.formats.artifact import load_artifact
from mdlora.formats.encoder import FeatureEncoder
from mdlora.training.export import export_onnx_file, export_run
from mdlora.training.loop import predict, to_batch
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config, tiny_prepared


@pytest.mark.parametrize(
    ("method", "extra"),
    [("mlora", {}), ("moe", {"experts_per_domain": 2}), ("multilora", {})],
)
def test_exported_artifact_scores_exactly_as_the_trained_model(
    tmp_path: Path, method: str, extra: dict, device: torch.device
) -> None:
    prepared = tiny_prepared(two_divisions=method == "multilora")
    cfg = tiny_config(tmp_path, method=method, epochs=1, export=True, device=str(device), **extra)
    result = run_training(cfg, prepared=prepared)
    model = result.trained.model
    assert model is not None and not model.training
    assert model.device.type == device.type
    test = to_batch(prepared.test, device)
    expected = predict(model, test)

    art = load_artifact(result.out_dir / "artifact", map_location=device)
    assert art.model.device.type == device.type
    assert np.array_equal(predict(art.model, test), expected)
    # a CPU batch scores on a model on any device (predict moves it), with the same scores
    assert np.array_equal(predict(art.model, to_batch(prepared.test, torch.device("cpu"))),
                          expected)  # fmt: skip
    assert art.manifest["stage"]["name"] == {"mlora": "adapters", "moe": "gate",
                                             "multilora": "fusion"}[method]  # fmt: skip
    assert art.manifest["metrics"]["wauc"] == pytest.approx(result.test["domain"].wauc)
    assert art.manifest["training"]["label_column"] == "label"
    # the encoder travels with the artifact and encodes raw rows as training did
    encoder = FeatureEncoder.from_dict(art.encoder or {})
    assert encoder.domain_names("domain") == prepared.encoder.domain_names("domain")

    again = export_run(result.out_dir, tmp_path / "again", onnx=False)
    assert np.array_equal(predict(load_artifact(again[0], device).model, test), expected)


def test_single_exports_one_artifact_per_domain(tmp_path: Path, device: torch.device) -> None:
    prepared = tiny_prepared()
    cfg = tiny_config(tmp_path, method="single", epochs=1, export=True, device=str(device))
    result = run_training(cfg, prepared=prepared)
    listing = json.loads((result.out_dir / "artifact" / "domains.json").read_text())
    assert [v["domain"] for v in listing.values()] == ["d0", "d1", "d2"]
    test = to_batch(prepared.test, device)
    for d, model in result.trained.per_domain.items():
        rows = (test.domains[:, 0] == d).nonzero().squeeze(1)
        art = load_artifact(result.out_dir / "artifact" / f"domain-{d}", map_location=device)
        assert np.array_equal(predict(art.model, test.select(rows)),
                              predict(model, test.select(rows)))  # fmt: skip


def test_onnx_failure_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    device: torch.device,
) -> None:
    pytest.importorskip("mdlora.formats.onnx_export")
    import mdlora.formats.onnx_export as onnx_export

    def broken(model: object, path: object) -> None:
        raise RuntimeError("no lowering for this operator")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    prepared = tiny_prepared()
    cfg = tiny_config(tmp_path, method="base", epochs=1, device=str(device))
    result = run_training(cfg, prepared=prepared)
    assert result.trained.model is not None
    assert export_onnx_file(result.trained.model, tmp_path / "m.onnx") is None
    assert result.trained.model.device.type == device.type  # given back where it was
    assert "ONNX export failed (RuntimeError: no lowering" in capsys.readouterr().out
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="written by `mdlora train`"):
        export_run(tmp_path)
