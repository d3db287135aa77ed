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
the last domain's are skipped, and ReLU is applied in the epilogue when nothing sits between
the layer and its activation. Accumulation is float32 with IEEE products (no TF32), so the
result equals the eager path to float rounding.

It runs where Triton and a CUDA tensor are present (``MDLORA_GROUPED_KERNEL=0`` turns it off);
``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (how the tests check it without a
GPU). Elsewhere :func:`grouped_linear` returns ``None`` and the caller keeps the eager path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

_KERNEL: Any = None
_TRIED = False


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
        slot = blk * BLOCK + local
        live = (local < BLOCK) & (slot < tl.load(used_ptr) * BLOCK)
        d = tl.load(block_domain_ptr + blk)
        sample = tl.load(rows_ptr + slot, mask=live, other=-1)  # -1: a padding row
        if GATHER_IN:
            src = tl.where(sample >= 0, sample, 0)
            src_ok = live & (sample >= 0)
        else:
            src = slot
            src_ok = live
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
            dst = tl.where(sample >= 0, sample, 0)
            dst_ok = live & (sample >= 0)
        else:
            dst = slot
            dst_ok = live
        tl.store(out_ptr + dst[:, None] * stride_out + rn[None, :], acc,
                 mask=dst_ok[:, None] & (rn[None, :] < N))  # fmt: skip

    if _interpreting():
        # triton.jit reads TRITON_INTERPRET once, when triton is first imported (torch may
        # import it before the tests set the variable): build the interpreted kernel directly
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(grouped_linear_kernel)
    return triton.jit(grouped_linear_kernel)


def _kernel() -> Any:
    global _KERNEL, _TRIED
    if not _TRIED:
        _TRIED = True
        _KERNEL = _build()
    return _KERNEL


def reset() -> None:
    """Forget the built kernel (tests switch ``TRITON_INTERPRET`` and build it again)."""
    global _KERNEL, _TRIED
    _KERNEL, _TRIED = None, False


def available(x: Tensor) -> bool:
    """Whether :func:`grouped_linear` runs for ``x``: Triton importable, float32, and a CUDA
    tensor (or a CPU one under ``TRITON_INTERPRET=1``)."""
    if not ENABLED or x.dtype != torch.float32 or x.requires_grad:
        return False
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
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
    kernel = _kernel()
    import triton

    x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    k_in, n_out = weight.shape[1], weight.shape[2]
    rows = plan.num_blocks * plan.block
    out = x.new_empty(plan.n if scatter_out else rows, n_out)
    if plan.n == 0:
        return out
    tiles = launch_constants(plan.block, n_out)
    grid = (plan.num_blocks * tiles["TILES"], triton.cdiv(n_out, tiles["BLOCK_N"]))
    kernel[grid](
        x, weight, bias, out, plan.block_domain, plan.sample_of_slot, plan.used_blocks,
        k_in, n_out, x.stride(0), out.stride(0),
        **tiles, GATHER_IN=gather_in, SCATTER_OUT=scatter_out, RELU=relu,
    )  # fmt: skip
    return out


def launch_constants(block: int, n_out: int) -> dict[str, int]:
    """The kernel's tile sizes for plan blocks of ``block`` rows and a layer ``n_out`` wide
    (tiles of at least 16 rows, as ``tl.dot`` needs before Triton 3.x padded smaller ones: a
    block of 8 rows takes a 16-row tile, masked)."""
    block_m = max(16, min(64, block))
    block_n = 64 if n_out >= 64 else max(16, 1 << (n_out - 1).bit_length())
    return {"BLOCK": block, "TILES": -(-block // block_m), "BLOCK_M": block_m,
            "BLOCK_N": block_n, "BLOCK_K": 32}  # fmt: skip
