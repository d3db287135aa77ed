"""Canary rollouts across replicas sharing a real Redis on loopback: the same user gets the
same version on every replica, feedback sent to any replica joins any replica's answer, and
the guard's and the admin's decisions reach every replica and survive restarts."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from mdlora.service.app import create_app
from tests.service.helpers import AUTH, wait_until
from tests.service.test_canary import (
    DIV,
    DOM,
    GUARD,
    ITEMS,
    MIN,
    register,
    register_canary,
    truth,
    variant,
    versions_of,
)
from tests.service.test_replicas import settings


def status(c: TestClient) -> Any:
    return c.get(f"/v1/rollouts/{DIV}/{DOM}", headers=AUTH).json()


def send_feedback(c: TestClient, events: list[dict[str, Any]]) -> Any:
    """POST /feedback, again while the answer is still on its way to Redis (a few ms)."""
    out: dict[str, Any] = {}

    def sent() -> bool:
        r = c.post("/feedback", json={"events": events})
        out["r"] = r
        return r.status_code != 404

    wait_until(sent, timeout=2.0, interval=0.01)
    assert out["r"].status_code == 200, out["r"].text
    return out["r"].json()


def test_replicas_split_alike_share_feedback_and_follow_the_guard(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    art = make_artifact("mlora")
    s = settings(art, redis_url, redis_prefix, **GUARD)
    p_true = truth(art)
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        register(a, variant(art, "stable"))
        assert register_canary(a, variant(art, "bad"), 20).status_code == 201
        wait_until(lambda: status(b).get("serving_canary") is True, timeout=2.0)
        seen = versions_of(a, range(1, 2001))
        assert versions_of(b, range(1, 2001)) == seen  # the same split on both replicas
        share = 100 * sum(v == 3 for v in seen.values()) / len(seen)
        assert abs(share - 20) <= 3.5, share

        # the closed loop, alternating replicas: predicted on one, feedback to the other
        rng = np.random.default_rng(0)
        decision = None
        for u, (pred, fb) in zip(range(1, 1001), itertools.cycle([(a, b), (b, a)])):
            r = pred.post("/predict", json={"domain": DOM, "user": {"id": u}, "item_ids": ITEMS})
            rid = r.json()["request_id"]
            clicks = rng.random(len(ITEMS)) < p_true(u)
            events = [
                {"request_id": rid, "item_index": i, "clicked": bool(k)}
                for i, k in enumerate(clicks)
            ]
            answer = send_feedback(fb, events)
            assert answer["accepted"] == len(ITEMS)
            if answer["guard"]:
                decision = answer["guard"][f"{DIV}/{DOM}"]
                break
        assert decision is not None and decision["decided_by"] == "guard", u
        # the abort reaches the other replica; both see the same shared windows
        wait_until(lambda: status(a)["state"] == status(b)["state"] == "aborted", timeout=2.0)
        fa, fb_ = status(a)["feedback"], status(b)["feedback"]
        assert fa == fb_ and fa["canary"]["count"] >= MIN
        assert set(versions_of(a, range(1, 301)).values()) == {2}
        wait_until(lambda: set(versions_of(b, range(1, 301)).values()) == {2}, timeout=2.0)
        # an event sent again to either replica is a duplicate
        assert send_feedback(a, events)["duplicates"] == len(ITEMS)

        # a good canary, promoted on one replica, is everyone's on both
        assert register_canary(b, variant(art, "good"), 20).status_code == 201
        wait_until(lambda: status(a)["version"] == 4 and status(a)["serving_canary"], 2.0)
        assert versions_of(a, range(1, 1001)) == versions_of(b, range(1, 1001))
        assert b.post(f"/v1/rollouts/{DIV}/{DOM}/promote", headers=AUTH).status_code == 200
        wait_until(lambda: set(versions_of(a, range(1, 201)).values()) == {4}, timeout=2.0)

    # a replica started afterwards reads the decisions from the registry
    with TestClient(create_app(s)) as c:
        assert status(c)["state"] == "promoted" and status(c)["active_version"] == 4
        assert set(versions_of(c, range(1, 201)).values()) == {4}


def test_a_running_rollout_is_served_by_a_replica_started_later(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str
) -> None:
    art = make_artifact("mlora")
    s = settings(art, redis_url, redis_prefix)
    with TestClient(create_app(s)) as a:
        register(a, variant(art, "stable"))
        assert register_canary(a, variant(art, "good"), 30).status_code == 201
        seen = versions_of(a, range(1, 1001))
    with TestClient(create_app(s)) as b:
        assert status(b)["state"] == "running" and status(b)["serving_canary"] is True
        assert versions_of(b, range(1, 1001)) == seen
