"""The service's torch runtime on the device fixture: CPU in CI, CUDA where present.

The snapshot, adapter registration and ``/predict`` all run on the device asked for, and
score like the core does on the CPU (to float rounding across devices, bit for bit on one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from mdlora.service.snapshot import ArtifactBase, LoadedAdapter
from tests.service.demo import demo_adapter
from tests.service.helpers import core_scores
from tests.service.test_snapshot import rows_for, score

DIVISION = {"mlora": "age", "moe": "gender"}


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_snapshots_score_and_register_on_the_device(
    demo_artifacts: dict[str, Path], method: str, device: torch.device
) -> None:
    on_cpu = ArtifactBase.load(demo_artifacts[method])
    base = ArtifactBase.load(demo_artifacts[method], device)
    snap = base.snapshot()
    assert snap.serving_model.device.type == device.type
    division = DIVISION[method]
    n = len(base.model.domain_names(division))
    rows = rows_for(snap, list(range(n)), n=300)
    before = score(snap, rows)
    np.testing.assert_allclose(before, score(on_cpu.snapshot(), rows), atol=1e-5, rtol=0)

    # registering a new domain's adapter on the device: the other domains keep their scores
    pkg = demo_adapter(on_cpu.model, division, "newcomer", seed=5)
    new = snap.with_adapters([(pkg, LoadedAdapter(1, "x", "registry"))], 1)
    assert new.serving_model.device.type == device.type
    after = score(new, rows)
    if device.type == "cpu":
        np.testing.assert_array_equal(after, before)
    else:  # the segmented GEMMs' block count changes with the domain count: rounding only
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    scores = score(new, rows_for(new, [new.domain_ids[division]["newcomer"]]))
    assert np.isfinite(scores).all() and scores.std() > 0


@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_predict_on_the_device_gives_the_cores_scores(
    make_artifact: Callable[[str], Path], method: str, device: torch.device
) -> None:
    art = make_artifact(method)
    division = DIVISION[method]
    domain = {"age": "25", "gender": "F"}[division]
    items = [3, 6, 30, 123, 900, 424242]
    settings = ServiceSettings(artifact_dir=art, device=device.type, dev_mode=True)
    with TestClient(create_app(settings)) as c:
        # unset, model calls run on a scorer thread on a GPU (they mostly wait for it)
        assert c.get("/v1/models").json()["scorer_thread"] == (device.type == "cuda")
        r = c.post("/predict", json={"domain": domain, "user": {"id": 7}, "item_ids": items})
        assert r.status_code == 200, r.text
        batch = c.post("/predict/batch", json={"requests": [
            {"domain": domain, "user": {"id": u}, "item_ids": items} for u in (1, 7, 150)
        ]})  # fmt: skip
        assert batch.status_code == 200, batch.text
    records = [{"user_id": 7, "movie_id": i, division: domain} for i in items]
    np.testing.assert_allclose(r.json()["scores"], core_scores(art, records), atol=1e-5)
    single = batch.json()["results"][1]["scores"]
    np.testing.assert_allclose(single, r.json()["scores"], atol=1e-6)


def test_warm_up_compiles_the_grouped_kernel_for_every_block_size(
    demo_artifacts: dict[str, Path], device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton compiles the grouped kernel once per block size: the warm-up before a swap
    scores a mixed batch of each size, so no request waits for a compilation."""
    import importlib.util

    from mdlora.models import grouped
    from mdlora.models.lora import BLOCK_SIZES, SegmentPlan
    from mdlora.service.runtime import TorchRunner, warm_up

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' brings it)")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the same kernel, interpreted
    grouped.reset()
    snap = ArtifactBase.load(demo_artifacts["mlora"], device).snapshot()
    if device.type == "cpu":
        snap.serving_model.set_routing("segment")  # what ``merged`` runs as on CUDA
    snap.runner = TorchRunner(snap)
    blocks: set[int] = set()
    original = grouped.grouped_linear

    def spy(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, plan: SegmentPlan, **kw: bool
    ) -> torch.Tensor | None:
        blocks.add(plan.block)
        return original(x, w, b, plan, **kw)

    monkeypatch.setattr(grouped, "grouped_linear", spy)
    warm_up(snap)
    assert blocks == set(BLOCK_SIZES)
    # the next snapshot of the same tower (an adapter swap) needs no compilation: its
    # warm-up scores no large batches beside live traffic
    blocks.clear()
    pkg = demo_adapter(ArtifactBase.load(demo_artifacts["mlora"]).model, "age", "new", seed=2)
    new = snap.with_adapters([(pkg, LoadedAdapter(1, "x", "registry"))], 1)
    if device.type == "cpu":
        new.serving_model.set_routing("segment")
    new.runner = TorchRunner(new)
    warm_up(new)
    assert blocks <= {min(BLOCK_SIZES)}  # at most the four-row batch's
    grouped.reset()


@pytest.mark.parametrize("multi_hot", [False, True])
@pytest.mark.parametrize("dense", [0, 3])
def test_a_batch_reaches_the_device_in_one_packed_copy_unchanged(
    device: torch.device, multi_hot: bool, dense: int
) -> None:
    """On a GPU a request's arrays travel in one pinned buffer, viewed by type on the device:
    the batch is the one the separate copies give (on the CPU the packing is forced)."""
    from mdlora.service.runtime import Rows, device_batch

    g = np.random.default_rng(0)
    rows = Rows(
        g.integers(0, 50, (37, 4)), g.random((37, dense), dtype=np.float32),
        g.integers(0, 7, (37, 2)), g.integers(-1, 9, (37, 2, 5)) if multi_hot else None,
    )  # fmt: skip
    packed = device_batch(rows, device, packed=True)
    plain = device_batch(rows, device, packed=False)
    for name in ("sparse", "dense", "domains", "multi_hot"):
        a, b = getattr(packed, name), getattr(plain, name)
        if b is None:
            assert a is None
            continue
        assert a.device.type == device.type and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name
