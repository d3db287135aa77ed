"""The user's own data: a Parquet or CSV table with a declared :class:`TableSchema`.

In memory: :func:`read_table` + :func:`prepare_table` (split, fit on train only, encode).
Larger than memory: :mod:`mdlora.training.data.streaming` reads the file in chunks
(:func:`iter_frames`: pyarrow ``ParquetFile.iter_batches``, pandas ``chunksize`` for CSV).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mdlora.formats.encoder import (
    FeatureEncoder,
    LabeledArrays,
    MultiHotColumn,
    canonical_value,
    natural_order,
)
from mdlora.training.data.prepared import DataError, PreparedData, encode_splits, labels_from
from mdlora.training.data.splits import random_split, stratified_domain_split, subsample

__all__ = [
    "TableSchema",
    "iter_frames",
    "prepare_table",
    "read_table",
    "validate_table",
]

_PARQUET = (".parquet", ".pq", ".parq")


@dataclass
class TableSchema:
    """Which columns of a table are what.

    Args:
        label: the label column: 0/1, booleans or true/false, or any values with
            ``positive_labels``.
        divisions: domain columns, the primary one first (at least one).
        sparse / multi_hot / dense: feature columns. A division column may also be listed in
            ``sparse`` to embed the domain as a feature.
        multi_hot_delimiter: separator of multi-hot cells given as strings ("Action|Comedy");
            list-valued cells (Parquet list columns) need none.
        multi_hot_max_len: ids kept per multi-hot cell: one int for all, a dict per column, or
            None for the longest cell seen in training.
        min_count: values seen fewer times in training map to the OOV id.
        domain_order: optional per-division domain values in id order; by default the natural
            order of the values present in the table.
        positive_labels: the label values that mean a click (e.g. ``["yes"]``); every other
            value is a non-click. By default the label must already be 0/1 or boolean.
    """

    label: str
    divisions: list[str]
    sparse: list[str] = field(default_factory=list)
    multi_hot: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    multi_hot_delimiter: str = "|"
    multi_hot_max_len: int | dict[str, int] | None = None
    min_count: int = 1
    domain_order: dict[str, list[str]] | None = None
    positive_labels: list[Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.divisions, str):
            self.divisions = [self.divisions]
        if not self.divisions:
            raise DataError("TableSchema needs at least one division (domain) column")
        if not self.sparse and not self.multi_hot:
            raise DataError("TableSchema needs at least one sparse or multi-hot column")
        if self.label in (*self.sparse, *self.multi_hot, *self.dense, *self.divisions):
            raise DataError(f"the label column {self.label!r} cannot also be a feature/division")

    @property
    def columns(self) -> list[str]:
        """Every column the schema reads, label included, without duplicates."""
        cols = [self.label, *self.divisions, *self.sparse, *self.multi_hot, *self.dense]
        return list(dict.fromkeys(cols))

    def categorical_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.divisions, *self.sparse, *self.multi_hot]))

    def _max_len(self, col: str) -> int | None:
        if isinstance(self.multi_hot_max_len, Mapping):
            return self.multi_hot_max_len.get(col)
        return self.multi_hot_max_len

    def make_encoder(
        self, domain_order: Mapping[str, Sequence[Any]] | None = None
    ) -> FeatureEncoder:
        """An unfitted encoder for this schema (``domain_order`` overrides the schema's)."""
        order: dict[str, Sequence[Any]] = dict(self.domain_order or {})
        order.update(domain_order or {})
        return FeatureEncoder(
            sparse=self.sparse,
            multi_hot=[
                MultiHotColumn(c, self._max_len(c), self.multi_hot_delimiter)
                for c in self.multi_hot
            ],
            dense=self.dense,
            divisions=self.divisions,
            domain_order=order or None,
            min_count=self.min_count,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSchema:
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                             for k, h in hints.items())  # fmt: skip
            raise DataError(f"unknown table schema key(s) {said}; known: {known}")
        missing = [k for k in ("label", "divisions") if k not in d]
        if missing:
            raise DataError(f"the table schema needs {missing}")
        positive = d.get("positive_labels")
        if positive is not None and not isinstance(positive, list):
            d = {**d, "positive_labels": [positive]}  # a single value
        return cls(**dict(d))


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in _PARQUET


def _csv_dtypes(schema: TableSchema | None) -> dict[str, Any] | None:
    # categorical columns are read as text, so "02134" stays "02134" (not the int 2134)
    return None if schema is None else dict.fromkeys(schema.categorical_columns(), str)


def _present_columns(path: Path) -> list[str]:
    try:
        if _is_parquet(path):
            return list(pq.ParquetFile(path).schema_arrow.names)
        return list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (no header row, no data)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, pa.ArrowException) as exc:
        kind = "Parquet" if _is_parquet(path) else "CSV"
        raise DataError(f"{path} cannot be read as {kind}: {exc}") from None


def _check_file_columns(path: Path, schema: TableSchema, extra: Sequence[str] = ()) -> None:
    present = _present_columns(path)
    missing = [c for c in dict.fromkeys([*schema.columns, *extra]) if c not in present]
    if missing:
        raise DataError(
            f"{path}: declared column(s) {missing} not found; columns present: {present}"
        )


def read_table(
    path: str | Path, schema: TableSchema | None = None, extra: Sequence[str] = ()
) -> pd.DataFrame:
    """Read a Parquet (``.parquet``/``.pq``) or CSV file (any other suffix, e.g. ``.csv.gz``).

    With a schema, only its columns (and the ``extra`` ones, e.g. a split or order column)
    are read, after checking they all exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table not found: {p}")
    columns = None
    if schema is not None:
        _check_file_columns(p, schema, extra)
        columns = list(dict.fromkeys([*schema.columns, *extra]))
    try:
        if _is_parquet(p):
            return pd.read_parquet(p, columns=columns)
        return pd.read_csv(p, usecols=columns, dtype=_csv_dtypes(schema), keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{p} is empty (no header row, no data)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, pa.ArrowException) as exc:
        kind = "Parquet" if _is_parquet(p) else "CSV"
        raise DataError(f"{p} cannot be read as {kind}: {exc}") from None


def validate_table(
    df: pd.DataFrame, schema: TableSchema, source: str = "table", whole: bool = True
) -> np.ndarray:
    """Check the declared columns exist and the label is 0/1; return labels as float32.
    ``whole=False``: ``df`` is one chunk of a table (it may hold no positive label)."""
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: declared column(s) {missing} not found; columns present: {list(df.columns)}"
        )
    try:
        labels = labels_from(df[schema.label], schema.positive_labels, require_positive=whole)
    except DataError as e:
        raise DataError(f"{source}: label column {schema.label!r}: {e}") from None
    for div in schema.divisions:
        if df[div].isna().any():
            raise DataError(f"{source}: division column {div!r} has missing values")
    for col in schema.dense:
        check_dense_column(df[col], f"{source}: dense column {col!r}")
    return labels


# text that means "no value" (pandas' CSV reader treats these as missing too)
_MISSING_TEXT = ("", "nan", "na", "n/a", "null", "none", "<na>", "-nan", "#n/a")


def check_dense_column(values: pd.Series, what: str) -> None:
    """Refuse a dense column with text that is not a number, or infinite values (missing
    values are fine: they are scaled to 0)."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return
    nums = pd.to_numeric(values, errors="coerce")
    given = values.notna()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        text = values.astype("string").str.strip().str.lower()
        given &= ~text.isin(_MISSING_TEXT).fillna(True)  # "", "NaN", "null" ... are missing
    bad = values[nums.isna() & given]
    if len(bad):
        examples = sorted({str(v) for v in bad.iloc[:1000]})[:5]
        raise DataError(
            f"{what} has {len(bad)} value(s) that are not numbers, e.g. {examples}; convert or "
            "blank them, or declare the column as sparse if it is a category"
        )
    n_inf = int(np.isinf(nums.to_numpy(np.float64, na_value=np.nan)).sum())
    if n_inf:
        raise DataError(f"{what} has {n_inf} infinite value(s); replace or blank them")


def _natural_domain_order(df: pd.DataFrame, schema: TableSchema) -> dict[str, list[str]]:
    """Domain names of every division not ordered by the schema: all values in the table."""
    declared = schema.domain_order or {}
    out: dict[str, list[str]] = {}
    for div in schema.divisions:
        if div in declared:
            continue
        keys = {canonical_value(v) for v in pd.unique(df[div])}
        out[div] = natural_order(k for k in keys if k is not None)
    return out


#: split-column values (compared stripped and case-insensitively) and the part each means
SPLIT_VALUES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def split_parts(
    labels: np.ndarray,
    split: Sequence[float],
    seed: int,
    part: np.ndarray | None = None,
    domains: np.ndarray | None = None,
    split_column: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` row indices: each row's code from a split column (``part``,
    :func:`split_codes`), else stratified per primary-division domain on the label
    (``domains``: each row's domain id), else a seeded random split."""
    if part is not None:
        out = tuple(np.flatnonzero(part == k).astype(np.int64) for k in range(3))
        if out[0].size == 0:
            raise DataError(f"split column {split_column!r} marks no row as train")
        return out[0], out[1], out[2]
    if domains is not None:
        tr, va, te = stratified_domain_split(domains, labels, split, seed)
    else:
        tr, va, te = random_split(len(labels), split, seed)
    return tr, va, te


def table_data(
    source: str,
    schema: TableSchema,
    encoder: FeatureEncoder,
    parts: Sequence[LabeledArrays],
    train_rows: np.ndarray,
    seed: int,
    split_column: str | None,
    order: np.ndarray | None,
    order_column: str | None,
    name: str | None,
    hparams: Mapping[str, Any] | None,
    **info: Any,
) -> PreparedData:
    """The :class:`PreparedData` of a prepared table (in memory or streamed): its encoded
    parts, where they came from, and the training rows' order values."""
    info = {"schema": schema.to_dict(), "seed": seed, **info}
    if split_column is not None:
        info["split_column"] = split_column
    if order_column is not None:
        info["order_column"] = order_column
    return PreparedData(
        name=name or (Path(source).stem if source != "table" else "table"),
        encoder=encoder,
        train=parts[0],
        val=parts[1],
        test=parts[2],
        divisions=list(schema.divisions),
        domain_names={d: encoder.domain_names(d) for d in schema.divisions},
        hparams=dict(hparams or {}),
        info=info,
        train_order=None if order is None else order[train_rows],
    )


def split_codes(values: pd.Series, column: str) -> np.ndarray:
    """Each row's part (0 train, 1 validation, 2 test) from a split column of train / val /
    test labels. Accepted (any case): ``train``, ``val`` / ``valid`` / ``validation``,
    ``test``; anything else, missing values included, is refused naming the values found."""
    text = values.astype("string").str.strip().str.lower()
    part = text.map(SPLIT_VALUES)
    bad = part.isna().to_numpy()
    if bad.any():
        found = sorted({str(v) for v in values[bad].iloc[:10_000]})[:8]
        raise DataError(
            f"split column {column!r}: {int(bad.sum())} row(s) with value(s) {found} that are "
            f"not one of {sorted(SPLIT_VALUES)} (any case)"
        )
    return part.to_numpy(dtype=np.int64)


def date_format_of(values: pd.Series) -> str | None:
    """The strftime format pandas infers for date text from its first value (None: numbers,
    dates already, or no format found). A streamed table passes it to every chunk, so each
    one is read the way the whole column would be."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype) or pd.api.types.is_numeric_dtype(
        values.dtype
    ):
        return None
    first = values.dropna()
    if first.empty:
        return None
    from pandas.tseries.api import guess_datetime_format

    return guess_datetime_format(str(first.iloc[0]))


def order_values(values: pd.Series, column: str, date_format: str | None = None) -> np.ndarray:
    """An order column (numbers, or datetimes / date text) as float64 ranks-to-be (dates as
    nanoseconds). ``date_format``: the format of date text (default: inferred)."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        out = values.dt.as_unit("ns").astype("int64").to_numpy(np.float64)
        missing = values.isna().to_numpy()
    elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(
        values.dtype
    ):
        out = values.to_numpy(np.float64, na_value=np.nan)
        missing = np.isnan(out)
    else:
        with warnings.catch_warnings():  # "could not infer format": parsed one by one
            warnings.simplefilter("ignore", UserWarning)
            parsed = pd.to_datetime(values, errors="coerce", utc=True, format=date_format)
        unparsed = parsed.isna() & values.notna()
        if unparsed.any():
            shown = sorted({str(v) for v in values[unparsed].iloc[:1000]})[:5]
            raise DataError(
                f"order column {column!r} must hold numbers or dates; found e.g. {shown}"
            )
        out = parsed.dt.as_unit("ns").astype("int64").to_numpy(np.float64)
        missing = parsed.isna().to_numpy()
    if missing.any():
        raise DataError(f"order column {column!r} has {int(missing.sum())} missing value(s)")
    return out


def prepare_table(
    data: str | Path | pd.DataFrame,
    schema: TableSchema,
    *,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    stratified: bool = True,
    split_column: str | None = None,
    order_column: str | None = None,
    seed: int = 2024,
    max_rows: int | None = None,
    sample_frac: float | None = None,
    name: str | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> PreparedData:
    """Split a table (per primary-division domain, stratified on the label, by default),
    fit the encoder on the train part only and encode all three parts.

    ``split_column`` names a column whose values say each row's part (train / val / test,
    see :data:`SPLIT_VALUES`): the table is then not re-split (``split`` and ``stratified``
    are ignored). ``order_column`` (numbers or dates, e.g. ``seq_pos``, a timestamp) is kept
    for the training rows in ``PreparedData.train_order`` (what ``adapt_order`` reads).

    Domain names cover every value in the whole table (so a domain rare enough to miss the
    train part still has an id); everything else is learnt from train only.
    """
    source = str(data) if not isinstance(data, pd.DataFrame) else "table"
    extra = [c for c in (split_column, order_column) if c]
    df = data if isinstance(data, pd.DataFrame) else read_table(data, schema, extra)
    missing = [c for c in extra if c not in df.columns]
    if missing:
        raise DataError(f"{source}: column(s) {missing} not found; present: {list(df.columns)}")
    df = subsample(df, max_rows, sample_frac, seed).reset_index(drop=True)
    labels = validate_table(df, schema, source)
    encoder = schema.make_encoder(_natural_domain_order(df, schema))
    ranks = None if order_column is None else order_values(df[order_column], order_column)
    part = None if split_column is None else split_codes(df[split_column], split_column)
    dom: np.ndarray | None = None
    if part is None and stratified:
        primary = schema.divisions[0]
        order = encoder.domain_order[primary]
        dom = pd.Index(order, dtype=object).get_indexer(
            pd.Index([canonical_value(v) for v in df[primary]], dtype=object)
        )
        if (dom < 0).any():
            bad = list(pd.unique(df[primary].to_numpy(dtype=object)[dom < 0]))[:5]
            raise DataError(
                f"division {primary!r}: values {bad} are not in the declared domain_order"
            )
    splits = split_parts(labels, split, seed, part, dom, split_column)
    parts = encode_splits(df, encoder, labels, splits)
    return table_data(source, schema, encoder, parts, splits[0], seed, split_column, ranks,
                      order_column, name, hparams)  # fmt: skip


def iter_frames(
    path: str | Path, schema: TableSchema, batch_rows: int = 65_536, extra: Sequence[str] = ()
) -> Iterator[pd.DataFrame]:
    """Stream a Parquet (pyarrow ``iter_batches``) or CSV (``chunksize``) file as DataFrames
    holding only the schema's columns (and the ``extra`` ones, e.g. a split column)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table not found: {p}")
    _check_file_columns(p, schema, extra)
    columns = list(dict.fromkeys([*schema.columns, *extra]))
    if _is_parquet(p):
        pf = pq.ParquetFile(p)
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield rb.to_pandas()
    else:
        yield from pd.read_csv(
            p, usecols=columns, dtype=_csv_dtypes(schema), chunksize=batch_rows
        )
