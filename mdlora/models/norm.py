"""Domain normalisation (MultiLoRA): one batch norm per domain, applied in one call."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _domain_sums(x: Tensor, index: Tensor, n_dom: int, onehot_t: Tensor | None) -> Tensor:
    """Per-domain row sums ``[D, features]``, in an order that does not vary between runs."""
    if onehot_t is not None:
        return torch.mm(onehot_t, x)
    return x.new_zeros(n_dom, x.shape[1]).index_add_(0, index, x)


class DomainBatchNorm(nn.Module):
    """Batch norm with running statistics and affine parameters per domain.

    A mixed-domain batch is normalised in one pass: per-domain means and variances come from
    ``index_add`` over the batch, not from one call per domain. Off the CPU they come from
    one-hot matmuls instead: ``index_add_`` adds with atomics there (two runs of the same
    training would differ in the last bits) and ``bincount`` reads the largest id back to the
    host (a sync per layer and step). The statistics are float32 even under autocast (a
    float16 sum of squares overflows).
    """

    running_mean: Tensor  # buffer [D, features]
    running_var: Tensor  # buffer [D, features]

    def __init__(
        self, num_domains: int, features: int, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_domains, features))
        self.bias = nn.Parameter(torch.zeros(num_domains, features))
        self.register_buffer("running_mean", torch.zeros(num_domains, features))
        self.register_buffer("running_var", torch.ones(num_domains, features))

    @property
    def num_domains(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        if self.training:
            half = x.dtype in (torch.float16, torch.bfloat16)
            with torch.autocast(x.device.type, enabled=False):
                return self._train_forward(x.float() if half else x, index, x.device.type != "cpu")
        scale, shift = self.affine()
        return torch.addcmul(shift[index], x, scale[index])

    def _train_forward(self, x: Tensor, index: Tensor, onehot: bool) -> Tensor:
        n_dom = self.num_domains
        onehot_t = None
        if onehot:
            onehot_t = F.one_hot(index, n_dom).to(x.dtype).t()
            counts = onehot_t.sum(1, keepdim=True)
        else:
            counts = torch.bincount(index, minlength=n_dom).to(x.dtype).unsqueeze(1)
        safe = counts.clamp(min=1)
        mean = _domain_sums(x, index, n_dom, onehot_t) / safe
        centered = x - mean[index]
        var = _domain_sums(centered.square(), index, n_dom, onehot_t) / safe
        x_hat = centered * torch.rsqrt(var[index] + self.eps)
        with torch.no_grad():
            seen = counts > 0
            unbiased = var * counts / (counts - 1).clamp(min=1)
            m = self.momentum
            self.running_mean.copy_(
                torch.where(seen, (1 - m) * self.running_mean + m * mean, self.running_mean)
            )
            self.running_var.copy_(
                torch.where(seen, (1 - m) * self.running_var + m * unbiased, self.running_var)
            )
        return x_hat * self.weight[index] + self.bias[index]

    def affine(self) -> tuple[Tensor, Tensor]:
        """Inference form ``x * scale[d] + shift[d]``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    @torch.no_grad()
    def grow(self, n: int = 1) -> None:
        f = self.weight.shape[1]
        self.weight = nn.Parameter(torch.cat([self.weight.data, self.weight.new_ones(n, f)], 0))
        self.bias = nn.Parameter(torch.cat([self.bias.data, self.bias.new_zeros(n, f)], 0))
        self.running_mean = torch.cat([self.running_mean, self.running_mean.new_zeros(n, f)], 0)
        self.running_var = torch.cat([self.running_var, self.running_var.new_ones(n, f)], 0)
