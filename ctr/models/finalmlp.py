"""FinalMLP (Mao et al., AAAI 2023): two MLP streams over gated copies of the flat input, fused by
a multi-head bilinear layer.

Each stream has its own feature gate, 2 * sigmoid(MLP(context)) per input column, so the two
streams can learn to look at different features. The context here is a learnable vector (what the
reference uses when no user or item fields are named; Criteo and Avazu have none), so each gate is
a learned, input-independent weighting of the columns. The fusion of the stream outputs o1, o2 is
w1.o1 + w2.o2 + b + sum over heads h of o1_h^T W_h o2_h, each head reading one slice of each
stream: the bilinear term costs (|o1| |o2| / heads) weights instead of |o1| |o2|.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from ctr.models.base import ArchShape, ModelBase, ModelSpec
from ctr.modules.mlp import MLP


class FinalMLPConfig(ModelBase):
    name: Literal["finalmlp"]
    stream1: list[PositiveInt] = Field(default_factory=lambda: [400, 400, 400])
    stream2: list[PositiveInt] = Field(default_factory=lambda: [800])
    gate_hidden: list[PositiveInt] = Field(default_factory=lambda: [800])
    heads: int = Field(default=10, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "FinalMLPConfig":
        outs = [self.stream1[-1] if self.stream1 else None, self.stream2[-1] if self.stream2 else None]
        if None in outs or any(o % self.heads for o in outs):
            raise ValueError(f"heads {self.heads} must divide both streams' output widths {outs} "
                             "(stream1 and stream2 need at least one layer each)")
        return self


class FeatureGate(nn.Module):
    """2 * sigmoid(MLP(context)): one weight in (0, 2) per flat input column; 1 at initialisation's centre."""

    def __init__(self, dim: int, hidden: list[int], width: int) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.zeros(1, dim))
        self.mlp = MLP(dim, hidden)
        self.out = nn.Linear(self.mlp.out_features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 * torch.sigmoid(self.out(self.mlp(self.context))))


class BilinearFusion(nn.Module):
    def __init__(self, width1: int, width2: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear1 = nn.Linear(width1, 1)
        self.linear2 = nn.Linear(width2, 1, bias=False)
        self.weight = nn.Parameter(torch.empty(heads, width1 // heads, width2 // heads))
        nn.init.xavier_normal_(self.weight)

    def forward(self, o1: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
        h1 = o1.view(o1.shape[0], self.heads, -1)
        h2 = o2.view(o2.shape[0], self.heads, -1)
        bilinear = torch.einsum("bhi,hij,bhj->b", h1, self.weight, h2)
        return (self.linear1(o1) + self.linear2(o2)).squeeze(1) + bilinear


class FinalMLPArch(nn.Module):
    def __init__(self, flat_width: int, dim: int, stream1: list[int], stream2: list[int], gate_hidden: list[int],
                 heads: int, dropout: float, batch_norm: bool) -> None:
        super().__init__()
        self.gate1 = FeatureGate(dim, gate_hidden, flat_width)
        self.gate2 = FeatureGate(dim, gate_hidden, flat_width)
        self.mlp1 = MLP(flat_width, stream1, dropout, batch_norm)
        self.mlp2 = MLP(flat_width, stream2, dropout, batch_norm)
        self.fusion = BilinearFusion(self.mlp1.out_features, self.mlp2.out_features, heads)

    def forward(self, emb: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.mlp1(self.gate1(x)), self.mlp2(self.gate2(x)))



def build(cfg: FinalMLPConfig, shape: ArchShape) -> FinalMLPArch:
    return FinalMLPArch(shape.flat_width, shape.dim, list(cfg.stream1), list(cfg.stream2), list(cfg.gate_hidden),
                        cfg.heads, cfg.dropout, cfg.batch_norm)


SPEC = ModelSpec(FinalMLPConfig, build, mlps=("mlp1", "mlp2"))
