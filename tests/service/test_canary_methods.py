"""A canary scores exactly as its version does when it is the active one, for MLoRA and
MoE-MLoRA on both runtimes (the canary is an extra internal domain of the serving model);
the cases refused (MoE domains gated over every expert, MultiLoRA) change nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files

CASES = {
    "mlora": ("age", "25", {"domain": "25"}),
    "moe": ("gender", "X", {"domain": "X"}),  # added with its own gate scope (see below)
}
ITEMS = [3, 6, 9, 12]


def scores(c: TestClient, where: dict[str, Any], user: int) -> tuple[list[float], Any]:
    r = c.post("/predict", json={**where, "user": {"id": user}, "item_ids": ITEMS})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["scores"], body["adapter_versions"]


@pytest.mark.parametrize(
    ("method", "runtime"),
    [("mlora", "torch"), ("moe", "torch"), ("mlora", "onnx"), ("moe", "onnx")],
)  # fmt: skip
def test_a_canary_scores_as_its_version(
    make_artifact: Callable[[str], Path], method: str, runtime: str
) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    division, domain, where = CASES[method]
    art, ref = make_artifact(method), make_artifact(method)
    pkg = demo_adapter(load_artifact(art).model, division, domain, seed=5)
    users = range(1, 41)

    def app(path: Path) -> TestClient:
        s = ServiceSettings(
            artifact_dir=path,
            admin_token=ADMIN_TOKEN,
            runtime=runtime,  # type: ignore[arg-type]
        )
        return TestClient(create_app(s))

    if method == "moe":  # a domain added after training with gate_scope "own"
        first = demo_adapter(load_artifact(art).model, division, domain, seed=4)
        for path in (art, ref):
            with app(path) as c:
                r = c.post("/v1/adapters", files=upload_files(first), headers=AUTH)
                assert r.status_code == 201, r.text
        pkg.config["gate_scope"] = "own"
    with app(ref) as r:
        before = {u: scores(r, where, u)[0] for u in users}
        assert r.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        after = {u: scores(r, where, u)[0] for u in users}
    with app(art) as c:
        up = c.post(
            "/v1/adapters", files=upload_files(pkg), data={"canary_percent": "50"}, headers=AUTH
        )
        assert up.status_code == 201, up.text
        arms = set()
        for u in users:
            got, versions = scores(c, where, u)
            on_canary = versions[division] == up.json()["version"]
            arms.add(on_canary)
            want = after[u] if on_canary else before[u]
            assert got == pytest.approx(want, abs=1e-5), (u, on_canary)
        assert arms == {True, False}


def test_a_moe_domain_gated_over_every_expert_cannot_have_a_canary(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("moe")
    pkg = demo_adapter(load_artifact(art).model, "gender", "F", seed=5)
    s = ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN)
    with TestClient(create_app(s)) as c:
        before = c.get("/v1/adapters/gender/F", headers=AUTH).json()
        r = c.post(
            "/v1/adapters", files=upload_files(pkg), data={"canary_percent": "10"}, headers=AUTH
        )
        assert r.status_code == 409 and "scope 'all'" in r.json()["detail"]
        assert c.get("/v1/adapters/gender/F", headers=AUTH).json() == before


def test_multilora_refuses_a_canary(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("multilora")
    pkg = demo_adapter(load_artifact(art).model, "age_group", "25", seed=5)
    s = ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN)
    with TestClient(create_app(s)) as c:
        r = c.post(
            "/v1/adapters", files=upload_files(pkg), data={"canary_percent": "10"}, headers=AUTH
        )
        assert r.status_code == 409 and "MultiLoRA" in r.json()["detail"]
        assert [
            v["version"]
            for v in c.get("/v1/adapters/age_group/25", headers=AUTH).json()["versions"]
        ] == [1]
