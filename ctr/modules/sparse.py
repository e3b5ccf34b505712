"""The sparse arch: one TorchRec EmbeddingBagCollection table per categorical field.

Built on the meta device: the tables get their memory (and their uniform(-r, r) initial values)
when DistributedModelParallel places them into fbgemm's fused kernels, or when a plain copy is
materialised for evaluation.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ctr.config import EmbeddingConfig
from ctr.modules.hashed import HashedSparseArch
from features.feature_map import FieldInfo


def embedding_tables(fields: list[FieldInfo], dim: int, init_range: float, prefix: str) -> list[EmbeddingBagConfig]:
    init = partial(nn.init.uniform_, a=-init_range, b=init_range)
    return [
        EmbeddingBagConfig(name=f"{prefix}_{f.name}", embedding_dim=dim, num_embeddings=int(f.num_embeddings or 0),
                           feature_names=[f.name], pooling=PoolingType.SUM, init_fn=init)
        for f in fields
    ]


class SparseArch(nn.Module):
    """Looks up every field: ``[B, F, D]``, fields in feature-map order."""

    def __init__(self, fields: list[FieldInfo], dim: int, init_range: float, prefix: str = "emb",
                 device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.num_fields = len(fields)
        self.num_keys = len(fields)  # one lookup key per field
        self.dim = dim
        self.ebc = EmbeddingBagCollection(tables=embedding_tables(fields, dim, init_range, prefix), device=device)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(sparse).values().view(-1, self.num_fields, self.dim)


def make_sparse_arch(fields: list[FieldInfo], cfg: EmbeddingConfig, device: torch.device) -> nn.Module:
    """The sparse arch the ``model.embedding`` config names; all return ``[B, keys, dim]``."""
    if cfg.kind == "per_field":
        return SparseArch(fields, cfg.dim, cfg.init_range, device=device)
    return HashedSparseArch(fields, cfg, device=device)
