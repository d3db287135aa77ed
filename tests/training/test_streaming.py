"""``data.options.streaming``: a table read chunk by chunk gives exactly the in-memory data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    import pandas as pd

    df = pd.read_parquet(table)
    df.loc[5, "split"] = "holdout"
    bad = tmp_path / "bad.parquet"
    df.to_parquet(bad)
    with pytest.raises(DataError, match="holdout"):
        prepare_table_stream(bad, TableSchema.from_dict(SCHEMA), split_column="split",
                             batch_rows=100, progress=False)  # fmt: skip
