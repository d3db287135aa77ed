"""Seeded train/validation/test splits: per-domain stratified, or plain random."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

__all__ = ["SplitIndices", "random_split", "stratified_domain_split", "subsample"]

SplitIndices = tuple[np.ndarray, np.ndarray, np.ndarray]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    if total <= 0:
        raise ValueError("fractions must not all be zero")
    a, b, c = (float(f) / total for f in fractions)
    return a, b, c


def _split_group(
    idx: np.ndarray,
    labels: np.ndarray | None,
    fractions: tuple[float, float, float],
    rng: np.random.RandomState,
) -> SplitIndices:
    """Split one group's row indices; stratified when every class can be split."""
    n = idx.size
    _f_train, f_val, f_test = fractions
    n_hold = round(n * (f_val + f_test))
    empty = np.empty(0, dtype=np.int64)
    if n_hold == 0 or n < 3:
        return idx, empty, empty
    if n_hold >= n:
        n_hold = n - 1

    def can_stratify(lab: np.ndarray | None, n_part: int, n_all: int) -> bool:
        if lab is None:
            return False
        _, counts = np.unique(lab, return_counts=True)
        # each class needs >= 2 members and both sides must hold at least one row per class
        return (
            counts.size > 1
            and counts.min() >= 2
            and n_part >= counts.size
            and n_all - n_part >= counts.size
        )

    strat = labels if can_stratify(labels, n_hold, n) else None
    seed = int(rng.randint(0, 2**31 - 1))
    train, hold = train_test_split(idx, test_size=n_hold, random_state=seed, stratify=strat)
    if f_test == 0:
        return np.asarray(train), np.asarray(hold), empty
    if f_val == 0:
        return np.asarray(train), empty, np.asarray(hold)
    n_test = round(hold.size * f_test / (f_val + f_test))
    if n_test == 0 or n_test >= hold.size:
        return np.asarray(train), np.asarray(hold), empty
    hold_lab = None if labels is None else labels[np.searchsorted(idx, hold)]
    strat2 = hold_lab if can_stratify(hold_lab, n_test, hold.size) else None
    seed2 = int(rng.randint(0, 2**31 - 1))
    val, test = train_test_split(hold, test_size=n_test, random_state=seed2, stratify=strat2)
    return np.asarray(train), np.asarray(val), np.asarray(test)


def stratified_domain_split(
    domains: np.ndarray,
    labels: np.ndarray | None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 2024,
) -> SplitIndices:
    """Per-domain random split of row indices, stratified on the label within each domain.

    Every domain is split on its own with the given fractions, so every domain keeps its share
    in each part. Uses scikit-learn's ``train_test_split(stratify=...)``; a domain whose rarest
    class has fewer than two rows (or that is too small) is split without stratification, and
    a domain with fewer than three rows goes to train entirely.

    Returns sorted ``(train, val, test)`` int64 index arrays.
    """
    fr = _check_fractions(fractions)
    domains = np.asarray(domains)
    if domains.ndim != 1:
        raise ValueError("domains must be one-dimensional (one domain id per row)")
    lab = None if labels is None else np.asarray(labels)
    if lab is not None and lab.shape[0] != domains.shape[0]:
        raise ValueError("labels and domains must have the same length")
    rng = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    order = np.argsort(domains, kind="stable")
    sorted_dom = domains[order]
    bounds = np.flatnonzero(np.r_[True, sorted_dom[1:] != sorted_dom[:-1], True])
    for a, b in itertools.pairwise(bounds):
        idx = np.sort(order[a:b]).astype(np.int64)
        out = _split_group(idx, None if lab is None else lab[idx], fr, rng)
        for k in range(3):
            parts[k].append(out[k])
    train, val, test = (
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, dtype=np.int64)
        for p in parts
    )
    return train, val, test


def random_split(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 2024
) -> SplitIndices:
    """Plain seeded random split of ``range(n)`` (e.g. the MultiLoRA 8:1:1 split)."""
    f_train, f_val, _ = _check_fractions(fractions)
    perm = np.random.RandomState(seed).permutation(n).astype(np.int64)
    n_train = round(n * f_train)
    n_val = round(n * f_val)
    return (
        np.sort(perm[:n_train]),
        np.sort(perm[n_train : n_train + n_val]),
        np.sort(perm[n_train + n_val :]),
    )


def subsample(
    df: pd.DataFrame,
    max_rows: int | None = None,
    sample_frac: float | None = None,
    seed: int = 2024,
) -> pd.DataFrame:
    """A seeded random subset of rows (original order kept), for CI and quick runs.

    ``sample_frac`` is applied first, then ``max_rows`` caps the count. A random subset (not the
    first rows) keeps every domain represented.
    """
    n = len(df)
    k = n
    if sample_frac is not None:
        if not 0 < sample_frac <= 1:
            raise ValueError(f"sample_frac must be in (0, 1], got {sample_frac}")
        k = round(n * sample_frac)
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        k = min(k, max_rows)
    if k >= n:
        return df
    rows = np.sort(np.random.RandomState(seed).choice(n, size=k, replace=False))
    return df.iloc[rows].reset_index(drop=True)
