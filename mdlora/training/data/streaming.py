"""Tables larger than memory: ``data.options.streaming: true`` reads a Parquet or CSV file chunk
by chunk and keeps only the encoded arrays, never the raw frame (whose Python strings are what
takes the memory: a user id as text costs tens of bytes, encoded it costs eight).

Three passes over the file, each holding one chunk of raw rows at a time:

1. labels, the split (a split column, or the same stratified / random split as
   :func:`~mdlora.training.data.tabular.prepare_table` computed from per-row domain ids and
   labels), the order column and every division's values;
2. the encoder, fitted on the training rows only (``FeatureEncoder.fit_stream``);
3. every chunk encoded, each row placed where ``prepare_table`` puts it.

The result equals ``prepare_table`` on the whole table (``tests/training/test_streaming.py``),
so a run gives the same numbers either way; only the peak memory differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mdlora.formats.encoder import LabeledArrays
from mdlora.formats.keys import canonical_value, natural_order
from mdlora.training.data.prepared import DataError, PreparedData
from mdlora.training.data.tabular import (
    TableSchema,
    date_format_of,
    iter_frames,
    order_values,
    split_codes,
    split_parts,
    table_data,
    validate_table,
)

DEFAULT_BATCH_ROWS = 131_072


def _chunks(
    path: Path, schema: TableSchema, batch_rows: int, extra: Sequence[str], what: str, show: bool
) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(first row, chunk)`` of the file, with a progress bar over rows."""
    start = 0
    with tqdm(desc=f"{path.name}: {what}", unit="rows", unit_scale=True, disable=not show,
              leave=False) as bar:  # fmt: skip
        for df in iter_frames(path, schema, batch_rows, extra):
            yield start, df.reset_index(drop=True)
            start += len(df)
            bar.update(len(df))


def prepare_table_stream(
    path: str | Path,
    schema: TableSchema,
    *,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    stratified: bool = True,
    split_column: str | None = None,
    order_column: str | None = None,
    seed: int = 2024,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    name: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> PreparedData:
    """:func:`~mdlora.training.data.tabular.prepare_table` for a file read chunk by chunk
    (same arguments, less ``max_rows`` / ``sample_frac``: a stream reads every row)."""
    p = Path(path)
    extra = [c for c in (split_column, order_column) if c]
    declared = schema.domain_order or {}
    primary = schema.divisions[0]
    seen: dict[str, set[str]] = {d: set() for d in schema.divisions if d not in declared}
    labels_l: list[np.ndarray] = []
    parts_l: list[np.ndarray] = []
    order_l: list[np.ndarray] = []
    prim_l: list[np.ndarray] = []  # primary-division values as ids into prim_ids
    prim_ids: dict[str, int] = {}
    date_format: str | None = None
    for start, df in _chunks(p, schema, batch_rows, extra, "reading labels and splits", progress):
        labels_l.append(validate_table(df, schema, f"{p} (rows from {start})", whole=False))
        for div, names in seen.items():
            names.update(c for v in pd.unique(df[div]) if (c := canonical_value(v)) is not None)
        if split_column is not None:
            parts_l.append(split_codes(df[split_column], split_column).astype(np.int8))
        if order_column is not None:
            if not order_l:  # read every chunk's date text as the whole column would be
                date_format = date_format_of(df[order_column])
            order_l.append(order_values(df[order_column], order_column, date_format))
        if split_column is None and stratified:
            codes, uniques = pd.factorize(df[primary].to_numpy(dtype=object))
            local = np.array(
                [prim_ids.setdefault(str(canonical_value(u)), len(prim_ids)) for u in uniques],
                np.int64,
            )
            prim_l.append(local[codes])
    if not labels_l:
        raise DataError(f"{p} has no rows")
    labels = np.concatenate(labels_l)
    n = len(labels)
    if schema.positive_labels is not None and not labels.any():
        raise DataError(
            f"{p}: label column {schema.label!r}: no label equals one of positive_labels "
            f"{list(schema.positive_labels)}"
        )
    domain_order = {d: natural_order(names) for d, names in seen.items()}
    encoder = schema.make_encoder(domain_order)

    dom: np.ndarray | None = None
    if split_column is None and stratified:
        index = pd.Index(encoder.domain_order[primary], dtype=object)
        by_temp = index.get_indexer(pd.Index(list(prim_ids), dtype=object))  # temp id -> id
        dom = by_temp[np.concatenate(prim_l)]  # (validate_table refused missing values)
        if (dom < 0).any():
            bad = sorted(k for k, i in prim_ids.items() if by_temp[i] < 0)[:5]
            raise DataError(
                f"division {primary!r}: values {bad} are not in the declared domain_order"
            )
    split_of: np.ndarray | None = None if split_column is None else np.concatenate(parts_l)
    splits = split_parts(labels, split, seed, split_of, dom, split_column)
    part = np.full(n, -1, np.int8)
    position = np.zeros(n, np.int64)  # a row's place in its part, as prepare_table orders it
    for k, idx in enumerate(splits):
        part[idx] = k
        position[idx] = np.arange(len(idx))

    def train_frames() -> Iterator[pd.DataFrame]:
        for start, df in _chunks(p, schema, batch_rows, (), "fitting the encoder", progress):
            yield df[part[start : start + len(df)] == 0]

    encoder.fit_stream(train_frames())

    # each part's arrays allocated once, at their final size; every encoded chunk is written
    # straight to its rows' places (the peak: the encoded arrays plus one chunk)
    parts_out: list[dict[str, np.ndarray | None]] = []
    for start, df in _chunks(p, schema, batch_rows, (), "encoding", progress):
        rows = slice(start, start + len(df))
        arr: dict[str, Any] = {**encoder.transform(df), "labels": labels[rows]}
        if not parts_out:
            parts_out = [
                {key: None if v is None else np.empty((len(idx), *np.shape(v)[1:]),
                                                     np.float32 if key == "labels" else v.dtype)
                 for key, v in arr.items()}
                for idx in splits
            ]  # fmt: skip
        for k in range(3):
            mask = part[rows] == k
            if not mask.any():
                continue
            at = position[rows][mask]
            for key, v in arr.items():
                target = parts_out[k][key]
                if target is not None:
                    target[at] = np.asarray(v)[mask]
    out = [LabeledArrays(**arrays) for arrays in parts_out]  # type: ignore[typeddict-item]
    order = None if order_column is None else np.concatenate(order_l)
    return table_data(str(p), schema, encoder, out, splits[0], seed, split_column, order,
                      order_column, name, hparams, streaming=batch_rows)  # fmt: skip
