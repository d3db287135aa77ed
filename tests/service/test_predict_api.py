"""POST /predict and /predict/batch: the scores are the core's, errors are 4xx with a message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_frame
from tests.service.helpers import core_scores

ITEMS = [3, 6, 30, 123, 900, 424242]  # the last one is not in the vocabulary (OOV)
FRAME = demo_frame()
USERS: dict[Any, dict[Any, Any]] = (
    FRAME.drop_duplicates("user_id").set_index("user_id").to_dict("index")
)
MOVIES = FRAME.drop_duplicates("movie_id").set_index("movie_id")


def client(artifact: Path, **kw: Any) -> TestClient:
    return TestClient(create_app(ServiceSettings(artifact_dir=artifact, **kw)))


def user_features(uid: int) -> dict[str, Any]:
    return {
        "gender": str(USERS[uid]["gender"]),
        "occupation": int(USERS[uid]["occupation"]),
        "age": int(USERS[uid]["age"]),
    }


def item_features(mid: int) -> dict[str, Any]:
    if mid not in MOVIES.index:
        return {}
    m = MOVIES.loc[mid]
    return {"first_genre": m["first_genre"], "genres": m["genres"].split("|")}


@pytest.mark.parametrize("method", ["mlora", "moe", "base"])
def test_scores_equal_the_cores_scores(make_artifact: Callable[[str], Path], method: str) -> None:
    art = make_artifact(method)
    division = {"mlora": "age", "moe": "gender", "base": "age"}[method]
    domains = {"age": ["1", "25", "56"], "gender": ["F", "M"]}[division]
    with client(art) as c:
        for uid in (1, 7, 150, 99999):
            for domain in domains:
                r = c.post(
                    "/predict", json={"domain": domain, "user": {"id": uid}, "item_ids": ITEMS}
                )
                assert r.status_code == 200, r.text
                body = r.json()
                records = [{"user_id": uid, "movie_id": i, division: domain} for i in ITEMS]
                np.testing.assert_allclose(body["scores"], core_scores(art, records), atol=1e-6)
                assert body["domains"] == {division: domain}
                assert body["backbone_only"] is False
                assert body["model_version"].startswith(art.name + "@")
                if method != "base":
                    assert body["adapter_versions"] == {division: 1}


def test_domains_score_differently(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    with client(art) as c:
        a = c.post("/predict", json={"domain": "1", "user": {"id": 3}, "item_ids": ITEMS}).json()
        b = c.post("/predict", json={"domain": "56", "user": {"id": 3}, "item_ids": ITEMS}).json()
        n = c.post("/predict", json={"domain": 56, "user": {"id": 3}, "item_ids": ITEMS}).json()
    assert not np.allclose(a["scores"], b["scores"])
    assert n["scores"] == b["scores"] and n["domains"] == {"age": "56"}  # an int names "56"


def test_multilora_takes_domains_from_request_or_user_features(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("multilora")
    uid = 11
    feats = user_features(uid)
    items = [{"id": i, "features": item_features(i)} for i in ITEMS]
    records = [
        {"user_id": uid, "movie_id": i, **feats, **item_features(i), "age_group": "25"}
        for i in ITEMS
    ]
    expected = core_scores(art, records)
    with client(art) as c:
        explicit = c.post(
            "/predict",
            json={
                "domains": {"age_group": "25", "gender": feats["gender"]},
                "user": {"id": uid, "features": feats},
                "items": items,
            },
        )
        derived = c.post(
            "/predict",
            json={"domain": "25", "user": {"id": uid, "features": feats}, "items": items},
        )
        from_user = c.post(
            "/predict",
            json={"user": {"id": uid, "features": {**feats, "age_group": "25"}}, "items": items},
        )
        missing = c.post("/predict", json={"user": {"id": uid}, "items": items})
    for r in (explicit, derived, from_user):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], expected, atol=1e-6)
        assert r.json()["domains"] == {"age_group": "25", "gender": feats["gender"]}
        assert r.json()["adapter_versions"] == {"age_group": 1, "gender": 1}
    assert missing.status_code == 422
    assert "no domain for division" in missing.json()["detail"]


def test_item_objects_and_item_ids_score_the_same(make_artifact: Callable[[str], Path]) -> None:
    with client(make_artifact("mlora")) as c:
        by_id = c.post("/predict", json={"domain": "18", "user": {"id": 5}, "item_ids": ITEMS})
        objs = c.post(
            "/predict",
            json={
                "domain": "18",
                "user": {"features": {"user_id": 5}},
                "items": [{"features": {"movie_id": i}} for i in ITEMS],
            },
        )
    assert by_id.json()["scores"] == objs.json()["scores"]


def test_batch_answers_like_single_requests(make_artifact: Callable[[str], Path]) -> None:
    reqs = [
        {"domain": d, "user": {"id": u}, "item_ids": ITEMS[: 2 + k], "request_id": f"r{k}"}
        for k, (d, u) in enumerate([("1", 3), ("25", 4), ("56", 5), ("25", 6)])
    ]
    with client(make_artifact("mlora")) as c:
        batch = c.post("/predict/batch", json={"requests": reqs})
        singles = [c.post("/predict", json=r).json() for r in reqs]
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["request_id"] for r in results] == ["r0", "r1", "r2", "r3"]
    for got, want in zip(results, singles, strict=True):
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)


BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{not json"),
    ("empty", b""),
    ("a list", b"[1, 2]"),
    ("no items", orjson.dumps({"domain": "25", "user": {"id": 1}})),
    ("both item lists", orjson.dumps({"domain": "25", "items": [{"id": 3}], "item_ids": [3]})),
    ("empty items", orjson.dumps({"domain": "25", "item_ids": []})),
    ("wrong type", orjson.dumps({"domain": [25], "item_ids": [3]})),
    ("domain too long", orjson.dumps({"domain": "x" * 200, "item_ids": [3]})),
    (
        "nested feature",
        orjson.dumps({"domain": "25", "user": {"features": {"a": {"b": 1}}}, "item_ids": [3]}),
    ),
    ("unknown field", orjson.dumps({"domain": "25", "item_ids": [3], "candidates": [1]})),
    ("unknown division", orjson.dumps({"domains": {"nope": "x"}, "domain": "25", "item_ids": [3]})),
    (
        "disagreeing domains",
        orjson.dumps({"domain": "25", "domains": {"age": "18"}, "item_ids": [3]}),
    ),
    ("no domain", orjson.dumps({"user": {"id": 1}, "item_ids": [3]})),
    ("null id list", orjson.dumps({"domain": "25", "item_ids": [None]})),
    ("boolean item id", orjson.dumps({"domain": "25", "item_ids": [3, True]})),
    ("fractional user id", orjson.dumps({"domain": "25", "user": {"id": 196.5}, "item_ids": [3]})),
]


@pytest.mark.parametrize(("what", "body"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_422_with_a_message(
    make_artifact: Callable[[str], Path], what: str, body: bytes
) -> None:
    with client(make_artifact("mlora")) as c:
        r = c.post("/predict", content=body, headers={"content-type": "application/json"})
        rb = c.post("/predict/batch", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, (what, r.text)
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert rb.status_code == 422, (what, rb.text)


def test_features_beside_the_id_get_a_pointer_to_features(
    make_artifact: Callable[[str], Path],
) -> None:
    with client(make_artifact("mlora")) as c:
        user = c.post("/predict", json={"domain": "25", "user": {"id": 1, "gender": "F"},
                                        "item_ids": [3]})  # fmt: skip
        item = c.post("/predict/batch", json={"requests": [
            {"domain": "25", "items": [{"id": 3, "genres": ["Drama"]}]}]})  # fmt: skip
    assert user.status_code == 422
    assert 'user.gender' in user.json()["detail"]
    assert 'go under user.features: {"gender": ...}' in user.json()["detail"]
    assert item.status_code == 422
    assert "go under the item's features: {\"genres\": ...}" in item.json()["detail"]


def test_limits_name_the_setting(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    with client(art, max_items=5, max_body_bytes=2048, max_batch_requests=2) as c:
        many = c.post("/predict", json={"domain": "25", "item_ids": list(range(6))})
        big = c.post("/predict", json={"domain": "25", "item_ids": ["x" * 50] * 60})
        batch = c.post(
            "/predict/batch",
            json={"requests": [{"domain": "25", "item_ids": [3]} for _ in range(3)]},
        )
        ok = c.post("/predict", json={"domain": "25", "item_ids": list(range(5))})
        body = orjson.dumps({"domain": "25", "item_ids": ["x" * 50] * 60})
        chunked = c.post(
            "/predict",
            content=(body[i : i + 500] for i in range(0, len(body), 500)),  # no Content-Length
            headers={"content-type": "application/json"},
        )
    assert chunked.status_code == 413 and "MDLORA_MAX_BODY_BYTES" in chunked.json()["detail"]
    assert many.status_code == 422 and "MDLORA_MAX_ITEMS" in many.json()["detail"]
    assert big.status_code == 413 and "MDLORA_MAX_BODY_BYTES" in big.json()["detail"]
    assert batch.status_code == 422 and "MDLORA_MAX_BATCH_REQUESTS" in batch.json()["detail"]
    assert ok.status_code == 200


def test_unknown_domain_is_refused_with_the_known_domains(
    make_artifact: Callable[[str], Path],
) -> None:
    with client(make_artifact("mlora")) as c:
        r = c.post("/predict", json={"domain": "77", "user": {"id": 1}, "item_ids": [3]})
        metrics = c.get("/metrics").text
    assert r.status_code == 404
    assert r.json()["known_domains"] == {"age": ["1", "18", "25", "35", "45", "50", "56"]}
    assert "'77'" in r.json()["detail"]
    assert 'mdlora_requests_total{domain="(unknown)",route="/predict",status="404"} 1.0' in metrics


@pytest.mark.parametrize("method", ["mlora", "moe", "multilora"])
def test_unknown_domain_can_score_with_the_backbone_alone(
    make_artifact: Callable[[str], Path], method: str
) -> None:
    art = make_artifact(method)
    division = {"mlora": "age", "moe": "gender", "multilora": "age_group"}[method]
    known = {"age": "25", "gender": "M", "age_group": "25"}[division]
    feats = user_features(9)
    feats.pop(division, None)
    records = [{"user_id": 9, "movie_id": i, **feats, **item_features(i)} for i in ITEMS]
    # the core in stage "backbone"; the division is also a sparse feature, and an unknown
    # domain name encodes there as the out-of-vocabulary id, as any unknown value does
    expected = core_scores(
        art, [{**r, division: known} for r in records], stage="backbone", oov=[division]
    )
    req = {
        "domain": "nowhere",
        "user": {"id": 9, "features": feats},
        "items": [{"id": i, "features": item_features(i)} for i in ITEMS],
    }
    known_req = {**req, "domain": known}
    with client(art, unknown_domain="backbone") as c:
        r = c.post("/predict", json=req)
        batch = c.post("/predict/batch", json={"requests": [known_req, req, known_req]})
        alone = c.post("/predict", json=known_req).json()["scores"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backbone_only"] is True and body["adapter_versions"] == {}
    assert any("backbone alone" in w for w in body["warnings"])
    np.testing.assert_allclose(body["scores"], expected, atol=1e-6)
    results = batch.json()["results"]
    assert [x["backbone_only"] for x in results] == [False, True, False]
    np.testing.assert_allclose(results[1]["scores"], body["scores"], atol=1e-6)
    np.testing.assert_allclose(results[0]["scores"], alone, atol=1e-6)
    assert not np.allclose(alone, body["scores"])


def test_health_readiness_and_metrics(make_artifact: Callable[[str], Path]) -> None:
    with client(make_artifact("mlora")) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        ready = c.get("/readyz").json()
        c.post("/predict", json={"domain": "25", "item_ids": [3, 6]})
        metrics = c.get("/metrics").text
        docs = c.get("/docs")
        schema = c.get("/openapi.json").json()
    assert ready["status"] == "ready" and ready["registry"] == "ok"
    for name in (
        "mdlora_requests_total",
        "mdlora_request_latency_seconds_bucket",
        "mdlora_items_scored_total",
        "mdlora_adapter_loads_total",
        "mdlora_registry_version",
        "mdlora_snapshot_age_seconds",
    ):
        assert name in metrics
    assert 'mdlora_items_scored_total{domain="25"} 2.0' in metrics
    assert 'mdlora_request_latency_seconds_count{domain="25",route="/predict"} 1.0' in metrics
    assert docs.status_code == 200
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/PredictRequest"
    assert "PredictRequest" in schema["components"]["schemas"]


def test_routes_behind_a_root_path_answer_like_the_fast_path(
    make_artifact: Callable[[str], Path],
) -> None:
    """Under a root path the FastAPI routes answer (the fast path only sees /predict)."""
    app = create_app(ServiceSettings(artifact_dir=make_artifact("mlora"), max_items=3))
    req = {"domain": "25", "user": {"id": 2}, "item_ids": [3, 6], "request_id": "r1"}
    with TestClient(app, root_path="/api") as c:
        for body in (req, {**req, "item_ids": [1, 2, 3, 4]}, {**req, "domain": "nope"}):
            routed = c.post("/api/predict", json=body)
            fast = c.post("/predict", json=body)
            assert routed.status_code == fast.status_code
            assert routed.json() == fast.json()
        batch = c.post("/api/predict/batch", json={"requests": [req]})
        assert batch.json()["results"][0]["scores"] == c.post("/predict", json=req).json()["scores"]
        metrics = c.get("/api/metrics").text
    assert 'route="/predict",status="200"' in metrics and 'route="/predict",status="404"' in metrics


@pytest.mark.parametrize(
    "mode",
    [{"scorer_thread": True}, {"micro_batch": False}, {"routing": "bag"}, {"routing": "auto"}],
    ids=["scorer-thread", "no-micro-batch", "bag-routing", "auto-routing"],
)
def test_every_scoring_mode_gives_the_cores_scores(
    make_artifact: Callable[[str], Path], mode: dict[str, Any]
) -> None:
    art = make_artifact("mlora")
    reqs: list[dict[str, Any]] = [
        {"domain": d, "user": {"id": u}, "item_ids": ITEMS} for d, u in [("1", 3), ("56", 4)]
    ]
    with client(art, **mode) as c:
        batch = c.post("/predict/batch", json={"requests": reqs}).json()["results"]
    for req, got in zip(reqs, batch, strict=True):
        records = [
            {"user_id": req["user"]["id"], "movie_id": i, "age": req["domain"]} for i in ITEMS
        ]
        np.testing.assert_allclose(got["scores"], core_scores(art, records), atol=1e-6)


def test_a_value_of_no_accepted_type_is_named_once(make_artifact: Callable[[str], Path]) -> None:
    with TestClient(create_app(ServiceSettings(artifact_dir=make_artifact("mlora")))) as c:
        r = c.post("/predict", json={"domain": "25", "user": {"id": 196.5}, "item_ids": [3]})
        assert r.status_code == 422
        assert "user.id: Value error, an id is a string or an integer, got 196.5" in (
            r.json()["detail"]
        )
        r = c.post("/predict", json={"domain": "25", "item_ids": [3, True]})
        assert r.status_code == 422 and "not true/false" in r.json()["detail"]
        # a float64 id column serialised: 196.0 is the id 196
        whole = c.post("/predict", json={"domain": "25", "user": {"id": 5.0}, "item_ids": [3.0]})
        same = c.post("/predict", json={"domain": "25", "user": {"id": 5}, "item_ids": [3]})
        assert whole.status_code == 200 and whole.json()["scores"] == same.json()["scores"]
        r = c.post("/predict", json={"domain": "25", "user": {"features": {"age": {"x": 1}}},
                                     "item_ids": [3]})  # fmt: skip
        assert "user.features.age: expected a string or an integer or a number" in (
            r.json()["detail"]
        )
