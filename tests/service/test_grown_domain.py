"""A registered domain that brings its own users and items (grown embedding rows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mdlora.formats.adapter_package import (
    AdapterPackage,
    make_adapter_package,
)
from mdlora.formats.artifact import load_artifact
from mdlora.formats.encoder import FeatureEncoder
from mdlora.formats.files import GROWN_VOCAB
from mdlora.formats.grown import region_fields
from mdlora.models.rows import EMBEDDING_ROWS, domain_rows, grow_domain_rows, set_domain_rows
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files

USERS = ["kid-1", "kid-2", "kid-3"]
ITEMS = ["toy-1", "toy-2", "toy-3", "toy-4"]


def grown_package(
    artifact: Path, domain: str = "kids", seed: int = 0
) -> tuple[AdapterPackage, Any]:
    """A package for a new domain with new users and items (random rows and adapter), and
    the core's reference scorer for it (the export with the package installed)."""
    art = load_artifact(artifact)
    enc = FeatureEncoder.from_dict(art.encoder or {})
    division = art.model.config.divisions[0].name
    art.model.add_domain(division, domain, "own")
    enc.add_domain(division, domain)
    values = {"user_id": USERS, "movie_id": ITEMS, division: [domain]}
    enc.set_grown(division, domain, values)
    grow_domain_rows(art.model, division, domain, region_fields(enc, values))
    gen = torch.Generator().manual_seed(seed)
    rows = {k: torch.randn(v.shape, generator=gen) for k, v in
            domain_rows(art.model, division, domain).items()}  # fmt: skip
    set_domain_rows(art.model, division, domain, rows)
    pkg = make_adapter_package(art.model, division, domain, 1)
    pkg.config[GROWN_VOCAB] = values
    if art.model.gate is not None:
        pkg.config["gate_scope"] = "own"
    from mdlora.formats.grown import place

    place(enc, art.model)
    return pkg, replace(art, encoder=enc.to_dict())


def _client(artifact: Path, **kw: Any) -> TestClient:
    return TestClient(create_app(ServiceSettings(artifact_dir=artifact, admin_token=ADMIN_TOKEN,
                                                 **kw)))  # fmt: skip


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
@pytest.mark.parametrize("method", ["mlora", "moe"])
def test_a_new_domain_scores_its_new_ids_with_its_own_rows(
    make_artifact: Callable[[str], Path], method: str, runtime: str
) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    art = make_artifact(method)
    pkg, reference = grown_package(art)
    division = pkg.division
    old_domain = reference.model.config.divisions[0].domains[0]
    body = {"domain": "kids", "user": {"id": "kid-2"}, "item_ids": ITEMS}
    old_body = {"domain": old_domain, "user": {"id": 5}, "item_ids": [3, 6, 9]}
    with _client(art, runtime=runtime) as c:
        old_before = c.post("/predict", json=old_body).json()["scores"]
        assert c.post("/predict", json=body).status_code == 404
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        assert r.status_code == 201, r.text
        got = c.post("/predict", json=body).json()
        old_after = c.post("/predict", json=old_body).json()["scores"]
        # the same ids in another domain are unknown there: the grown ids are the domain's own
        elsewhere = c.post("/predict", json={**body, "domain": old_domain}).json()
        listed = c.get(f"/v1/adapters/{division}/kids", headers=AUTH).json()
        gone = c.delete(f"/v1/adapters/{division}/kids", headers=AUTH)
        after_remove = c.post("/predict", json=body)
    records = [{"user_id": "kid-2", "movie_id": i, division: "kids"} for i in ITEMS]
    want = reference.score(records)
    assert np.allclose(got["scores"], want, atol=1e-5), (got["scores"], want)
    assert len(set(np.round(got["scores"], 6))) == len(ITEMS)  # the items are told apart
    assert not any("not in the model's vocabulary" in w for w in got.get("warnings", []))
    assert any("not in the model's vocabulary" in w for w in elsewhere.get("warnings", []))
    assert np.allclose(old_after, old_before, atol=1e-6)
    assert listed["grown_ids"] == len(USERS) + len(ITEMS) + 1, listed
    assert gone.status_code == 200 and after_remove.status_code == 404


def test_grown_rows_must_match_their_values(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    pkg, _ = grown_package(art)
    values = pkg.config[GROWN_VOCAB]
    pkg.config[GROWN_VOCAB] = {**values, "user_id": values["user_id"][:-1]}  # 7 values, 8 rows
    assert pkg.tensors[EMBEDDING_ROWS].shape[0] == 8
    with _client(art) as c:
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        listing = c.get("/v1/adapters", headers=AUTH).json()
    assert r.status_code == 422 and "grown_vocab" in r.json()["detail"], r.text
    assert "kids" not in str(listing)


def test_the_feature_store_serves_a_new_domains_users(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    """publish-features for the new domain's users and items: a request with ids alone gets
    its domain from the stored user and scores its ids with their grown rows."""
    import pandas as pd
    import redis

    from mdlora.service.feature_store import publish_features

    art = make_artifact("mlora")
    pkg, reference = grown_package(art)
    division = pkg.division
    frame = pd.DataFrame(
        [{"user_id": u, "movie_id": i, division: "kids"} for u in USERS for i in ITEMS]
    )
    encoder = FeatureEncoder.from_dict(reference.encoder)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    publish_features(frame, encoder, "user_id", "movie_id", client, redis_prefix, progress=False)
    with _client(art, feature_store="redis", redis_url=redis_url, redis_prefix=redis_prefix) as c:
        assert c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        ids_only = c.post("/predict", json={"user": {"id": "kid-3"}, "item_ids": ITEMS}).json()
    assert ids_only["domains"] == {division: "kids"}, ids_only
    want = reference.score([{"user_id": "kid-3", "movie_id": i, division: "kids"} for i in ITEMS])
    assert np.allclose(ids_only["scores"], want, atol=1e-5)


def test_replicas_follow_a_grown_domain_and_its_rollback(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    """Two replicas on one Redis: registering a package with grown rows, a version without
    them, a rollback and a removal reach the other replica, which scores like the first."""
    from tests.service.demo import demo_adapter
    from tests.service.helpers import wait_until

    art = make_artifact("mlora")
    pkg, _ = grown_package(art)
    plain = demo_adapter(load_artifact(art).model, pkg.division, "kids", seed=5, version=2)
    s = ServiceSettings(artifact_dir=art, registry="redis", redis_url=redis_url,
                        redis_prefix=redis_prefix, admin_token=ADMIN_TOKEN,
                        reconcile_interval_s=60.0)  # fmt: skip
    body = {"domain": "kids", "user": {"id": "kid-1"}, "item_ids": ITEMS}

    def scores(c: TestClient) -> Any:
        r = c.post("/predict", json=body)
        return r.json()["scores"] if r.status_code == 200 else r.status_code

    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        assert a.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        grown = scores(a)
        wait_until(lambda: scores(b) == grown, timeout=2.0)
        assert a.post("/v1/adapters", files=upload_files(plain), headers=AUTH).status_code == 201
        flat = scores(a)
        assert len(set(flat)) == 1  # without rows of their own, the new ids look alike
        wait_until(lambda: scores(b) == flat, timeout=2.0)
        assert b.post(f"/v1/adapters/{pkg.division}/kids/rollback", headers=AUTH).status_code == 200
        wait_until(lambda: scores(a) == grown, timeout=2.0)
        assert scores(b) == grown
        assert a.delete(f"/v1/adapters/{pkg.division}/kids", headers=AUTH).status_code == 200
        wait_until(lambda: scores(b) == 404, timeout=2.0)


def test_a_package_whose_grown_rows_overflow_or_whose_scores_saturate_is_refused(
    make_artifact: Callable[[str], Path],
) -> None:
    """The probe scores every id the package grew (their rows are reached through them
    alone) and refuses scores that are all exactly 0 or 1; nothing is registered."""
    art = make_artifact("mlora")
    pkg, _ = grown_package(art, "huge")
    rows = pkg.tensors[EMBEDDING_ROWS]
    rows.zero_()
    rows[-1] = 3e38  # one grown row (the domain's own value) whose products overflow
    saturated, _ = grown_package(art, "sat", seed=1)
    for name, t in saturated.tensors.items():
        if name.endswith("bias"):
            t.fill_(1e30)  # finite, but every score becomes exactly 1
    with _client(art) as c:
        listing = c.get("/v1/adapters", headers=AUTH).json()
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        assert r.status_code == 422 and "ids the package grew" in r.json()["detail"], r.text
        r = c.post("/v1/adapters", files=upload_files(saturated), headers=AUTH)
        assert r.status_code == 422 and "saturate the model" in r.json()["detail"], r.text
        assert c.get("/v1/adapters", headers=AUTH).json() == listing
