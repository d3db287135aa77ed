"""Feature specification and the embedding layer every backbone starts with.

Id convention, shared by the encoder in ``mdlora/training/`` and by the service: index 0 of every
categorical vocabulary is the out-of-vocabulary id, so an unseen value never fails and never
aliases a real one. Multi-hot fields are padded with -1, which the pooling masks out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

OOV_ID = 0
PAD_ID = -1


@dataclass(frozen=True)
class SparseField:
    """A single-valued categorical field; ``vocab_size`` includes the OOV id 0."""

    name: str
    vocab_size: int


@dataclass(frozen=True)
class MultiHotField:
    """A set-valued categorical field, mean-pooled; ``max_len`` ids per sample, padded with -1."""

    name: str
    vocab_size: int
    max_len: int


@dataclass(frozen=True)
class DenseField:
    """A real-valued field (already scaled by the encoder)."""

    name: str


@dataclass(frozen=True)
class FeatureSpec:
    """The model's input layout: which fields exist, in what order, with what vocabularies."""

    sparse: tuple[SparseField, ...] = ()
    multi_hot: tuple[MultiHotField, ...] = ()
    dense: tuple[DenseField, ...] = ()

    def __post_init__(self) -> None:
        fields: tuple[SparseField | MultiHotField | DenseField, ...] = (
            *self.sparse,
            *self.multi_hot,
            *self.dense,
        )
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        if not self.sparse and not self.multi_hot:
            raise ValueError("a feature spec needs at least one sparse or multi-hot field")
        embedded: tuple[SparseField | MultiHotField, ...] = (*self.sparse, *self.multi_hot)
        for f in embedded:
            if f.vocab_size < 2:
                raise ValueError(f"field {f.name!r}: vocab_size must be >= 2 (OOV + one value)")
        for m in self.multi_hot:
            if m.max_len < 1:
                raise ValueError(f"field {m.name!r}: max_len must be >= 1")

    @property
    def num_embedded(self) -> int:
        """Number of fields that get an embedding vector (sparse + multi-hot)."""
        return len(self.sparse) + len(self.multi_hot)

    @property
    def max_multi_hot_len(self) -> int:
        return max((m.max_len for m in self.multi_hot), default=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(
            sparse=tuple(SparseField(**f) for f in d.get("sparse", [])),
            multi_hot=tuple(MultiHotField(**f) for f in d.get("multi_hot", [])),
            dense=tuple(DenseField(**f) for f in d.get("dense", [])),
        )


@dataclass
class EncodedBatch:
    """Model inputs for one batch, all already encoded to ids / floats.

    ``domains`` has one column per division (the first is the primary division).
    """

    sparse: Tensor  # [B, n_sparse] int64
    dense: Tensor  # [B, n_dense] float32
    domains: Tensor  # [B, n_divisions] int64
    multi_hot: Tensor | None = None  # [B, n_multi_hot, L] int64, -1 padded
    labels: Tensor | None = field(default=None)  # [B] float32

    @classmethod
    def from_arrays(
        cls,
        sparse: Any,
        dense: Any,
        domains: Any,
        multi_hot: Any = None,
        labels: Any = None,
        *,
        device: torch.device | str | None = None,
    ) -> EncodedBatch:
        """The one numpy-to-batch conversion: ids as int64, values and labels as float32.

        Takes what the encoder returns (``EncodedBatch.from_arrays(**encoder.transform(df))``)
        or tensors; copies only where a dtype or memory layout has to change.
        """

        def tensor(x: Any, dtype: torch.dtype) -> Tensor:
            if isinstance(x, Tensor):
                t = x.to(dtype)
            else:
                t = torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)
            return t if device is None else t.to(device, non_blocking=True)

        return cls(
            sparse=tensor(sparse, torch.long),
            dense=tensor(dense, torch.float32),
            domains=tensor(domains, torch.long),
            multi_hot=None if multi_hot is None else tensor(multi_hot, torch.long),
            labels=None if labels is None else tensor(labels, torch.float32),
        )

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(
            sparse=self.sparse.to(device, non_blocking=True),
            dense=self.dense.to(device, non_blocking=True),
            domains=self.domains.to(device, non_blocking=True),
            multi_hot=None if self.multi_hot is None else self.multi_hot.to(device),
            labels=None if self.labels is None else self.labels.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return int(self.domains.shape[0])

    def select(self, index: Tensor) -> EncodedBatch:
        """Rows ``index`` of this batch (used to score one domain's samples on their own)."""
        return EncodedBatch(
            sparse=self.sparse[index],
            dense=self.dense[index],
            domains=self.domains[index],
            multi_hot=None if self.multi_hot is None else self.multi_hot[index],
            labels=None if self.labels is None else self.labels[index],
        )


class FieldEmbedding(nn.Module):
    """All fields' embeddings in one table (one lookup per batch, not one per field).

    Returns ``[B, F, k]`` with the sparse fields first, then the mean-pooled multi-hot fields.
    ``dim=1`` gives the first-order (wide / linear) weights of the same fields.
    """

    sparse_offsets: Tensor  # buffer [n_sparse]: each sparse field's first row in ``weight``
    multi_hot_offsets: Tensor  # buffer [n_multi_hot]: same for the multi-hot fields

    def __init__(self, spec: FeatureSpec, dim: int, init_std: float = 1e-4) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        sizes = [f.vocab_size for f in spec.sparse] + [m.vocab_size for m in spec.multi_hot]
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer(
            "sparse_offsets", offsets[: len(spec.sparse)].clone(), persistent=False
        )
        self.register_buffer(
            "multi_hot_offsets", offsets[len(spec.sparse) :].clone(), persistent=False
        )
        self.weight = nn.Parameter(torch.randn(sum(sizes), dim) * init_std)
        #: rows of the fields' own vocabularies; rows past it are grown for added domains
        self.base_rows = int(sum(sizes))

    def field_offsets(self) -> list[int]:
        """First row of every embedded field (sparse fields, then multi-hot), in spec order."""
        return [*self.sparse_offsets.tolist(), *self.multi_hot_offsets.tolist()]

    def oov_rows(self) -> list[int]:
        """The out-of-vocabulary row of every embedded field (``OOV_ID`` at its offset)."""
        return [off + OOV_ID for off in self.field_offsets()]

    def with_rows(self, weight: Tensor) -> FieldEmbedding:
        """A copy of this layer (same spec and offsets) whose table is ``weight``.

        ``weight`` must keep the first ``base_rows`` rows' layout; rows past them are grown
        rows that ids past a field's vocabulary reach (``id + offset``). A new object, so
        snapshots that share the old one are untouched.
        """
        if weight.dim() != 2 or weight.shape[1] != self.dim or weight.shape[0] < self.base_rows:
            raise ValueError(
                f"an embedding table of shape {tuple(weight.shape)} does not fit: expected "
                f"[>= {self.base_rows}, {self.dim}]"
            )
        from mdlora.models.layers import shallow_module

        clone = shallow_module(self)
        clone.weight = nn.Parameter(weight.detach(), requires_grad=self.weight.requires_grad)
        return clone

    def forward(self, sparse: Tensor, multi_hot: Tensor | None = None) -> Tensor:
        parts = []
        if sparse.shape[1]:
            parts.append(nn.functional.embedding(sparse + self.sparse_offsets, self.weight))
        if self.spec.multi_hot:
            if multi_hot is None:
                raise ValueError(
                    "this model has multi-hot fields but no multi_hot tensor was given"
                )
            mask = multi_hot >= 0  # [B, M, L]
            ids = torch.where(mask, multi_hot, 0) + self.multi_hot_offsets[None, :, None]
            emb = nn.functional.embedding(ids, self.weight) * mask.unsqueeze(-1)
            count = mask.sum(-1, keepdim=True).clamp(min=1).to(emb.dtype)
            parts.append(emb.sum(2) / count)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
