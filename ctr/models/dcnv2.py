"""DCNv2: a cross network (full or low rank) stacked under, or in parallel with, an MLP."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ctr.models.base import ArchShape, MLPModel, ModelSpec
from ctr.modules.interactions import CrossNetwork
from ctr.modules.mlp import MLP


class DCNv2Config(MLPModel):
    name: Literal["dcnv2"]
    cross_layers: int = Field(default=3, ge=1)
    structure: Literal["stacked", "parallel"] = "parallel"
    low_rank: int | None = Field(default=None, gt=0)


class DCNv2Arch(nn.Module):
    """stacked: MLP(cross(x0)); parallel: head([cross(x0), MLP(x0)])."""

    def __init__(self, flat_width: int, cross_layers: int, low_rank: int | None, stacked: bool,
                 hidden: list[int], dropout: float, batch_norm: bool) -> None:
        super().__init__()
        self.stacked = stacked
        self.cross = CrossNetwork(flat_width, cross_layers, low_rank)
        self.mlp = MLP(flat_width, hidden, dropout, batch_norm)
        self.head = nn.Linear(self.mlp.out_features if stacked else flat_width + self.mlp.out_features, 1)

    def forward(self, emb: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            out = self.mlp(self.cross(x))
        else:
            out = torch.cat([self.cross(x), self.mlp(x)], dim=1)
        return self.head(out).squeeze(1)

    def cross_projections(self) -> list[str]:
        """The cross layers' full-rank projections (a low-rank cross layer is factorised already)."""
        return [f"cross.layers.{i}.project" for i, layer in enumerate(self.cross.layers)
                if isinstance(layer.project, nn.Linear)]


def build(cfg: DCNv2Config, shape: ArchShape) -> DCNv2Arch:
    return DCNv2Arch(shape.flat_width, cfg.cross_layers, cfg.low_rank, cfg.structure == "stacked",
                     list(cfg.hidden), cfg.dropout, cfg.batch_norm)


SPEC = ModelSpec(DCNv2Config, build, mlps=("mlp",), more_factorizable=DCNv2Arch.cross_projections)
