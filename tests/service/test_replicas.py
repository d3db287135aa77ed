"""Replicas sharing one Redis registry follow each other's changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mdlora.formats.adapter_package import adapter_package_bytes
from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.registry import RedisRegistry, RegistryState, new_record, set_active
from mdlora.service.settings import ServiceSettings
from mdlora.service.snapshot import ArtifactInfo
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files, wait_until

PREDICT = {"user": {"id": 8}, "item_ids": [3, 6, 9, 12, 15]}


def settings(art: Path, url: str, prefix: str, **kw: Any) -> ServiceSettings:
    kw.setdefault("reconcile_interval_s", 60.0)  # only pub/sub can be fast enough here
    return ServiceSettings(
        artifact_dir=art,
        registry="redis",
        redis_url=url,
        redis_prefix=prefix,
        admin_token=ADMIN_TOKEN,
        **kw,
    )


def scores(c: TestClient, domain: str) -> Any:
    r = c.post("/predict", json={**PREDICT, "domain": domain})
    return r.json()["scores"] if r.status_code == 200 else r.status_code


def test_a_registration_reaches_the_other_replica_within_a_second(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    s = settings(art, redis_url, redis_prefix)
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        assert scores(b, "99") == 404
        r = a.post(
            "/v1/adapters", files=upload_files(demo_adapter(model, "age", "99", 1)), headers=AUTH
        )
        assert r.status_code == 201, r.text
        v1 = scores(a, "99")
        took = wait_until(lambda: scores(b, "99") == v1, timeout=1.0)
        assert took < 1.0

        a.post(
            "/v1/adapters", files=upload_files(demo_adapter(model, "age", "99", 2)), headers=AUTH
        )
        v2 = scores(a, "99")
        assert v2 != v1
        wait_until(lambda: scores(b, "99") == v2, timeout=1.0)

        assert a.post("/v1/adapters/age/99/rollback", headers=AUTH).json()["version"] == 1
        wait_until(lambda: scores(b, "99") == v1, timeout=1.0)

        assert b.delete("/v1/adapters/age/99", headers=AUTH).status_code == 200
        wait_until(lambda: scores(a, "99") == 404, timeout=1.0)
        ready = b.get("/readyz").json()
        assert ready["status"] == "ready" and ready["registry_version"] == 4
        assert "mdlora_registry_version 4.0" in a.get("/metrics").text


def test_a_missed_message_is_caught_by_the_periodic_reconcile(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    art = make_artifact("mlora")
    artifact = load_artifact(art)
    model_id = ArtifactInfo.from_artifact(artifact).model_id
    config, weights = adapter_package_bytes(demo_adapter(artifact.model, "age", "42"))
    with TestClient(
        create_app(settings(art, redis_url, redis_prefix, reconcile_interval_s=0.3))
    ) as c:
        assert scores(c, "42") == 404
        writer = RedisRegistry(redis_url, redis_prefix, model_id)
        writer.channel = f"{redis_prefix}:nobody-listens"  # the message is lost
        record = new_record(1, config, weights)
        state = RegistryState().with_entry(("age", "42"), set_active(None, 1, record))
        writer.commit(0, state, (("age", "42"), record, config, weights))
        wait_until(lambda: isinstance(scores(c, "42"), list), timeout=3.0)


@pytest.mark.parametrize("method", ["moe", "multilora"])
def test_replicas_agree_for_every_method(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str, method: str
) -> None:
    art = make_artifact(method)
    model = load_artifact(art).model
    division = model.config.divisions[0].name
    s = settings(art, redis_url, redis_prefix)
    extra = {"domains": {"gender": "F"}} if method == "multilora" else {}
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        r = a.post(
            "/v1/adapters", files=upload_files(demo_adapter(model, division, "new")), headers=AUTH
        )
        assert r.status_code == 201, r.text
        req = {**PREDICT, "domain": "new", **extra}
        want = a.post("/predict", json=req).json()
        wait_until(lambda: b.post("/predict", json=req).json().get("scores") == want["scores"], 1.0)
        time.sleep(0.05)
        assert b.post("/predict", json=req).json()["adapter_versions"][division] == 1


def test_a_registry_that_lost_its_data_is_written_back_not_followed(
    make_artifact: Callable[[str], Path],
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its keys deleted (as FLUSHALL would): the replica keeps serving, writes the state and
    the packages back with their version numbers, and numbers are never reused."""
    import redis

    art = make_artifact("mlora")
    model = load_artifact(art).model
    with TestClient(create_app(settings(art, redis_url, redis_prefix))) as a:
        for seed in (1, 2):
            files = upload_files(demo_adapter(model, "age", "42", seed))
            assert a.post("/v1/adapters", files=files, headers=AUTH).status_code == 201
        v2 = scores(a, "42")
        listing = a.get("/v1/adapters", headers=AUTH).json()
        client = redis.Redis.from_url(redis_url)
        client.delete(*client.keys(f"{redis_prefix}:registry:*"))  # emptied
        with caplog.at_level("WARNING", logger="mdlora.service"):
            a.app.state.service.control.request_reconcile()  # type: ignore[attr-defined]
            wait_until(lambda: bool(client.keys(f"{redis_prefix}:registry:*:state")), 3.0)
        assert scores(a, "42") == v2
        assert a.get("/v1/adapters", headers=AUTH).json() == listing
        assert a.get("/readyz").json()["status"] == "ready"
        metrics = a.get("/metrics").text
        assert "mdlora_registry_losses_total 1.0" in metrics
        assert "mdlora_registry_restores_total 1.0" in metrics
        assert "mdlora_registry_diverged 0.0" in metrics
        # the package of v1 was written back too: a rollback still finds it
        assert a.post("/v1/adapters/age/42/rollback", headers=AUTH).json()["version"] == 1
        r = a.post(
            "/v1/adapters", files=upload_files(demo_adapter(model, "age", "42", 3)), headers=AUTH
        )
        assert r.json()["version"] == 3  # never reused
    assert "the registry is empty, this replica followed change 2" in caplog.text
    assert "wrote it back (change 2, 1 domains, 2 packages written)" in caplog.text


def test_a_registry_replaced_by_another_history_is_not_followed(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    """The store now holds changes this replica never saw (another registry's): it is not
    followed and not overwritten; the replica serves what it holds, degraded, says why, and
    refuses admin writes (which would reuse version numbers) until someone decides."""
    import redis

    art = make_artifact("mlora")
    artifact = load_artifact(art)
    model_id = ArtifactInfo.from_artifact(artifact).model_id
    with TestClient(create_app(settings(art, redis_url, redis_prefix))) as a:
        files = upload_files(demo_adapter(artifact.model, "age", "42"))
        assert a.post("/v1/adapters", files=files, headers=AUTH).status_code == 201
        v42 = scores(a, "42")
        client = redis.Redis.from_url(redis_url)
        client.delete(*client.keys(f"{redis_prefix}:registry:*"))
        other = RedisRegistry(redis_url, redis_prefix, model_id)  # another history's first change
        config, weights = adapter_package_bytes(demo_adapter(artifact.model, "age", "43"))
        record = new_record(1, config, weights)
        state = RegistryState().with_entry(("age", "43"), set_active(None, 1, record))
        other.commit(0, state, (("age", "43"), record, config, weights))
        wait_until(lambda: a.get("/readyz").json()["status"] == "degraded", 3.0)
        ready = a.get("/readyz").json()
        assert "the registry was replaced" in ready["registry"], ready
        assert scores(a, "42") == v42 and scores(a, "43") == 404
        r = a.post(
            "/v1/adapters", files=upload_files(demo_adapter(artifact.model, "age", "44")),
            headers=AUTH,
        )  # fmt: skip
        assert r.status_code == 503 and "the registry was replaced" in r.json()["detail"]
        assert "mdlora_registry_diverged 1.0" in a.get("/metrics").text
        assert RedisRegistry(redis_url, redis_prefix, model_id).read_state() == state
