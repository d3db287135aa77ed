"""Embedding rows grown for a domain added after training (its own users, items, ...).

A domain added later usually brings ids the export never saw: every one of them maps to the
out-of-vocabulary row, so all of the domain's rows look alike to the model and no adapter can
tell them apart. Growing gives those ids rows of their own, past the fields' vocabularies:

* The tables keep their first ``base_rows`` rows untouched; grown rows are appended after
  them in one region per domain, in the order the domains were grown. An id of a field past
  its vocabulary reaches ``id + field offset``, a row in that region (the encoder assigns such
  ids: ``mdlora.formats.grown``), so the forward pass is unchanged.
* Both tables that take ids grow together: the field embedding and, for backbones with a wide
  part, its first-order weights (``linear``).
* Nothing is written in place: every change builds new tables (``FieldEmbedding.with_rows``),
  so a copy-on-write model snapshot that shares the old ones is never changed.

``model.grown`` maps ``(division, domain)`` to its number of rows, in region order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlora.models.model import MultiDomainModel

EMBEDDING_ROWS = "embedding.rows"
LINEAR_ROWS = "linear.rows"

DomainKey = tuple[str, str]


def grown_regions(model: MultiDomainModel) -> dict[DomainKey, tuple[int, int]]:
    """``(division, domain) -> (first row, number of rows)`` of every grown region."""
    out = {}
    start = model.embedding.base_rows
    for key, n in model.grown.items():
        out[key] = (start, n)
        start += n
    return out


def domain_rows(model: MultiDomainModel, division: str, domain: str) -> dict[str, Tensor]:
    """The grown rows of one domain by tensor name (empty when it has none)."""
    region = grown_regions(model).get((division, domain))
    if region is None:
        return {}
    start, n = region
    out = {EMBEDDING_ROWS: model.embedding.weight[start : start + n]}
    if model.linear is not None:
        out[LINEAR_ROWS] = model.linear.weight[start : start + n]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def rows_signature(
    model: MultiDomainModel, n: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of ``n`` grown rows for this model."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        EMBEDDING_ROWS: ((n, model.embedding.dim), model.embedding.weight.dtype)
    }
    if model.linear is not None:
        out[LINEAR_ROWS] = ((n, 1), model.linear.weight.dtype)
    return out


@torch.no_grad()
def set_domain_rows(
    model: MultiDomainModel, division: str, domain: str, tensors: dict[str, Tensor]
) -> int:
    """Give ``division/domain`` exactly these grown rows (replacing any it had); first row.

    ``tensors``: ``embedding.rows`` ``[n, dim]`` and, when the model has a wide part,
    ``linear.rows`` ``[n, 1]`` (as :func:`domain_rows` returns them). ``n = 0`` removes them.
    """
    emb = tensors.get(EMBEDDING_ROWS)
    n = 0 if emb is None else int(emb.shape[0])
    want = rows_signature(model, n)
    for name, (shape, _dtype) in want.items():
        got = tensors.get(name)
        if got is None and n:
            raise ValueError(f"grown rows of {division}/{domain}: tensor {name!r} is missing")
        if got is not None and tuple(got.shape) != shape:
            raise ValueError(
                f"grown rows of {division}/{domain}: tensor {name!r} has shape "
                f"{tuple(got.shape)}, expected {shape}"
            )
    key = (division, domain)
    regions = grown_regions(model)
    tables = [("embedding", EMBEDDING_ROWS)]
    if model.linear is not None:
        tables.append(("linear", LINEAR_ROWS))
    for attr, name in tables:
        layer = getattr(model, attr)
        w = layer.weight
        parts = [w[: layer.base_rows]]
        for k, (start, count) in regions.items():
            if k != key:
                parts.append(w[start : start + count])
        if n:
            parts.append(tensors[name].to(device=w.device, dtype=w.dtype))
        setattr(model, attr, layer.with_rows(torch.cat(parts, 0)))
    grown = {k: c for k, c in model.grown.items() if k != key}
    if n:
        grown[key] = n
    model.grown = grown
    return grown_regions(model)[key][0] if n else -1


@torch.no_grad()
def grow_domain_rows(model: MultiDomainModel, division: str, domain: str, fields: list[int]) -> int:
    """Grow one row per entry of ``fields`` (the embedded field each new id belongs to) for
    ``division/domain``; returns the first new row.

    A new row starts as a copy of its field's out-of-vocabulary row: before training, the
    domain scores exactly as it did with its ids unknown.
    """
    if (division, domain) in model.grown:
        raise ValueError(f"{division}/{domain} already has grown rows")
    index = torch.tensor(
        [model.embedding.oov_rows()[f] for f in fields], dtype=torch.long,
        device=model.embedding.weight.device,
    )  # fmt: skip
    tensors = {EMBEDDING_ROWS: model.embedding.weight[index].clone()}
    if model.linear is not None:
        tensors[LINEAR_ROWS] = model.linear.weight[index].clone()
    return set_domain_rows(model, division, domain, tensors)
