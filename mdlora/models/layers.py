"""Shared interaction layers (shared by all domains), in DeepCTR-Torch's formulations.

Every layer takes field embeddings ``E`` of shape ``[B, F, k]``.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def shallow_module(module: M) -> M:
    """A new module object with its own child / parameter / buffer tables and the same tensors:
    replacing a child or a parameter in it leaves ``module`` as it was (copy-on-write)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


class FM(nn.Module):
    """Second-order factorisation machine term, one logit per sample."""

    def forward(self, emb: Tensor) -> Tensor:
        square_of_sum = emb.sum(1).pow(2)
        sum_of_square = emb.pow(2).sum(1)
        return 0.5 * (square_of_sum - sum_of_square).sum(1)


class BiInteraction(nn.Module):
    """NFM's bi-interaction pooling: the FM term kept as a k-dimensional vector."""

    def forward(self, emb: Tensor) -> Tensor:
        return 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1))


class CrossNet(nn.Module):
    """DCN's vector cross network, x_{l+1} = x0 (x_l . w_l) + b_l + x_l (residual kept)."""

    def __init__(self, dim: int, num_layers: int = 2) -> None:
        super().__init__()
        self.kernels = nn.Parameter(torch.empty(num_layers, dim))
        self.bias = nn.Parameter(torch.zeros(num_layers, dim))
        nn.init.xavier_normal_(self.kernels)

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for i in range(self.kernels.shape[0]):
            x = x0 * (x @ self.kernels[i]).unsqueeze(1) + self.bias[i] + x
        return x


class CIN(nn.Module):
    """xDeepFM's compressed interaction network with split-half; returns one logit."""

    def __init__(self, num_fields: int, layer_sizes: tuple[int, ...] = (128, 128)) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.split_sizes: list[int] = []
        prev = num_fields
        out_dim = 0
        for i, size in enumerate(layer_sizes):
            self.convs.append(nn.Conv1d(prev * num_fields, size, kernel_size=1))
            last = i == len(layer_sizes) - 1
            if last:
                prev, direct = size, size
            else:
                if size % 2:
                    raise ValueError("CIN layer sizes must be even with split_half")
                prev, direct = size // 2, size // 2
            self.split_sizes.append(direct)
            out_dim += direct
        self.out = nn.Linear(out_dim, 1, bias=False)

    def forward(self, emb: Tensor) -> Tensor:
        b, _, d = emb.shape
        x = emb
        directs = []
        for i, conv in enumerate(self.convs):
            z = torch.einsum("bhd,bmd->bhmd", x, emb).reshape(b, -1, d)
            z = torch.relu(conv(z))
            if i < len(self.convs) - 1:
                x, direct = torch.split(
                    z, [z.shape[1] - self.split_sizes[i], self.split_sizes[i]], 1
                )
            else:
                direct = z
            directs.append(direct)
        return self.out(torch.cat(directs, 1).sum(-1)).squeeze(-1)


class InteractingLayer(nn.Module):
    """AutoInt's multi-head self-attention over fields, with a residual projection."""

    def __init__(
        self, in_dim: int, head_dim: int = 8, heads: int = 4, residual: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        out = head_dim * heads
        self.qkv = nn.Linear(in_dim, 3 * out, bias=False)
        self.res = nn.Linear(in_dim, out, bias=False) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        b, f, _ = x.shape
        q, k, v = self.qkv(x).view(b, f, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # DeepCTR: no 1/sqrt(d) scaling
        out = (att @ v).transpose(1, 2).reshape(b, f, -1)
        if self.res is not None:
            out = out + self.res(x)
        return torch.relu(out)


class InnerProduct(nn.Module):
    """PNN's pairwise inner products of field embeddings, ``[B, F(F-1)/2]``."""

    rows: Tensor  # buffer: first field of each pair
    cols: Tensor  # buffer: second field of each pair

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, emb: Tensor) -> Tensor:
        return (emb[:, self.rows] * emb[:, self.cols]).sum(-1)


class SENET(nn.Module):
    """FiBiNET's squeeze-excitation over fields (reduction ratio 3)."""

    def __init__(self, num_fields: int, reduction: int = 3) -> None:
        super().__init__()
        hidden = max(1, num_fields // reduction)
        self.excite = nn.Sequential(
            nn.Linear(num_fields, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, num_fields, bias=False),
            nn.ReLU(),
        )

    def forward(self, emb: Tensor) -> Tensor:
        return emb * self.excite(emb.mean(-1)).unsqueeze(-1)


class BilinearInteraction(nn.Module):
    """FiBiNET's bilinear layer, type "interaction": one k x k matrix per field pair."""

    rows: Tensor  # buffer: first field of each pair
    cols: Tensor  # buffer: second field of each pair

    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.weight = nn.Parameter(torch.empty(rows.numel(), dim, dim))
        nn.init.xavier_normal_(self.weight)

    def forward(self, emb: Tensor) -> Tensor:
        vi = emb[:, self.rows]  # [B, P, k]
        return torch.einsum("bpk,pkl->bpl", vi, self.weight) * emb[:, self.cols]


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a CPU mask drawn 16 bits at a time.

    On CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element, which
    cost about 3.2 ms for a 1024 x 256 activation on one core: more than the tower's matrix
    products. Here one 64-bit random draw yields four 16-bit uniforms, each compared with
    ``round(p * 2**16)``: 4-5x faster forward and backward. The drop probability is therefore
    ``p`` rounded to a multiple of 2**-16 (exact for 0.5, 0.25, ...). Other devices use
    ``F.dropout``. Same state dict and module tree as ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or self.inplace:
            return nn.functional.dropout(x, self.p, True, self.inplace)
        return x * keep_mask(x.shape, self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """Boolean mask of ``shape`` on CPU whose entries are True with probability ``1 - p``.

    ``p`` is rounded to a multiple of 2**-16; the draw uses torch's global CPU generator, so
    ``torch.manual_seed`` makes it reproducible.
    """
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # each in [-2**15, 2**15)
    return uniform16 >= round(p * 65536) - 32768
