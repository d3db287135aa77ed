"""Canary rollouts (service.rollout) and online feedback (service.feedback), local registry.

The simulated rollout: a closed-loop client draws clicks from a known ground-truth CTR model
(the domain's active adapter, as the models core scores it), a good canary (the active
adapter lightly perturbed) and a bad one (its adapter weights negated) served at 20%.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mdlora.formats.adapter_package import (
    AdapterPackage,
    apply_adapter,
    make_adapter_package,
)
from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.rollout import user_bucket
from mdlora.service.settings import ServiceSettings
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files

DIV, DOM = "age", "25"
ITEMS = [3 * i for i in range(1, 11)]


STRENGTH = 4.0  # the demo's random adapters barely move scores; the stable one here does


def variant(art: Path, kind: str, seed: int = 7) -> AdapterPackage:
    """The age/25 adapter the rollouts start from (``stable``: the artifact's, its low-rank
    weights scaled up so that the domain's scores depend on them), ``good``: that one lightly
    perturbed (a retraining), ``bad``: its weights negated."""
    model = load_artifact(art).model
    pkg = make_adapter_package(model, DIV, DOM, 2)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in pkg.tensors.items():
        if name.endswith(("lora_B", "bias")):
            t = t * STRENGTH
            if kind == "bad":
                t = -t
            elif kind == "good":
                t = t * (1 + 0.02 * torch.randn(t.shape, generator=gen))
        out[name] = t.contiguous()
    pkg.tensors = out
    return pkg


def app(art: Path, **kw: Any) -> TestClient:
    kw.setdefault("admin_token", ADMIN_TOKEN)
    return TestClient(create_app(ServiceSettings(artifact_dir=art, **kw)))


def register(c: TestClient, pkg: AdapterPackage) -> None:
    assert c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201


def register_canary(c: TestClient, pkg: AdapterPackage, percent: float = 20) -> Any:
    return c.post(
        "/v1/adapters",
        files=upload_files(pkg),
        data={"canary_percent": str(percent)},
        headers=AUTH,
    )


def versions_of(c: TestClient, users: range) -> dict[int, int]:
    """Which version answered each user (64 users per /predict/batch call)."""
    out: dict[int, int] = {}
    ids = list(users)
    for start in range(0, len(ids), 64):
        chunk = ids[start : start + 64]
        body = {
            "requests": [{"domain": DOM, "user": {"id": u}, "item_ids": ITEMS[:2]} for u in chunk]
        }
        r = c.post("/predict/batch", json=body)
        assert r.status_code == 200, r.text
        for u, res in zip(chunk, r.json()["results"], strict=True):
            out[u] = res["adapter_versions"][DIV]
            assert res["request_id"]
    return out


@pytest.fixture
def mlora(make_artifact: Callable[[str], Path]) -> Path:
    return make_artifact("mlora")


def test_share_is_within_two_points_and_sticky_and_promote_makes_it_everyone(
    mlora: Path,
) -> None:
    with app(mlora) as c:
        r = register_canary(c, variant(mlora, "good"), 20)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2
        status = c.get(f"/v1/rollouts/{DIV}/{DOM}", headers=AUTH).json()
        assert status["state"] == "running" and status["version"] == 2
        assert status["stable"] == 1 and status["active_version"] == 1
        assert status["serving_canary"] is True

        seen = versions_of(c, range(1, 10_001))
        share = 100 * sum(v == 2 for v in seen.values()) / len(seen)
        assert abs(share - 20) <= 2, share
        assert set(seen.values()) == {1, 2}
        # the split is the documented hash: the same users again get the same versions
        salt = status["salt"]
        assert all((v == 2) == (user_bucket(salt, str(u)) < 20) for u, v in seen.items())
        assert versions_of(c, range(1, 2001)) == {u: seen[u] for u in range(1, 2001)}
        # a canary user's scores are the canary's, a stable user's the active version's
        canary_user = next(u for u, v in seen.items() if v == 2)
        stable_user = next(u for u, v in seen.items() if v == 1)
        one = {"domain": DOM, "item_ids": ITEMS}
        s_canary = c.post("/predict", json={**one, "user": {"id": canary_user}}).json()
        s_stable = c.post("/predict", json={**one, "user": {"id": stable_user}}).json()
        assert s_canary["adapter_versions"] == {DIV: 2}
        assert s_stable["adapter_versions"] == {DIV: 1}
        # no user id: the active version
        anon = c.post("/predict", json={**one, "user": {"features": {}}}).json()
        assert anon["adapter_versions"] == {DIV: 1}
        # raising the share only moves users onto the canary
        r = c.post(f"/v1/rollouts/{DIV}/{DOM}", json={"version": 2, "percent": 50}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["salt"] == salt and r.json()["percent"] == 50
        again = versions_of(c, range(1, 3001))
        assert all(again[u] == 2 for u in range(1, 3001) if seen[u] == 2)
        assert 40 <= 100 * sum(v == 2 for v in again.values()) / 3000 <= 60

        r = c.post(f"/v1/rollouts/{DOM}/promote", headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["state"] == "promoted" and body["decided_by"] == "admin"
        assert body["active_version"] == 2 and body["serving_canary"] is False
        assert set(versions_of(c, range(1, 1001)).values()) == {2}
        metrics = c.get("/metrics").text
        assert 'mdlora_rollout_decisions_total{by="admin",decision="promote"} 1.0' in metrics
        assert 'mdlora_rollout_canary_percent{division="age",domain="25"} 0.0' in metrics
        # decided: promote again is a 409
        assert c.post(f"/v1/rollouts/{DIV}/{DOM}/promote", headers=AUTH).status_code == 409


def test_abort_and_changes_refused_while_a_rollout_runs(mlora: Path) -> None:
    with app(mlora) as c:
        assert register_canary(c, variant(mlora, "good"), 30).status_code == 201
        # one rollout per domain; no registration / rollback / removal under it
        r = register_canary(c, variant(mlora, "bad"), 30)
        assert r.status_code == 409 and "promote or abort" in r.json()["detail"]
        r = c.post("/v1/adapters", files=upload_files(variant(mlora, "bad")), headers=AUTH)
        assert r.status_code == 409
        assert c.post(f"/v1/adapters/{DIV}/{DOM}/rollback", headers=AUTH).status_code == 409
        assert c.delete(f"/v1/adapters/{DIV}/{DOM}", headers=AUTH).status_code == 409
        listed = c.get(f"/v1/adapters/{DIV}/{DOM}", headers=AUTH).json()
        assert [v["version"] for v in listed["versions"]] == [1, 2]  # nothing else changed
        # bad input to the rollout API
        url = f"/v1/rollouts/{DIV}/{DOM}"
        assert c.post(url, json={"version": 2, "percent": 101}, headers=AUTH).status_code == 422
        assert c.post(url, json={"version": "2"}, headers=AUTH).status_code == 422
        assert c.post(url, json={"version": 3, "percent": 5}, headers=AUTH).status_code == 404
        assert c.post(url, json={"version": 2, "percent": 5}).status_code == 401
        assert c.get("/v1/rollouts/age/99", headers=AUTH).status_code == 404

        r = c.post(f"{url}/abort", json={"reason": "testing"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "aborted" and r.json()["reason"] == "testing"
        assert set(versions_of(c, range(1, 501)).values()) == {1}
        # a new rollout of the same registered version, by the separate call
        r = c.post(url, json={"version": 2, "percent": 100}, headers=AUTH)
        assert r.status_code == 200 and r.json()["state"] == "running"
        assert set(versions_of(c, range(1, 201)).values()) == {2}
        assert len(c.get("/v1/rollouts", headers=AUTH).json()["rollouts"]) == 1


def test_a_rollout_survives_a_restart(mlora: Path) -> None:
    with app(mlora) as c:
        assert register_canary(c, variant(mlora, "good"), 25).status_code == 201
        before = versions_of(c, range(1, 1001))
    with app(mlora) as c:
        status = c.get(f"/v1/rollouts/{DOM}", headers=AUTH).json()
        assert status["state"] == "running" and status["serving_canary"] is True
        assert versions_of(c, range(1, 1001)) == before


# ---------------------------------------------------------------------------- feedback
def truth(art: Path) -> Callable[[int], np.ndarray]:
    """The ground-truth click probability of ``ITEMS`` for a user: the ``stable`` adapter,
    as the models core scores it."""
    artifact = load_artifact(art)
    apply_adapter(artifact.model, variant(art, "stable"))

    def p(user: int) -> np.ndarray:
        return artifact.score([{"user_id": user, "movie_id": i, "age": 25} for i in ITEMS])

    return p


def closed_loop(
    c: TestClient, p_true: Callable[[int], np.ndarray], users: range, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Predict for each user, draw clicks from the truth, send them back; yields the
    feedback answers."""
    rng = np.random.default_rng(seed)
    for u in users:
        r = c.post("/predict", json={"domain": DOM, "user": {"id": u}, "item_ids": ITEMS})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        clicks = rng.random(len(ITEMS)) < p_true(u)
        events = [
            {"request_id": rid, "item_index": i, "clicked": bool(k)} for i, k in enumerate(clicks)
        ]
        fb = c.post("/feedback", json={"events": events})
        assert fb.status_code == 200, fb.text
        yield fb.json()


# at 500 events the LogLoss of a version is known to about 9%: margins of several standard
# errors, so the good canary is not aborted by chance (the guard checks after every batch)
MIN = 500
GUARD = {
    "rollout_min_events": MIN,
    "rollout_logloss_margin": 0.25,
    "rollout_calibration_margin": 0.1,
    "rollout_guard_interval_s": 0.0,
}


def test_the_guard_aborts_a_bad_canary_after_the_minimum_events(mlora: Path) -> None:
    p_true = truth(mlora)
    with app(mlora, **GUARD) as c:
        register(c, variant(mlora, "stable"))
        assert register_canary(c, variant(mlora, "bad"), 20).status_code == 201
        aborted_at = None
        for n, fb in enumerate(closed_loop(c, p_true, range(1, 1001)), 1):
            if fb["guard"]:
                aborted_at = n
                decision = fb["guard"][f"{DIV}/{DOM}"]
                break
        assert aborted_at is not None, "the guard never aborted the bad canary"
        assert decision["state"] == "aborted" and decision["decided_by"] == "guard"
        status = c.get(f"/v1/rollouts/{DIV}/{DOM}", headers=AUTH).json()
        assert status["state"] == "aborted" and status["reason"].startswith(("logloss", "calib"))
        canary, stable = status["feedback"]["canary"], status["feedback"]["stable"]
        assert canary["count"] >= MIN and stable["count"] >= MIN
        assert canary["count"] < MIN + 10 * len(ITEMS)  # judged as soon as it had enough
        assert canary["logloss"] > stable["logloss"]
        assert 0 < stable["auc"] <= 1 and stable["calibration"] > 0
        metrics = c.get("/metrics").text
        assert "mdlora_rollout_guard_aborts_total{" in metrics
        assert 'decision="abort"} 1.0' in metrics
        assert 'mdlora_feedback_count{division="age",domain="25",version="3"}' in metrics
        # everyone is back on the active version
        assert set(versions_of(c, range(1, 301)).values()) == {2}
        print(f"guard: aborted after {canary['count']} canary events ({aborted_at} answers)")


def test_the_guard_leaves_a_good_canary_running(mlora: Path) -> None:
    p_true = truth(mlora)
    with app(mlora, **GUARD) as c:
        register(c, variant(mlora, "stable"))
        assert register_canary(c, variant(mlora, "good"), 20).status_code == 201
        for fb in closed_loop(c, p_true, range(1, 501)):
            assert not fb["guard"]
        status = c.get(f"/v1/rollouts/{DIV}/{DOM}", headers=AUTH).json()
        assert status["state"] == "running"
        canary, stable = status["feedback"]["canary"], status["feedback"]["stable"]
        assert canary["count"] >= MIN and stable["count"] >= MIN  # the guard did judge it
        assert canary["logloss"] < 1.25 * stable["logloss"]
        r = c.post(f"/v1/rollouts/{DIV}/{DOM}/promote", headers=AUTH)
        assert r.status_code == 200 and r.json()["active_version"] == 3
        assert set(versions_of(c, range(1, 301)).values()) == {3}


def test_bad_feedback_is_refused_and_changes_nothing(mlora: Path) -> None:
    with app(mlora, feedback_max_events=50, feedback_max_body_bytes=4096) as c:
        assert register_canary(c, variant(mlora, "good"), 50).status_code == 201
        r = c.post("/predict", json={"domain": DOM, "user": {"id": 9}, "item_ids": ITEMS})
        rid = r.json()["request_id"]
        good = {"request_id": rid, "item_id": ITEMS[0], "clicked": True}

        def counts() -> Any:
            s = c.get(f"/v1/rollouts/{DIV}/{DOM}", headers=AUTH).json()["feedback"]
            return s["canary"]["count"], s["stable"]["count"]

        bad_bodies = {
            "unknown id": ({"events": [good, {**good, "request_id": "nope"}]}, 404),
            "item not served": ({"events": [good, {**good, "item_id": 4}]}, 422),
            "index out of range": ({"events": [{**good, "item_id": None, "item_index": 10}]}, 422),
            "both item fields": ({"events": [{**good, "item_index": 0}]}, 422),
            "clicked as text": ({"events": [{**good, "clicked": "yes"}]}, 422),
            "clicked as 1": ({"events": [{**good, "clicked": 1}]}, 422),
            "no events": ({"events": []}, 422),
            "extra field": ({"events": [good], "x": 1}, 422),
            "not a list": ({"events": good}, 422),
            "too many events": ({"events": [good] * 51}, 422),
            "huge body": ({"events": [good] * 200}, 413),
        }
        for name, (body, status) in bad_bodies.items():
            r = c.post("/feedback", json=body)
            assert r.status_code == status, (name, r.text)
            assert r.json()["detail"], name
        assert c.post("/feedback", content=b"{not json").status_code == 422
        assert counts() == (0, 0)
        # a served answer outside any rollout is not kept: unknown
        other = c.post("/predict", json={"domain": "35", "user": {"id": 9}, "item_ids": [3]})
        fb = {"request_id": other.json()["request_id"], "item_index": 0, "clicked": False}
        assert c.post("/feedback", json={"events": [fb]}).status_code == 404
        # the good event counts once, however often it is sent
        ok = c.post("/feedback", json={"events": [good, good]})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1
        assert c.post("/feedback", json={"events": [good]}).json()["duplicates"] == 1
        assert sum(counts()) == 1
        refused = Counter(
            line.split()[0] for line in c.get("/metrics").text.splitlines() if "refused" in line
        )
        assert refused


def test_window_statistics_match_sklearn_and_the_guard_reads_them() -> None:
    from sklearn.metrics import log_loss, roc_auc_score

    from mdlora.service.feedback import guard_verdict, window_stats

    rng = np.random.default_rng(0)
    p = np.round(rng.random(5000), 2)  # many ties
    y = rng.random(5000) < p
    s = window_stats(p, y)
    assert s["count"] == 5000
    assert s["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert s["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-9)
    assert s["calibration"] == pytest.approx(p.mean() / y.mean())
    assert window_stats(p[:0], y[:0])["logloss"] is None
    assert window_stats(p[:10], np.zeros(10, bool))["auc"] is None  # one class: undefined
    cfg = ServiceSettings(artifact_dir=Path("."), rollout_min_events=1000)
    worse = window_stats(1 - p, y)
    verdict = guard_verdict(worse, s, cfg)
    assert verdict is not None and verdict[0] == "logloss"
    assert guard_verdict(s, s, cfg) is None
    few = window_stats(1 - p[:999], y[:999])
    assert guard_verdict(few, s, cfg) is None  # not enough events yet
    high = window_stats(np.clip(p + 0.25, 0, 1), y)
    loose = ServiceSettings(artifact_dir=Path("."), rollout_logloss_margin=10.0)
    verdict = guard_verdict(high, s, loose)
    assert verdict is not None and verdict[0] == "calibration"
