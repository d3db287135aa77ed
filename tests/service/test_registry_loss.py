"""The local registry loses its state file: written back, as a Redis that lost its data is
(the Redis cases are in test_replicas.py and test_redis_outage.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.recovery import restorable, went_back
from mdlora.service.registry import RegistryState, new_record, set_active
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files, wait_until

PREDICT = {"user": {"id": 8}, "item_ids": [3, 6, 9]}


def test_a_deleted_registry_file_is_written_back(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    settings = ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings)) as c:
        for seed in (1, 2):
            files = upload_files(demo_adapter(model, "age", "42", seed))
            assert c.post("/v1/adapters", files=files, headers=AUTH).status_code == 201
        want = c.post("/predict", json={**PREDICT, "domain": "42"}).json()["scores"]
        listing = c.get("/v1/adapters", headers=AUTH).json()
        state = (art / "registry.json").read_bytes()
        (art / "registry.json").unlink()
        c.app.state.service.control.request_reconcile()  # type: ignore[attr-defined]
        wait_until(lambda: (art / "registry.json").exists(), 3.0)
        assert (art / "registry.json").read_bytes() == state
        assert c.post("/predict", json={**PREDICT, "domain": "42"}).json()["scores"] == want
        assert c.get("/v1/adapters", headers=AUTH).json() == listing


def test_what_counts_as_going_back() -> None:
    record = new_record(1, b"{}", b"w")
    one = RegistryState().with_entry(("age", "42"), set_active(None, 1, record))
    two = one.with_entry(("age", "43"), set_active(None, 1, record))
    other = RegistryState().with_entry(("age", "44"), set_active(None, 1, record))
    assert one.epoch and two.epoch == one.epoch and other.epoch != one.epoch
    assert went_back(RegistryState(), RegistryState()) is None  # nothing seen, nothing lost
    assert went_back(RegistryState(), two) is None
    assert went_back(one, two) is None  # forwards
    assert "is empty" in str(went_back(two, RegistryState()))
    assert "went back from change 2 to 1" in str(went_back(two, one))
    assert "was replaced" in str(went_back(one, other))
    assert restorable(two, RegistryState()) and restorable(two, one)
    assert not restorable(one, other)  # changes this replica never saw: not overwritten
