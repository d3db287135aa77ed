"""Per-request encoding equals the encoder's own; the Redis feature store round trip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mdlora.formats.encoder import FeatureEncoder
from mdlora.service.app import create_app
from mdlora.service.feature_store import RequestEncoder, split_columns
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_frame, demo_model

FRAME = demo_frame()


@pytest.fixture(scope="module")
def encoder() -> FeatureEncoder:
    _, data = demo_model("multilora", "age_group")
    return data.encoder


def _expected(enc: FeatureEncoder, user: dict[str, Any], items: list[dict[str, Any]]) -> Any:
    records = []
    for item in items:
        rec = dict(user)
        rec.update({k: v for k, v in item.items() if v is not None})
        records.append({"age_group": "25", "gender": "F", **rec})
    return enc.encode_records(records)


CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("ids only", {"user_id": 4}, [{"movie_id": 3}, {"movie_id": 9}, {"movie_id": "nope"}]),
    (
        "all features",
        {"user_id": "4", "gender": "M", "occupation": 3, "age": 35, "age_group": "35-56"},
        [
            {"movie_id": 3, "first_genre": "Drama", "genres": ["Drama", "War", "Comedy", "Horror"]},
            {"movie_id": 12, "first_genre": "Unseen", "genres": "Action|Sci-Fi"},
            {"movie_id": 15, "genres": []},
        ],
    ),
    ("missing values", {"age": None, "zip": "ignored"}, [{"movie_id": None}, {"genres": None}]),
    ("dense out of range", {"age": 999.0}, [{"movie_id": 3, "age": -5}, {"movie_id": 6}]),
    ("item overrides user", {"gender": "F"}, [{"gender": "M"}, {"gender": None}]),
]


@pytest.mark.parametrize(("what", "user", "items"), CASES, ids=[c[0] for c in CASES])
def test_request_encoding_equals_encode_records(
    encoder: FeatureEncoder, what: str, user: dict[str, Any], items: list[dict[str, Any]]
) -> None:
    columns: dict[str, list[Any]] = {}
    for i, item in enumerate(items):
        for k, v in item.items():
            columns.setdefault(k, [None] * len(items))[i] = v
    sparse, dense, multi_hot = RequestEncoder(encoder).encode(
        {**user, "age_group": user.get("age_group", "25"), "gender": user.get("gender", "F")},
        columns,
        len(items),
    )
    want = _expected(encoder, user, items)
    np.testing.assert_array_equal(sparse, want["sparse"])
    np.testing.assert_array_equal(dense, want["dense"])
    np.testing.assert_array_equal(multi_hot, want["multi_hot"])


def test_user_and_item_columns_are_read_from_the_data() -> None:
    users, items = split_columns(
        FRAME,
        ["user_id", "movie_id", "gender", "age", "first_genre", "genres", "label"],
        "user_id",
        "movie_id",
    )
    assert users == ["gender", "age"]
    assert items == ["first_genre", "genres"]


def test_published_features_score_like_inline_features(
    make_artifact: Callable[[str], Path], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    import redis

    from mdlora.cli.service import register

    art = make_artifact("multilora")
    data = tmp_path / "ratings.parquet"
    frame = FRAME.copy()
    frame["genres"] = frame["genres"].str.split("|")
    frame.to_parquet(data)
    import typer

    cli = typer.Typer()
    register(cli)
    result = CliRunner().invoke(
        cli,
        [
            "publish-features",
            "--artifact",
            str(art),
            "--data",
            str(data),
            "--redis-url",
            redis_url,
            "--prefix",
            redis_prefix,
        ],
    )
    assert result.exit_code == 0, result.output
    stored = redis.Redis.from_url(redis_url, decode_responses=True)
    meta = stored.hgetall(f"{redis_prefix}:feat:meta")
    assert meta["user_id_field"] == "user_id" and meta["item_id_field"] == "movie_id"

    uid = int(frame["user_id"].iloc[0])
    user = frame[frame["user_id"] == uid].iloc[0]
    mids = [int(m) for m in pd.unique(frame["movie_id"])[:20]]
    by_mid: dict[Any, dict[Any, Any]] = (
        frame.drop_duplicates("movie_id").set_index("movie_id").to_dict("index")
    )
    features = {
        "gender": user["gender"],
        "occupation": int(user["occupation"]),
        "age": int(user["age"]),
        "age_group": user["age_group"],
    }
    items = [
        {
            "id": m,
            "features": {
                "first_genre": by_mid[m]["first_genre"],
                "genres": list(by_mid[m]["genres"]),
            },
        }
        for m in mids
    ]
    inline = {"user": {"id": uid, "features": features}, "items": items}
    settings = ServiceSettings(
        artifact_dir=art, feature_store="redis", redis_url=redis_url, redis_prefix=redis_prefix
    )
    with TestClient(create_app(settings)) as c:
        a = c.post("/predict", json=inline)
        b = c.post("/predict", json={"user": {"id": uid}, "item_ids": mids})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    # the domains came from the stored user features (age_group and gender are divisions)
    assert b.json()["domains"] == {"age_group": user["age_group"], "gender": user["gender"]}
    np.testing.assert_allclose(a.json()["scores"], b.json()["scores"], atol=1e-6)


def test_unreachable_feature_store_scores_with_a_warning(
    make_artifact: Callable[[str], Path],
) -> None:
    settings = ServiceSettings(
        artifact_dir=make_artifact("mlora"),
        feature_store="redis",
        redis_url="redis://127.0.0.1:1/0",
        redis_timeout_s=0.2,
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/predict", json={"domain": "25", "user": {"id": 3}, "item_ids": [3, 6]})
    assert r.status_code == 200
    assert any("feature store unavailable" in w for w in r.json()["warnings"])


def test_answers_say_what_the_scores_could_not_use(make_artifact: Callable[[str], Path]) -> None:
    """Unknown ids and feature names, missing features and non-numeric dense values are
    scored (cold start, missing) and named in ``warnings``; a complete request has none."""
    full_user = {"user_id": 4, "gender": "M", "occupation": 3, "age": 35, "age_group": "25"}
    item = {"movie_id": 3, "first_genre": "Drama", "genres": ["Drama"]}
    with TestClient(
        create_app(ServiceSettings(artifact_dir=make_artifact("multilora")))
    ) as c:

        def warnings(user: dict[str, Any], items: list[dict[str, Any]]) -> list[str]:
            body = {
                "user": {"features": user},
                "items": [{"features": f} for f in items],
                "domains": {"age_group": "25", "gender": "M"},
            }
            r = c.post("/predict", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["scores"]) == len(items)
            return list(r.json()["warnings"])

        assert warnings(full_user, [item]) == []
        got = " | ".join(
            warnings(
                {**full_user, "user_id": 987654, "age": "old", "zip": "02134"},
                [item, {**item, "movie_id": 99999}, {**item, "movie_id": 88888}],
            )
        )
        assert "user id 987654 is not in the model's vocabulary" in got
        assert "2 of 3 item ids are not in the model's vocabulary" in got and "99999" in got
        assert "unknown feature(s) ['zip'] ignored" in got
        assert "dense feature(s) ['age']" in got
        got = " | ".join(warnings({"user_id": 4}, [{"movie_id": 3}]))
        assert "no value for feature(s) ['age', 'first_genre', 'genres', 'occupation']" in got
        # a feature some items have and others not (or that the store lacks for them)
        got = " | ".join(warnings(full_user, [item, {"movie_id": 5, "genres": ["Drama"]}]))
        assert "no value for item feature(s) first_genre for 1 of 2 items" in got, got
        assert "no value for feature(s)" not in got
