"""``data.options.streaming``: a table read chunk by chunk gives exactly the in-memory data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdlora.training.config import ConfigError, config_from_dict
from mdlora.training.data.prepared import DataError, PreparedData
from mdlora.training.data.streaming import prepare_table_stream
from mdlora.training.data.synthetic import make_amazon_like
from mdlora.training.data.tabular import TableSchema, prepare_table
from mdlora.training.run import load_data

SCHEMA = {"label": "label", "divisions": ["domain", "activeness"],
          "sparse": ["user", "item", "domain"]}  # fmt: skip


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "amazon_like.parquet"
    make_amazon_like(users=(120, 80, 50), history=8, seed=3).to_parquet(path, row_group_size=500)
    return path


def _same(a: PreparedData, b: PreparedData) -> None:
    assert a.encoder.to_dict() == b.encoder.to_dict()
    assert a.domain_names == b.domain_names
    for part in ("train", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        for key in x:
            xa, ya = x[key], y[key]
            if xa is None:
                assert ya is None
            else:
                np.testing.assert_array_equal(xa, ya, err_msg=f"{part}.{key}")
    if a.train_order is None:
        assert b.train_order is None
    else:
        np.testing.assert_array_equal(a.train_order, b.train_order)


@pytest.mark.parametrize(
    "options",
    [
        {},  # stratified per domain on the label
        {"stratified": False, "split": [0.8, 0.1, 0.1]},
        {"split_column": "split", "order_column": "seq_pos"},
    ],
    ids=["stratified", "random", "split-column"],
)
def test_streamed_table_equals_the_in_memory_one(table: Path, options: dict) -> None:
    schema = TableSchema.from_dict(SCHEMA)
    whole = prepare_table(table, schema, seed=5, **options)
    streamed = prepare_table_stream(table, schema, seed=5, batch_rows=333, progress=False,
                                    **options)  # fmt: skip
    _same(whole, streamed)


def test_mdlora_train_config_reads_a_table_by_streaming(table: Path) -> None:
    def config(**options: object) -> dict[str, object]:
        return {"data": {"source": "table", "path": str(table), "schema": SCHEMA,
                         "options": options}, "progress": False}  # fmt: skip

    whole = load_data(config_from_dict(config(split_column="split")))
    streamed = load_data(
        config_from_dict(config(split_column="split", streaming=True, batch_rows=700))
    )
    assert streamed.info["streaming"] == 700
    _same(whole, streamed)
    with pytest.raises(ConfigError, match="streaming reads every row"):
        load_data(config_from_dict(config(streaming=True, max_rows=100)))


def test_bad_values_in_a_streamed_table_are_named(table: Path, tmp_path: Path) -> None:


    df = pd.read_parquet(table)
    df.loc[5, "split"] = "holdout"
    bad = tmp_path / "bad.parquet"
    df.to_parquet(bad)
    with pytest.raises(DataError, match="holdout"):
        prepare_table_stream(bad, TableSchema.from_dict(SCHEMA), split_column="split",
                             batch_rows=100, progress=False)  # fmt: skip


def _click_log(n: int = 2_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 60, n), unit="D")
    return pd.DataFrame({
        "user": rng.integers(0, 300, n).astype(str), "item": rng.integers(0, 100, n),
        "domain": rng.choice(["a", "b", "c"], n),
        "outcome": np.where(rng.random(n) < 0.05, "click", "view"),
        "when": days.strftime("%d/%m/%Y"),  # day first: a format to infer once, not per chunk
    })  # fmt: skip


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_streaming_matches_on_csv_positive_labels_dates_and_an_empty_part(
    tmp_path: Path, suffix: str
) -> None:
    df = _click_log()
    df.loc[:799, "outcome"] = "view"  # the first chunks have no click at all
    path = tmp_path / f"log{suffix}"
    df.to_parquet(path) if suffix == ".parquet" else df.to_csv(path, index=False)
    schema = TableSchema.from_dict(
        {"label": "outcome", "positive_labels": ["click"], "divisions": ["domain"],
         "sparse": ["user", "item"]}
    )  # fmt: skip
    for options in ({"order_column": "when"}, {"split": [0.8, 0.2, 0.0], "stratified": False}):
        whole = prepare_table(path, schema, seed=2, **options)
        streamed = prepare_table_stream(path, schema, seed=2, batch_rows=300, progress=False,
                                        **options)  # fmt: skip
        _same(whole, streamed)
    assert streamed.test["labels"].size == 0  # an empty part is kept, as in memory
    df["outcome"] = "view"
    df.to_parquet(path) if suffix == ".parquet" else df.to_csv(path, index=False)
    with pytest.raises(DataError, match="no label equals one of positive_labels"):
        prepare_table_stream(path, schema, batch_rows=300, progress=False)


def test_options_a_table_does_not_take_are_refused_by_name(table: Path) -> None:
    def config(**options: object) -> dict[str, object]:
        return {"data": {"source": "table", "path": str(table), "schema": SCHEMA,
                         "options": options}, "progress": False}  # fmt: skip

    with pytest.raises(ConfigError, match=r"\['batch_rows'\] do not apply to a table"):
        load_data(config_from_dict(config(batch_rows=100)))  # without streaming
    with pytest.raises(ConfigError, match=r"\['max_row'\] do not apply to a streamed table"):
        load_data(config_from_dict(config(streaming=True, max_row=5)))
