"""FeatureEncoder: vocabularies, OOV, scaling, domains, serialisation, serving fast path."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mdlora.formats.encoder import FeatureEncoder, MultiHotColumn, canonical_value
from mdlora.models.features import OOV_ID, PAD_ID, FeatureSpec


def assert_same_arrays(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    for key in ("sparse", "multi_hot", "dense", "domains"):
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            assert np.array_equal(a[key], b[key]), key


def _train_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": [10, 11, 12, 10, 13],
            "city": ["paris", "rome", "paris", None, "oslo"],
            "genres": ["Action|Comedy", "Drama", "", None, "Comedy|Drama|Action|War"],
            "tags": [[1, 2], [3], [], [2, 2, 1], [4]],
            "price": [1.0, 3.0, np.nan, 5.0, 2.0],
            "gender": ["M", "F", "F", "M", "M"],
            "age": [25, 1, 56, 18, 25],
        }
    )


def _encoder(**kw: object) -> FeatureEncoder:
    return FeatureEncoder(
        sparse=["user", "city", "gender"],
        multi_hot=[MultiHotColumn("genres", max_len=3), MultiHotColumn("tags")],
        dense=["price"],
        divisions=["gender", "age"],
        **kw,  # type: ignore[arg-type]
    )


def test_fit_transform_ids_shapes_and_dtypes() -> None:
    df = _train_df()
    enc = _encoder().fit(df)
    out = enc.transform(df)
    assert out["sparse"].dtype == np.int64 and out["sparse"].shape == (5, 3)
    assert out["multi_hot"] is not None and out["multi_hot"].dtype == np.int64
    assert out["multi_hot"].shape == (5, 2, 3)  # width = max(max_len 3, longest tags 3)
    assert out["dense"].dtype == np.float32 and out["dense"].shape == (5, 1)
    assert out["domains"].dtype == np.int64 and out["domains"].shape == (5, 2)
    # vocab ids start at 1 (0 is OOV), in natural order
    assert enc.vocabs["user"] == ["10", "11", "12", "13"]
    assert out["sparse"][:, 0].tolist() == [1, 2, 3, 1, 4]
    # missing city -> OOV
    assert enc.vocabs["city"] == ["oslo", "paris", "rome"]
    assert out["sparse"][:, 1].tolist() == [2, 3, 2, OOV_ID, 1]
    # domain names: sorted strings for gender, NUMERIC order for age codes
    assert enc.domain_names("gender") == ["F", "M"]
    assert enc.domain_names("age") == ["1", "18", "25", "56"]
    assert out["domains"].tolist() == [[1, 2], [0, 0], [0, 3], [1, 1], [1, 2]]


def test_multi_hot_padding_truncation_and_lists() -> None:
    df = _train_df()
    enc = _encoder().fit(df)
    mh = enc.transform(df)["multi_hot"]
    assert mh is not None
    g = {t: i + 1 for i, t in enumerate(enc.vocabs["genres"])}
    assert enc.vocabs["genres"] == ["Action", "Comedy", "Drama", "War"]
    assert mh[0, 0].tolist() == [g["Action"], g["Comedy"], PAD_ID]
    assert mh[2, 0].tolist() == [PAD_ID] * 3  # empty string -> no ids
    assert mh[3, 0].tolist() == [PAD_ID] * 3  # missing -> no ids
    assert mh[4, 0].tolist() == [g["Comedy"], g["Drama"], g["Action"]]  # truncated to max_len 3
    assert enc.max_lens == {"genres": 3, "tags": 3}
    # list cells (ints) share the canonical string keys
    assert mh[0, 1].tolist() == [1, 2, PAD_ID]
    assert mh[3, 1].tolist() == [2, 2, 1]
    # a string cell and a list cell with the same tokens encode identically
    other = df.copy()
    other["tags"] = ["1|2", "3", "", "2|2|1", "4"]
    other_mh = enc.transform(other)["multi_hot"]
    assert other_mh is not None and np.array_equal(other_mh, mh)


def test_oov_for_unseen_values_and_vocab_from_train_only() -> None:
    train = _train_df()
    enc = _encoder().fit(train)
    test = pd.DataFrame(
        {
            "user": [99, 10],
            "city": ["tokyo", "rome"],
            "genres": ["Horror|Action", "Western"],
            "tags": [[7], [1]],
            "price": [100.0, -3.0],
            "gender": ["F", "M"],
            "age": [1, 56],
        }
    )
    out = enc.transform(test)
    assert out["sparse"][:, 0].tolist() == [OOV_ID, 1]
    assert out["sparse"][:, 1].tolist() == [OOV_ID, 3]
    mh = out["multi_hot"]
    assert mh is not None
    assert mh[0, 0].tolist() == [OOV_ID, 1, PAD_ID]  # unknown token keeps its slot as OOV
    assert mh[1, 0].tolist() == [OOV_ID, PAD_ID, PAD_ID]
    # the test values never entered the vocabularies
    assert "99" not in enc.vocabs["user"] and "tokyo" not in enc.vocabs["city"]
    # dense: scaled with TRAIN min/max (1..5) and clipped
    assert out["dense"][:, 0].tolist() == [1.0, 0.0]
    assert enc.dense_min == {"price": 1.0} and enc.dense_max == {"price": 5.0}


def test_dense_scaling_and_nan() -> None:
    df = _train_df()
    enc = _encoder().fit(df)
    dense = enc.transform(df)["dense"][:, 0]
    np.testing.assert_allclose(dense, [0.0, 0.5, 0.0, 1.0, 0.25])


def test_min_count_maps_rare_values_to_oov() -> None:
    df = _train_df()
    enc = _encoder(min_count={"user": 2}).fit(df)
    assert enc.vocabs["user"] == ["10"]
    assert enc.transform(df)["sparse"][:, 0].tolist() == [1, 0, 0, 1, 0]
    assert enc.feature_spec().sparse[0].vocab_size == 2


def test_canonical_keys_unify_int_float_and_string() -> None:
    assert canonical_value(1) == canonical_value("1") == canonical_value(1.0) == "1"
    assert canonical_value(np.int64(7)) == "7" and canonical_value(np.float32(2.0)) == "2"
    assert canonical_value(float("nan")) is None and canonical_value(None) is None
    assert canonical_value(True) == "True" and canonical_value(0.5) == "0.5"
    enc = FeatureEncoder(sparse=["x"], divisions=["d"]).fit(
        pd.DataFrame({"x": [1, 2, 3], "d": [0, 1, 1]})
    )
    as_str = enc.transform(pd.DataFrame({"x": ["1", "2", "3"], "d": ["0", "1", "1"]}))
    as_float = enc.transform(pd.DataFrame({"x": [1.0, 2.0, np.nan], "d": [0.0, 1.0, 1.0]}))
    assert as_str["sparse"][:, 0].tolist() == [1, 2, 3]
    assert as_float["sparse"][:, 0].tolist() == [1, 2, OOV_ID]
    assert as_str["domains"][:, 0].tolist() == as_float["domains"][:, 0].tolist() == [0, 1, 1]


def test_unknown_domain_raises_naming_division_and_value() -> None:
    enc = _encoder().fit(_train_df())
    bad = _train_df().assign(age=[25, 1, 56, 18, 99])
    with pytest.raises(ValueError, match=r"division 'age'.*99"):
        enc.transform(bad)
    with pytest.raises(ValueError, match=r"division 'gender'.*'X'"):
        enc.encode_records([{"gender": "X", "age": 1}])
    with pytest.raises(ValueError, match="division 'gender'"):
        enc.encode_records([{"age": 1}])  # a missing domain is an error, not OOV


def test_add_domain_appends_and_keeps_existing_ids() -> None:
    enc = _encoder().fit(_train_df())
    before = enc.transform(_train_df())
    new_id = enc.add_domain("age", 35)
    assert new_id == 4
    assert enc.domain_names("age") == ["1", "18", "25", "56", "35"]
    assert enc.domain_id("age", "35") == 4
    after = enc.transform(_train_df())
    assert np.array_equal(before["domains"], after["domains"])
    rec = enc.encode_records([{"gender": "F", "age": 35}])
    assert rec["domains"].tolist() == [[0, 4]]
    with pytest.raises(ValueError, match="already has"):
        enc.add_domain("age", "35")
    with pytest.raises(KeyError):
        enc.add_domain("nope", "x")


def test_set_domains_takes_a_models_lists_and_keeps_existing_ids() -> None:
    """Beside a model the encoder's domain lists are the model's (``set_domains``): they may
    only grow, so no id the model was trained with moves."""
    enc = _encoder(domain_order={"gender": ["F", "M"]}).fit(_train_df())
    before = enc.transform(_train_df())
    enc.set_domains({"age": [1, 18, 25, 56, 35], "gender": ["F", "M", "X"]})  # a model's order
    assert list(enc.domains) == ["gender", "age"]  # the encoder's division order stays
    assert enc.domain_names("age") == ["1", "18", "25", "56", "35"]
    assert enc.domain_names("gender") == enc.domain_order["gender"] == ["F", "M", "X"]
    assert "age" not in enc.domain_order
    assert np.array_equal(enc.transform(_train_df())["domains"], before["domains"])
    assert enc.encode_records([{"gender": "X", "age": 35}])["domains"].tolist() == [[2, 4]]
    with pytest.raises(ValueError, match=r"division 'age'.*do not extend.*ids would change"):
        enc.set_domains({"age": ["18", "1", "25", "56", "35"], "gender": ["F", "M", "X"]})
    with pytest.raises(ValueError, match="divisions"):
        enc.set_domains({"age": ["1", "18", "25", "56", "35"]})
    with pytest.raises(ValueError, match="repeat"):
        enc.set_domains({"age": ["1", "18", "25", "56", "35", 35], "gender": ["F", "M", "X"]})
    with pytest.raises(ValueError, match="missing"):
        enc.add_domain("age", None)
    assert enc.domain_names("age") == ["1", "18", "25", "56", "35"]  # refusals change nothing


def test_domain_order_is_respected_and_enforced() -> None:
    df = _train_df()
    enc = _encoder(domain_order={"age": [1, 18, 25, 35, 45, 50, 56]}).fit(df)
    assert enc.domain_names("age") == ["1", "18", "25", "35", "45", "50", "56"]
    assert enc.transform(df)["domains"][:, 1].tolist() == [2, 0, 6, 1, 2]
    with pytest.raises(ValueError, match=r"not in the declared domain_order"):
        _encoder(domain_order={"age": [1, 18, 25]}).fit(df)


def test_json_round_trip_gives_identical_encodings() -> None:
    df = _train_df()
    enc = _encoder(domain_order={"gender": ["M", "F"]}).fit(df)
    enc.add_domain("age", 99)
    text = json.dumps(enc.to_dict())  # must be plain JSON
    clone = FeatureEncoder.from_dict(json.loads(text))
    a, b = enc.transform(df), clone.transform(df)
    assert_same_arrays(a, b)
    assert clone.feature_spec() == enc.feature_spec()
    assert clone.domain_names("age") == enc.domain_names("age")
    assert clone.to_dict() == enc.to_dict()
    # the spec itself round-trips through the models' own dict format
    assert FeatureSpec.from_dict(enc.feature_spec().to_dict()) == enc.feature_spec()


def test_save_load_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "encoder.json"
    enc = _encoder().fit(_train_df())
    enc.save(path)
    assert json.loads(path.read_text())["format_version"] == 1
    clone = FeatureEncoder.load(path)
    assert np.array_equal(
        clone.transform(_train_df())["sparse"], enc.transform(_train_df())["sparse"]
    )


def _random_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    genres = np.array(["A", "B", "C", "D", "E", "F"], dtype=object)
    return pd.DataFrame(
        {
            "user": rng.integers(0, 300, n),
            "city": rng.choice(np.array(["a", "b", "c", "d", None], dtype=object), n),
            "genres": ["|".join(rng.choice(genres, rng.integers(0, 5))) for _ in range(n)],
            "tags": [list(rng.integers(0, 9, rng.integers(0, 4))) for _ in range(n)],
            "price": np.where(rng.random(n) < 0.1, np.nan, rng.normal(10, 3, n)),
            "gender": rng.choice(np.array(["F", "M"], dtype=object), n),
            "age": rng.choice([1, 18, 25, 35, 45, 50, 56], n),
        }
    )


def test_encode_records_equals_transform() -> None:
    train = _random_frame(2000, 0)
    test = _random_frame(500, 1)  # unseen users, NaN prices, empty lists
    enc = _encoder().fit(train)
    records = test.to_dict("records")
    a, b = enc.transform(test), enc.encode_records(records)
    assert_same_arrays(a, b)
    # raw string values from a JSON request give the same ids
    as_json = json.loads(
        json.dumps(
            [
                {k: (str(v) if k == "user" else v) for k, v in r.items()}
                for r in test.head(50).to_dict("records")
            ],
            default=str,
        )
    )
    c = enc.encode_records(as_json)
    assert np.array_equal(c["sparse"], a["sparse"][:50])


def test_encode_records_missing_fields_give_oov_and_zero() -> None:
    enc = _encoder().fit(_train_df())
    out = enc.encode_records([{"gender": "M", "age": 25}])
    assert out["sparse"].tolist() == [[OOV_ID, OOV_ID, 2]]  # gender is also a sparse field
    assert out["dense"].tolist() == [[0.0]]
    assert out["multi_hot"] is not None and (out["multi_hot"] == PAD_ID).all()


def test_fit_stream_equals_fit() -> None:
    df = _random_frame(3000, 2)
    whole = _encoder().fit(df)
    chunks = (df.iloc[i : i + 700] for i in range(0, len(df), 700))
    streamed = _encoder().fit_stream(chunks)
    assert streamed.to_dict() == whole.to_dict()


def test_missing_column_and_unfitted_errors() -> None:
    enc = _encoder()
    with pytest.raises(RuntimeError, match="not fitted"):
        enc.transform(_train_df())
    with pytest.raises(ValueError, match=r"\['price'\].*columns present"):
        enc.fit(_train_df().drop(columns=["price"]))
    with pytest.raises(ValueError, match="unique"):
        FeatureEncoder(sparse=["a", "a"], divisions=["d"])


def test_transform_is_vectorised_fast() -> None:
    n = 300_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "user": rng.integers(0, 50_000, n),
            "city": rng.choice(np.array(["a", "b", "c"], dtype=object), n),
            "genres": rng.choice(np.array(["A|B", "B", "C|A|B"], dtype=object), n),
            "tags": [[1, 2]] * n,
            "price": rng.random(n),
            "gender": rng.choice(np.array(["F", "M"], dtype=object), n),
            "age": rng.choice([1, 18, 25], n),
        }
    )
    enc = _encoder()
    t0 = time.perf_counter()
    enc.fit(df)
    enc.transform(df)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"fit+transform of {n} rows took {elapsed:.1f}s"


def test_infinite_dense_values_scale_to_the_ends_and_nan_to_zero() -> None:
    enc = FeatureEncoder(sparse=["u"], dense=["x"], divisions=["d"])
    enc.fit(pd.DataFrame({"u": [1, 2], "x": [0.0, 10.0], "d": ["a", "a"]}))
    rows = pd.DataFrame({"u": [1] * 4, "x": [np.inf, -np.inf, np.nan, 5.0], "d": ["a"] * 4})
    assert enc.transform(rows)["dense"][:, 0].tolist() == [1.0, 0.0, 0.0, 0.5]
    records = rows.to_dict("records")
    assert enc.encode_records(records)["dense"][:, 0].tolist() == [1.0, 0.0, 0.0, 0.5]
