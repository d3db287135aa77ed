"""A new domain that brings its own users and items: add-domain grows rows for its ids."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdlora.formats.adapter_package import (
    apply_adapter,
    read_adapter_package,
    write_adapter_package,
)
from mdlora.formats.artifact import load_artifact
from mdlora.formats.encoder import FeatureEncoder
from mdlora.formats.files import (
    GROWN_VOCAB,
    ArtifactError,
)
from mdlora.formats.grown import place
from mdlora.models.rows import EMBEDDING_ROWS, grown_regions
from mdlora.training.add_domain import AddDomainSettings, add_domain
from mdlora.training.data.synthetic import make_new_domain, make_synthetic, synthetic_schema
from mdlora.training.data.tabular import prepare_table
from mdlora.training.evaluate import compute_metrics
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config

SETTINGS = AddDomainSettings(epochs=8, lr=0.01, batch_size=256, patience=2, progress=False)


@functools.cache
def _old() -> pd.DataFrame:
    return make_synthetic(n_rows=12_000, n_domains=3, seed=0, n_users=200, n_items=80)


@functools.cache
def _new() -> pd.DataFrame:
    """The new domain: new users, new items and new tag tokens (multi-hot ids grow too)."""
    df = make_new_domain("d_new", n_rows=8_000, n_users=150, n_items=60, seed=3)
    return df.assign(tags=df["tags"].str.replace("t", "nt", regex=False))


@functools.cache
def _trained(root: Path, method: str) -> Path:
    prepared = prepare_table(_old(), synthetic_schema(), seed=0, name="old")
    extra = {"experts_per_domain": 2} if method == "moe" else {}
    cfg = tiny_config(root / method, method=method, epochs=3, export=True, **extra)
    run_training(cfg, prepared=prepared)
    return root / method / "run" / "artifact"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grown")


def _files(root: Path) -> tuple[Path, pd.DataFrame]:
    new = _new()
    cut = int(len(new) * 0.75)
    path = root / "d_new.parquet"
    if not path.exists():
        new.iloc[:cut].to_parquet(path)
    return path, new.iloc[cut:].reset_index(drop=True)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    auc = compute_metrics(labels, scores, np.zeros(len(labels), np.int64), ["x"]).domains[0].auc
    assert auc is not None
    return auc


def _records(df: pd.DataFrame) -> list[dict[str, object]]:
    return df.drop(columns=["label"]).to_dict("records")  # type: ignore[return-value]


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_new_users_and_items_get_rows_that_learn(root: Path, method: str) -> None:
    artifact = _trained(root, method)
    path, held_out = _files(root)
    labels = held_out["label"].to_numpy()
    old_rows = _records(_old().sample(2000, random_state=1))
    old_scores = load_artifact(artifact).score(old_rows)

    grown_pkg, flat_pkg = root / f"{method}-grown-pkg", root / f"{method}-flat-pkg"
    res = add_domain(
        artifact, path, "d_new", out=grown_pkg, settings=SETTINGS,
        artifact_out=root / f"{method}-grown",
    )  # fmt: skip
    no_grow = AddDomainSettings(**{**SETTINGS.__dict__, "grow": False})
    flat = add_domain(artifact, path, "d_new", out=flat_pkg, settings=no_grow)
    assert res.grown["user_id"] >= 140 and res.grown["item_id"] >= 55
    assert res.grown["domain"] == 1 and res.grown["tags"] >= 15
    assert flat.grown == {}
    pkg = read_adapter_package(grown_pkg)
    assert sum(len(v) for v in pkg.config[GROWN_VOCAB].values()) == sum(res.grown.values())
    assert pkg.tensors[EMBEDDING_ROWS].shape[0] == sum(res.grown.values())

    # the grown artifact: old domains bit-identical, the new one scored with its own rows
    grown = load_artifact(root / f"{method}-grown")
    assert np.array_equal(grown.score(old_rows), old_scores)
    auc_grown = _auc(grown.score(_records(held_out)), labels)

    # the service's path: register each package on the loaded export
    served = load_artifact(artifact)
    encoder = FeatureEncoder.from_dict(served.encoder or {})
    encoder.add_domain("domain", "d_new")
    apply_adapter(served.model, read_adapter_package(flat_pkg))
    auc_flat_scores = replace(served, encoder=encoder.to_dict()).score(_records(held_out))
    auc_flat = _auc(auc_flat_scores, labels)
    apply_adapter(served.model, pkg)  # version 2 of the domain brings rows
    with pytest.raises(ValueError, match="encoder knows none of their ids"):  # not as unknown ids
        replace(served, encoder=encoder.to_dict()).score(_records(held_out))
    encoder.set_grown("domain", "d_new", pkg.config[GROWN_VOCAB])
    place(encoder, served.model)
    batch_scores = replace(served, encoder=encoder.to_dict()).score(_records(held_out))
    assert np.allclose(batch_scores, grown.score(_records(held_out)), atol=1e-6)
    assert np.array_equal(served.score(old_rows), old_scores)
    assert auc_grown > 0.66 and auc_grown > auc_flat + 0.05, (auc_grown, auc_flat)

    # the same in one call: Artifact.apply_adapter teaches the encoder the package's ids too
    once = load_artifact(artifact)
    once.apply_adapter(pkg)
    assert np.allclose(once.score(_records(held_out)), batch_scores, atol=1e-6)
    once.apply_adapter(read_adapter_package(flat_pkg))  # a version without rows drops them
    assert once.encoder is not None and not once.encoder.get("grown")
    assert np.allclose(once.score(_records(held_out)), auc_flat_scores, atol=1e-6)

    # rolling back to the package without rows drops them; old domains still identical
    apply_adapter(served.model, read_adapter_package(flat_pkg))
    assert grown_regions(served.model) == {}
    assert np.array_equal(served.score(old_rows), old_scores)


def test_a_domain_every_row_of_which_looks_alike_is_refused(root: Path, tmp_path: Path) -> None:
    artifact = _trained(root, "mlora")
    ids_only = _new().assign(user_segment="s0", item_category="c0", tags="t1", price=0.5)
    path = tmp_path / "ids-only.csv"
    ids_only.to_csv(path, index=False)
    out = tmp_path / "pkg"
    flat = AddDomainSettings(**{**SETTINGS.__dict__, "grow": False})
    with pytest.raises(ValueError, match=r"same model input.*drop --no-grow"):
        add_domain(artifact, path, "d_new", out=out, settings=flat)
    assert not out.exists()
    res = add_domain(artifact, path, "d_new", out=out, settings=SETTINGS)  # growing fixes it
    assert res.grown["user_id"] > 0 and out.is_dir()


def test_grown_ids_encode_alike_on_both_paths_and_only_in_their_domain(root: Path) -> None:
    artifact = _trained(root, "mlora")
    art = load_artifact(artifact)
    encoder = FeatureEncoder.from_dict(art.encoder or {})
    encoder.add_domain("domain", "d_new")
    art.model.add_domain("domain", "d_new")
    from mdlora.formats.grown import new_values, region_fields
    from mdlora.models.rows import grow_domain_rows

    values = new_values(encoder, _new())
    encoder.set_grown("domain", "d_new", values)
    grow_domain_rows(art.model, "domain", "d_new", region_fields(encoder, values))
    place(encoder, art.model)
    sample = pd.concat([_new().head(300), _old().head(300)]).reset_index(drop=True)
    # a row of an OLD domain with a new domain's ids: they stay unknown there
    sample.loc[300, ["user_id", "item_id"]] = _new().loc[0, ["user_id", "item_id"]].to_numpy()
    a = encoder.transform(sample)
    b = encoder.encode_records(sample.to_dict("records"))
    for key in ("sparse", "multi_hot", "dense", "domains"):
        x, y = a[key], b[key]
        assert x is not None and y is not None and np.array_equal(x, y), key
    vocab = encoder.vocab_size("user_id")
    assert (a["sparse"][:300, 0] >= vocab).all()  # grown ids, past the vocabulary
    assert a["sparse"][300, 0] == 0  # out of vocabulary in d0
    assert (a["multi_hot"][:300] != 0).any()  # type: ignore[index]
    # every grown id reaches a row inside the domain's region
    rows = a["sparse"][:300, 0] + art.model.embedding.sparse_offsets[0].item()
    start, n = grown_regions(art.model)[("domain", "d_new")]
    assert ((rows >= start) & (rows < start + n)).all()
    with torch.no_grad():  # and the model takes them
        from mdlora.models.features import EncodedBatch

        sparse, dense, domains = (torch.from_numpy(a[k]) for k in ("sparse", "dense", "domains"))
        assert a["multi_hot"] is not None
        batch = EncodedBatch(sparse, dense, domains, torch.from_numpy(a["multi_hot"]))
        assert torch.isfinite(art.model.score_batch(batch)).all()


def test_packages_whose_rows_and_values_disagree_are_refused(root: Path, tmp_path: Path) -> None:
    artifact = _trained(root, "mlora")
    path, _ = _files(root)
    out = tmp_path / "pkg"
    add_domain(artifact, path, "d_new", out=out, settings=SETTINGS)
    pkg = read_adapter_package(out)
    values = dict(pkg.config[GROWN_VOCAB])
    values["user_id"] = values["user_id"][:-1]
    bad = type(pkg)(dict(pkg.config, **{GROWN_VOCAB: values}), pkg.tensors)
    write_adapter_package(bad, tmp_path / "bad")
    with pytest.raises(ArtifactError, match="needs exactly one row"):
        read_adapter_package(tmp_path / "bad")
    no_values = type(pkg)({k: v for k, v in pkg.config.items() if k != GROWN_VOCAB}, pkg.tensors)
    write_adapter_package(no_values, tmp_path / "bad2")
    with pytest.raises(ArtifactError, match="grown_vocab"):
        read_adapter_package(tmp_path / "bad2")
    assert pkg.config[GROWN_VOCAB]["domain"] == ["d_new"]  # the division's own column
    moved = type(pkg)(dict(pkg.config, domain="d1"), pkg.tensors)  # config edited to retarget
    write_adapter_package(moved, tmp_path / "bad3")
    with pytest.raises(ArtifactError, match=r"grown ids are for domain \['d_new'\] but it names"):
        read_adapter_package(tmp_path / "bad3")


def test_add_domain_grows_and_trains_rows_on_the_device(root: Path, device: torch.device) -> None:
    artifact = _trained(root, "mlora")
    path, held_out = _files(root)
    out = root / f"on-{device.type}"
    on_device = AddDomainSettings(**{**SETTINGS.__dict__, "device": str(device), "epochs": 2})
    res = add_domain(
        artifact, path, "d_new", out=out / "pkg", artifact_out=out / "grown", settings=on_device
    )
    assert res.grown["user_id"] > 0
    grown = load_artifact(out / "grown", map_location=device)
    old = load_artifact(artifact, map_location=device)
    assert grown.model.device.type == device.type
    rows = _records(_old().sample(500, random_state=2))
    assert np.array_equal(grown.score(rows), old.score(rows))
    scores = grown.score(_records(held_out))
    assert np.isfinite(scores).all() and len(set(np.round(scores, 6))) > 10


def test_add_domain_validates_every_n_steps(root: Path, tmp_path: Path) -> None:
    artifact = _trained(root, "mlora")
    path, _ = _files(root)
    often = AddDomainSettings(**{**SETTINGS.__dict__, "epochs": 2, "eval_every": 5})
    res = add_domain(artifact, path, "d_new", out=tmp_path / "pkg", settings=often)
    (phase,) = res.phases
    assert phase.eval_every == 5
    assert len(phase.history) > phase.epochs_run  # several evaluations an epoch
