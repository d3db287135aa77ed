"""Ids a domain added later brings with it: their vocabulary and where their rows are.

``mdlora add-domain`` grows the vocabularies for values the export never saw (new users, new
items, the new domain's own value of a domain feature) and trains embedding rows for them
(``mdlora.models.rows``). The values are **scoped to their domain**: a value is looked up in the
export's vocabulary first, and only when it is unknown there, in the grown vocabulary of the
row's own domain. So two domains can grow the same value without clashing, and removing or
rolling back one domain's adapter never changes another domain's ids.

``encoder.grown[division][domain][column]`` lists a domain's grown values in id order. Where
their rows sit in the model's tables is runtime placement (``place``): a grown value ``v`` of
column ``c`` gets the id ``start + local(c, v) - offset(c)``, where ``start`` is the domain's
first grown row, ``local`` the value's position in the domain's region (fields in the spec's
order, then values in order) and ``offset`` the field's first row, so ``id + offset`` (what
``FieldEmbedding`` looks up) is the value's grown row. The same layout is what
:func:`region_fields` tells the model to grow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mdlora.models.features import OOV_ID

if TYPE_CHECKING:
    from mdlora.formats.encoder import EncodedArrays, FeatureEncoder
    from mdlora.models.model import MultiDomainModel

GrownValues = dict[str, list[str]]  # column -> grown values in id order


def embedded_columns(encoder: FeatureEncoder) -> list[str]:
    """The embedded columns in the model's field order (sparse, then multi-hot)."""
    return [*encoder.sparse_columns, *(m.name for m in encoder.multi_hot_columns)]


def field_offsets(encoder: FeatureEncoder) -> dict[str, int]:
    """First row of every embedded column's field in the model's embedding table."""
    spec = encoder.feature_spec()
    sizes = [f.vocab_size for f in spec.sparse] + [m.vocab_size for m in spec.multi_hot]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    return dict(zip(embedded_columns(encoder), starts, strict=True))


def region_fields(encoder: FeatureEncoder, values: Mapping[str, Sequence[str]]) -> list[int]:
    """The field index of every row of a domain's grown region, in region order."""
    out: list[int] = []
    for f, col in enumerate(embedded_columns(encoder)):
        out += [f] * len(values.get(col, ()))
    return out


def new_values(
    encoder: FeatureEncoder, df: pd.DataFrame, columns: Sequence[str] | None = None
) -> GrownValues:
    """Values of ``df`` the encoder's vocabularies lack, per embedded column.

    Counted like the encoder's own fit: a value needs the column's ``min_count`` occurrences;
    multi-hot cells are split into tokens. ``columns`` limits which columns grow.
    """
    from mdlora.formats.keys import canonical_series, explode_tokens, factorize_multi, natural_order

    out: GrownValues = {}
    delims = {m.name: m.delimiter for m in encoder.multi_hot_columns}
    for col in embedded_columns(encoder):
        if columns is not None and col not in columns:
            continue
        if col in delims:
            codes, uniques = factorize_multi(df[col])
            rows, tokens = explode_tokens(uniques, delims[col])
            n_u = np.bincount(codes[codes >= 0], minlength=len(uniques))
            counts = (
                pd.Series(n_u[rows], dtype=np.int64).groupby(tokens.to_numpy(dtype=object)).sum()
            )
        else:
            keys = canonical_series(df[col]).dropna()
            counts = keys.value_counts()
        known = set(encoder.vocabs[col])
        keep = [
            str(k) for k, c in counts.items()
            if c >= encoder._min_count(col) and str(k) not in known and str(k) != ""
        ]  # fmt: skip
        if keep:
            out[col] = natural_order(keep)
    return out


def count(values: Mapping[str, Sequence[str]]) -> int:
    return sum(len(v) for v in values.values())


def check_values(encoder: FeatureEncoder, values: Any, what: str) -> GrownValues:
    """``values`` as a ``GrownValues`` after checking its shape (a ``ValueError`` says why)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{what}: grown values must map column names to lists of values")
    cols = set(embedded_columns(encoder))
    out: GrownValues = {}
    for col, vals in values.items():
        if col not in cols:
            raise ValueError(
                f"{what}: column {col!r} has no embedding to grow (embedded columns: "
                f"{sorted(cols)})"
            )
        if not isinstance(vals, list) or not all(isinstance(v, str) and v for v in vals):
            raise ValueError(f"{what}: grown values of {col!r} must be a list of non-empty strings")
        if len(set(vals)) != len(vals):
            raise ValueError(f"{what}: grown values of {col!r} repeat a value")
        known = set(encoder.vocabs[col])
        clash = [v for v in vals[:1000] if v in known][:5]
        if clash:
            raise ValueError(
                f"{what}: grown values of {col!r} include values the export already knows: {clash}"
            )
        if vals:
            out[col] = list(vals)
    return out


def place(encoder: FeatureEncoder, model: MultiDomainModel) -> None:
    """Point every grown vocabulary of ``encoder`` at its rows in ``model`` (see the module
    docstring); raises ``ValueError`` when the two disagree."""
    from mdlora.models.rows import grown_regions

    regions = grown_regions(model)
    starts: dict[tuple[str, str], int] = {}
    for div, doms in encoder.grown.items():
        for dom, values in doms.items():
            region = regions.get((div, dom))
            n = count(values)
            if region is None or region[1] != n:
                have = "none" if region is None else f"{region[1]} rows"
                raise ValueError(
                    f"the encoder has {n} grown ids for {div}/{dom} but the model has {have}: "
                    "the encoder and the model come from different add-domain runs"
                )
            starts[(div, dom)] = region[0]
    for (div, dom), (_, n) in regions.items():
        if (div, dom) not in starts and dom in encoder.domains.get(div, []):
            raise ValueError(
                f"the model has {n} grown rows for {div}/{dom} but the encoder knows none of "
                "their ids, so its rows would be encoded as unknown: install adapter packages "
                "with Artifact.apply_adapter, which gives the encoder the package's ids"
            )
    encoder.set_grown_starts(starts)


class GrownLookup:
    """A domain's grown ids ready to encode with: column -> (canonical value -> id)."""

    def __init__(self, encoder: FeatureEncoder, values: GrownValues, start: int) -> None:
        offsets = field_offsets(encoder)
        self.maps: dict[str, dict[str, int]] = {}
        local = 0
        for col in embedded_columns(encoder):
            vals = values.get(col, [])
            base = start + local - offsets[col]
            self.maps[col] = {v: base + i for i, v in enumerate(vals)}
            local += len(vals)


def lookups(encoder: FeatureEncoder) -> list[tuple[int, int, GrownLookup]]:
    """``(division column, domain id, lookup)`` of every placed grown domain."""
    out = []
    for div, doms in encoder.grown.items():
        for dom, values in doms.items():
            if dom not in encoder.domains.get(div, []):
                continue  # a domain the encoder does not serve: nothing can reach its ids
            start = encoder.grown_starts.get((div, dom))
            if start is None:
                raise RuntimeError(
                    f"the grown ids of {div}/{dom} are not placed in a model: call "
                    "mdlora.formats.grown.place(encoder, model) first"
                )
            out.append((
                encoder.divisions.index(div), encoder.domains[div].index(dom),
                GrownLookup(encoder, values, start),
            ))  # fmt: skip
    return out


def apply_frame(encoder: FeatureEncoder, df: pd.DataFrame, arrays: EncodedArrays) -> None:
    """Give the rows of grown domains their grown ids (in place; ``transform``'s last step)."""
    from mdlora.formats.keys import canonical_series, explode_tokens, factorize_multi, positions

    sparse_j = {c: j for j, c in enumerate(encoder.sparse_columns)}
    multi = {m.name: (j, m) for j, m in enumerate(encoder.multi_hot_columns)}
    for div_j, dom_id, lookup in encoder.grown_lookups():
        rows = np.flatnonzero(arrays["domains"][:, div_j] == dom_id)
        if rows.size == 0:
            continue
        for col, vmap in lookup.maps.items():
            if not vmap:
                continue
            if col in sparse_j:
                keys = canonical_series(df[col].iloc[rows])
                ids = keys.map(vmap).to_numpy(dtype=np.float64, na_value=np.nan)
                cur = arrays["sparse"][rows, sparse_j[col]]
                hit = (cur == OOV_ID) & ~np.isnan(ids)
                cur[hit] = ids[hit].astype(np.int64)
                arrays["sparse"][rows, sparse_j[col]] = cur
            else:
                j, m = multi[col]
                mh = arrays["multi_hot"]
                assert mh is not None
                codes, uniques = factorize_multi(df[col].iloc[rows].reset_index(drop=True))
                trows, tokens = explode_tokens(uniques, m.delimiter)
                ids = tokens.map(vmap).to_numpy(dtype=np.float64, na_value=np.nan)
                ids = np.where(np.isnan(ids), OOV_ID, ids).astype(np.int64)
                pos = positions(trows)
                keep = pos < encoder.max_lens[col]
                table = np.full((len(uniques) + 1, mh.shape[2]), OOV_ID, dtype=np.int64)
                table[trows[keep], pos[keep]] = ids[keep]
                grown = table[codes]
                cur = mh[rows, j, :]
                hit = (cur == OOV_ID) & (grown != OOV_ID)
                cur[hit] = grown[hit]
                mh[rows, j, :] = cur


def apply_records(
    encoder: FeatureEncoder, records: Sequence[Mapping[Any, Any]], arrays: EncodedArrays
) -> None:
    """:func:`apply_frame` for raw records (``encode_records``' last step)."""
    from mdlora.formats.keys import canonical_value, cell_tokens

    sparse_j = {c: j for j, c in enumerate(encoder.sparse_columns)}
    multi = {m.name: (j, m) for j, m in enumerate(encoder.multi_hot_columns)}
    for div_j, dom_id, lookup in encoder.grown_lookups():
        rows = np.flatnonzero(arrays["domains"][:, div_j] == dom_id).tolist()
        for col, vmap in lookup.maps.items():
            if not vmap or not rows:
                continue
            if col in sparse_j:
                j = sparse_j[col]
                for i in rows:
                    if arrays["sparse"][i, j] == OOV_ID:
                        key = canonical_value(records[i].get(col))
                        if key is not None and key in vmap:
                            arrays["sparse"][i, j] = vmap[key]
                continue
            j, m = multi[col]
            mh = arrays["multi_hot"]
            assert mh is not None
            limit = encoder.max_lens[col]
            for i in rows:
                for k, key in enumerate(cell_tokens(records[i].get(col), m.delimiter, limit)):
                    if mh[i, j, k] == OOV_ID and key in vmap:
                        mh[i, j, k] = vmap[key]
