"""LR: first-order weights only, the floor every other model must beat."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ctr.models.base import ArchShape, FirstOrderTerm, ModelBase, ModelSpec


class LRConfig(ModelBase):
    name: Literal["lr"]


class LRArch(nn.Module):
    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.first_order = FirstOrderTerm(num_dense)

    def forward(self, emb: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        return self.first_order(linear, dense)



def build(cfg: LRConfig, shape: ArchShape) -> LRArch:
    return LRArch(shape.num_dense)


SPEC = ModelSpec(LRConfig, build, first_order=True, embeddings=False, capabilities=frozenset())  # no tables, no layers
