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
