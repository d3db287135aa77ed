"""Row sharding for distributed training.

Sharding follows ``torch.utils.data.DistributedSampler`` exactly (same permutation for the same
``seed + epoch``, padded by wrapping around so every rank gets the same number of rows, then
``indices[rank::world_size]``), so a DDP run sees the same data as with the stock sampler. The
training loop indexes whole device-resident splits with these indices (no DataLoader).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["shard_indices"]


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
