"""Snapshots: copy-on-write, immutability under registration, the zero "backbone" domain."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mdlora.formats.files import ArtifactError
from mdlora.models.features import EncodedBatch
from mdlora.service.runtime import Rows, TorchRunner
from mdlora.service.snapshot import ArtifactBase, LoadedAdapter, Snapshot, cow_copy
from tests.service.demo import demo_adapter


def rows_for(snapshot: Snapshot, domain_ids: list[int], n: int = 40) -> Rows:
    gen = np.random.default_rng(0)
    spec = snapshot.model.config.features
    sparse = np.stack([gen.integers(0, f.vocab_size, n) for f in spec.sparse], 1)
    domains = np.zeros((n, len(snapshot.divisions)), np.int64)
    domains[:, 0] = np.resize(domain_ids, n)
    return Rows(sparse.astype(np.int64), np.zeros((n, len(spec.dense)), np.float32), domains)


def score(snapshot: Snapshot, rows: Rows) -> np.ndarray:
    snapshot.runner = TorchRunner(snapshot)
    return snapshot.runner.score(rows)


@pytest.mark.parametrize("method", ["mlora", "moe", "multilora"])
def test_cow_copy_shares_the_backbone_and_copies_adapters(
    demo_artifacts: dict[str, Path], method: str
) -> None:
    base = ArtifactBase.load(demo_artifacts[method])
    clone = cow_copy(base.model)
    shared = dict(base.model.named_parameters())
    for name, p in clone.named_parameters():
        same = p.data_ptr() == shared[name].data_ptr()
        per_domain = name.startswith(
            ("tower.banks.", "tower.lora_sets.", "tower.domain_norms.", "gate.")
        )
        assert same != per_domain, name


def test_registration_builds_a_new_snapshot_and_leaves_the_old_one_alone(
    demo_artifacts: dict[str, Path],
) -> None:
    base = ArtifactBase.load(demo_artifacts["mlora"])
    old = base.snapshot()
    rows = rows_for(old, list(range(7)))
    before = score(old, rows)
    pkg_new = demo_adapter(base.model, "age", "99", seed=5)
    pkg_upd = demo_adapter(base.model, "age", "25", seed=6)
    new = old.with_adapters(
        [
            (pkg_new, LoadedAdapter(1, "x", "registry")),
            (pkg_upd, LoadedAdapter(2, "y", "registry")),
        ],
        1,
    )
    np.testing.assert_array_equal(score(old, rows), before)  # old snapshot unchanged
    after = score(new, rows)
    changed = rows.domains[:, 0] == old.domain_ids["age"]["25"]
    np.testing.assert_array_equal(after[~changed], before[~changed])  # other domains bit-exact
    assert not np.allclose(after[changed], before[changed])
    assert new.domain_ids["age"]["99"] == 7 and "99" not in old.domain_ids["age"]
    assert new.adapters[("age", "25")].version == 2 and old.adapters[("age", "25")].version == 1
    new_rows = rows_for(new, [7])
    assert score(new, new_rows).std() > 0


def test_a_package_that_does_not_fit_leaves_the_snapshot_unchanged(
    demo_artifacts: dict[str, Path],
) -> None:
    base = ArtifactBase.load(demo_artifacts["mlora"])
    snap = base.snapshot()
    rows = rows_for(snap, list(range(7)))
    before = score(snap, rows)
    good = demo_adapter(base.model, "age", "77")
    bad = copy.deepcopy(good)
    bad.tensors["tower.1.lora_B"] = torch.full_like(bad.tensors["tower.1.lora_B"], float("nan"))
    with pytest.raises(ArtifactError, match="NaN"):
        snap.with_adapters(
            [(good, LoadedAdapter(1, "a", "registry")), (bad, LoadedAdapter(1, "b", "registry"))], 1
        )
    np.testing.assert_array_equal(score(snap, rows), before)
    assert "77" not in snap.domain_ids["age"]


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_the_reserved_domain_scores_exactly_the_backbone(
    demo_artifacts: dict[str, Path], method: str
) -> None:
    base = ArtifactBase.load(demo_artifacts[method])
    snap = base.snapshot()
    assert snap.backbone_id is not None
    rows = rows_for(snap, [snap.backbone_id])
    reference = copy.copy(base.model)
    reference.set_stage("backbone")
    batch = EncodedBatch(
        torch.from_numpy(rows.sparse),
        torch.from_numpy(rows.dense),
        torch.from_numpy(rows.domains) * 0,
    )
    with torch.inference_mode():
        expected = reference.score_batch(batch).numpy()
    np.testing.assert_allclose(score(snap, rows), expected, atol=1e-6)
    assert snap.domains(snap.divisions[0]) == list(base.model.domain_names())  # reserved one hidden
