"""Hot-loading under load: requests in flight never fail and never see half a change."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, live_server, upload_files

REQUEST = {"domain": "25", "user": {"id": 8}, "item_ids": [3, 6, 9, 12, 15, 18, 21, 24]}
OTHER = {**REQUEST, "domain": "45"}


def test_register_and_roll_back_while_clients_keep_predicting(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    app = create_app(ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN))
    answers: list[tuple[str, int, Any]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                req: dict[str, Any] = REQUEST if k % 2 == 0 else OTHER
                try:
                    r = c.post("/predict", json=req)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                answers.append((req["domain"], body["adapter_versions"]["age"], body["scores"]))

    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as admin:
        old = admin.post("/predict", json=REQUEST).json()["scores"]
        other = admin.post("/predict", json=OTHER).json()["scores"]
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        reg = admin.post(
            "/v1/adapters", files=upload_files(demo_adapter(model, "age", "25", 9)), headers=AUTH
        )
        time.sleep(0.3)
        new = admin.post("/predict", json=REQUEST).json()["scores"]
        back = admin.post("/v1/adapters/age/25/rollback", headers=AUTH)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
    assert reg.status_code == 201 and back.status_code == 200
    assert not failures, failures[:5]
    assert not np.allclose(old, new)
    seen = {1: 0, 2: 0}
    for domain, version, scores in answers:
        if domain == "45":
            np.testing.assert_allclose(scores, other, atol=1e-6)
            continue
        want = old if version == 1 else new  # the scores always match the version reported
        np.testing.assert_allclose(scores, want, atol=1e-6)
        seen[version] += 1
    assert seen[1] > 0 and seen[2] > 0, seen
