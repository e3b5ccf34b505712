"""Feature interactions: factorization machine (DeepFM) and the DCNv2 cross network."""

from __future__ import annotations

import torch
from torch import nn


def factorization_machine(emb: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs of <e_i, e_j>, in O(F*D): 0.5 * sum_d[(sum_f e)^2 - sum_f e^2]. [B,F,D] -> [B]."""
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l, with W full rank (d x d) or low rank (U V, rank r)."""

    def __init__(self, width: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.project = nn.Linear(width, width)
        else:
            self.project = nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.project(x) + x


class CrossNetwork(nn.Module):
    def __init__(self, width: int, num_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(width, low_rank) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
