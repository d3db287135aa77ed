"""Domain batch norm: per-domain statistics in one pass, the same on every device and run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mdlora.models.norm import DomainBatchNorm


def _step(norm: DomainBatchNorm, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = norm(x, index)
    (out * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    return out.detach(), x.grad, norm.weight.grad.clone(), norm.running_mean.clone()


@pytest.fixture
def one_cpu_thread() -> Iterator[None]:
    """On the CPU the indexing's backward (index_put_ with accumulate) adds in parallel, so
    it repeats bit for bit on one thread only (torch documents it as nondeterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_training_statistics_are_per_domain_and_repeatable(
    device: torch.device, one_cpu_thread: None
) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 16, generator=g) * 3 + 1).to(device)
    index = torch.randint(0, 5, (4096,), generator=g).to(device)
    runs = []
    for _ in range(2):
        norm = DomainBatchNorm(6, 16).to(device).train()  # domain 5 has no rows
        runs.append(_step(norm, x, index))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b), "two identical training steps differ in their bits"
    out, _, _, running = runs[0]
    for d in range(5):
        rows = out[index == d]
        torch.testing.assert_close(rows.mean(0), torch.zeros(16, device=device), atol=1e-5,
                                   rtol=0)  # fmt: skip
        torch.testing.assert_close(running[d], 0.1 * x[index == d].mean(0), atol=1e-5, rtol=0)
    assert torch.equal(running[5], torch.zeros(16, device=device))  # unseen: left alone
    # the same step on the CPU agrees to rounding
    cpu = _step(DomainBatchNorm(6, 16).train(), x.cpu(), index.cpu())
    for a, b in zip(runs[0], cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


def test_the_one_hot_statistics_off_the_cpu_equal_the_index_add_ones() -> None:
    """Off the CPU the statistics are one-hot matmuls (no atomics, no host sync); the same
    numbers as ``bincount``/``index_add_`` to rounding, gradients included."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g) * 2 + 3
    index = torch.randint(0, 4, (512,), generator=g)
    runs = []
    for onehot in (False, True):
        norm = DomainBatchNorm(5, 8).train()
        xg = x.clone().requires_grad_(True)
        out = norm._train_forward(xg, index, onehot)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert xg.grad is not None
        runs.append((out.detach(), xg.grad, norm.running_mean.clone(), norm.running_var.clone()))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_statistics_stay_float32_under_autocast() -> None:
    """A half-precision sum of squares overflows; under autocast the norm computes in float32."""
    x = torch.full((64, 4), 300.0)
    x[::2] = -300.0  # variance 9e4: its per-domain sum of squares is far past float16's range
    index = torch.zeros(64, dtype=torch.long)
    norm = DomainBatchNorm(1, 4).train()
    with torch.autocast("cpu", dtype=torch.float16):
        out = norm(x.half(), index)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.abs(), torch.ones_like(out), atol=1e-2, rtol=0)
