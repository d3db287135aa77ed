"""An optional fused CPU kernel for hard-routed low-rank adapters at inference.

``z[i] += (x[i] A[d_i]) B[d_i] + c[d_i]`` for every sample ``i`` in one parallel loop: each
sample reads only its own domain's rows, nothing per-sample is materialised, and the loop
does exactly the low-rank FLOPs. Eager PyTorch cannot express this without either
per-operator overhead per domain or materialised per-sample weights (PERFORMANCE.md), which
is why this one piece is compiled with numba. It is forward-only (training routes through the
differentiable ``embedding_bag`` path) and CPU-only; without numba, or on CUDA tensors, the
``kernel`` strategy falls back to ``bag``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_KERNEL: Callable[..., None] | None = None
_TRIED = False


def _build() -> Callable[..., None] | None:
    # numba's default "workqueue" layer aborts when two threads call a parallel kernel at
    # once (the service scores from several threads); the OpenMP layer is thread-safe.
    os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    try:
        import numba as nb
        import numpy as np
    except ImportError:
        return None

    @nb.njit(parallel=True, fastmath=True, nogil=True)
    def lowrank_add(x: Any, at: Any, b: Any, c: Any, idx: Any, out: Any) -> None:
        n, in_dim = x.shape
        r = at.shape[1]
        width = b.shape[2]
        for i in nb.prange(n):
            d = idx[i]
            for j in range(r):
                s = np.float32(0.0)
                for k in range(in_dim):
                    s += x[i, k] * at[d, j, k]
                for m in range(width):
                    out[i, m] += s * b[d, j, m]
            for m in range(width):
                out[i, m] += c[d, m]

    return lowrank_add


def kernel_available() -> bool:
    """Whether the fused kernel can run here (numba importable)."""
    global _KERNEL, _TRIED
    if not _TRIED:
        _TRIED = True
        _KERNEL = _build()
    return _KERNEL is not None


def _match_torch_threads() -> None:
    """Run the kernel on torch's thread count, and keep torch's count intact.

    Starting numba's OpenMP pool resets the process's OpenMP thread count, which silently
    undoes an earlier ``torch.set_num_threads``; a kernel with more threads than torch uses
    also fights torch's pool for the cores.
    """
    import numba as nb

    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, nb.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if nb.get_num_threads() != threads:
        nb.set_num_threads(threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def lowrank_add_(z: Tensor, x: Tensor, a_t: Tensor, b: Tensor, c: Tensor, index: Tensor) -> bool:
    """Add the routed adapter change to ``z`` in place; False when the kernel cannot run.

    ``a_t`` is the bank's A transposed to ``[D, r, in]`` (contiguous dot products).
    """
    if not kernel_available() or z.device.type != "cpu" or z.dtype != torch.float32:
        return False
    if z.requires_grad or not (z.is_contiguous() and x.is_contiguous()):
        return False
    assert _KERNEL is not None
    wanted_threads = torch.get_num_threads()
    _match_torch_threads()
    with torch.no_grad():
        _KERNEL(
            x.detach().numpy(), a_t.numpy(), b.numpy(), c.numpy(),
            index.detach().numpy(), z.detach().numpy(),
        )  # fmt: skip
    if torch.get_num_threads() != wanted_threads:  # the first launch starts numba's pool
        torch.set_num_threads(wanted_threads)
    return True
