"""The MLP tower shared by DNN, DeepFM, DCNv2 and FinalMLP."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer; no output layer (callers add one)."""

    def __init__(self, in_features: int, hidden: list[int], dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers.append(nn.Linear(width, out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def norms(self, prefix: str) -> list[str]:
        """Paths (under ``prefix``) of the BatchNorms, each right after the Linear it can fold into."""
        return [f"{prefix}.layers.{i}" for i, m in enumerate(self.layers) if isinstance(m, nn.BatchNorm1d)]

    def linears(self, prefix: str) -> list[str]:
        """Paths (under ``prefix``) of the hidden Linears, in forward order."""
        return [f"{prefix}.layers.{i}" for i, m in enumerate(self.layers) if isinstance(m, nn.Linear)]
