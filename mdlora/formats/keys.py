"""Canonical vocabulary keys and the vectorised helpers the feature encoder is built from.

A vocabulary key is a canonical STRING, so ``1``, ``1.0``, ``numpy.int64(1)`` and ``"1"`` all
map to the same id (see :mod:`mdlora.formats.encoder`). These functions turn raw pandas columns into
such keys with the per-row work in C (factorise first, canonicalise the distinct values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

# canonical string keys


def canonical_value(v: Any) -> str | None:
    """The vocabulary key of one raw value (``None`` for missing). See the module docstring."""
    if type(v) is str:
        return v
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        if f.is_integer():
            return str(int(f))
        return repr(f)
    if isinstance(v, str):  # str subclasses
        return str(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return str(v)


def canonical_series(s: pd.Series) -> pd.Series:
    """Vectorised :func:`canonical_value`: an object/str Series with NaN/None for missing."""
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        s = s.astype(object)
        dtype = s.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return s.map(canonical_value)
    if pd.api.types.is_integer_dtype(dtype):
        if s.hasnans:
            return s.astype(object).map(canonical_value)
        return s.astype(str)
    if pd.api.types.is_float_dtype(dtype):
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = ~np.isnan(vals)
        fv = vals[finite]
        if np.all(fv == np.floor(fv)) and (fv.size == 0 or np.abs(fv).max() < 2**62):
            out = np.full(len(vals), None, dtype=object)
            out[finite] = fv.astype(np.int64).astype(str).astype(object)
            return pd.Series(out, index=s.index, dtype=object)
        return s.map(canonical_value)
    if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
        return s  # pandas string dtype: already strings, NaN for missing
    # object dtype: strings are the common case, check that in C before falling back
    kind = pd.api.types.infer_dtype(s, skipna=True)
    if kind in ("string", "empty"):
        return s
    return s.map(canonical_value)


FACTORIZE_SAFE = {
    "string",
    "empty",
    "integer",
    "floating",
    "mixed-integer-float",
    "boolean",
    "decimal",
}


def factorize(s: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """``(codes, canonical keys of the uniques)``; code -1 marks a missing value.

    Factorising first and canonicalising only the distinct values keeps the per-row work in C.
    Object columns whose raw values could hash-collide across canonical forms (``True == 1``)
    are canonicalised row by row first.
    """
    if pd.api.types.is_object_dtype(s.dtype):
        if pd.api.types.infer_dtype(s, skipna=True) not in FACTORIZE_SAFE:
            s = canonical_series(s)
    elif isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    keys = canonical_series(pd.Series(np.asarray(uniques, dtype=object), dtype=object))
    return np.asarray(codes, dtype=np.int64), keys


def _hashable_cell(v: Any) -> Any:
    if isinstance(v, (list, np.ndarray, pd.Series)):
        return tuple(v)
    return v


def factorize_multi(s: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Factorise a multi-hot column whose cells are strings or list-likes.

    List cells are unhashable: they are first grouped by object identity (cheap, and loaders
    typically share one list object between all rows of an item), then only the distinct
    objects are made tuples and grouped by content.
    """
    if pd.api.types.is_string_dtype(s.dtype) and (
        not pd.api.types.is_object_dtype(s.dtype)
        or pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty")
    ):
        codes, uniques = pd.factorize(s, use_na_sentinel=True)
        return np.asarray(codes, dtype=np.int64), pd.Series(
            np.asarray(uniques, dtype=object), dtype=object
        )
    values = s.to_numpy(dtype=object)
    ids = np.fromiter(map(id, values), dtype=np.int64, count=values.size)
    _, first, id_codes = np.unique(ids, return_index=True, return_inverse=True)
    objs = pd.Series([_hashable_cell(v) for v in values[first]], dtype=object)
    codes2, uniques = pd.factorize(objs, use_na_sentinel=True)
    codes = np.asarray(codes2, dtype=np.int64)[id_codes]
    return codes, pd.Series(np.asarray(uniques, dtype=object), dtype=object)


def natural_order(values: Iterable[str]) -> list[str]:
    """Deterministic order: numeric when every value is an integer literal, else lexicographic."""
    vals = list(values)
    if not vals:
        return []
    try:
        nums = [int(v) for v in vals]
    except ValueError:
        return sorted(vals)
    if all(str(n) == v for n, v in zip(nums, vals, strict=True)):
        order = sorted(range(len(vals)), key=nums.__getitem__)
        return [vals[i] for i in order]
    return sorted(vals)


def lookup_ids(index: pd.Index, keys: pd.Series) -> np.ndarray:
    """Ids for canonical ``keys`` in ``index`` (position + 1; 0 for unknown or missing)."""
    if len(index) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    pos = index.get_indexer(pd.Index(keys.to_numpy(dtype=object), dtype=object))
    return pos.astype(np.int64) + 1


def split_multi(s: pd.Series, delimiter: str) -> pd.Series:
    """Make every cell list-like: strings are split on ``delimiter``; lists/arrays kept."""
    dtype = s.dtype
    if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
        return s.str.split(delimiter, regex=False)
    if pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
        return s.str.split(delimiter, regex=False)

    def cell(v: Any) -> Any:
        if isinstance(v, str):
            return v.split(delimiter)
        return v

    return s.map(cell)


def explode_tokens(s: pd.Series, delimiter: str) -> tuple[np.ndarray, pd.Series]:
    """(row position, canonical token) of every non-empty token of a multi-hot column."""
    lists = split_multi(s.reset_index(drop=True), delimiter)
    ex = lists.explode()
    tokens = canonical_series(ex.astype(object) if ex.dtype != object else ex)
    valid = tokens.notna().to_numpy() & (tokens.to_numpy(dtype=object) != "")
    rows = np.asarray(ex.index.to_numpy(), dtype=np.int64)[valid]
    return rows, tokens[valid].reset_index(drop=True)


def positions(rows: np.ndarray) -> np.ndarray:
    """Position of each entry within its row, for ``rows`` sorted non-decreasingly."""
    if rows.size == 0:
        return rows.copy()
    idx = np.arange(rows.size)
    starts = np.empty(rows.size, dtype=bool)
    starts[0] = True
    np.not_equal(rows[1:], rows[:-1], out=starts[1:])
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    return idx - first


def cell_tokens(cell: Any, delimiter: str, limit: int) -> list[str]:
    """The canonical tokens of one multi-hot cell (a delimited string, a list, or one value),
    at most ``limit``; missing and empty tokens are skipped, as the encoder's fit does."""
    if cell is None:
        return []
    if isinstance(cell, str):
        items: Iterable[Any] = cell.split(delimiter)
    elif isinstance(cell, (list, tuple, np.ndarray)):
        items = cell
    else:
        items = [cell]
    out: list[str] = []
    for t in items:
        key = canonical_value(t)
        if key is None or key == "":
            continue
        if len(out) >= limit:
            break
        out.append(key)
    return out


def raw_float(v: Any) -> float:
    """A raw dense value as a float; NaN (missing) for text, None and integers too large
    for a float (``float(10**400)`` raises OverflowError)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def min_max_scale(vals: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Dense values scaled with the training range ``[lo, hi]`` to [0, 1] (clipped; NaN, i.e.
    missing, -> 0.0) as float32."""
    span = hi - lo
    with np.errstate(invalid="ignore"):
        out = (vals - lo) / span if span > 0 else np.zeros_like(vals)
        out = np.clip(out, 0.0, 1.0)  # +-inf land on the ends of the range
    out[np.isnan(vals)] = 0.0  # missing
    return out.astype(np.float32)
