"""Encoded numpy arrays -> :class:`mdlora.models.features.EncodedBatch` batches, fast.

Batches are cut from a (shuffled) index permutation and gathered with one numpy fancy-index per
array -- never one ``__getitem__`` per row. :func:`iter_batches` is the main entry point;
:class:`ArrayDataset` + :func:`make_loader` wrap the same thing for code that wants a torch
``DataLoader``.

Sharding follows ``torch.utils.data.DistributedSampler`` exactly (same permutation for the same
``seed + epoch``, padded by wrapping around so every rank gets the same number of rows, then
``indices[rank::world_size]``), so a DDP run sees the same data as with the stock sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from mdlora.models.features import EncodedBatch

__all__ = [
    "ArrayDataset",
    "batch_from_arrays",
    "concat_arrays",
    "iter_batches",
    "make_loader",
    "num_batches",
    "shard_indices",
]

_KEYS = ("sparse", "multi_hot", "dense", "domains", "labels")


def _n_rows(arrays: Mapping[str, Any]) -> int:
    return int(np.asarray(arrays["domains"]).shape[0])


def shard_indices(
    n: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> np.ndarray:
    """This rank's row indices, identical to ``list(DistributedSampler(...))``.

    With ``world_size == 1`` and ``drop_last=False`` this is simply a permutation of
    ``range(n)`` (or ``range(n)`` itself without ``shuffle``). ``drop_last`` here is the
    sampler's: drop the tail instead of padding to a multiple of ``world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g).numpy().astype(np.int64)
    else:
        indices = np.arange(n, dtype=np.int64)
    if world_size == 1:
        return indices
    if drop_last and n % world_size != 0:
        num_samples = math.ceil((n - world_size) / world_size)
    else:
        num_samples = math.ceil(n / world_size)
    total = num_samples * world_size
    if not drop_last:
        pad = total - n
        if pad > 0:
            if pad <= n:
                indices = np.concatenate([indices, indices[:pad]])
            else:
                reps = math.ceil(pad / n)
                indices = np.concatenate([indices, np.tile(indices, reps)[:pad]])
    else:
        indices = indices[:total]
    return indices[rank:total:world_size]


def batch_from_arrays(arrays: Mapping[str, Any], idx: np.ndarray | slice) -> EncodedBatch:
    """One :class:`EncodedBatch` holding rows ``idx`` of ``arrays`` (labels when present)."""
    mh = arrays.get("multi_hot")
    lab = arrays.get("labels")
    return EncodedBatch.from_arrays(
        arrays["sparse"][idx], arrays["dense"][idx], arrays["domains"][idx],
        None if mh is None else mh[idx], None if lab is None else lab[idx],
    )  # fmt: skip


def num_batches(n: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
    """How many batches :func:`iter_batches` yields per rank for ``n`` rows."""
    per_rank = n if world_size == 1 else math.ceil(n / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def iter_batches(
    arrays: Mapping[str, Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    rows: np.ndarray | None = None,
) -> Iterator[EncodedBatch]:
    """Yield :class:`EncodedBatch` batches of ``arrays`` (a ``LabeledArrays``/``EncodedArrays``).

    Args:
        shuffle: permute rows, seeded by ``seed + epoch`` (pass the epoch number to get a new
            order each epoch, as with ``DistributedSampler.set_epoch``).
        rank, world_size: shard like ``DistributedSampler`` (padded, equal batch counts).
        drop_last: drop this rank's final incomplete batch.
        rows: optional subset of row indices to iterate over (e.g. one domain's rows); the
            shuffle/shard logic then applies to that subset.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _n_rows(arrays) if rows is None else int(rows.shape[0])
    idx = shard_indices(
        n, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size
    )
    if rows is not None:
        idx = np.asarray(rows, dtype=np.int64)[idx]
    contiguous = rows is None and not shuffle and world_size == 1
    for start in range(0, idx.shape[0], batch_size):
        stop = min(start + batch_size, idx.shape[0])
        if drop_last and stop - start < batch_size:
            break
        sel: np.ndarray | slice = slice(start, stop) if contiguous else idx[start:stop]
        yield batch_from_arrays(arrays, sel)


def concat_arrays(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate encoded chunks (e.g. from ``iter_parquet_batches``) row-wise."""
    if not parts:
        raise ValueError("nothing to concatenate")
    out: dict[str, Any] = {}
    for key in _KEYS:
        vals = [p.get(key) for p in parts]
        if all(v is None for v in vals):
            if key in parts[0]:
                out[key] = None
            continue
        if any(v is None for v in vals):
            raise ValueError(f"{key!r} is present in some chunks and missing in others")
        out[key] = np.concatenate([np.asarray(v) for v in vals], axis=0)
    return out


class ArrayDataset(Dataset[EncodedBatch]):
    """A map-style dataset over encoded arrays whose items are whole batches.

    ``ds[i]`` is a one-row batch, ``ds[[i, j, ...]]`` (or ``ds.__getitems__``) a batch of
    those rows, gathered in one go -- use it with a ``BatchSampler`` (see :func:`make_loader`).
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        self.arrays = arrays
        self._n = _n_rows(arrays)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> EncodedBatch:
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        return batch_from_arrays(self.arrays, idx)

    def __getitems__(self, indices: Sequence[int]) -> EncodedBatch:
        return self[np.asarray(indices, dtype=np.int64)]


def _identity(batch: Any) -> Any:
    return batch


def make_loader(
    arrays: Mapping[str, Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[EncodedBatch]:
    """A ``DataLoader`` yielding :class:`EncodedBatch` (one gather per batch).

    With ``world_size > 1`` it uses a ``DistributedSampler`` (call
    ``loader.batch_sampler.sampler.set_epoch(epoch)`` each epoch); otherwise a
    random/sequential sampler seeded with ``seed``.
    """
    ds = ArrayDataset(arrays)
    sampler: Any
    if world_size > 1:
        sampler = DistributedSampler(
            ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
    elif shuffle:
        g = torch.Generator()
        g.manual_seed(seed)
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = SequentialSampler(ds)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(
        ds,
        sampler=batches,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
