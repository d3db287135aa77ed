"""Hostile or malformed input never gets a 5xx: numbers too large for a float, deeply nested
JSON, what the OpenAPI document promises (issue 14)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from mdlora.formats.adapter_package import AdapterPackage
from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files

BIG = "1" + "0" * 400  # an integer no float can hold: float(10**400) raises OverflowError


def test_a_dense_value_too_large_for_a_float_is_scored_as_missing_with_a_warning(
    make_artifact: Callable[[str], Path],
) -> None:
    # the bodies are written by hand: json.dumps cannot write a number no float holds
    user = '"domains": {"age_group": "25", "gender": "M"}, "user": {"id": 7'
    with TestClient(create_app(ServiceSettings(artifact_dir=make_artifact("multilora")))) as c:

        def post(path: str, body: str) -> dict[str, Any]:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            return dict(r.json())

        missing = post("/predict", "{" + user + '}, "items": [{"id": 3}]}')["scores"]
        for value in (BIG, "-" + BIG):
            item = '{"id": 3, "features": {"age": VALUE}}'.replace("VALUE", value)
            inline = post("/predict", "{" + user + '}, "items": [' + item + "]}")
            assert inline["scores"] == missing
            assert any("dense feature(s) ['age']" in w for w in inline["warnings"])
            request = "{" + user + ', "features": {"age": VALUE}}, "item_ids": [3, 6]}'
            body = '{"requests": [' + request.replace("VALUE", value) + "]}"
            batch = post("/predict/batch", body)
            assert len(batch["results"][0]["scores"]) == 2
            assert any("too large for a float" in w for w in batch["results"][0]["warnings"])


def _schema_accepts(doc: dict[str, Any], component: str, body: Any) -> bool:
    import jsonschema_rs  # schemathesis's own validator

    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    return bool(jsonschema_rs.validator_for(schema).is_valid(body))


def test_the_predict_schema_says_exactly_one_of_items_and_item_ids(
    make_artifact: Callable[[str], Path],
) -> None:
    settings = ServiceSettings(artifact_dir=make_artifact("mlora"), unknown_domain="backbone")
    with TestClient(create_app(settings)) as c:
        doc = c.get("/openapi.json").json()
        bodies: list[dict[str, Any]] = [
            {"item_ids": None},
            {"items": None},
            {"items": None, "item_ids": None},
            {},
            {"item_ids": [3], "items": [{"id": 3}]},
            {"item_ids": [3]},
            {"items": [{"id": 3}]},
            {"item_ids": [3], "items": None},
            {"items": [{"id": 3}], "item_ids": None},
        ]
        for body in bodies:
            request = {"domain": "25", "user": {"id": 8}, **body}
            status = c.post("/predict", json=request).status_code
            assert status in (200, 422), (body, status)
            assert _schema_accepts(doc, "PredictRequest", request) == (status == 200), body
            batch = {"requests": [request]}
            assert _schema_accepts(doc, "BatchPredictRequest", batch) == (status == 200), body


def test_405_answers_allow_every_method_of_the_path(make_artifact: Callable[[str], Path]) -> None:
    want = {
        ("OPTIONS", "/v1/adapters"): "GET, POST",
        ("PUT", "/v1/adapters"): "GET, POST",
        ("PUT", "/v1/adapters/age/25"): "DELETE, GET",
        ("GET", "/v1/adapters/age/25/rollback"): "POST",
        ("GET", "/predict"): "POST",
        ("POST", "/readyz"): "GET",
    }
    with TestClient(create_app(ServiceSettings(artifact_dir=make_artifact("mlora")))) as c:
        for (method, path), allow in want.items():
            r = c.request(method, path)
            assert r.status_code == 405, (method, path)
            assert r.headers["allow"] == allow, (method, path)
            assert allow in r.json()["detail"]


def test_unparsable_multipart_is_a_documented_400(make_artifact: Callable[[str], Path]) -> None:
    with TestClient(create_app(ServiceSettings(artifact_dir=make_artifact("mlora")))) as c:
        r = c.post(
            "/v1/adapters",
            content=b"not multipart at all",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 400 and "multipart" in r.json()["detail"]
        responses = c.get("/openapi.json").json()["paths"]["/v1/adapters"]["post"]["responses"]
        assert "400" in responses and "Invalid multipart data" in responses["400"]["description"]


def _huge_adapter(art: Path, domain: str) -> AdapterPackage:
    """Finite weights of +-3e38 (each a valid float32): their products overflow."""
    pkg = demo_adapter(load_artifact(art).model, "age", domain)
    gen = torch.Generator().manual_seed(0)
    return AdapterPackage(
        pkg.config,
        {
            k: (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1).to(v.dtype) * 3e38
            for k, v in pkg.tensors.items()
        },
    )


PREDICT = {"user": {"id": 8}, "item_ids": [3, 6, 9]}


def test_an_adapter_whose_scores_are_not_finite_is_refused(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    with TestClient(create_app(ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN))) as c:
        listing = c.get("/v1/adapters", headers=AUTH).json()
        before = c.post("/predict", json={**PREDICT, "domain": "25"}).json()["scores"]
        r = c.post("/v1/adapters", files=upload_files(_huge_adapter(art, "huge")), headers=AUTH)
        assert r.status_code == 422, r.text
        assert "not finite" in r.json()["detail"]
        assert c.get("/v1/adapters", headers=AUTH).json() == listing
        assert c.post("/predict", json={**PREDICT, "domain": "huge"}).status_code == 404
        assert c.post("/predict", json={**PREDICT, "domain": "25"}).json()["scores"] == before
        assert not (art / "adapters" / "age" / "huge").exists()


def test_a_non_finite_score_is_never_sent(
    make_artifact: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should such an adapter get past the probe, its scores are an error, counted, never a
    null in a 200 answer."""
    art = make_artifact("mlora")
    with TestClient(create_app(ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN))) as c:
        control = c.app.state.service.control  # type: ignore[attr-defined]
        monkeypatch.setattr(control, "_probe", lambda snapshot, key: None, raising=False)
        files = upload_files(_huge_adapter(art, "huge"))
        assert c.post("/v1/adapters", files=files, headers=AUTH).status_code == 201
        r = c.post("/predict", json={**PREDICT, "domain": "huge"})
        assert r.status_code == 500, r.text
        assert r.json()["items"] == [0, 1, 2] and "not of the request" in r.json()["detail"]
        ok = {**PREDICT, "domain": "25"}
        r = c.post("/predict/batch", json={"requests": [ok, {**PREDICT, "domain": "huge"}]})
        assert r.status_code == 500 and r.json()["detail"].startswith("requests[1]: ")
        assert c.post("/predict", json=ok).status_code == 200
        metrics = c.get("/metrics").text
    assert 'mdlora_nonfinite_scores_total{domain="huge"} 6.0' in metrics
