"""Online features: per-request encoding and the Redis feature store.

* :class:`RequestEncoder` encodes one request (one user, n candidate items) with the model's
  own :class:`~mdlora.formats.encoder.FeatureEncoder`: the user's columns are encoded once and
  broadcast, the items' columns once per item; the item-id lookup is a dict lookup per id.
  It gives exactly ``encoder.encode_records`` of the merged ``{**user, **item}`` records
  (tested), without building those records.
* :class:`FeatureStore` reads stored raw features: a hash per user
  (``<prefix>:feat:user:<id>`` -> column -> value) and a hash per item column
  (``<prefix>:feat:item:<column>`` -> item id -> value), so a request needs ONE pipelined round
  trip: ``HMGET`` of the user's hash and one ``HMGET`` per item column over all candidates.
* :func:`publish_features` writes them from a dataset (``mdlora publish-features``).

Values are stored as the encoder's canonical strings (multi-hot cells joined with the column's
delimiter), so a stored value encodes exactly like the raw one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mdlora.formats.encoder import FeatureEncoder, canonical_value
from mdlora.formats.grown import GrownLookup
from mdlora.formats.keys import cell_tokens
from mdlora.models.features import OOV_ID, PAD_ID

USER_ID_CANDIDATES = ("user_id", "userid", "uid", "user")
ITEM_ID_CANDIDATES = ("item_id", "movie_id", "itemid", "iid", "item", "movie")


def detect_id_fields(
    encoder: FeatureEncoder,
    manifest: Mapping[str, Any],
    user_field: str | None = None,
    item_field: str | None = None,
) -> tuple[str | None, str | None]:
    """The columns a request's user id and item ids fill.

    Explicit settings first, then the artifact manifest's ``serving`` block, then the first
    sparse column with a conventional name (``user_id``..., ``item_id``/``movie_id``...).
    """
    serving = manifest.get("serving") or {}
    cols = list(encoder.sparse_columns)

    def pick(explicit: str | None, key: str, names: tuple[str, ...]) -> str | None:
        if explicit:
            return explicit
        if serving.get(key):
            return str(serving[key])
        return next((c for c in cols if c.lower() in names), None)

    return (
        pick(user_field, "user_id_field", USER_ID_CANDIDATES),
        pick(item_field, "item_id_field", ITEM_ID_CANDIDATES),
    )


class IdVocabulary:
    """A sparse column's vocabulary as sorted numpy keys: ids of a whole list in one
    ``searchsorted`` instead of a dict lookup per value.

    Only used for id lists that are all ``int`` or all ``str``/``int`` (what the API's id
    fields validate to); their canonical keys are ``str(value)``, which is what numpy's string
    conversion of an ``int`` gives too. Anything else takes the encoder's per-value path.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        order = np.argsort(np.array(vocab, dtype=str), kind="stable")
        self.str_keys = np.array(vocab, dtype=str)[order]
        self.str_ids = (order + 1).astype(np.int64)
        ints = [(int(k), i + 1) for i, k in enumerate(vocab) if _is_int_key(k)]
        ints.sort()
        self.int_keys = np.array([k for k, _ in ints], dtype=np.int64)
        self.int_ids = np.array([i for _, i in ints], dtype=np.int64)

    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        if keys.size == 0:
            return np.zeros(values.shape, np.int64)
        pos = np.searchsorted(keys, values).clip(max=keys.size - 1)
        return np.where(keys[pos] == values, ids[pos], OOV_ID)

    def lookup(self, values: Sequence[Any]) -> np.ndarray | None:
        """Ids of ``values``, or None when they are not a plain int / str list."""
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError, OverflowError):
            return None
        if arr.ndim != 1:
            return None
        if arr.dtype.kind == "i":
            return self._find(self.int_keys, self.int_ids, arr.astype(np.int64, copy=False))
        if arr.dtype.kind == "U":
            return self._find(self.str_keys, self.str_ids, arr)
        return None


def _is_int_key(key: str) -> bool:
    try:
        return str(int(key)) == key
    except ValueError:
        return False


@dataclass
class _Part:
    """A column-subset encoder and where its outputs go in the full arrays."""

    encoder: FeatureEncoder
    sparse: tuple[np.ndarray, np.ndarray]  # (positions in full, columns of the part kept)
    multi_hot: tuple[np.ndarray, np.ndarray]
    dense: tuple[np.ndarray, np.ndarray]


class RequestEncoder:
    """Encodes one user and n items into model inputs (see the module docstring)."""

    def __init__(self, encoder: FeatureEncoder) -> None:
        if not encoder.fitted:
            raise ValueError("the artifact's encoder is not fitted")
        self.encoder = encoder
        self.sparse = list(encoder.sparse_columns)
        self.multi_hot = [m.name for m in encoder.multi_hot_columns]
        self.dense = list(encoder.dense_columns)
        self.columns = frozenset([*self.sparse, *self.multi_hot, *self.dense])
        self.width = encoder.multi_hot_width
        self._state = encoder.to_dict()
        self._vocab = {c: {v: i + 1 for i, v in enumerate(encoder.vocabs[c])} for c in self.sparse}
        self._ids: dict[str, IdVocabulary] = {}
        self._parts: dict[frozenset[str], _Part] = {}
        self._delims = {m.name: m.delimiter for m in encoder.multi_hot_columns}
        self._max_lens = dict(encoder.max_lens)

    def _part(self, cols: frozenset[str]) -> _Part:
        """An encoder over ``cols`` only (same vocabularies, no divisions), cached."""
        part = self._parts.get(cols)
        if part is not None:
            return part
        s = self._state
        sparse = [c for c in self.sparse if c in cols]
        multi = [m for m in s["multi_hot"] if m["name"] in cols]
        if not sparse and not multi:  # an encoder needs one embedded column: borrow one
            sparse = [self.sparse[0]] if self.sparse else []
            multi = [] if self.sparse else [s["multi_hot"][0]]
        names = set(sparse) | {m["name"] for m in multi} | cols
        sub = FeatureEncoder.from_dict(
            {
                **s,
                "sparse": sparse,
                "multi_hot": multi,
                "dense": [c for c in self.dense if c in cols],
                "divisions": [],
                "domain_order": {},
                "min_count": 1,
                "vocabs": {k: v for k, v in s["vocabs"].items() if k in names},
                "max_lens": {k: v for k, v in s["max_lens"].items() if k in names},
                "dense_min": {k: v for k, v in s["dense_min"].items() if k in names},
                "dense_max": {k: v for k, v in s["dense_max"].items() if k in names},
                "domains": {},
            }
        )

        def where(part_cols: list[str], full: list[str]) -> tuple[np.ndarray, np.ndarray]:
            keep = [j for j, c in enumerate(part_cols) if c in cols]
            return (
                np.array([full.index(part_cols[j]) for j in keep], np.int64),
                np.array(keep, np.int64),
            )

        part = _Part(
            sub,
            where(sub.sparse_columns, self.sparse),
            where([m.name for m in sub.multi_hot_columns], self.multi_hot),
            where(sub.dense_columns, self.dense),
        )
        self._parts[cols] = part
        return part

    def encode(
        self,
        user: Mapping[str, Any],
        items: Mapping[str, Sequence[Any]],
        n: int,
        id_columns: Iterable[str] = (),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(sparse, dense, multi_hot)`` for ``n`` rows.

        ``user``: raw values of the user's columns; ``items``: column -> ``n`` raw values
        (``None`` = missing; a missing item value falls back to the user's value of that
        column). Unknown columns are ignored; missing ones encode as OOV / 0.0 / empty.
        ``id_columns``: item columns holding validated ids (``str``/``int``), looked up with
        :class:`IdVocabulary`.
        """
        sparse = np.empty((n, len(self.sparse)), np.int64)
        dense = np.empty((n, len(self.dense)), np.float32)
        multi_hot = (
            np.full((n, len(self.multi_hot), self.width), PAD_ID, np.int64)
            if self.multi_hot
            else None
        )
        item_cols = [c for c in items if c in self.columns]
        user_cols = self.columns.difference(item_cols)
        if user_cols:
            part = self._part(user_cols)
            self._scatter(part, part.encoder.encode_records([user]), sparse, dense, multi_hot)
        if not item_cols:
            return sparse, dense, multi_hot
        values = {}
        for c in item_cols:
            vals = items[c]
            if len(vals) != n:
                raise ValueError(f"item column {c!r} has {len(vals)} values for {n} items")
            fallback = user.get(c)
            if fallback is not None:
                vals = [fallback if v is None else v for v in vals]
            values[c] = vals
        other = []
        fast = set(id_columns)
        for c in item_cols:
            vmap = self._vocab.get(c)
            if vmap is None:
                other.append(c)
                continue
            if c in fast:
                ids = self._id_vocabulary(c).lookup(values[c])
                if ids is not None:
                    sparse[:, self.sparse.index(c)] = ids
                    continue
            get = vmap.get
            sparse[:, self.sparse.index(c)] = np.fromiter(
                (get(canonical_value(v), OOV_ID) for v in values[c]),  # type: ignore[arg-type]
                dtype=np.int64,
                count=n,
            )
        if other:
            part = self._part(frozenset(other))
            records = [{c: values[c][i] for c in other} for i in range(n)]
            self._scatter(part, part.encoder.encode_records(records), sparse, dense, multi_hot)
        return sparse, dense, multi_hot

    def apply_grown(
        self,
        lookup: GrownLookup,
        user: Mapping[str, Any],
        items: Mapping[str, Sequence[Any]],
        sparse: np.ndarray,
        multi_hot: np.ndarray | None,
    ) -> None:
        """Give values unknown to the export their grown ids (``mdlora.formats.grown``), in place.

        ``lookup``: the grown ids of the request's domain; arguments as :meth:`encode` took
        them, its output arrays. Only ids that encoded as out-of-vocabulary change.
        """
        n = sparse.shape[0]
        for col, vmap in lookup.maps.items():
            if not vmap:
                continue
            vals = items.get(col)
            fallback = user.get(col)
            cells = [fallback] * n if vals is None else [fallback if v is None else v for v in vals]
            if col in self._vocab:
                j = self.sparse.index(col)
                for i in np.flatnonzero(sparse[:, j] == OOV_ID).tolist():
                    key = canonical_value(cells[i])
                    if key is not None and key in vmap:
                        sparse[i, j] = vmap[key]
            elif multi_hot is not None and col in self.multi_hot:
                j = self.multi_hot.index(col)
                delim = self._delims[col]
                for i, cell in enumerate(cells):
                    for k, key in enumerate(cell_tokens(cell, delim, self._max_lens[col])):
                        if multi_hot[i, j, k] == OOV_ID and key in vmap:
                            multi_hot[i, j, k] = vmap[key]

    def _id_vocabulary(self, column: str) -> IdVocabulary:
        vocab = self._ids.get(column)
        if vocab is None:
            vocab = self._ids[column] = IdVocabulary(self.encoder.vocabs[column])
        return vocab

    @staticmethod
    def _scatter(
        part: _Part,
        out: Mapping[str, Any],
        sparse: np.ndarray,
        dense: np.ndarray,
        multi_hot: np.ndarray | None,
    ) -> None:
        pos, keep = part.sparse
        if pos.size:
            sparse[:, pos] = out["sparse"][:, keep]
        pos, keep = part.dense
        if pos.size:
            dense[:, pos] = out["dense"][:, keep]
        pos, keep = part.multi_hot
        if pos.size and multi_hot is not None:
            sub = out["multi_hot"]
            multi_hot[:, pos, : sub.shape[2]] = sub[:, keep, :]


# ------------------------------------------------------------------------- feature store
def feature_keys(prefix: str) -> tuple[str, str, str]:
    """``(user key prefix, item column key prefix, meta key)`` under ``prefix``."""
    return f"{prefix}:feat:user:", f"{prefix}:feat:item:", f"{prefix}:feat:meta"


@dataclass(frozen=True)
class FeatureMeta:
    """What ``publish-features`` wrote: which columns are per user and which per item."""

    user_id_field: str
    item_id_field: str
    user_columns: tuple[str, ...]
    item_columns: tuple[str, ...]


def _parse_meta(raw: Mapping[str, str]) -> FeatureMeta | None:
    if not raw:
        return None
    try:
        return FeatureMeta(
            raw["user_id_field"],
            raw["item_id_field"],
            tuple(json.loads(raw["user_columns"])),
            tuple(json.loads(raw["item_columns"])),
        )
    except (KeyError, ValueError, TypeError):
        return None


class FeatureStore:
    """Async reader of the Redis feature store (one pipelined round trip per request)."""

    def __init__(self, client: Any, prefix: str, meta_ttl: float = 30.0) -> None:
        self.client = client
        self.user_key, self.item_key, self.meta_key = feature_keys(prefix)
        self.meta_ttl = meta_ttl
        self._meta: FeatureMeta | None = None
        self._meta_at = -1e9

    async def meta(self) -> FeatureMeta | None:
        """The published layout (cached ``meta_ttl`` seconds); None when nothing is published."""
        now = time.monotonic()
        if now - self._meta_at > self.meta_ttl:
            raw = await self.client.hgetall(self.meta_key)
            self._meta, self._meta_at = _parse_meta(raw), now
        return self._meta

    async def fetch(
        self,
        user_id: Any,
        user_columns: Sequence[str],
        item_ids: Sequence[Any],
        item_columns: Sequence[str],
    ) -> tuple[dict[str, str], dict[str, list[str | None]]]:
        """Stored user features and item columns (None where nothing is stored)."""
        pipe = self.client.pipeline(transaction=False)
        uid = canonical_value(user_id)
        fetch_user = uid is not None and bool(user_columns)
        if fetch_user:
            pipe.hmget(self.user_key + str(uid), list(user_columns))
        keys = [canonical_value(i) or "" for i in item_ids]
        for col in item_columns:
            pipe.hmget(self.item_key + col, keys)
        res = await pipe.execute() if (fetch_user or item_columns) else []
        user: dict[str, str] = {}
        if fetch_user:
            user = {c: v for c, v in zip(user_columns, res[0], strict=True) if v is not None}
            res = res[1:]
        return user, dict(zip(item_columns, res, strict=True))


# ------------------------------------------------------------------------------ publishing
def _to_strings(s: pd.Series, delimiter: str | None) -> pd.Series:
    """Canonical strings (None for missing); list cells joined with ``delimiter``."""

    def one(v: Any) -> str | None:
        if isinstance(v, (list, tuple, np.ndarray)):
            toks = [canonical_value(t) for t in v]
            return (delimiter or "|").join(t for t in toks if t)
        return canonical_value(v)

    return s.map(one).astype(object)


def split_columns(
    frame: pd.DataFrame, columns: Iterable[str], user_field: str, item_field: str
) -> tuple[list[str], list[str]]:
    """Columns constant per user (user features) and, of the rest, constant per item."""
    cols = [c for c in columns if c not in (user_field, item_field)]
    if not cols:
        return [], []
    per_user = frame.groupby(user_field, sort=False)[cols].nunique(dropna=False).max()
    user_cols = [c for c in cols if per_user.get(c, 2) <= 1]
    rest = [c for c in cols if c not in user_cols]
    if not rest:
        return user_cols, []
    per_item = frame.groupby(item_field, sort=False)[rest].nunique(dropna=False).max()
    return user_cols, [c for c in rest if per_item.get(c, 2) <= 1]


def publish_features(
    frame: pd.DataFrame,
    encoder: FeatureEncoder,
    user_field: str,
    item_field: str,
    client: Any,
    prefix: str,
    chunk: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write user and item features of ``frame`` to Redis (see the module docstring).

    Columns come from the encoder (features and divisions, so a MultiLoRA request can take its
    domains from the user); which are per user and which per item is read from the data.
    Returns counts and the column split.
    """
    from tqdm import tqdm

    for col in (user_field, item_field):
        if col not in frame.columns:
            raise ValueError(f"the data has no {col!r} column (columns: {list(frame.columns)})")
    delims = {m.name: m.delimiter for m in encoder.multi_hot_columns}
    wanted = [c for c in encoder.columns if c in frame.columns]
    data = pd.DataFrame({c: _to_strings(frame[c], delims.get(c)) for c in wanted})
    for c in (user_field, item_field):
        data[c] = _to_strings(frame[c], None)
    user_cols, item_cols = split_columns(data, wanted, user_field, item_field)
    user_key, item_key, meta_key = feature_keys(prefix)
    users = data.drop_duplicates(user_field)[[user_field, *user_cols]]
    items = data.drop_duplicates(item_field)[[item_field, *item_cols]]
    total = len(users) + len(items) * max(1, len(item_cols))
    bar = tqdm(total=total, desc="publishing features", unit="key", disable=not progress)
    pipe = client.pipeline(transaction=False)
    records = users.to_dict("records") if user_cols else []
    for start in range(0, len(records), chunk):
        for rec in records[start : start + chunk]:
            uid = rec.pop(user_field)
            mapping = {k: v for k, v in rec.items() if v is not None}
            if uid is not None and mapping:
                pipe.hset(user_key + uid, mapping=mapping)
        pipe.execute()
        bar.update(min(chunk, len(records) - start))
    if not records:
        bar.update(len(users))
    for col in item_cols:
        ids = items[item_field].to_numpy(dtype=object)
        vals = items[col].to_numpy(dtype=object)
        for start in range(0, len(ids), chunk):
            mapping = {
                k: v
                for k, v in zip(
                    ids[start : start + chunk], vals[start : start + chunk], strict=True
                )
                if k is not None and v is not None
            }
            if mapping:
                pipe.hset(item_key + col, mapping=mapping)
            pipe.execute()
            bar.update(min(chunk, len(ids) - start))
    client.hset(
        meta_key,
        mapping={
            "user_id_field": user_field,
            "item_id_field": item_field,
            "user_columns": json.dumps(user_cols),
            "item_columns": json.dumps(item_cols),
            "published_at": str(time.time()),
            "rows": str(len(frame)),
        },
    )
    bar.close()
    return {
        "users": len(users),
        "items": len(items),
        "user_columns": user_cols,
        "item_columns": item_cols,
    }
