"""The backbones' interaction parts, chosen by name.

Every backbone is embeddings -> interaction -> DNN tower -> head. The interaction part below
turns field embeddings ``E`` ``[B, F, k]`` and dense values ``[B, n_dense]`` into

* ``tower_in``: the DNN tower's input (the part adapters act on, shared layout for all);
* ``side``: an optional vector concatenated to the tower output before the head (AutoInt,
  DCN, as in DeepCTR-Torch);
* ``logit``: an optional extra logit added to the head's (FM, CIN).

``uses_linear`` says whether the first-order (wide) term is added, as in DeepCTR-Torch.
Defaults are the published settings in ALGORITHMS.md §2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mdlora.models import layers

Out = tuple[Tensor, Tensor | None, Tensor | None]

class Interaction(nn.Module):
    uses_linear = False
    tower_in: int
    side_dim = 0

    def __init__(self, num_fields: int, dim: int, num_dense: int) -> None:
        super().__init__()
        self.num_fields, self.dim, self.num_dense = num_fields, dim, num_dense
        self.tower_in = num_fields * dim + num_dense

    def deep_input(self, emb: Tensor, dense: Tensor) -> Tensor:
        flat = emb.flatten(1)
        return torch.cat([flat, dense], 1) if self.num_dense else flat

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        return self.deep_input(emb, dense), None, None


class MLP(Interaction):
    """Plain DNN over the concatenated embeddings."""


class WDL(Interaction):
    """Wide & Deep: first-order wide part + DNN."""

    uses_linear = True


class DeepFM(Interaction):
    uses_linear = True

    def __init__(self, num_fields: int, dim: int, num_dense: int) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.fm = layers.FM()

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        return self.deep_input(emb, dense), None, self.fm(emb)


class NFM(Interaction):
    """Bi-interaction pooling (with dropout) feeds the DNN."""

    uses_linear = True

    def __init__(self, num_fields: int, dim: int, num_dense: int, bi_dropout: float = 0.0) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.bi = layers.BiInteraction()
        self.bi_dropout = layers.Dropout(bi_dropout)
        self.tower_in = dim + num_dense

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        bi = self.bi_dropout(self.bi(emb))
        return (torch.cat([bi, dense], 1) if self.num_dense else bi), None, None


class AutoInt(Interaction):
    uses_linear = True

    def __init__(
        self, num_fields: int, dim: int, num_dense: int,
        att_layers: int = 3, heads: int = 4, head_dim: int = 8, residual: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(num_fields, dim, num_dense)
        dims = [dim] + [heads * head_dim] * att_layers
        self.att = nn.Sequential(
            *[
                layers.InteractingLayer(dims[i], head_dim, heads, residual)
                for i in range(att_layers)
            ]
        )
        self.side_dim = num_fields * heads * head_dim

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        return self.deep_input(emb, dense), self.att(emb).flatten(1), None


class PNN(Interaction):
    """Inner-product PNN: embeddings and pairwise inner products feed the DNN."""

    def __init__(self, num_fields: int, dim: int, num_dense: int) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.inner = layers.InnerProduct(num_fields)
        self.tower_in = num_fields * dim + num_fields * (num_fields - 1) // 2 + num_dense

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        parts = [emb.flatten(1), self.inner(emb)]
        if self.num_dense:
            parts.append(dense)
        return torch.cat(parts, 1), None, None


class DCN(Interaction):
    uses_linear = True

    def __init__(self, num_fields: int, dim: int, num_dense: int, cross_layers: int = 2) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.cross = layers.CrossNet(self.tower_in, cross_layers)
        self.side_dim = self.tower_in

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        x0 = self.deep_input(emb, dense)
        return x0, self.cross(x0), None


class FiBiNET(Interaction):
    uses_linear = True

    def __init__(self, num_fields: int, dim: int, num_dense: int, reduction: int = 3) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.senet = layers.SENET(num_fields, reduction)
        self.bilinear = layers.BilinearInteraction(num_fields, dim)
        pairs = num_fields * (num_fields - 1) // 2
        self.tower_in = 2 * pairs * dim + num_dense

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        parts = [self.bilinear(emb).flatten(1), self.bilinear(self.senet(emb)).flatten(1)]
        if self.num_dense:
            parts.append(dense)
        return torch.cat(parts, 1), None, None


class XDeepFM(Interaction):
    uses_linear = True

    def __init__(
        self, num_fields: int, dim: int, num_dense: int, cin_layers: tuple[int, ...] = (128, 128)
    ) -> None:
        super().__init__(num_fields, dim, num_dense)
        self.cin = layers.CIN(num_fields, tuple(cin_layers))

    def forward(self, emb: Tensor, dense: Tensor) -> Out:
        return self.deep_input(emb, dense), None, self.cin(emb)


BACKBONES: dict[str, type[Interaction]] = {
    "mlp": MLP, "wdl": WDL, "deepfm": DeepFM, "nfm": NFM, "autoint": AutoInt,
    "pnn": PNN, "dcn": DCN, "fibinet": FiBiNET, "xdeepfm": XDeepFM,
}  # fmt: skip


def build_interaction(
    name: str, num_fields: int, dim: int, num_dense: int, options: dict[str, Any]
) -> Interaction:
    """The interaction part of backbone ``name`` with its published defaults + ``options``."""
    try:
        cls = BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
    try:
        return cls(num_fields, dim, num_dense, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for backbone {name!r}: {options} ({exc})") from None
