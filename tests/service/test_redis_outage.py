"""Redis stops mid-run: serving continues, readiness says degraded, admin writes answer 503,
and the replicas catch up when it returns. Uses a private redis-server, never the shared one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mdlora.artifact import load_artifact
from service.app import create_app
from service.demo import demo_adapter
from service.settings import ServiceSettings
from tests.service.helpers import (
    ADMIN_TOKEN,
    AUTH,
    free_port,
    private_redis,
    upload_files,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
PREDICT = {"user": {"id": 8}, "item_ids": [3, 6, 9, 12]}


def scores(c: TestClient, domain: str) -> Any:
    r = c.post("/predict", json={**PREDICT, "domain": domain})
    return r.json()["scores"] if r.status_code == 200 else r.status_code


def test_serving_survives_a_redis_outage_and_catches_up(
    make_artifact: Callable[[str], Path], tmp_path: Path
) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    with private_redis(port, data) as (url, proc):
        s = ServiceSettings(
            artifact_dir=art,
            registry="redis",
            redis_url=url,
            admin_token=ADMIN_TOKEN,
            reconcile_interval_s=0.5,
            redis_timeout_s=0.3,
        )
        with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
            assert (
                a.post(
                    "/v1/adapters",
                    files=upload_files(demo_adapter(model, "age", "99")),
                    headers=AUTH,
                ).status_code
                == 201
            )
            v99 = scores(a, "99")
            wait_until(lambda: scores(b, "99") == v99, 1.0)
            v25 = scores(a, "25")

            proc.terminate()
            proc.wait(timeout=10)
            for _ in range(20):  # predictions keep coming, from what is loaded
                assert scores(a, "99") == v99 and scores(b, "25") == v25
            ready = a.get("/readyz").json()
            assert ready["status"] == "degraded" and "unavailable" in ready["registry"]
            pkg = upload_files(demo_adapter(model, "age", "98"))
            writes = [
                a.post("/v1/adapters", files=pkg, headers=AUTH),
                a.post("/v1/adapters/age/99/rollback", headers=AUTH),
                b.delete("/v1/adapters/age/99", headers=AUTH),
            ]
            for r in writes:
                assert r.status_code == 503, r.text
                assert "unavailable" in r.json()["detail"]
            assert scores(a, "98") == 404  # the refused registration changed nothing
            listing = a.get("/v1/adapters", headers=AUTH).json()
            assert listing["registry"].startswith("unavailable")
            assert "mdlora_registry_up 0.0" in a.get("/metrics").text

            with private_redis(port, data):
                wait_until(lambda: a.get("/readyz").json()["status"] == "ready", 5.0)
                wait_until(lambda: b.get("/readyz").json()["status"] == "ready", 5.0)
                r = b.post("/v1/adapters", files=pkg, headers=AUTH)
                assert r.status_code == 201, r.text
                v98 = scores(b, "98")
                wait_until(lambda: scores(a, "98") == v98, 3.0)  # pub/sub is back on a
                assert scores(a, "99") == v99


def test_a_replica_starts_without_redis_and_serves_the_artifact(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    s = ServiceSettings(
        artifact_dir=art,
        registry="redis",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        admin_token=ADMIN_TOKEN,
        redis_timeout_s=0.2,
    )
    with TestClient(create_app(s)) as c:
        assert isinstance(scores(c, "25"), list)
        assert c.get("/readyz").json()["status"] == "degraded"
        pkg = upload_files(demo_adapter(load_artifact(art).model, "age", "98"))
        assert c.post("/v1/adapters", files=pkg, headers=AUTH).status_code == 503
