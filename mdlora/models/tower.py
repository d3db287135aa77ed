"""The DNN tower, the part of every backbone that domain adapters act on.

Layer ``l`` computes ``act(norm(dropout(x W + b) + delta(x)))`` where ``delta`` is the routed
adapter change (MLoRA / MoE-MLoRA bank, or MultiLoRA's LoRA sets, fused or single) and
``norm`` is nothing, a shared batch norm, or MultiLoRA's per-domain norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import cast

from torch import Tensor, nn

from mdlora.models import grouped
from mdlora.models.fusion import FusionAttention
from mdlora.models.layers import Dropout
from mdlora.models.lora import AdapterBank, InferenceBank, SegmentPlan, Segments
from mdlora.models.norm import DomainBatchNorm

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass
class Route:
    """How one batch is routed through the tower's adapters.

    ``index``/``weights``: hard expert index ``[B]`` or soft gate ``[B, E]`` for the primary
    bank (MLoRA, MoE). ``banks``: inference banks per layer (folded), replacing ``index``'s
    lookup into the trainable bank. ``lora``: MultiLoRA division name -> domain index ``[B]``
    for the LoRA sets to apply; ``norm``: ``(norm set name, index)`` for domain norms;
    ``fuse``: whether the two LoRA sets are fused by attention.
    """

    index: Tensor | None = None
    weights: Tensor | None = None
    banks: list[InferenceBank] | None = None
    lora: dict[str, Tensor] = field(default_factory=dict)
    norm: tuple[str, Tensor] | None = None
    fuse: bool = False


class AdaptedTower(nn.Module):
    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...],
        dropout: float = 0.0,
        activation: str = "relu",
        norm: str = "none",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")
        if norm not in ("none", "batch"):
            raise ValueError("tower norm must be 'none' or 'batch'")
        dims = [in_dim, *hidden]
        self.dims = dims
        linears = [nn.Linear(i, o) for i, o in pairwise(dims)]
        self.linears = nn.ModuleList(linears)
        self.acts = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden)
        self.norms = nn.ModuleList(nn.BatchNorm1d(o) for o in hidden) if norm == "batch" else None
        self.dropout = Dropout(dropout)
        for lin in linears:
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        # Adapter slots, filled by the model for its method.
        self.banks: nn.ModuleList | None = None  # primary bank per layer (MLoRA / MoE)
        self.lora_sets = nn.ModuleDict()  # MultiLoRA: division -> bank per layer
        self.domain_norms = nn.ModuleDict()  # norm set name -> DomainBatchNorm per layer
        self.fusions: nn.ModuleList | None = None

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    # Typed views of the adapter slots (``nn.ModuleList`` / ``nn.ModuleDict`` items are typed
    # as plain ``nn.Module``); each returns the same module objects, one per tower layer.
    def primary_banks(self) -> list[AdapterBank]:
        """The primary banks (MLoRA / MoE), one per layer; empty when there are none."""
        if self.banks is None:
            return []
        return [cast(AdapterBank, bank) for bank in self.banks]

    def lora_banks(self, division: str) -> list[AdapterBank]:
        """MultiLoRA: the LoRA set of ``division``, one bank per layer."""
        return [cast(AdapterBank, bank) for bank in self._slot(self.lora_sets, division)]

    def norm_layers(self, name: str) -> list[DomainBatchNorm]:
        """The domain norm set ``name`` (``div:<division>`` or ``cell``), one per layer."""
        return [cast(DomainBatchNorm, norm) for norm in self._slot(self.domain_norms, name)]

    @staticmethod
    def _slot(slots: nn.ModuleDict, name: str) -> nn.ModuleList:
        return cast(nn.ModuleList, slots[name])

    def forward(self, x: Tensor, route: Route | None = None) -> Tensor:
        banks = route.banks if route is not None else None
        if banks is not None and not self.training and all(b.segmented(x) for b in banks):
            return self._segmented(x, cast(Route, route), banks)
        segments: Segments | None = None
        plan: SegmentPlan | None = None
        for i, lin in enumerate(self.linears):
            merged = None
            if banks is not None and not self.training and banks[i].segmented(x):
                assert route is not None and route.index is not None
                plan = plan or SegmentPlan(route.index, banks[i].a.shape[0])
                merged = banks[i].segment_forward(x, plan)
            elif (
                route is not None and route.banks is not None and route.banks[i].merge_limit
                and x.device.type == "cpu"
            ):  # fmt: skip
                # which domains a batch holds is read on the host: off the CPU that is a
                # device sync per call, so there the strategy routes the batch as it is
                assert route.index is not None and not route.lora and route.norm is None
                segments = segments or Segments(route.index)
                merged = route.banks[i].merged_forward(x, segments)
            if merged is not None:  # inference: the shared layer and the adapter in one GEMM
                z = merged
            else:
                z = self.dropout(lin(x))
                if route is not None:
                    z = self._adapt(i, x, z, route)
            if self.norms is not None:
                z = self.norms[i](z)
            x = self.acts[i](z)
        return x

    def _segmented(self, x: Tensor, route: Route, banks: list[InferenceBank]) -> Tensor:
        """Every layer as its merged per-domain GEMM over one :class:`SegmentPlan` layout:
        scattered once in, gathered once out (eval mode: dropout is the identity, and the
        shared norm and the activation act row by row, so padding rows affect nothing)."""
        assert route.index is not None and not route.lora and route.norm is None
        plan = SegmentPlan(route.index, banks[0].a.shape[0])
        if grouped.available(x):
            out = self._grouped(x, plan, banks)
            if out is not None and plan.block not in grouped.VERIFIED:
                # the first kernel result of the process per block size (a compiled variant
                # each) is checked against the eager ops on their own layout; a mismatch
                # turns the kernels off (grouped.verify)
                eager = SegmentPlan(route.index, banks[0].a.shape[0], plan.block, False)
                want = self._eager(x, eager, banks)
                return out if grouped.verify(out, want, plan.block) else want
            if out is not None:
                return out
        return self._eager(x, plan, banks)

    def _eager(self, x: Tensor, plan: SegmentPlan, banks: list[InferenceBank]) -> Tensor:
        h = plan.scatter(x)
        for i, bank in enumerate(banks):
            assert bank.merged_w is not None and bank.merged_b is not None
            z = plan.linear(h, bank.merged_w, bank.merged_b)
            if self.norms is not None:
                z = self.norms[i](z)
            h = self.acts[i](z)
        return plan.gather(h)

    def _grouped(
        self, x: Tensor, plan: SegmentPlan, banks: list[InferenceBank]
    ) -> Tensor | None:
        """:meth:`_segmented` with the grouped kernel (``mdlora.models.grouped``): the first
        layer reads the batch's rows in place, the last writes them back, ReLU in the kernel
        where no norm sits between a layer and its activation. None when a kernel cannot run
        (the caller then takes the eager path from ``x``)."""
        h, last = x, len(banks) - 1
        for i, bank in enumerate(banks):
            assert bank.merged_w is not None and bank.merged_b is not None
            relu = self.norms is None and type(self.acts[i]) is nn.ReLU
            z = grouped.grouped_linear(
                h, bank.merged_w, bank.merged_b, plan,
                gather_in=i == 0, scatter_out=i == last, relu=relu,
            )  # fmt: skip
            if z is None:
                return None
            if self.norms is not None:
                z = self.norms[i](z)
            h = z if relu else self.acts[i](z)
        return h

    def _adapt(self, i: int, x: Tensor, z: Tensor, route: Route) -> Tensor:
        if route.banks is not None:
            assert route.index is not None
            z = route.banks[i].apply(z, x, route.index)
        elif route.index is not None or route.weights is not None:
            assert self.banks is not None
            z = z + self.banks[i](x, index=route.index, weights=route.weights)
        if route.lora:
            deltas = [
                self._slot(self.lora_sets, name)[i](x, index=idx)
                for name, idx in route.lora.items()
            ]
            if route.fuse:
                assert self.fusions is not None and len(deltas) == 2
                z = z + self.fusions[i](z, deltas[0], deltas[1])
            else:
                for d in deltas:
                    z = z + d
        if route.norm is not None:
            name, idx = route.norm
            z = self._slot(self.domain_norms, name)[i](z, idx)
        return z

    def add_banks(
        self, num_experts: int, ranks: list[int], row_scale: bool = False
    ) -> nn.ModuleList:
        return nn.ModuleList(
            AdapterBank(num_experts, i, o, r, row_scale)
            for i, o, r in zip(self.dims[:-1], self.dims[1:], ranks, strict=False)
        )

    def add_domain_norms(self, num_domains: int) -> nn.ModuleList:
        return nn.ModuleList(DomainBatchNorm(num_domains, o) for o in self.dims[1:])

    def add_fusions(self, rank: int, mode: str) -> nn.ModuleList:
        return nn.ModuleList(FusionAttention(o, rank, mode) for o in self.dims[1:])
