"""DNN: an MLP over the concatenated embeddings and dense features."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ctr.models.base import ArchShape, MLPModel, ModelSpec
from ctr.modules.mlp import MLP


class DNNConfig(MLPModel):
    name: Literal["dnn"]


class DNNArch(nn.Module):
    def __init__(self, flat_width: int, hidden: list[int], dropout: float, batch_norm: bool) -> None:
        super().__init__()
        self.mlp = MLP(flat_width, hidden, dropout, batch_norm)
        self.head = nn.Linear(self.mlp.out_features, 1)

    def forward(self, emb: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x)).squeeze(1)



def build(cfg: DNNConfig, shape: ArchShape) -> DNNArch:
    return DNNArch(shape.flat_width, list(cfg.hidden), cfg.dropout, cfg.batch_norm)


SPEC = ModelSpec(DNNConfig, build, mlps=("mlp",), folds_into="mlp.layers.0")
