"""Adaptation on fresh rows, finetune_fresh, mlora_joint and the phases' trajectories."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdlora.formats.artifact import load_artifact
from mdlora.formats.encoder import FeatureEncoder, LabeledArrays
from mdlora.training.add_domain import AddDomainSettings, add_domain
from mdlora.training.config import ConfigError
from mdlora.training.data.prepared import PreparedData
from mdlora.training.data.synthetic import synthetic_schema
from mdlora.training.data.tabular import prepare_table
from mdlora.training.loop import predict, to_batch
from mdlora.training.recipes import PhaseRows, fresh_split
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config, tiny_frame, tiny_prepared


def _domains_labels(prepared: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    return prepared.train["domains"][:, 0], prepared.train["labels"]


def test_fresh_split_is_a_stratified_per_domain_slice() -> None:
    prepared = tiny_prepared()
    dom, lab = _domains_labels(prepared)
    back, fresh = fresh_split(prepared.train, 0.2, seed=0)
    assert np.intersect1d(back, fresh).size == 0
    assert np.array_equal(np.sort(np.concatenate([back, fresh])), np.arange(len(dom)))
    for d in np.unique(dom):
        rows = dom == d
        assert abs(np.isin(np.flatnonzero(rows), fresh).mean() - 0.2) < 0.01
        # the label balance of the slice follows its domain's
        assert abs(lab[fresh][dom[fresh] == d].mean() - lab[rows].mean()) < 0.02
    again, _ = fresh_split(prepared.train, 0.2, seed=0)
    other, _ = fresh_split(prepared.train, 0.2, seed=1)
    assert np.array_equal(back, again) and not np.array_equal(back, other)


def test_fresh_split_with_an_order_takes_each_domains_most_recent_rows() -> None:
    prepared = tiny_prepared()
    dom, _ = _domains_labels(prepared)
    order = np.random.RandomState(3).randint(0, 50, size=len(dom)).astype(np.float64)
    back, fresh = fresh_split(prepared.train, 0.25, seed=0, order=order)
    for d in np.unique(dom):
        f, b = fresh[dom[fresh] == d], back[dom[back] == d]
        assert f.size == round((dom == d).sum() * 0.25)
        assert order[f].min() >= order[b].max()  # nothing older in the slice, nothing newer out


def test_fresh_rows_are_kept_out_of_phase_1_and_train_the_adapters(tmp_path: Path) -> None:
    """Phase 1 does not depend on the fresh rows at all (their features may be anything); the
    adapters do; the metrics say which rows each phase trained on."""
    prepared = tiny_prepared()
    cfg = tiny_config(tmp_path / "a", adapt_rows="fresh", adapt_fraction=0.25, epochs=1)
    first = run_training(cfg, prepared=prepared)
    _, fresh = fresh_split(prepared.train, 0.25, seed=0)
    # scramble the fresh rows' features (the slice is drawn from domains and labels only)
    scrambled = dict(prepared.train)
    sparse = prepared.train["sparse"].copy()
    sparse[fresh] = sparse[np.random.RandomState(0).permutation(fresh)]
    scrambled["sparse"] = sparse
    other = dataclasses.replace(prepared, train=LabeledArrays(**scrambled))  # type: ignore[typeddict-item]
    second = run_training(tiny_config(tmp_path / "b", adapt_rows="fresh", adapt_fraction=0.25,
                                      epochs=1),
                          prepared=other)  # fmt: skip
    assert first.reference is not None and second.reference is not None
    assert first.reference["domain"].wauc == second.reference["domain"].wauc
    assert first.test["domain"].wauc != second.test["domain"].wauc

    m = json.loads((cfg.out_dir() / "metrics.json").read_text())
    n = len(prepared.train["labels"])
    assert m["label"] == "MLoRA (fresh rows)"
    assert m["adapt_rows"]["fresh_rows"] == fresh.size
    assert m["adapt_rows"]["backbone_rows"] == n - fresh.size
    assert [(p["name"], p["rows"], p["train_rows"]) for p in m["phases"]] == [
        ("backbone", "backbone slice", n - fresh.size), ("adapters", "fresh slice", fresh.size)
    ]  # fmt: skip
    report = (cfg.out_dir() / "results.md").read_text()
    assert f"| backbone | backbone slice | {n - fresh.size} |" in report
    assert f"| adapters | fresh slice | {fresh.size} |" in report
    # every row trains somewhere: all rows under the default
    plain = run_training(tiny_config(tmp_path / "c", epochs=1), prepared=prepared)
    assert [(p.rows, p.train_rows) for p in plain.phases] == [("all", n), ("all", n)]
    assert plain.metrics_dict()["adapt_rows"] == {"mode": "all", "rows": n}


@pytest.mark.parametrize(("method", "extra"), [("moe", {}), ("multilora", {})])
def test_fresh_rows_for_moe_and_multilora_phases(tmp_path: Path, method: str, extra: dict) -> None:
    prepared = tiny_prepared(two_divisions=method == "multilora")
    cfg = tiny_config(tmp_path, method=method, adapt_rows="fresh", epochs=1, **extra)
    result = run_training(cfg, prepared=prepared)
    back, fresh = fresh_split(prepared.train, 0.2, seed=0)
    dom = prepared.train["domains"][:, 0]
    assert result.phases[0].rows == "backbone slice" and result.phases[0].train_rows == back.size
    for p in result.phases[1:]:
        assert p.rows == "fresh slice"
        if p.name.startswith("expert:"):  # its domain's fresh rows only
            owner = int(result.trained.model.gate.owner[int(p.name[7:])])  # type: ignore[union-attr]
            assert p.train_rows == int((dom[fresh] == owner).sum())
        else:
            assert p.train_rows == fresh.size


def test_finetune_fresh_shares_phase_1_and_fine_tunes_the_whole_backbone(tmp_path: Path) -> None:
    prepared = tiny_prepared()
    adapters = run_training(tiny_config(tmp_path / "m", adapt_rows="fresh"), prepared=prepared)
    ft_cfg = tiny_config(tmp_path / "f", method="finetune_fresh")
    assert ft_cfg.adapt_rows == "fresh" and ft_cfg.model_method == "base"
    ft = run_training(ft_cfg, prepared=prepared)
    assert ft.reference_label == "Base (phase 1)" and ft.reference is not None
    assert adapters.reference is not None
    # the same phase 1: identical backbone test metrics
    assert ft.reference["domain"].to_dict() == adapters.reference["domain"].to_dict()
    assert [(p.name, p.rows) for p in ft.phases] == [
        ("backbone", "backbone slice"), ("finetune", "fresh slice")
    ]  # fmt: skip
    assert ft.phases[1].trainable == ft.phases[0].trainable  # the whole backbone
    assert ft.metrics_dict()["label"] == "Fine-tune (fresh rows)"


@pytest.fixture(scope="module")
def joint_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreparedData]:
    """An mlora_joint export trained on domains d0, d1 (d2 is left for add-domain)."""
    root = tmp_path_factory.mktemp("joint")
    frame = tiny_frame()
    prepared = prepare_table(frame[frame["domain"] != "d2"], synthetic_schema(), seed=0)
    cfg = tiny_config(root, method="mlora_joint", epochs=3, export=True)
    torch.manual_seed(0)
    result = run_training(cfg, prepared=prepared)
    (ph,) = result.phases
    assert (ph.name, ph.rows) == ("joint", "all")
    model = result.trained.model
    assert model is not None and model.config.method == "mlora"
    assert model.stage.name == "adapters"
    # backbone and adapters trained in the one phase
    from mdlora.models.freeze import set_trainable

    n_backbone = sum(p.numel() for p in set_trainable(model, ["backbone"]))
    n_experts = sum(p.numel() for p in set_trainable(model, ["experts"]))
    assert ph.trainable == n_backbone + n_experts
    assert result.reference is None and result.metrics_dict()["label"] == "MLoRA (joint)"
    return cfg.out_dir() / "artifact", prepared


def test_mlora_joint_exports_a_normal_mlora_artifact(
    joint_artifact: tuple[Path, PreparedData],
) -> None:
    artifact, prepared = joint_artifact
    art = load_artifact(artifact)
    assert art.manifest["stage"]["name"] == "adapters"
    assert art.model.config.method == "mlora"
    test = to_batch(prepared.test, torch.device("cpu"))
    scores = predict(art.model, test)
    # the adapters matter: the backbone stage of the same weights scores differently
    art.model.set_stage("backbone")
    assert not np.allclose(predict(art.model, test), scores)


def test_add_domain_works_on_a_joint_artifact(
    joint_artifact: tuple[Path, PreparedData], tmp_path: Path
) -> None:
    artifact, _ = joint_artifact
    frame = tiny_frame()
    new = frame[frame["domain"] == "d2"]
    path = tmp_path / "d2.csv"
    new.to_csv(path, index=False)
    settings = AddDomainSettings(epochs=2, lr=0.005, batch_size=256, patience=2, progress=False)
    res = add_domain(artifact, path, "d2", out=tmp_path / "pkg", settings=settings,
                     artifact_out=tmp_path / "grown")  # fmt: skip
    assert res.package_dir is not None and res.package_dir.is_dir()
    assert res.val_auc is not None and res.artifact_out is not None
    before = load_artifact(artifact)
    after = load_artifact(res.artifact_out)
    assert after.model.domain_names("domain")[-1] == "d2"
    encoder = FeatureEncoder.from_dict(before.encoder or {})
    old = frame[frame["domain"] != "d2"].sample(500, random_state=0)
    arr = encoder.transform(old)
    batch = to_batch(LabeledArrays(**arr, labels=old["label"].to_numpy(np.float32)),
                     torch.device("cpu"))  # fmt: skip
    # existing domains score bit-identically after the addition
    assert np.array_equal(predict(after.model, batch), predict(before.model, batch))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapt_rows": "recent"}, "adapt_rows must be one of"),
        ({"method": "base", "adapt_rows": "fresh"}, "adapt_rows: fresh needs a method"),
        ({"method": "mlora_joint", "adapt_rows": "fresh"}, "got method 'mlora_joint'"),
        ({"adapt_rows": "fresh", "adapt_fraction": 1.0}, "adapt_fraction must be in (0, 1)"),
        ({"adapt_rows": "fresh", "adapt_order": "seq_pos"}, "needs data.source: table"),
        ({"adapt_order": "seq_pos"}, "it needs adapt_rows: fresh"),
        ({"eval_every": 0}, "eval_every must be an integer >= 1"),
        ({"eval_every": 2.5}, "eval_every must be an integer >= 1"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, **overrides)


def test_new_keys_at_their_defaults_keep_old_fingerprints(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    assert cfg.fingerprint() == tiny_config(tmp_path, adapt_fraction=0.2).fingerprint()
    assert cfg.fingerprint() != tiny_config(tmp_path, eval_every=10).fingerprint()
    assert cfg.fingerprint() != tiny_config(tmp_path, adapt_rows="fresh").fingerprint()


def test_a_table_order_column_orders_the_fresh_slice_end_to_end(tmp_path: Path) -> None:
    frame = tiny_frame().copy()
    frame["seq_pos"] = np.random.RandomState(0).randint(0, 30, size=len(frame))
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    schema = synthetic_schema().to_dict()
    cfg = tiny_config(
        tmp_path, method="mlora", adapt_rows="fresh", adapt_order="seq_pos", epochs=1,
        data={"source": "table", "path": str(path), "schema": schema, "options": {"seed": 0}},
    )  # fmt: skip
    result = run_training(cfg)
    order = result.prepared.train_order
    assert order is not None and len(order) == len(result.prepared.train["labels"])
    info = result.metrics_dict()["adapt_rows"]
    assert info["order"] == "seq_pos"
    _, fresh = fresh_split(result.prepared.train, 0.2, seed=0, order=order)
    assert info["fresh_rows"] == fresh.size == result.phases[1].train_rows
    assert order[fresh].mean() > pd.Series(order).quantile(0.7)
    # the same prepared data without adapt_order: a stratified sample, not the latest rows
    arrays = result.prepared.train
    batch = to_batch(arrays, torch.device("cpu"))
    plain = tiny_config(tmp_path / "s", adapt_rows="fresh", data=cfg.data.__dict__)
    sampled = PhaseRows(plain, arrays, batch, order)
    _, sample = fresh_split(arrays, 0.2, seed=0)
    assert abs(order[sample].mean() - order.mean()) < 1.0
    assert torch.equal(sampled.fresh.sparse, batch.sparse[torch.from_numpy(sample)])
    latest = PhaseRows(cfg, arrays, batch, order)
    assert torch.equal(latest.fresh.sparse, batch.sparse[torch.from_numpy(fresh)])
