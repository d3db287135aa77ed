"""Aggregating cached cells: means and standard deviations over seeds, significance."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mdlora.training.reproduce.grid import Slice


# ------------------------------------------------------------------------ aggregation
@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std None with one seed)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        if not self.values:
            return "not run"
        m = self.mean
        assert m is not None
        s = f"{scale * m:.{digits}f}"
        if self.std is not None:
            s += f" ± {scale * self.std:.{digits}f}"
        return s + ("" if self.n >= 3 else f" (n={self.n})")


def _select(records: Iterable[dict[str, Any]], sl: Slice, **match: Any) -> list[dict[str, Any]]:
    out = []
    for r in records:
        if Slice.from_dict(r.get("slice", {})) != sl:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def _wauc_of(rec: dict[str, Any], method: str) -> float | None:
    """WAUC of ``method`` from a cell record (Base may come from another method's phase 1)."""
    if rec["method"] == method:
        w = rec.get("wauc")
        return None if w is None else float(w)
    return None


def table1_stats(records: list[dict[str, Any]], sl: Slice) -> dict[tuple[str, str, str], Stat]:
    """(split, backbone, method) -> WAUC over seeds."""
    stats: dict[tuple[str, str, str], Stat] = defaultdict(lambda: Stat([]))
    for r in _select(records, sl, table="table1"):
        w = _wauc_of(r, r["method"])
        if w is not None:
            stats[(r["split"], r["backbone"], r["method"])].values.append(w)
    return stats


def significant(a: Stat, b: Stat) -> bool | None:
    """Whether two methods differ by more than the seed noise (None: fewer than 2 seeds).

    The rule: |mean difference| > the larger of the two standard deviations; a rough screen,
    stated in the report, not a formal test (3 seeds are too few for one).
    """
    if a.std is None or b.std is None or a.mean is None or b.mean is None:
        return None
    return abs(a.mean - b.mean) > max(a.std, b.std)
