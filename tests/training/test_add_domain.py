"""add-domain: existing domains score bit-identically; the new adapter beats the backbone."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdlora.formats.adapter_package import (
    apply_adapter,
    read_adapter_package,
)
from mdlora.formats.artifact import load_artifact
from mdlora.formats.domains import model_domains
from mdlora.formats.encoder import FeatureEncoder, LabeledArrays
from mdlora.formats.grown import place
from mdlora.training.add_domain import AddDomainSettings, add_domain
from mdlora.training.data.synthetic import make_synthetic, synthetic_schema
from mdlora.training.data.tabular import prepare_table
from mdlora.training.evaluate import compute_metrics
from mdlora.training.loop import predict, to_batch
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config

SETTINGS = AddDomainSettings(epochs=8, lr=0.005, batch_size=256, patience=3, progress=False)


@functools.cache
def _frame() -> pd.DataFrame:
    return make_synthetic(n_rows=16_000, n_domains=4, seed=4, n_users=200, n_items=80,
                          domain_strength=2.0)  # fmt: skip


def _encode(encoder: FeatureEncoder, df: pd.DataFrame) -> LabeledArrays:
    arr = encoder.transform(df)
    return LabeledArrays(**arr, labels=df["label"].to_numpy(np.float32))


@functools.cache
def _trained(root: Path, method: str, device: str = "cpu") -> Path:
    """An artifact trained on ``device`` on domains d0-d2 (d3 is held back as the new domain)."""
    old = _frame()[_frame()["domain"] != "d3"]
    prepared = prepare_table(old, synthetic_schema(), seed=0, name="old")
    extra = {"experts_per_domain": 2} if method == "moe" else {}
    cfg = tiny_config(root / device / method, method=method, epochs=6, ranks=[8, 4],
                      export=True, device=device, **extra)  # fmt: skip
    run_training(cfg, prepared=prepared)
    return root / device / method / "run" / "artifact"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("add_domain")


def _new_rows(root: Path) -> tuple[Path, pd.DataFrame]:
    """The new domain's rows: 80% into a CSV file for add-domain, 20% kept for testing."""
    new = _frame()[_frame()["domain"] == "d3"].reset_index(drop=True)
    cut = int(len(new) * 0.8)
    path = root / "d3.csv"
    new.iloc[:cut].to_csv(path, index=False)
    return path, new.iloc[cut:]


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_add_domain_keeps_old_scores_and_beats_the_backbone(
    root: Path, method: str, device: torch.device
) -> None:
    artifact = _trained(root, method, device.type)
    path, held_out = _new_rows(root)
    before = load_artifact(artifact, map_location=device)
    root = root / device.type  # this device's package and grown artifact
    encoder = FeatureEncoder.from_dict(before.encoder or {})
    old_rows = _frame()[_frame()["domain"] != "d3"].sample(3000, random_state=0)
    old_batch = to_batch(_encode(encoder, old_rows), device)
    old_scores = predict(before.model, old_batch)

    out = root / f"{method}-pkg"
    settings = dataclasses.replace(SETTINGS, device=device.type)
    res = add_domain(artifact, path, "d3", out=out, settings=settings,
                     artifact_out=root / f"{method}-grown")  # fmt: skip
    assert res.domain_id == 3 and res.encoder.domain_names("domain")[-1] == "d3"
    assert res.val_auc is not None and res.val_auc_backbone is not None
    assert res.val_auc > res.val_auc_backbone + 0.01

    # the service's path: register the package on the loaded old model
    pkg = read_adapter_package(out)
    assert (pkg.division, pkg.domain) == ("domain", "d3")
    assert apply_adapter(before.model, pkg) == 3
    assert np.array_equal(predict(before.model, old_batch), old_scores)
    grown = load_artifact(root / f"{method}-grown", map_location=device)
    assert np.array_equal(predict(grown.model, old_batch), old_scores)
    # one domain list: the model's; the grown artifact's encoder and the package's show it too
    lists = model_domains(grown.model.config)
    assert lists == {"domain": ["d0", "d1", "d2", "d3"]}
    assert grown.encoder is not None and FeatureEncoder.from_dict(grown.encoder).domains == lists
    assert FeatureEncoder.from_json((out / "encoder.json").read_text()).domains == lists

    # held-out rows of the new domain: its adapter beats the backbone alone
    grown_encoder = FeatureEncoder.from_json((out / "encoder.json").read_text())
    place(grown_encoder, before.model)  # its grown ids (the domain's own value) -> their rows
    new_batch = to_batch(_encode(grown_encoder, held_out), device)
    labels = held_out["label"].to_numpy()
    with_adapter = predict(before.model, new_batch)
    before.model.set_stage("backbone")
    backbone = predict(before.model, new_batch)
    zeros = np.zeros(len(labels), dtype=np.int64)
    auc_new = compute_metrics(labels, with_adapter, zeros, ["d3"]).domains[0].auc
    auc_backbone = compute_metrics(labels, backbone, zeros, ["d3"]).domains[0].auc
    assert auc_new is not None and auc_backbone is not None and auc_new > auc_backbone


def test_existing_domain_and_base_models_are_refused_without_writing(root: Path) -> None:
    artifact = _trained(root, "mlora")
    path, _ = _new_rows(root)
    frame = pd.read_csv(path).assign(domain="d1")
    frame.to_csv(root / "d1.csv", index=False)
    with pytest.raises(ValueError, match="already has a domain 'd1'"):
        add_domain(artifact, root / "d1.csv", "d1", out=root / "nope", settings=SETTINGS)
    with pytest.raises(ValueError, match="no rows with domain == 'd9'"):
        add_domain(artifact, path, "d9", out=root / "nope", settings=SETTINGS)
    assert not (root / "nope").exists()
    base_root = root / "base"
    prepared = prepare_table(_frame()[_frame()["domain"] != "d3"], synthetic_schema(), seed=0)
    run_training(tiny_config(base_root, method="base", epochs=1, export=True), prepared=prepared)
    with pytest.raises(ValueError, match="no per-domain adapters"):
        add_domain(base_root / "run" / "artifact", path, "d3", out=root / "nope",
                   settings=SETTINGS)  # fmt: skip
    assert not (root / "nope").exists()


def test_a_file_without_the_domain_column_uses_every_row(root: Path) -> None:
    artifact = _trained(root, "mlora")
    path, _ = _new_rows(root)
    pd.read_csv(path).drop(columns=["domain"]).to_csv(root / "nocol.csv", index=False)
    res = add_domain(artifact, root / "nocol.csv", "d3", out=root / "nocol-pkg",
                     settings=AddDomainSettings(epochs=1, progress=False))  # fmt: skip
    assert res.rows_train + res.rows_val == len(pd.read_csv(path))
    assert (root / "nocol-pkg" / "adapter_model.safetensors").is_file()


def test_an_adapter_that_learned_nothing_says_so(root: Path) -> None:
    """Labels that carry no signal for the new domain: no epoch beats the backbone, the
    package equals its starting point, and the result (and the package) warn about it."""
    artifact = _trained(root, "mlora")
    path, _ = _new_rows(root)
    rng = np.random.default_rng(0)
    noise = pd.read_csv(path).assign(label=lambda d: rng.integers(0, 2, len(d)))
    noise.to_csv(root / "noise.csv", index=False)
    res = add_domain(artifact, root / "noise.csv", "d3", out=root / "noise-pkg",
                     settings=AddDomainSettings(epochs=2, patience=1, lr=1e-6,
                                                progress=False))  # fmt: skip
    if any(p.best_epoch for p in res.phases):
        pytest.skip("an epoch improved by chance on the noise labels")
    assert res.warnings() and "starting weights" in res.warnings()[0]
    assert "warning: no epoch improved" in res.describe()
    pkg = read_adapter_package(root / "noise-pkg")
    assert pkg.config["metrics"]["warnings"] == res.warnings()
    assert all(not v.any() for k, v in pkg.tensors.items() if k.endswith(("lora_B", "bias")))


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"batch_size": 0}, {"batch_size": -5}, {"patience": 0}, {"lr": 0.0},
     {"val_fraction": 1.0}, {"gate_scope": "bogus"}, {"eval_every": 0}, {"l2": -1.0}],
)  # fmt: skip
def test_settings_out_of_range_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AddDomainSettings(**bad)  # type: ignore[arg-type]


def test_a_package_names_the_backbone_it_was_trained_against(root: Path) -> None:
    artifact = _trained(root, "mlora")
    path, _ = _new_rows(root)
    add_domain(artifact, path, "d3", out=root / "named-pkg",
               settings=AddDomainSettings(epochs=1, progress=False))  # fmt: skip
    manifest = load_artifact(artifact).manifest
    pkg = read_adapter_package(root / "named-pkg")
    assert pkg.config["backbone_sha256"] == manifest["files"]["backbone.safetensors"]["sha256"]
