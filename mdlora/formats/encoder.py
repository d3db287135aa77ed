"""The one feature encoder shared by training and by the online service.

A :class:`FeatureEncoder` is declared from a schema (sparse, multi-hot, dense and division
columns), fitted on the TRAINING split only, and then turns a pandas DataFrame (vectorised) or a
list of raw records (the serving fast path, no pandas) into the numpy arrays the models consume.

Conventions (shared with :mod:`mdlora.models.features`):

* Index 0 of every categorical vocabulary is the out-of-vocabulary id (``OOV_ID``): unseen and
  missing values map to 0, so they never fail and never alias a real value.
* Multi-hot fields are padded with ``PAD_ID`` (-1) up to the field's ``max_len``; tokens past
  ``max_len`` are dropped, unknown tokens map to 0, missing/empty tokens are dropped.
* Dense fields are min-max scaled with the training minimum and maximum and clipped to [0, 1]
  (a serving value outside the training range saturates); NaN / missing -> 0.0.
* Division (domain) columns map a domain value to an id 0..n-1. Domain names are kept as
  strings, in a stable order: the order given in ``domain_order``, else natural order of the
  values seen in training (numeric order when every value is an integer, else string order).
  There is no OOV domain: an unknown domain value raises ``ValueError`` naming the division and
  the value; a new domain comes with its adapter (``mdlora add-domain``, which extends the
  model's lists and takes them here through :meth:`FeatureEncoder.set_domains`).

Vocabulary keys are canonical STRINGS, so ``1``, ``1.0``, ``numpy.int64(1)`` and ``"1"`` all map
to the same id. Canonical form: ``str`` as is; integers (and integral floats) as their decimal
integer; other floats via ``repr``; booleans as ``"True"``/``"False"``; ``None``/NaN are
missing. Note ``"01"`` and ``1`` are different keys.

Serialisation is plain JSON (:meth:`to_dict` / :meth:`from_dict`, :meth:`save` / :meth:`load`);
no pickle anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from mdlora.formats import domains as domain_lists
from mdlora.formats.keys import (
    canonical_value,
    cell_tokens,
    explode_tokens,
    factorize,
    factorize_multi,
    lookup_ids,
    min_max_scale,
    natural_order,
    positions,
    raw_float,
)
from mdlora.models.features import (
    OOV_ID,
    PAD_ID,
    DenseField,
    FeatureSpec,
    MultiHotField,
    SparseField,
)

__all__ = [
    "ENCODER_FORMAT_VERSION",
    "EncodedArrays",
    "FeatureEncoder",
    "LabeledArrays",
    "MultiHotColumn",
    "canonical_value",
    "natural_order",
]

ENCODER_FORMAT_VERSION = 1


class EncodedArrays(TypedDict):
    """What :meth:`FeatureEncoder.transform` returns (a plain dict at runtime)."""

    sparse: np.ndarray  # [N, n_sparse] int64
    multi_hot: np.ndarray | None  # [N, n_multi_hot, L] int64, -1 padded; None without fields
    dense: np.ndarray  # [N, n_dense] float32
    domains: np.ndarray  # [N, n_divisions] int64


class LabeledArrays(EncodedArrays):
    """Encoded arrays plus the labels (float32 [N], 0/1)."""

    labels: np.ndarray


@dataclass(frozen=True)
class MultiHotColumn:
    """A set-valued column: a list per row, or a ``delimiter``-separated string.

    ``max_len=None`` means "the longest list seen in training".
    """

    name: str
    max_len: int | None = None
    delimiter: str = "|"


# --------------------------------------------------------------------------------------------


class FeatureEncoder:
    """Declared-schema encoder; fit on training data only, then transform anything.

    Args:
        sparse: single-valued categorical columns (one embedded field each, in this order).
        multi_hot: set-valued columns, as names or :class:`MultiHotColumn`.
        dense: real-valued columns, min-max scaled to [0, 1] with training statistics.
        divisions: domain columns; the first is the primary division. A division column may
            also be listed in ``sparse`` (the domain as an embedded feature).
        domain_order: per division, the domain values in id order (fixes names and ids, e.g.
            MovieLens age codes 1,18,...,56 -> 0..6). Values outside it fail at fit.
        min_count: minimum training count for a value to get its own id (int, or per column);
            rarer values map to OOV.
        multi_hot_delimiter: default delimiter for multi-hot columns given by name.
    """

    def __init__(
        self,
        sparse: Sequence[str] = (),
        multi_hot: Sequence[str | MultiHotColumn] = (),
        dense: Sequence[str] = (),
        divisions: Sequence[str] = (),
        *,
        domain_order: Mapping[str, Sequence[Any]] | None = None,
        min_count: int | Mapping[str, int] = 1,
        multi_hot_delimiter: str = "|",
    ) -> None:
        self.sparse_columns: list[str] = list(sparse)
        self.multi_hot_columns: list[MultiHotColumn] = [
            m if isinstance(m, MultiHotColumn) else MultiHotColumn(m, None, multi_hot_delimiter)
            for m in multi_hot
        ]
        self.dense_columns: list[str] = list(dense)
        self.divisions: list[str] = list(divisions)
        fields = [*self.sparse_columns, *(m.name for m in self.multi_hot_columns)]
        fields += self.dense_columns
        if len(set(fields)) != len(fields):
            raise ValueError(f"feature column names must be unique, got {fields}")
        if len(set(self.divisions)) != len(self.divisions):
            raise ValueError(f"division names must be unique, got {self.divisions}")
        if not self.sparse_columns and not self.multi_hot_columns:
            raise ValueError("an encoder needs at least one sparse or multi-hot column")
        self.domain_order: dict[str, list[str]] = {}
        for div, order in (domain_order or {}).items():
            if div not in self.divisions:
                raise ValueError(f"domain_order given for {div!r}, which is not a division")
            names = [canonical_value(v) for v in order]
            if any(n is None for n in names) or len(set(names)) != len(names):
                raise ValueError(f"domain_order[{div!r}] must be distinct non-missing values")
            self.domain_order[div] = [str(n) for n in names]
        self.min_count = min_count
        # fitted state
        self.vocabs: dict[str, list[str]] = {}
        self.max_lens: dict[str, int] = {}
        self.dense_min: dict[str, float] = {}
        self.dense_max: dict[str, float] = {}
        self.domains: dict[str, list[str]] = {}
        #: ids added domains brought: division -> domain -> column -> values
        #: (``mdlora.formats.grown``)
        self.grown: dict[str, dict[str, dict[str, list[str]]]] = {}
        self.grown_starts: dict[tuple[str, str], int] = {}  # where their rows are (runtime)
        self._grown_lookups: list[Any] | None = None
        self._fitted = False
        self._index_cache: dict[str, pd.Index] = {}
        self._dict_cache: dict[str, dict[str, int]] = {}

    # ---------------------------------------------------------------- schema helpers

    @property
    def fitted(self) -> bool:
        return self._fitted

    @property
    def columns(self) -> list[str]:
        """Every input column the encoder reads (features and divisions, no duplicates)."""
        cols = [
            *self.sparse_columns,
            *(m.name for m in self.multi_hot_columns),
            *self.dense_columns,
            *self.divisions,
        ]
        return list(dict.fromkeys(cols))

    def _min_count(self, column: str) -> int:
        if isinstance(self.min_count, Mapping):
            return int(self.min_count.get(column, 1))
        return int(self.min_count)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("FeatureEncoder is not fitted: call fit(train_df) first")

    def _check_columns(self, df: pd.DataFrame) -> None:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(
                f"column(s) {missing} declared in the encoder schema are missing from the data; "
                f"columns present: {list(df.columns)}"
            )

    def _invalidate(self) -> None:
        self._index_cache.clear()
        self._dict_cache.clear()
        self._grown_lookups = None

    # ---------------------------------------------------------------- grown ids

    def set_grown(self, division: str, domain: str, values: Mapping[str, list[str]]) -> None:
        """Give ``division/domain`` these grown values (``mdlora.formats.grown``; empty removes
        them).

        Its rows must then be placed (``mdlora.formats.grown.place``) before rows of it are encoded.
        """
        from mdlora.formats import grown

        checked = grown.check_values(self, values, f"{division}/{domain}")
        doms = dict(self.grown.get(division, {}))
        doms.pop(domain, None)
        if checked:
            doms[domain] = checked
        self.grown = {k: v for k, v in self.grown.items() if k != division}
        if doms:
            self.grown[division] = doms
        self.grown_starts = {k: v for k, v in self.grown_starts.items() if k != (division, domain)}
        self._grown_lookups = None

    def set_grown_starts(self, starts: Mapping[tuple[str, str], int]) -> None:
        self.grown_starts = dict(starts)
        self._grown_lookups = None

    def grown_lookups(self) -> list[Any]:
        """Cached ``mdlora.formats.grown.lookups`` of this encoder."""
        if self._grown_lookups is None:
            from mdlora.formats import grown

            self._grown_lookups = grown.lookups(self)
        return self._grown_lookups

    def _index(self, key: str, values: list[str]) -> pd.Index:
        idx = self._index_cache.get(key)
        if idx is None:
            idx = pd.Index(values, dtype=object)
            self._index_cache[key] = idx
        return idx

    def _map(self, key: str, values: list[str], base: int) -> dict[str, int]:
        m = self._dict_cache.get(key)
        if m is None:
            m = {v: i + base for i, v in enumerate(values)}
            self._dict_cache[key] = m
        return m

    # ---------------------------------------------------------------- fitting

    def fit(self, df: pd.DataFrame) -> FeatureEncoder:
        """Build vocabularies, dense statistics and domain names from TRAINING rows only."""
        return self.fit_stream([df])

    def fit_stream(self, frames: Iterable[pd.DataFrame]) -> FeatureEncoder:
        """Fit from an iterable of DataFrame chunks (for data larger than memory).

        Gives exactly the same encoder as :meth:`fit` on the concatenated chunks.
        """
        counts: dict[str, pd.Series] = {}
        max_seen: dict[str, int] = {m.name: 0 for m in self.multi_hot_columns}
        dmin: dict[str, float] = {c: math.inf for c in self.dense_columns}
        dmax: dict[str, float] = {c: -math.inf for c in self.dense_columns}
        dom_seen: dict[str, set[str]] = {d: set() for d in self.divisions}
        n_rows = 0
        for df in frames:
            self._check_columns(df)
            n_rows += len(df)
            for col in self.sparse_columns:
                codes, keys = factorize(df[col])
                n_u = np.bincount(codes[codes >= 0], minlength=len(keys))
                vc = pd.Series(n_u, dtype=np.int64).groupby(keys.to_numpy(dtype=object)).sum()
                counts[col] = vc if col not in counts else counts[col].add(vc, fill_value=0)
            for m in self.multi_hot_columns:
                codes, uniques = factorize_multi(df[m.name])
                rows, tokens = explode_tokens(uniques, m.delimiter)
                n_u = np.bincount(codes[codes >= 0], minlength=len(uniques))
                weights = pd.Series(n_u[rows], dtype=np.int64)
                vc = weights.groupby(tokens.to_numpy(dtype=object)).sum()
                counts[m.name] = (
                    vc if m.name not in counts else counts[m.name].add(vc, fill_value=0)
                )
                if rows.size:
                    max_seen[m.name] = max(max_seen[m.name], int(np.bincount(rows).max()))
            for col in self.dense_columns:
                vals = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                vals = vals[np.isfinite(vals)]
                if vals.size:
                    dmin[col] = min(dmin[col], float(vals.min()))
                    dmax[col] = max(dmax[col], float(vals.max()))
            for div in self.divisions:
                codes, keys = factorize(df[div])
                if (codes < 0).any() or keys.isna().any():
                    raise ValueError(f"division {div!r} has missing values in the training data")
                dom_seen[div].update(str(k) for k in keys)
        if n_rows == 0:
            raise ValueError("cannot fit a FeatureEncoder on zero rows")

        def vocab(col: str) -> list[str]:
            vc = counts.get(col)
            if vc is None or vc.empty:
                return []
            keep = vc[vc >= self._min_count(col)]
            return natural_order(str(k) for k in keep.index)

        names = [*self.sparse_columns, *(m.name for m in self.multi_hot_columns)]
        self.vocabs = {c: vocab(c) for c in names}
        self.max_lens = {
            m.name: int(m.max_len) if m.max_len is not None else max(1, max_seen[m.name])
            for m in self.multi_hot_columns
        }
        self.dense_min = {c: (dmin[c] if math.isfinite(dmin[c]) else 0.0) for c in dmin}
        self.dense_max = {c: (dmax[c] if math.isfinite(dmax[c]) else 0.0) for c in dmax}
        self.domains = {}
        for div in self.divisions:
            if div in self.domain_order:
                names = self.domain_order[div]
                extra = sorted(dom_seen[div] - set(names))
                if extra:
                    raise ValueError(
                        f"division {div!r}: training values {extra[:10]} are not in the declared "
                        f"domain_order {names}"
                    )
                self.domains[div] = list(names)
            else:
                self.domains[div] = natural_order(dom_seen[div])
        self._fitted = True
        self._invalidate()
        return self

    # ---------------------------------------------------------------- domains

    def domain_names(self, division: str) -> list[str]:
        """Domain names of ``division`` in id order."""
        self._check_fitted()
        if division not in self.domains:
            raise KeyError(f"unknown division {division!r}; divisions: {self.divisions}")
        return list(self.domains[division])

    def num_domains(self, division: str) -> int:
        return len(self.domain_names(division))

    def domain_id(self, division: str, value: Any) -> int:
        """Id of one domain value; ``ValueError`` when unknown."""
        self._check_fitted()
        names = self._map("\0dom:" + division, self.domain_names(division), 0)
        key = canonical_value(value)
        if key is None or key not in names:
            raise ValueError(self._unknown_domain_msg(division, [value]))
        return names[key]

    def add_domain(self, division: str, name: Any) -> int:
        """Append a new domain to ``division`` and return its id (the previous count).

        Existing ids never change, so a model trained before the addition stays valid. Beside
        a model, the model's divisions own the list: add the domain to the model and take its
        lists with :meth:`set_domains` (``mdlora.formats.domains``).
        """
        self._check_fitted()
        if division not in self.domains:
            raise KeyError(f"unknown division {division!r}; divisions: {self.divisions}")
        key = canonical_value(name)  # None: set_domains refuses a missing name
        if key in self.domains[division]:
            raise ValueError(f"division {division!r} already has a domain named {key!r}")
        self.set_domains({**self.domains, division: [*self.domains[division], key]})
        return len(self.domains[division]) - 1

    def set_domains(self, domains: Mapping[str, Sequence[Any]]) -> None:
        """Take every division's domain names (a model's: ``domains.model_domains(config)``);
        each list must start with the names the division has, so existing ids never change."""
        self._check_fitted()
        self.domains = domain_lists.extended(self.domains, domains)
        for div in self.domain_order:  # the declared order follows (a refit keeps the ids)
            self.domain_order[div] = list(self.domains[div])
        self._invalidate()

    def _unknown_domain_msg(self, division: str, values: Sequence[Any]) -> str:
        shown = [v for v in values[:5]]
        return (
            f"division {division!r}: unknown domain value(s) {shown} "
            f"(known domains: {self.domains.get(division)}); a new domain needs its adapter: "
            f"mdlora add-domain --domain NAME, then register the package with the service"
        )

    # ---------------------------------------------------------------- spec

    def feature_spec(self) -> FeatureSpec:
        """The model input layout. ``vocab_size`` includes the OOV id (and is at least 2)."""
        self._check_fitted()
        return FeatureSpec(
            sparse=tuple(
                SparseField(c, max(2, len(self.vocabs[c]) + 1)) for c in self.sparse_columns
            ),
            multi_hot=tuple(
                MultiHotField(m.name, max(2, len(self.vocabs[m.name]) + 1), self.max_lens[m.name])
                for m in self.multi_hot_columns
            ),
            dense=tuple(DenseField(c) for c in self.dense_columns),
        )

    def vocab_size(self, column: str) -> int:
        """Ids in use for ``column``, OOV included."""
        self._check_fitted()
        return len(self.vocabs[column]) + 1

    @property
    def multi_hot_width(self) -> int:
        """``L`` of the multi-hot array: the largest ``max_len`` of any multi-hot field."""
        return max(self.max_lens.values(), default=0)

    # ---------------------------------------------------------------- transform (vectorised)

    def transform(self, df: pd.DataFrame) -> EncodedArrays:
        """Encode a DataFrame (vectorised; for training-size data)."""
        self._check_fitted()
        self._check_columns(df)
        n = len(df)
        sparse = np.zeros((n, len(self.sparse_columns)), dtype=np.int64)
        for j, col in enumerate(self.sparse_columns):
            idx = self._index(col, self.vocabs[col])
            codes, keys = factorize(df[col])
            uid = np.append(lookup_ids(idx, keys), OOV_ID)  # code -1 (missing) -> OOV
            sparse[:, j] = uid[codes]
        multi_hot: np.ndarray | None = None
        if self.multi_hot_columns:
            multi_hot = np.full(
                (n, len(self.multi_hot_columns), self.multi_hot_width), PAD_ID, dtype=np.int64
            )
            for j, m in enumerate(self.multi_hot_columns):
                codes, uniques = factorize_multi(df[m.name])
                rows, tokens = explode_tokens(uniques, m.delimiter)
                ids = lookup_ids(self._index(m.name, self.vocabs[m.name]), tokens)
                pos = positions(rows)
                keep = pos < self.max_lens[m.name]
                # one row per distinct cell plus an all-padding row for missing cells (code -1)
                table = np.full((len(uniques) + 1, self.multi_hot_width), PAD_ID, dtype=np.int64)
                table[rows[keep], pos[keep]] = ids[keep]
                multi_hot[:, j, :] = table[codes]
        dense = np.zeros((n, len(self.dense_columns)), dtype=np.float32)
        for j, col in enumerate(self.dense_columns):
            vals = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            dense[:, j] = min_max_scale(vals, self.dense_min[col], self.dense_max[col])
        domains = np.zeros((n, len(self.divisions)), dtype=np.int64)
        for j, div in enumerate(self.divisions):
            codes, keys = factorize(df[div])
            upos = self._index("\0dom:" + div, self.domains[div]).get_indexer(
                pd.Index(keys.to_numpy(dtype=object), dtype=object)
            )
            if (codes < 0).any():
                raise ValueError(self._unknown_domain_msg(div, [None]))
            if (upos < 0).any():
                raise ValueError(self._unknown_domain_msg(div, list(keys[upos < 0])))
            domains[:, j] = upos[codes]
        out = EncodedArrays(sparse=sparse, multi_hot=multi_hot, dense=dense, domains=domains)
        if self.grown:
            from mdlora.formats import grown

            grown.apply_frame(self, df, out)
        return out

    # ---------------------------------------------------------------- serving fast path

    def encode_records(self, records: Sequence[Mapping[Any, Any]]) -> EncodedArrays:
        """Encode raw records (dicts of raw values) without pandas: the serving fast path.

        Missing feature fields give OOV / 0.0 (empty multi-hot); a missing or unknown domain
        value raises ``ValueError``. Same output as :meth:`transform` on the same rows.
        """
        self._check_fitted()
        n = len(records)
        sparse = np.zeros((n, len(self.sparse_columns)), dtype=np.int64)
        for j, col in enumerate(self.sparse_columns):
            vmap = self._map(col, self.vocabs[col], 1)
            get = vmap.get
            sparse[:, j] = np.fromiter(
                (get(canonical_value(r.get(col)), OOV_ID) for r in records),  # type: ignore[arg-type]
                dtype=np.int64,
                count=n,
            )
        multi_hot: np.ndarray | None = None
        if self.multi_hot_columns:
            multi_hot = np.full(
                (n, len(self.multi_hot_columns), self.multi_hot_width), PAD_ID, dtype=np.int64
            )
            for j, m in enumerate(self.multi_hot_columns):
                vmap = self._map(m.name, self.vocabs[m.name], 1)
                limit = self.max_lens[m.name]
                for i, r in enumerate(records):
                    for k, tok in enumerate(cell_tokens(r.get(m.name), m.delimiter, limit)):
                        multi_hot[i, j, k] = vmap.get(tok, OOV_ID)
        dense = np.zeros((n, len(self.dense_columns)), dtype=np.float32)
        for j, col in enumerate(self.dense_columns):
            vals = np.fromiter((raw_float(r.get(col)) for r in records), dtype=np.float64, count=n)
            dense[:, j] = min_max_scale(vals, self.dense_min[col], self.dense_max[col])
        domains = np.zeros((n, len(self.divisions)), dtype=np.int64)
        for j, div in enumerate(self.divisions):
            dmap = self._map("\0dom:" + div, self.domains[div], 0)
            for i, r in enumerate(records):
                key = canonical_value(r.get(div))
                d = dmap.get(key) if key is not None else None
                if d is None:
                    raise ValueError(self._unknown_domain_msg(div, [r.get(div)]))
                domains[i, j] = d
        out = EncodedArrays(sparse=sparse, multi_hot=multi_hot, dense=dense, domains=domains)
        if self.grown:
            from mdlora.formats import grown

            grown.apply_records(self, records, out)
        return out

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description of the schema and fitted state."""
        return {
            "format_version": ENCODER_FORMAT_VERSION,
            "sparse": list(self.sparse_columns),
            "multi_hot": [
                {"name": m.name, "max_len": m.max_len, "delimiter": m.delimiter}
                for m in self.multi_hot_columns
            ],
            "dense": list(self.dense_columns),
            "divisions": list(self.divisions),
            "domain_order": {k: list(v) for k, v in self.domain_order.items()},
            "min_count": (
                dict(self.min_count) if isinstance(self.min_count, Mapping) else self.min_count
            ),
            "fitted": self._fitted,
            "vocabs": {k: list(v) for k, v in self.vocabs.items()},
            "max_lens": dict(self.max_lens),
            "dense_min": dict(self.dense_min),
            "dense_max": dict(self.dense_max),
            "domains": {k: list(v) for k, v in self.domains.items()},
            **({"grown": self.grown} if self.grown else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEncoder:
        version = d.get("format_version")
        if version != ENCODER_FORMAT_VERSION:
            raise ValueError(f"unsupported encoder format_version {version!r}")
        enc = cls(
            sparse=d["sparse"],
            multi_hot=[
                MultiHotColumn(m["name"], m["max_len"], m["delimiter"]) for m in d["multi_hot"]
            ],
            dense=d["dense"],
            divisions=d["divisions"],
            domain_order=d.get("domain_order") or None,
            min_count=d.get("min_count", 1),
        )
        if d.get("fitted"):
            enc.vocabs = {k: [str(x) for x in v] for k, v in d["vocabs"].items()}
            enc.max_lens = {k: int(v) for k, v in d["max_lens"].items()}
            enc.dense_min = {k: float(v) for k, v in d["dense_min"].items()}
            enc.dense_max = {k: float(v) for k, v in d["dense_max"].items()}
            enc.domains = {k: [str(x) for x in v] for k, v in d["domains"].items()}
            enc._fitted = True
            for div, doms in (d.get("grown") or {}).items():
                for dom, values in doms.items():
                    enc.set_grown(div, dom, values)
        return enc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> FeatureEncoder:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoder:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __repr__(self) -> str:
        state = "fitted" if self._fitted else "unfitted"
        return (
            f"FeatureEncoder({state}, sparse={self.sparse_columns}, "
            f"multi_hot={[m.name for m in self.multi_hot_columns]}, dense={self.dense_columns}, "
            f"divisions={self.divisions})"
        )
