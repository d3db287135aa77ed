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
