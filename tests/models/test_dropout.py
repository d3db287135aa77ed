"""The CPU dropout: drop rate, scaling, gradient, eval identity, seeding."""

from __future__ import annotations

import pytest
import torch

from mdlora.models.layers import Dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_rate_matches_p(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    # 1e6 Bernoulli draws: the standard error of the mean is below 5e-4
    assert abs(mask.float().mean().item() - (1 - p)) < 3e-3


def test_mask_has_no_structure_along_rows_or_columns() -> None:
    torch.manual_seed(1)
    mask = keep_mask((4096, 64), 0.5).float()
    # every column and every 16-bit lane position keeps about half
    assert (mask.mean(0) - 0.5).abs().max() < 0.04
    lanes = mask.reshape(-1, 4).mean(0)
    assert (lanes - 0.5).abs().max() < 0.01


def test_odd_sizes_and_scaling() -> None:
    torch.manual_seed(2)
    drop = Dropout(0.5)
    x = torch.ones(7, 13)
    y = drop(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0}
    assert y.shape == x.shape


def test_gradient_is_the_mask_times_scale() -> None:
    torch.manual_seed(3)
    drop = Dropout(0.2)
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert x.grad is not None
    kept = y != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))
    assert torch.all(x.grad[~kept] == 0)
    assert torch.allclose(y[kept], x.detach()[kept] / 0.8)


def test_eval_mode_and_zero_p_are_identity() -> None:
    x = torch.randn(16, 8)
    drop = Dropout(0.5).eval()
    assert drop(x) is x
    assert Dropout(0.0).train()(x) is x


def test_seeded_draws_repeat() -> None:
    x = torch.randn(128, 64)
    torch.manual_seed(5)
    a = Dropout(0.5)(x)
    torch.manual_seed(5)
    b = Dropout(0.5)(x)
    assert torch.equal(a, b)


def test_state_dict_matches_nn_dropout() -> None:
    assert Dropout(0.3).state_dict().keys() == torch.nn.Dropout(0.3).state_dict().keys()
    assert isinstance(Dropout(0.3), torch.nn.Dropout)
