"""Hostile or malformed input never gets a 5xx: numbers too large for a float, deeply nested
JSON, what the OpenAPI document promises (issue 14)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings

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
        bodies = [
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
