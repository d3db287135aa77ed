"""Own tables: a split column the user already has, and an order column for fresh rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdlora.training.data.prepared import DataError
from mdlora.training.data.synthetic import synthetic_schema
from mdlora.training.data.tabular import order_values, prepare_table
from mdlora.training.run import load_data
from tests.training.helpers import tiny_config, tiny_frame


def _with_split(seed: int = 0) -> pd.DataFrame:
    df = tiny_frame().copy()
    rng = np.random.RandomState(seed)
    words = np.array(["train", "Train", "TRAIN ", "val", "Valid", "VALIDATION", "test", "Test"])
    df["part"] = words[rng.choice(len(words), size=len(df), p=[0.2, 0.2, 0.2, 0.1, 0.05, 0.05,
                                                                 0.1, 0.1])]  # fmt: skip
    return df


def test_a_split_column_decides_every_rows_part(tmp_path: Path) -> None:
    df = _with_split()
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False)
    prepared = prepare_table(path, synthetic_schema(), split_column="part", seed=0)
    part = df["part"].str.strip().str.lower()
    want = {
        "train": part == "train", "val": part.isin(["val", "valid", "validation"]),
        "test": part == "test",
    }  # fmt: skip
    for name, mask in want.items():
        arr = prepared.split(name)
        assert len(arr["labels"]) == int(mask.sum())
        # the same rows, in table order: labels and prices line up exactly
        assert np.array_equal(arr["labels"], df.loc[mask, "label"].to_numpy(np.float32))
    assert prepared.info["split_column"] == "part"
    # no random re-split: another seed or fractions give the same parts
    other = prepare_table(path, synthetic_schema(), split_column="part", seed=9, split=(1, 1, 1))
    for name in ("train", "val", "test"):
        assert np.array_equal(other.split(name)["labels"], prepared.split(name)["labels"])
        assert np.array_equal(other.split(name)["sparse"], prepared.split(name)["sparse"])


def test_unknown_or_missing_split_values_are_refused_by_name() -> None:
    df = _with_split()
    df.loc[[3, 5], "part"] = "holdout"
    df.loc[7, "part"] = "dev"
    with pytest.raises(DataError, match=r"split column 'part': 3 row\(s\) .*\['dev', 'holdout'\]"):
        prepare_table(df, synthetic_schema(), split_column="part")
    df = _with_split()
    df.loc[4, "part"] = None
    with pytest.raises(DataError, match="split column 'part': 1 row"):
        prepare_table(df, synthetic_schema(), split_column="part")
    with pytest.raises(DataError, match=r"column\(s\) \['nope'\] not found"):
        prepare_table(_with_split(), synthetic_schema(), split_column="nope")
    only_test = _with_split().assign(part="test")
    with pytest.raises(DataError, match="marks no row as train"):
        prepare_table(only_test, synthetic_schema(), split_column="part")


def test_a_config_passes_split_column_through_data_options(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _with_split().to_csv(path, index=False)
    data = {"source": "table", "path": str(path), "schema": synthetic_schema().to_dict(),
            "options": {"split_column": "part"}}  # fmt: skip
    prepared = load_data(tiny_config(tmp_path, data=data))
    n_test = int(_with_split()["part"].str.strip().str.lower().eq("test").sum())
    assert len(prepared.test["labels"]) == n_test


def test_order_values_take_numbers_and_dates_and_refuse_the_rest() -> None:
    assert order_values(pd.Series([3, 1, 2]), "c").tolist() == [3.0, 1.0, 2.0]
    dates = order_values(pd.Series(["2024-01-02", "2023-05-01", "2024-01-01"]), "c")
    assert list(np.argsort(dates)) == [1, 2, 0]
    stamps = order_values(pd.Series(pd.to_datetime(["2024-01-02", "2023-05-01"])), "c")
    assert stamps[0] > stamps[1]
    with pytest.raises(DataError, match="order column 'c' must hold numbers or dates"):
        order_values(pd.Series(["soon", "2024-01-01"]), "c")
    with pytest.raises(DataError, match="order column 'c' has 1 missing"):
        order_values(pd.Series([1.0, np.nan]), "c")
