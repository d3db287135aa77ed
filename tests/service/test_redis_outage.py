"""Redis stops mid-run: serving continues, readiness says degraded, admin writes answer 503,
and the replicas catch up when it returns; Redis returns empty: nothing is lost. Uses a
private redis-server, never the shared one."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from mdlora.formats.adapter_package import adapter_package_bytes
from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.registry import RedisRegistry, RegistryState, new_record, set_active
from mdlora.service.settings import ServiceSettings
from mdlora.service.snapshot import ArtifactInfo
from tests.service.demo import demo_adapter
from tests.service.helpers import (
    ADMIN_TOKEN,
    AUTH,
    free_port,
    live_server,
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


def test_redis_back_empty_loses_nothing(
    make_artifact: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The reproduction of issue 14: two replicas, domains registered; Redis shut down without
    saving and an empty one started on its port, under load. Not one request fails, the
    listings are what they were, and the next version number is still a new one."""
    art = make_artifact("mlora")
    model = load_artifact(art).model
    port = free_port()
    with private_redis(port) as (url, _):
        s = ServiceSettings(
            artifact_dir=art,
            registry="redis",
            redis_url=url,
            admin_token=ADMIN_TOKEN,
            redis_timeout_s=0.3,
        )
        with live_server(create_app(s)) as a, live_server(create_app(s)) as b:
            http = httpx.Client(timeout=10)
            for domain, seed in (("d7", 1), ("d7", 2), ("d8", 3), ("25", 4)):
                files = upload_files(demo_adapter(model, "age", domain, seed))
                r = http.post(f"{a}/v1/adapters", files=files, headers=AUTH)
                assert r.status_code == 201, r.text
            assert http.post(f"{b}/v1/adapters/age/d7/rollback", headers=AUTH).status_code == 200
            wait_until(
                lambda: all(
                    http.get(f"{u}/readyz").json()["registry_version"] == 5 for u in (a, b)
                ),
                2.0,
            )
            want = {}
            for d in ("d7", "d8", "25", "35"):
                want[d] = http.post(f"{a}/predict", json={**PREDICT, "domain": d}).json()["scores"]
                assert (
                    http.post(f"{b}/predict", json={**PREDICT, "domain": d}).json()["scores"]
                    == want[d]
                )
            listings = [http.get(f"{u}/v1/adapters", headers=AUTH).json() for u in (a, b)]
            assert listings[0] == listings[1] and listings[0]["registry_version"] == 5

            sent, failed, stop = 0, [], threading.Event()

            def load() -> None:
                nonlocal sent
                with httpx.Client(timeout=10) as client:
                    while not stop.is_set():
                        for i, d in enumerate(want):
                            url = (a, b)[(sent + i) % 2]
                            r = client.post(f"{url}/predict", json={**PREDICT, "domain": d})
                            sent += 1
                            if r.status_code != 200 or r.json()["scores"] != want[d]:
                                failed.append((url, d, r.status_code, r.text[:200]))

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            time.sleep(0.5)
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(url).shutdown(nosave=True)
            time.sleep(0.5)
            with private_redis(port):  # an empty Redis on the same port
                store = RedisRegistry(url, "mdlora", ArtifactInfo.from_artifact(
                    load_artifact(art)).model_id)  # fmt: skip
                wait_until(lambda: store.read_state().version == 5, 5.0)
                time.sleep(1.0)  # keep the load on after the write-back
                stop.set()
                loader.join(timeout=30)
                after = [http.get(f"{u}/v1/adapters", headers=AUTH).json() for u in (a, b)]
                ready = [http.get(f"{u}/readyz").json()["status"] for u in (a, b)]
                metrics = [http.get(f"{u}/metrics").text for u in (a, b)]
                files = upload_files(demo_adapter(model, "age", "d7", 5))
                new = http.post(f"{b}/v1/adapters", files=files, headers=AUTH).json()
            http.close()
    with capsys.disabled():
        print(
            f"\nredis back empty: {sent} requests sent, {len(failed)} failed; listing before "
            f"{_summary(listings[0])}, after {_summary(after[0])} / {_summary(after[1])}"
        )
    assert sent > 100 and failed == [], failed[:5]
    assert after == listings
    assert ready == ["ready", "ready"]
    restores = sum("mdlora_registry_restores_total 1.0" in m for m in metrics)
    assert restores == 1, "one replica writes the registry back"
    # the other replica saw the empty registry too, or only the restored one
    assert any("mdlora_registry_losses_total 1.0" in m for m in metrics)
    assert all("mdlora_registry_diverged 0.0" in m for m in metrics)
    assert new["version"] == 3  # d7 had v1 and v2: never reused


def _summary(listing: dict[str, Any]) -> str:
    """Registry version, then the registered domains: active version / every version."""
    return f"registry v{listing['registry_version']} " + ", ".join(
        f"{a['domain']}: v{a['active_version']} of {[v['version'] for v in a['versions']]}"
        for a in listing["adapters"]
        if any(v["origin"] == "registry" for v in a["versions"])
    )


def test_a_replica_starts_without_redis_and_catches_up_when_it_returns(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    artifact = load_artifact(art)
    port = free_port()
    s = ServiceSettings(
        artifact_dir=art,
        registry="redis",
        redis_url=f"redis://127.0.0.1:{port}/0",
        admin_token=ADMIN_TOKEN,
        redis_timeout_s=0.2,
    )
    with TestClient(create_app(s)) as c:
        assert isinstance(scores(c, "25"), list)  # the artifact's own adapters
        ready = c.get("/readyz").json()
        assert ready["status"] == "degraded" and ready["registry"].startswith("unavailable")
        pkg = upload_files(demo_adapter(artifact.model, "age", "98"))
        assert c.post("/v1/adapters", files=pkg, headers=AUTH).status_code == 503
        assert scores(c, "97") == 404

        with private_redis(port) as (url, _):
            # another replica registered 97 meanwhile
            writer = RedisRegistry(url, "mdlora", ArtifactInfo.from_artifact(artifact).model_id)
            config, weights = adapter_package_bytes(demo_adapter(artifact.model, "age", "97"))
            record = new_record(1, config, weights)
            state = RegistryState().with_entry(("age", "97"), set_active(None, 1, record))
            writer.commit(0, state, (("age", "97"), record, config, weights))
            wait_until(lambda: isinstance(scores(c, "97"), list), 5.0)
            assert c.get("/readyz").json()["status"] == "ready"
            r = c.post("/v1/adapters", files=pkg, headers=AUTH)
            assert r.status_code == 201 and r.json()["registry_version"] == 2, r.text


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
