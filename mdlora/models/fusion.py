"""MultiLoRA's fusion of the two divisions' LoRA outputs in one layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

FUSION_MODES = ("attention", "add", "avg")


class FusionAttention(nn.Module):
    """``h_lora = softmax(q K / r) V`` with ``q = W_Q h0``, ``K = W_K [h_A, h_B]``,
    ``V = [h_A, h_B]``.

    ``mode="add"`` and ``"avg"`` are the paper's ablations (MultiLoRA-add / -avg): no weights.
    """

    def __init__(self, dim: int, rank: int = 8, mode: str = "attention") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        self.mode, self.rank = mode, rank
        self.query = nn.Linear(dim, rank, bias=False)
        self.key = nn.Linear(dim, rank, bias=False)

    def forward(self, h0: Tensor, h_a: Tensor, h_b: Tensor) -> Tensor:
        if self.mode == "add":
            return h_a + h_b
        if self.mode == "avg":
            return 0.5 * (h_a + h_b)
        q = self.query(h0)  # [B, r]
        values = torch.stack([h_a, h_b], 1)  # [B, 2, out]
        keys = self.key(values)  # [B, 2, r]
        att = torch.softmax((keys @ q.unsqueeze(-1)).squeeze(-1) / self.rank, dim=-1)
        return (att.unsqueeze(-1) * values).sum(1)
