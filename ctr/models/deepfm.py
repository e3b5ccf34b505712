"""DeepFM: first-order weights + factorization machine + an MLP, summed into one logit."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ctr.models.base import ArchShape, FirstOrderTerm, MLPModel, ModelSpec
from ctr.modules.interactions import factorization_machine
from ctr.modules.mlp import MLP


class DeepFMConfig(MLPModel):
    name: Literal["deepfm"]


class DeepFMArch(nn.Module):
    def __init__(self, flat_width: int, num_dense: int, hidden: list[int], dropout: float, batch_norm: bool) -> None:
        super().__init__()
        self.first_order = FirstOrderTerm(num_dense)
        self.mlp = MLP(flat_width, hidden, dropout, batch_norm)
        self.head = nn.Linear(self.mlp.out_features, 1)

    def forward(self, emb: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        return self.first_order(linear, dense) + factorization_machine(emb) + self.head(self.mlp(x)).squeeze(1)



def build(cfg: DeepFMConfig, shape: ArchShape) -> DeepFMArch:
    return DeepFMArch(shape.flat_width, shape.num_dense, list(cfg.hidden), cfg.dropout, cfg.batch_norm)


SPEC = ModelSpec(DeepFMConfig, build, mlps=("mlp",), first_order=True)
