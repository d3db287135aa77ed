"""Low-rank adapter banks: all experts' (A, B, c[, s]) of one tower layer in stacked tensors.

One bank serves the three methods:

* MLoRA: one expert per domain, routed by the domain index (a one-hot gate);
* MoE-MLoRA: k experts per domain, mixed by a soft gate ``g`` of shape ``[B, E]``;
* MultiLoRA: as MLoRA but with a row scale ``s`` (``delta = s * (x A B) + e``).

For an expert ``e`` the change to the layer's pre-activation is ``s_e * (x A_e B_e) + c_e``
(``s_e = 1`` without a row scale). Routing a mixed-domain batch never loops over domains:

* hard routing (one expert per sample) uses ``embedding_bag`` with per-sample weights twice:
  ``u = sum_k x_k A[e, k, :]`` and ``delta = sum_j u_j B[e, j, :] + c_e``. Each sample reads only
  its own expert's rows, so the cost is the low-rank FLOPs and nothing else, the result of a
  sample does not depend on the other experts in the bank (adding one is bit-exact for the
  others), and autograd handles it as is;
* soft routing (a gate over all experts) folds the mixture into two matmuls over the stacked
  experts, ``((x @ A_cat) * g_r) @ B_cat + g @ C`` (ARCHITECTURE.md, property 2);
* ``fused_down`` (inference, hard routing) computes ``x @ A_cat`` as one GEMM and gathers each
  sample's ``r`` columns; it pays when ``E * r`` is small next to the layer width;
* ``kernel`` (inference, CPU) adds ``(x A[d]) B[d] + c[d]`` into the layer output in one
  fused parallel loop (``mdlora/models/kernels.py``, numba); it falls back to ``bag`` where it
  cannot run;
* ``mixture`` (inference) keeps the experts unfolded and applies each sample's gate row as
  in training, ``((x @ A_cat) * g_r) @ B_cat + g @ C``: two GEMMs whose width is every
  expert's rank, so it pays for MoE-MLoRA when ``E * r`` is small next to the layer; its
  GEMM shapes change when experts are added, so growth is exact to rounding, not to the bit;
* ``gather`` materialises each sample's ``A[e]``, ``B[e]`` and uses batched matmuls: slow on
  CPU, but made of plain Gather/MatMul operators, so it is what the ONNX export uses;
* ``segment`` (inference, the CUDA default: ``merged`` on a CUDA model runs this way) takes
  the same merged per-domain layers but lays the batch out in blocks of one domain each
  (:class:`SegmentPlan`, sized without a host sync) and runs every layer as ONE batched GEMM
  (``baddbmm`` over the blocks' gathered weights), keeping that layout through the whole
  tower: a fixed number of kernel launches per layer whatever the domains present, where a
  GPU is launch-bound (PERFORMANCE.md); padding rows are zeros and are dropped at the end.
  On CUDA with Triton the layout is two kernels (no sort) and each layer one grouped
  kernel that reads every block's weights in place and the batch's rows through the layout
  (``mdlora.models.grouped``);
* ``merged`` (inference) keeps, per domain, the shared layer with its adapter merged in,
  ``W + A'_d B'_d`` and ``b + c_d``, and scores a batch as one GEMM per domain present
  (sorted segments); with more domains present than ``merge_limit`` it falls back to
  ``kernel``. A single-domain batch (one ``/predict`` request) then costs exactly the bare
  backbone, and a MoE-MLoRA layer whose folded adapters are nearly full rank costs one
  GEMM per domain instead of a dense per-sample update.

At inference the MoE gate depends only on the domain, so :func:`fold_experts` turns it into
one effective adapter per domain and the hard path applies (``InferenceBank``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdlora.models import grouped
from mdlora.models.kernels import lowrank_add_

# Hard routing with gradients uses the one-hot mixture up to this many stacked columns (E*r).
DENSE_TRAINING_WIDTH = 256
ROUTING_STRATEGIES = ("bag", "fused_down", "gather", "kernel", "mixture", "merged", "segment")
#: strategies whose layers run as the merged per-domain GEMMs of a :class:`SegmentPlan` on CUDA
SEGMENTED_ON_CUDA = ("merged", "segment")
#: on CUDA, ``gather`` stands in for unmerged layers while its per-sample A[d], B[d] copies
#: (batch x rank x (in + out) floats) stay under this many elements (1 GiB of float32)
GATHER_MAX_ELEMENTS = 1 << 28
#: ``merged`` keeps one merged weight per domain only while a layer's copies fit in this
MERGED_MAX_BYTES = 128 << 20


def rank_from_alpha(out_dim: int, alpha: float) -> int:
    """MLoRA's rank rule ``r = max(floor(out / alpha), 1)``."""
    return max(math.floor(out_dim / alpha), 1)


class AdapterBank(nn.Module):
    """Trainable stacked low-rank experts for one ``in_dim -> out_dim`` layer.

    ``A``: ``[E, in, r]`` Glorot-normal, ``B``: ``[E, r, out]`` zeros, ``bias``: ``[E, out]``
    zeros, so a fresh bank leaves the layer unchanged. With ``row_scale`` (MultiLoRA) ``scale``
    is ``[E, out]`` random Gaussian.
    """

    def __init__(
        self, num_experts: int, in_dim: int, out_dim: int, rank: int, row_scale: bool = False
    ) -> None:
        super().__init__()
        if num_experts < 1 or rank < 1:
            raise ValueError(f"need num_experts >= 1 and rank >= 1, got {num_experts}, {rank}")
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.A = nn.Parameter(self._init_a(num_experts))
        self.B = nn.Parameter(torch.zeros(num_experts, rank, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_dim))
        self.scale: nn.Parameter | None = (
            nn.Parameter(torch.randn(num_experts, out_dim)) if row_scale else None
        )

    def _init_a(self, n: int) -> Tensor:
        a = torch.empty(n, self.in_dim, self.rank)
        std = math.sqrt(2.0 / (self.in_dim + self.rank))
        return a.normal_(0.0, std)

    @property
    def num_experts(self) -> int:
        return int(self.A.shape[0])

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_dim}, out={self.out_dim}, "
            f"rank={self.rank}, row_scale={self.scale is not None}"
        )

    def scaled_b(self) -> Tensor:
        """B with the row scale folded in (``s * (u B) == u (B * s)``)."""
        return self.B if self.scale is None else self.B * self.scale.unsqueeze(1)

    def forward(
        self, x: Tensor, index: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """The adapter change ``[B, out]`` for inputs ``x`` ``[B, in]``.

        Give exactly one of ``index`` (``[B]`` expert per sample) or ``weights`` (``[B, E]``).
        """
        if (index is None) == (weights is None):
            raise ValueError("give exactly one of index (hard routing) or weights (soft gate)")
        if index is not None:
            if torch.onnx.is_in_onnx_export():
                # embedding_bag exports as a per-sample Loop; gathers are plain operators.
                return lowrank_gather(x, self.A, self.scaled_b(), self.bias, index)
            if torch.is_grad_enabled() and self.num_experts * self.rank <= DENSE_TRAINING_WIDTH:
                # embedding_bag's backward is slow on CPU (sort-based index_add); with few
                # experts the one-hot mixture's two GEMMs train several times faster.
                weights = F.one_hot(index, self.num_experts).to(x.dtype)
            else:
                return lowrank_bag(x, self.A, self.scaled_b(), self.bias, index)
        assert weights is not None
        return lowrank_soft(x, self.A, self.scaled_b(), self.bias, weights)

    @torch.no_grad()
    def grow(self, n: int = 1) -> None:
        """Append ``n`` fresh experts; existing rows are copied unchanged."""
        e, out = self.num_experts, self.out_dim
        self.A = nn.Parameter(torch.cat([self.A.data, self._init_a(n).to(self.A)], 0))
        self.B = nn.Parameter(torch.cat([self.B.data, self.B.new_zeros(n, self.rank, out)], 0))
        self.bias = nn.Parameter(torch.cat([self.bias.data, self.bias.new_zeros(n, out)], 0))
        if self.scale is not None:
            new = torch.randn(n, out).to(self.scale)
            self.scale = nn.Parameter(torch.cat([self.scale.data, new], 0))
        assert self.num_experts == e + n


def _bag_rows(index: Tensor, width: int) -> Tensor:
    """Row ids ``index * width + [0..width)`` of each sample's block in a flattened bank."""
    return index.unsqueeze(1) * width + torch.arange(width, device=index.device)


def lowrank_bag(x: Tensor, a: Tensor, b: Tensor, c: Tensor, index: Tensor) -> Tensor:
    """Hard-routed ``x A[i] B[i] + c[i]`` with two weighted ``embedding_bag`` sums.

    ``a``: ``[E, in, r]``, ``b``: ``[E, r, out]``, ``c``: ``[E, out]``, ``index``: ``[B]``.
    """
    e, in_dim, r = a.shape
    u = F.embedding_bag(
        _bag_rows(index, in_dim), a.reshape(e * in_dim, r), per_sample_weights=x, mode="sum"
    )
    return lowrank_up(u, b, c, index)


def lowrank_up(u: Tensor, b: Tensor, c: Tensor, index: Tensor) -> Tensor:
    """``u B[i] + c[i]`` for per-sample low-rank activations ``u`` ``[B, r]``."""
    e, r, out = b.shape
    rows = torch.cat([_bag_rows(index, r), (index + e * r).unsqueeze(1)], 1)
    table = torch.cat([b.reshape(e * r, out), c], 0)
    weights = torch.cat([u, u.new_ones(u.shape[0], 1)], 1)
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


def lowrank_gather(x: Tensor, a: Tensor, b: Tensor, c: Tensor, index: Tensor) -> Tensor:
    """Hard-routed ``x A[i] B[i] + c[i]`` with gathered per-sample matrices (ONNX-friendly)."""
    u = torch.bmm(x.unsqueeze(1), a[index])
    return torch.bmm(u, b[index]).squeeze(1) + c[index]


def lowrank_soft(x: Tensor, a: Tensor, b: Tensor, c: Tensor, weights: Tensor) -> Tensor:
    """Gate-weighted mixture ``sum_e g_e (x A_e B_e + c_e)`` as two matmuls."""
    e, in_dim, r = a.shape
    u = x @ a.permute(1, 0, 2).reshape(in_dim, e * r)
    u = u * weights.repeat_interleave(r, dim=1)
    return torch.addmm(weights @ c, u, b.reshape(e * r, -1))


class Segments:
    """Which domains a batch holds, computed once per forward for the ``merged`` path."""

    def __init__(self, index: Tensor) -> None:
        self.index = index
        self.single: int | None = None
        self.present: list[int] = []
        self.counts: list[int] = []
        self._order: tuple[Tensor, Tensor] | None = None
        if index.numel() == 0:
            return
        first = index[0]
        if bool((index == first).all()):
            self.single = int(first)
            self.present, self.counts = [self.single], [index.numel()]
            return
        counts = torch.bincount(index)
        present = counts.nonzero().squeeze(1)
        self.present, self.counts = present.tolist(), counts[present].tolist()

    def order_and_inverse(self) -> tuple[Tensor, Tensor]:
        """The permutation sorting the batch by domain, and its inverse."""
        if self._order is None:
            order = torch.argsort(self.index, stable=True)
            self._order = (order, torch.argsort(order))
        return self._order


#: the block sizes :func:`segment_block` chooses from (the grouped kernel compiles per size)
BLOCK_SIZES = (8, 16, 32, 64, 128)


def segment_block(n: int, num_domains: int) -> int:
    """Rows per block of a :class:`SegmentPlan`: a power of two in ``BLOCK_SIZES``, small
    enough that the padding (at most one part-filled block per domain) stays near half the
    batch (``n = 2 * num_domains * b`` rows choose block ``b``)."""
    per = max(n // max(2 * num_domains, 1), 1)
    return max(BLOCK_SIZES[0], min(BLOCK_SIZES[-1], 1 << (per.bit_length() - 1)))


class SegmentPlan:
    """A batch laid out in blocks of ``block`` rows, each block holding one domain's samples.

    ``slot[i]``: the padded row of sample ``i``; ``block_domain[k]``: the domain of block ``k``.
    The number of blocks is the static bound ``ceil(n / block) + D`` (a domain with ``c``
    samples takes ``ceil(c / block)`` blocks), so building the plan needs no host sync, and a
    layer is one ``baddbmm`` whatever the domains present (CUDA-graph capturable). Blocks
    past the last domain's are all padding (domain ``D - 1``, zero rows). On CUDA with Triton
    the kernels of ``mdlora.models.grouped`` build it; a domain's rows then take its slots in
    an order that varies between calls (each row is scored on its own, so no score does).
    """

    def __init__(
        self, index: Tensor, num_domains: int, block: int | None = None, use_kernels: bool = True
    ) -> None:
        n = index.numel()
        self.n = n
        self.block = bm = block or segment_block(n, num_domains)
        self.num_blocks = -(-n // bm) + num_domains
        self._sample_of_slot: Tensor | None = None
        made = grouped.layout(index, num_domains, bm, self.num_blocks) if use_kernels else None
        if made is not None:  # CUDA with Triton: four launches instead of the ops below
            self.slot, self._sample_of_slot, self.block_domain, self.used_blocks = made
            return
        # ids come from the model's own tables (score_batch checks them); clamping keeps a
        # bad id from writing outside the padded buffer
        index = index.clamp(0, num_domains - 1)
        # not bincount: on CUDA it reads the largest id back to the host (a device sync)
        counts = index.new_zeros(num_domains).index_add_(0, index, torch.ones_like(index))
        blocks = (counts + bm - 1) // bm
        ends = blocks.cumsum(0)
        first_slot = (ends - blocks) * bm - (counts.cumsum(0) - counts)  # per domain
        sorted_d, order = torch.sort(index, stable=True)
        rank = torch.arange(n, device=index.device)
        self.slot = torch.empty_like(order).index_copy_(0, order, first_slot[sorted_d] + rank)
        ids = torch.arange(self.num_blocks, device=index.device)
        self.block_domain = torch.searchsorted(ends, ids, right=True).clamp_(max=num_domains - 1)
        self.used_blocks = ends[-1:]  # blocks holding samples (the rest are padding only)

    @property
    def sample_of_slot(self) -> Tensor:
        """``[blocks * block]``: the sample in each padded row, -1 for padding (the grouped
        kernel reads and writes the batch's own rows through it)."""
        if self._sample_of_slot is None:
            n, slot = self.n, self.slot
            out = slot.new_full((self.num_blocks * self.block,), -1)
            self._sample_of_slot = out.index_copy_(0, slot, torch.arange(n, device=slot.device))
        return self._sample_of_slot

    def scatter(self, x: Tensor) -> Tensor:
        """``x`` ``[n, f]`` in the padded layout ``[blocks * block, f]`` (padding rows zero)."""
        out = x.new_zeros(self.num_blocks * self.block, x.shape[1])
        return out.index_copy_(0, self.slot, x)

    def gather(self, xp: Tensor) -> Tensor:
        """The rows of the samples, in the batch's order, from the padded layout."""
        return xp.index_select(0, self.slot)

    def linear(self, xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Per-domain layers ``xp W[d] + b[d]`` on the padded layout: one batched GEMM.

        ``weight``: ``[D, in, out]``, ``bias``: ``[D, out]``.
        """
        w = weight.index_select(0, self.block_domain)
        b = bias.index_select(0, self.block_domain).unsqueeze(1)
        out = torch.baddbmm(b, xp.view(self.num_blocks, self.block, -1), w)
        return out.view(self.num_blocks * self.block, -1)


@dataclass
class InferenceBank:
    """Per-domain effective adapters of one layer, laid out for hard routing at inference.

    ``a``: ``[D, in, R]``, ``b``: ``[D, R, out]`` (row scale folded), ``c``: ``[D, out]``.
    ``strategy`` picks how a mixed batch is routed (see module docstring); ``a_cat`` is the
    ``[in, D*R]`` matrix the ``fused_down`` strategy multiplies by. ``merged_w`` /
    ``merged_b`` (``[D, in, out]`` / ``[D, out]``) are the shared layer with each domain's
    adapter merged in, used by :meth:`merged_forward` for batches with at most
    ``merge_limit`` domains present.
    """

    a: Tensor
    b: Tensor
    c: Tensor
    strategy: str = "bag"
    a_cat: Tensor | None = None
    a_t: Tensor | None = None
    gate: Tensor | None = None  # "mixture": [D, E] gate rows; a, b, c are then the E experts
    merged_w: Tensor | None = None
    merged_b: Tensor | None = None
    merge_limit: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"unknown routing strategy {self.strategy!r}: {ROUTING_STRATEGIES}")
        if self.strategy == "fused_down" and self.a_cat is None:
            d, i, r = self.a.shape
            self.a_cat = self.a.permute(1, 0, 2).reshape(i, d * r).contiguous()
        if self.strategy == "mixture" and self.gate is None:
            raise ValueError("the mixture strategy needs the per-domain gate table")
        if self.strategy in ("kernel", "merged", "segment") and self.a_t is None:
            self.a_t = self.a.transpose(1, 2).contiguous()

    @property
    def rank(self) -> int:
        return int(self.a.shape[2])

    def segmented(self, x: Tensor) -> bool:
        """Whether this layer runs as the merged per-domain GEMMs of a :class:`SegmentPlan`
        (``segment`` anywhere, ``merged`` on CUDA; only with merged weights under the cap)."""
        if self.merged_w is None or self.merged_b is None:
            return False
        return self.strategy == "segment" or (
            self.strategy in SEGMENTED_ON_CUDA and x.device.type == "cuda"
        )

    def segment_forward(self, x: Tensor, plan: SegmentPlan) -> Tensor:
        """The adapted layer's pre-activation through ``plan`` (scatter, one GEMM, gather)."""
        assert self.merged_w is not None and self.merged_b is not None
        return plan.gather(plan.linear(plan.scatter(x), self.merged_w, self.merged_b))

    def merge(self, weight: Tensor, bias: Tensor, limit: int) -> None:
        """Build the merged per-domain layers from the shared ``nn.Linear`` weight and bias.

        Left unmerged (``merge_limit`` 0: the ``kernel`` path always) when the copies would
        take more than ``MERGED_MAX_BYTES``.
        """
        d, in_dim, _ = self.a.shape
        out = self.b.shape[2]
        if limit < 1 or d * in_dim * out * self.a.element_size() > MERGED_MAX_BYTES:
            self.merge_limit = 0
            return
        self.merged_w = (weight.t().unsqueeze(0) + torch.bmm(self.a, self.b)).contiguous()
        self.merged_b = (bias.unsqueeze(0) + self.c).contiguous()
        self.merge_limit = limit

    def merged_forward(self, x: Tensor, segments: Segments) -> Tensor | None:
        """The adapted layer's pre-activation from the merged weights; None when the batch
        has more domains than ``merge_limit`` (the caller then routes by ``strategy``)."""
        w, bias = self.merged_w, self.merged_b
        if w is None or bias is None or x.shape[0] == 0:
            return None
        if segments.single is not None:  # one domain: one GEMM, a plain layer's cost
            return torch.addmm(bias[segments.single], x, w[segments.single])
        if len(segments.present) > self.merge_limit:
            return None
        order, inverse = segments.order_and_inverse()
        xs = x.index_select(0, order)
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for d, n in zip(segments.present, segments.counts, strict=True):
            torch.addmm(bias[d], xs[start : start + n], w[d], out=out[start : start + n])
            start += n
        return out.index_select(0, inverse)

    def apply(self, z: Tensor, x: Tensor, index: Tensor) -> Tensor:
        """``z`` plus the routed change; the ``kernel`` strategy adds in place when it can."""
        if self.strategy in ("kernel", "merged", "segment") and not z.requires_grad:
            assert self.a_t is not None
            if lowrank_add_(z, x, self.a_t, self.b, self.c, index):
                return z
        return z + self.delta(x, index)

    def delta(self, x: Tensor, index: Tensor) -> Tensor:
        if self.strategy == "mixture":
            assert self.gate is not None
            return lowrank_soft(x, self.a, self.b, self.c, self.gate[index])
        if self.strategy in ("merged", "segment") and x.device.type == "cuda":
            # merged weights over the cap: the gathered batched matmuls beat embedding_bag
            # there while the per-sample matrices they materialise stay small (low rank).
            # ``kernel`` keeps embedding_bag on CUDA: its sums run in row order, so zero
            # padding added when a domain grows the bank leaves the others bit-identical,
            # which cuBLAS's matmuls over a wider rank do not promise
            _, in_dim, r = self.a.shape
            if x.shape[0] * r * (in_dim + self.b.shape[2]) <= GATHER_MAX_ELEMENTS:
                return lowrank_gather(x, self.a, self.b, self.c, index)
        if self.strategy in ("bag", "kernel", "merged", "segment"):
            return lowrank_bag(x, self.a, self.b, self.c, index)
        if self.strategy == "gather":
            return lowrank_gather(x, self.a, self.b, self.c, index)
        assert self.a_cat is not None
        r = self.rank
        u = (x @ self.a_cat).gather(1, _bag_rows(index, r))
        return lowrank_up(u, self.b, self.c, index)


def merge_limit(bank: InferenceBank) -> int:
    """How many domains a batch may hold for ``merged`` to use its per-domain GEMMs.

    From benchmarks/bench_routing.py on 2 cores: a GEMM segment costs a fixed ~15-20 us on top
    of its FLOPs. A low-rank adapter adds little to the shared GEMM through the fused kernel,
    so merging pays for single-domain batches only (one ``/predict`` request). Folded MoE
    adapters near full rank (``R (in + out) >= in out / 2``) cost more per sample than the
    shared layer itself, and up to 32 segments are cheaper than that.
    """
    _, in_dim, r = bank.a.shape
    out = bank.b.shape[2]
    return 32 if 2 * r * (in_dim + out) >= in_dim * out else 1


def fold_experts(
    a: Tensor, b: Tensor, c: Tensor, gate: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold a per-domain gate over experts into one effective adapter per domain.

    ``gate``: ``[D, E]`` mixture weights per domain; ``mask``: ``[D, E]`` bool, experts a domain
    may use. Domain ``d`` gets ``A'_d = [A_e]`` and ``B'_d = [g_de B_e]`` over its own experts
    (rank ``E_d * r``), zero-padded to the largest ``E_d``; each domain is folded on its own so
    that adding experts for a new domain leaves the others' effective adapters bit-identical.
    """
    n_dom, n_exp = gate.shape
    _, in_dim, r = a.shape
    out = b.shape[2]
    if mask is None:
        mask = torch.ones(n_dom, n_exp, dtype=torch.bool, device=gate.device)
    width = int(mask.sum(1).max().item()) * r
    full = width > min(in_dim, out)
    if full:
        # The concatenation would be wider than the layer: a dense per-domain update
        # dW_d (rank <= min(in, out)) written as (I, dW_d) or (dW_d, I) is cheaper.
        width = min(in_dim, out)
    fa = a.new_zeros(n_dom, in_dim, width)
    fb = b.new_zeros(n_dom, width, out)
    fc = c.new_zeros(n_dom, out)
    for d in range(n_dom):
        sel = mask[d].nonzero().squeeze(1)
        g = gate[d, sel]
        k = sel.numel() * r
        cat_a = a[sel].permute(1, 0, 2).reshape(in_dim, k)
        cat_b = (b[sel] * g[:, None, None]).reshape(k, out)
        if not full:
            fa[d, :, :k] = cat_a
            fb[d, :k] = cat_b
        elif in_dim <= out:
            fa[d] = torch.eye(in_dim, dtype=a.dtype, device=a.device)
            fb[d] = cat_a @ cat_b
        else:
            fa[d] = cat_a @ cat_b
            fb[d] = torch.eye(out, dtype=b.dtype, device=b.device)
        fc[d] = g @ c[sel]
    return fa, fb, fc
