"""A grouped GEMM for the segmented tower on CUDA: each block's domain weights read in place.

:class:`~mdlora.models.lora.SegmentPlan` lays a mixed-domain batch out in blocks of one domain
each; the eager path then runs a layer as one ``baddbmm`` over ``weight[block_domain]``, which
first copies every block's ``[in, out]`` weight (blocks x in x out floats per layer) and needs
the batch scattered into the padded layout before the tower and gathered back after it. On
an H200 those copies were ~0.2 ms and the layout ~0.4-0.6 ms of the ~0.7 ms the segmented
tower added over the bare backbone (``benchmarks/bench_gpu.py --profile``).

This Triton kernel is Punica's SGMV idea for CTR towers: one launch per layer, a program per
(block tile, output tile) that loads its block's domain id and multiplies by that domain's
merged weight where it lies. The first layer reads the batch's rows through the plan's slot
map (no scatter), the last writes the samples' rows straight back (no gather), blocks past
the last domain's read and write nothing, and ReLU is applied in the epilogue when nothing
sits between the layer and its activation. Accumulation is float32 with IEEE products (no
TF32), so the result equals the eager path to float rounding.

The layout itself (:func:`layout`) is two more kernels instead of ~25 eager ops and a sort:
one counts each domain's rows with atomics, one gives every row a slot in its domain's blocks
(an atomic cursor per domain), finds each block's domain by binary search over the domains'
block ends and marks the padding slots. The order of a domain's rows inside its blocks then
varies from call to call; every row is computed on its own, so no score does.

It runs where Triton 3.x and a CUDA tensor are present, with autograd off
(``MDLORA_GROUPED_KERNEL=0`` turns it off; a kernel that fails to compile or launch, or whose
first result for a block size differs from the eager path's, turns it off for the process,
with a warning, and scoring goes on on the eager path);
``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (how the tests check it without a
GPU). Elsewhere :func:`grouped_linear` returns ``None`` and the caller keeps the eager path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_KERNEL: Any = None
_TRIED = False
#: why the kernels were turned off for this process (a compile or launch failed, or their
#: first result differed from the eager path's), or None
BROKEN: str | None = None
#: the block sizes whose first kernel result in this process was checked against the eager
#: path (Triton compiles a variant per block size, so each is checked once)
VERIFIED: set[int] = set()
#: what callers warmed the kernels up for in this process (the service's warm-up: a device,
#: tower shape and block size compile once, so later snapshots skip them)
WARMED: set[tuple[Any, ...]] = set()


#: ``MDLORA_GROUPED_KERNEL=0`` keeps the eager path on CUDA too (an operator's way out
#: should a GPU or Triton version misbehave; benchmarks/bench_gpu.py times both)
ENABLED = os.environ.get("MDLORA_GROUPED_KERNEL", "1") not in ("", "0")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    if int(triton.__version__.split(".")[0]) < 3:  # tl.dot(input_precision=...) is 3.x
        logger.warning("triton %s is older than 3.0: the grouped kernels stay off (eager path)",
                       triton.__version__)  # fmt: skip
        return None

    def grouped_linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, block_domain_ptr, rows_ptr, used_ptr,
        K, N, stride_x, stride_out,
        BLOCK: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GATHER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr, RELU: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        blk = (pid_m // TILES).to(tl.int64)  # row offsets past 2**31 elements stay exact
        local = (pid_m % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        if blk >= tl.load(used_ptr):
            # past the last domain's blocks: padding only (up to one per domain, so a small
            # request to a model of many domains would otherwise run a tile per domain)
            return
        slot = blk * BLOCK + local
        live = local < BLOCK
        d = tl.load(block_domain_ptr + blk)
        sample = tl.load(rows_ptr + slot, mask=live, other=-1)  # -1: a padding row
        # a slot's batch row (read in place by the first layer, written by the last)
        row = tl.where(sample >= 0, sample, 0)
        row_ok = live & (sample >= 0)
        if GATHER_IN:
            src, src_ok = row, row_ok
        else:
            src, src_ok = slot, live
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # builtins only: triton's @jit helpers (tl.zeros ...) cannot run in an interpreted
        # kernel once triton was imported without TRITON_INTERPRET
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + src[:, None] * stride_x + rk[None, :],
                         mask=src_ok[:, None] & (rk[None, :] < K), other=0.0)  # fmt: skip
            wt = tl.load(w_ptr + d * K * N + rk[:, None] * N + rn[None, :],
                         mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)  # fmt: skip
            acc += tl.dot(xt, wt, input_precision="ieee")
        acc += tl.load(b_ptr + d * N + rn, mask=rn < N, other=0.0)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        if SCATTER_OUT:
            dst, dst_ok = row, row_ok
        else:
            dst, dst_ok = slot, live
        tl.store(out_ptr + dst[:, None] * stride_out + rn[None, :], acc,
                 mask=dst_ok[:, None] & (rn[None, :] < N))  # fmt: skip

    def count_kernel(idx_ptr, counts_ptr, n, D, ROWS: tl.constexpr):  # fmt: skip
        i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = i < n
        d = tl.minimum(tl.maximum(tl.load(idx_ptr + i, mask=live, other=0), 0), D - 1)
        tl.atomic_add(counts_ptr + d, 1, mask=live, sem="relaxed")  # ordered by the launch

    def place_kernel(
        idx_ptr, counts_ptr, cursor_ptr, ends_ptr, first_ptr, slot_ptr, sample_ptr,
        block_domain_ptr, n, D, num_blocks, steps,
        BM: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        # each row: the next free slot of its domain's blocks
        i = pid * ROWS + tl.arange(0, ROWS)
        live = i < n
        d = tl.minimum(tl.maximum(tl.load(idx_ptr + i, mask=live, other=0), 0), D - 1)
        pos = tl.atomic_add(cursor_ptr + d, 1, mask=live, sem="relaxed")  # a ticket
        slot = tl.load(first_ptr + d, mask=live, other=0) + pos
        tl.store(slot_ptr + i, slot, mask=live)
        tl.store(sample_ptr + slot, i, mask=live)
        # each block: its domain (the first whose block end lies past it), its padding rows
        b = pid * BLOCKS + tl.arange(0, BLOCKS)
        in_range = b < num_blocks
        lo = tl.full((BLOCKS,), 0, tl.int64)
        hi = tl.full((BLOCKS,), 0, tl.int64) + D
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(ends_ptr + mid, mask=in_range & active, other=0)
            right = end <= b
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (end > b), mid, hi)
        bd = tl.minimum(lo, D - 1)
        tl.store(block_domain_ptr + b, bd, mask=in_range)
        nth = b - tl.load(first_ptr + bd, mask=in_range, other=0) // BM  # block of its domain
        filled = tl.load(counts_ptr + bd, mask=in_range, other=0) - nth * BM
        r = tl.arange(0, BM)
        pad = in_range[:, None] & (r[None, :] >= filled[:, None])
        tl.store(sample_ptr + b[:, None] * BM + r[None, :], tl.full((BLOCKS, BM), -1, tl.int64),
                 mask=pad)  # fmt: skip

    kernels = {"linear": grouped_linear_kernel, "count": count_kernel, "place": place_kernel}
    if _interpreting():
        # triton.jit reads TRITON_INTERPRET once, when triton is first imported (torch may
        # import it before the tests set the variable): build the interpreted kernels directly
        from triton.runtime.interpreter import InterpretedFunction

        return {name: InterpretedFunction(fn) for name, fn in kernels.items()}
    # Triton compiles a variant per integer argument equal to 1 or divisible by 16 and per
    # pointer alignment: the batch-dependent ones stay generic, so a request of a new size
    # (one row, a round number) does not wait for a compilation the warm-up did not do
    generic = {"linear": ("used_ptr",), "count": ("n", "D"),
               "place": ("n", "D", "num_blocks", "steps")}  # fmt: skip
    built = {}
    for name, fn in kernels.items():
        try:
            built[name] = triton.jit(fn, do_not_specialize=generic[name],
                                     do_not_specialize_on_alignment=generic[name])  # fmt: skip
        except TypeError:  # a Triton 3.x without the alignment switch
            built[name] = triton.jit(fn, do_not_specialize=generic[name])
    return built




def _kernel() -> Any:
    global _KERNEL, _TRIED
    if not _TRIED:
        _TRIED = True
        _KERNEL = _build()
    return _KERNEL


def reset() -> None:
    """Forget the built kernels, any failure, the check and the warm-ups (tests switch
    ``TRITON_INTERPRET``)."""
    global _KERNEL, _TRIED, BROKEN
    _KERNEL, _TRIED, BROKEN = None, False, None
    VERIFIED.clear()
    WARMED.clear()


def _strict() -> bool:
    return os.environ.get("MDLORA_GROUPED_STRICT", "0") not in ("", "0")


def _turn_off(reason: str) -> None:
    global BROKEN
    BROKEN = reason
    logger.warning("grouped kernels off for this process (eager path from now on): %s", reason)


def verify(got: Tensor, want: Tensor, block: int = 0) -> bool:
    """Check the kernels' first result for ``block`` (a plan's block size) in this process
    against the eager path's: equal to float rounding, the kernels stay on (and this block
    size is not checked again); else they are turned off with a warning, so a GPU or Triton
    where they compute wrongly scores on the eager path instead of silently (raised with
    ``MDLORA_GROUPED_STRICT=1``)."""
    VERIFIED.add(block)
    rtol, atol = 1e-3, 1e-4
    if got.shape == want.shape and tf32_matmul(got.device):
        # the eager reference multiplied in TF32 (10-bit mantissa): its own error reaches
        # 1e-3; a kernel that computes wrongly is off by far more than this bound
        rtol, atol = 1e-2, 1e-2 * float(want.abs().mean())
    if got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol):
        return True
    worst = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
    reason = f"the first result differs from the eager path's (largest difference {worst:.3g})"
    if _strict():
        raise AssertionError(reason)
    _turn_off(reason)
    return False


def tf32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run in TF32 (CUDA with
    ``torch.set_float32_matmul_precision("high")``, ``allow_tf32`` or ``fp32_precision =
    "tf32"``). Torch raises on reading the legacy flag once the newer per-backend setting was
    written, hence both reads."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if getattr(matmul, "fp32_precision", None) == "tf32":
                return True
        except Exception:  # the legacy read below decides
            pass
        try:
            return bool(matmul.allow_tf32)
        except Exception:  # unreadable: assume it may
            return True


def _launch(name: str, grid: tuple[int, ...], device: torch.device, *args: Any,
            **constants: Any) -> bool:  # fmt: skip
    """Run kernel ``name`` on ``device`` (Triton launches on the current CUDA device, so it is
    made ``device``'s); False when it cannot compile or run here, which turns the kernels
    off for this process with a warning (scoring goes on, on the eager path). With
    ``MDLORA_GROUPED_STRICT=1`` (the tests) a failure is raised instead."""
    place = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with place:
            _kernel()[name][grid](*args, **constants)
    except Exception as exc:
        if _strict():
            raise  # the tests want a kernel's failure, not the fallback
        _turn_off(f"{name} kernel: {type(exc).__name__}: {exc}")
        return False
    return True


def available(x: Tensor) -> bool:
    """Whether :func:`grouped_linear` runs for ``x``: Triton 3.x importable, float32, autograd
    off (the kernels have no backward), and a CUDA tensor (or a CPU one under
    ``TRITON_INTERPRET=1``)."""
    if x.dtype != torch.float32 or torch.is_grad_enabled():
        return False
    return runs_on(x.device)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device`` (Triton 3.x, not turned off)."""
    if not ENABLED or BROKEN is not None:
        return False
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return False
    return _kernel() is not None


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    plan: Any,
    *,
    gather_in: bool = False,
    scatter_out: bool = False,
    relu: bool = False,
) -> Tensor | None:
    """``x W[d] + b[d]`` (then ReLU if ``relu``) per block of ``plan``; ``None`` where the kernel
    cannot run (the caller then uses ``plan.linear``).

    ``x``: the padded layout ``[blocks * block, in]``, or with ``gather_in`` the batch's own
    rows ``[n, in]``; the result is the padded layout, or with ``scatter_out`` ``[n, out]``.
    ``weight``: ``[D, in, out]``, ``bias``: ``[D, out]`` (the merged per-domain layers).
    Rows of the padded layout that hold no sample are unspecified.
    """
    if not available(x) or weight.dtype != x.dtype or bias.dtype != x.dtype:
        return None
    x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    k_in, n_out = weight.shape[1], weight.shape[2]
    rows = plan.num_blocks * plan.block
    out = x.new_empty(plan.n if scatter_out else rows, n_out)
    if plan.n == 0:
        return out
    tiles = launch_constants(plan.block, n_out)
    grid = (plan.num_blocks * tiles["TILES"], -(-n_out // tiles["BLOCK_N"]))
    ran = _launch(
        "linear", grid, x.device,
        x, weight, bias, out, plan.block_domain, plan.sample_of_slot, plan.used_blocks,
        k_in, n_out, x.stride(0), out.stride(0),
        **tiles, GATHER_IN=gather_in, SCATTER_OUT=scatter_out, RELU=relu,
    )  # fmt: skip
    return out if ran else None


def launch_constants(block: int, n_out: int) -> dict[str, int]:
    """The kernel's tile sizes for plan blocks of ``block`` rows and a layer ``n_out`` wide
    (tiles of at least 16 rows, as ``tl.dot`` needs before Triton 3.x padded smaller ones: a
    block of 8 rows takes a 16-row tile, masked)."""
    block_m = max(16, min(64, 1 << (block - 1).bit_length()))  # a power of two
    block_n = 64 if n_out >= 64 else max(16, 1 << (n_out - 1).bit_length())
    return {"BLOCK": block, "TILES": -(-block // block_m), "BLOCK_M": block_m,
            "BLOCK_N": block_n, "BLOCK_K": 32}  # fmt: skip


#: rows and blocks per program of the layout kernels
LAYOUT_ROWS, LAYOUT_BLOCKS = 1024, 16


def layout(
    index: Tensor, num_domains: int, block: int, num_blocks: int
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """A :class:`~mdlora.models.lora.SegmentPlan`'s ``(slot, sample_of_slot, block_domain,
    used_blocks)`` for domain ids ``index``, in four launches; ``None`` where the kernels
    cannot run (the plan then builds them with eager ops).

    Each domain's rows fill its blocks from the first, as the eager layout's do, in an order
    that may change from call to call.
    """
    if index.dtype != torch.int64 or block & (block - 1) or not runs_on(index.device):
        return None  # (tl.arange needs a power-of-two block)
    n, dev = index.numel(), index.device
    index = index.contiguous()
    stride = -(-num_domains // 4) * 4  # the cursor starts 16-byte aligned, as counts does
    scratch = torch.zeros(2 * stride, dtype=torch.int32, device=dev)
    counts, cursor = scratch[:num_domains], scratch[stride : stride + num_domains]
    if n and not _launch("count", (-(-n // LAYOUT_ROWS),), dev, index, counts, n, num_domains,
                         ROWS=LAYOUT_ROWS):  # fmt: skip
        return None
    blocks = (counts + (block - 1)) // block
    ends = blocks.cumsum(0)
    first = (ends - blocks) * block
    slot = torch.empty(n, dtype=torch.int64, device=dev)
    sample = torch.empty(num_blocks * block, dtype=torch.int64, device=dev)
    block_domain = torch.empty(num_blocks, dtype=torch.int64, device=dev)
    programs = max(-(-n // LAYOUT_ROWS), -(-num_blocks // LAYOUT_BLOCKS))
    if not _launch(
        "place", (programs,), dev,
        index, counts, cursor, ends, first, slot, sample, block_domain,
        n, num_domains, num_blocks, num_domains.bit_length() + 1,
        BM=block, ROWS=LAYOUT_ROWS, BLOCKS=LAYOUT_BLOCKS,
    ):  # fmt: skip
        return None
    return slot, sample, block_domain, ends[-1:]
