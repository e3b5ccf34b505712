"""The parts every CTR model is built from, as TorchRec's DLRM is: a sparse arch that turns ids
into tensors, and a dense arch (interactions and over-arch) that takes tensors only.

``CTRModel`` joins them: embedding tables -> optional search gates -> optional AFM projection -> the
flat input's stored columns -> the model's own dense arch. The edge export keeps the dense arch
(and the projection) as they are and swaps only the sparse side for a torch-only one, so a model's
forward is written once. Every model returns (logits [B], embedding penalty): the penalty is the
mean squared norm of the embedding rows looked up for the batch (when ``embedding_penalty`` is on),
so an L2 on embeddings reaches exactly the rows the fused optimizer updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import nn
from torchrec import KeyedJaggedTensor

from common.strict import Strict
from ctr.capabilities import DENSE_ARCH
from ctr.embedding_config import EmbeddingConfig, PerFieldEmbedding

# CTRModel's parts by attribute name, which is also their prefix in its state dict (ctr.models.weights)
EMBEDDING, GATES, PROJECTION = "embedding", "gates", "projection"
FIRST_ORDER_DIM = 4  # fbgemm's smallest width; the four values of a row are summed into one weight


class ModelBase(Strict):
    name: str
    embedding: EmbeddingConfig = PerFieldEmbedding()

    @field_validator("embedding", mode="before")
    @classmethod
    def _default_kind(cls, value: Any) -> Any:
        """``kind`` may be left out: per-field tables."""
        return {"kind": "per_field", **value} if isinstance(value, dict) else value


class MLPModel(ModelBase):
    """The settings of models with one MLP tower over the flat input."""

    hidden: list[PositiveInt] = Field(default_factory=lambda: [400, 400, 400])
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False


@dataclass(frozen=True)
class ArchShape:
    """What a dense arch needs to know of the sparse side: plain numbers."""

    flat_width: int  # stored embedding columns + dense features
    num_keys: int  # lookup keys (fields, or field chunks with unified embeddings)
    dim: int
    num_dense: int


@dataclass(frozen=True)
class ModelSpec:
    """One model: its config class, how the config maps onto its dense arch, and which sparse
    parts it reads. ``folds_into``: the Linear (path inside the arch) that alone reads the
    embeddings, where AFM folds an embedding projection instead of keeping one. ``capabilities``:
    what its dense arch allows (``ctr.capabilities``); its tables add their own. ``mlps``: the
    arch's MLP towers (``ctr.modules.mlp.MLP``, by attribute), whose hidden Linears AFM may
    factorise and whose BatchNorms fold into the Linear before them; ``more_factorizable``: other
    Linears it may factorise (DCNv2's cross projections), listed from a built arch."""

    config: type[ModelBase]
    arch: Callable[[Any, ArchShape], nn.Module]
    first_order: bool = False
    embeddings: bool = True
    folds_into: str | None = None
    capabilities: frozenset[str] = DENSE_ARCH
    mlps: tuple[str, ...] = ()
    more_factorizable: Callable[[nn.Module], list[str]] | None = None

    def factorizable(self, arch: nn.Module) -> list[str]:
        """Paths (inside ``arch``) of the Linears AFM may factorise, in forward order; never an output head."""
        more = self.more_factorizable(arch) if self.more_factorizable is not None else []
        return more + [p for m in self.mlps for p in arch.get_submodule(m).linears(m)]

    def foldable_norms(self, arch: nn.Module) -> list[str]:
        """Paths (inside ``arch``) of the BatchNorms that fold into the Linear just before them."""
        return [p for m in self.mlps for p in arch.get_submodule(m).norms(m)]


def penalty(*embeddings: torch.Tensor) -> torch.Tensor:
    return sum(e.pow(2).sum() for e in embeddings) / embeddings[0].shape[0]


def flat_input(emb: torch.Tensor, dense: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """``[emb (keys x dim), dense]`` with only the stored columns (all of them when ``columns`` is None)."""
    x = torch.cat([emb.flatten(1), dense], dim=1)
    return x if columns is None else x.index_select(1, columns)


class FirstOrderTerm(nn.Module):
    """The logistic-regression part after its lookup: summed per-value weights + dense term + bias."""

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.dense = nn.Linear(num_dense, 1) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, linear: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        out = linear + self.bias
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(1)
        return out


class FieldProjection(nn.Module):
    """Per field f: the first ``rank`` values of a stored row -> ``dim`` values (e U_f^T + mu_f);
    the projection back of AFM-compressed embeddings where an interaction needs them whole."""

    def __init__(self, num_fields: int, rank: int, dim: int) -> None:
        super().__init__()
        self.rank = rank
        self.weight = nn.Parameter(torch.zeros(num_fields, rank, dim))
        self.bias = nn.Parameter(torch.zeros(num_fields, dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bfk,fkd->bfd", emb[:, :, :self.rank], self.weight) + self.bias


class LowRankLinear(nn.Sequential):
    """A Linear replaced by two (in -> k -> out), e.g. by AFM."""

    def __init__(self, in_features: int, rank: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, rank), nn.Linear(rank, out_features))
        self.in_features, self.rank, self.out_features = in_features, rank, out_features


class CTRModel(nn.Module):
    """``forward`` = ``lookup`` (tables, then search gates) + ``interact`` (projection, flat input,
    first-order term, dense arch). A width search scores many masks of the same looked-up rows by
    calling ``interact`` on cached embeddings."""

    def __init__(self, embedding: nn.Module | None, first_order: nn.Module | None, projection: FieldProjection | None,
                 columns: torch.Tensor | None, arch: nn.Module, dim: int, num_dense: int,
                 capabilities: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.capabilities = capabilities  # what may be done to this model (``ctr.capabilities``)
        self.embedding = embedding
        self.first_order = first_order
        self.projection = projection
        self.register_buffer("columns", columns, persistent=False)
        self.arch = arch
        self.dim, self.num_dense = dim, num_dense
        self.gates: nn.Module | None = None  # set by a compression search (OptFS gates, OptEmbed masks)
        # the trainer turns this on when trainer.embedding_l2 > 0; otherwise the penalty is a zero and costs
        # nothing (computed on every step, it took 2% of the DNN step)
        self.embedding_penalty = False

    def lookup(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if self.embedding is None:
            return torch.zeros(sparse.stride(), 0, self.dim)
        emb = self.embedding(sparse)
        return emb if self.gates is None else self.gates(emb, sparse, self.embedding)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projection is not None:
            emb = self.projection(emb)
        x = flat_input(emb, dense, self.columns)
        if self.first_order is None:
            logits, looked_up = self.arch(emb, x, dense, torch.zeros(emb.shape[0])), (emb,)
        else:
            w = self.first_order(sparse)
            logits, looked_up = self.arch(emb, x, dense, w.sum(dim=(1, 2))), (emb, w)
        return logits, penalty(*looked_up) if self.embedding_penalty else emb.new_zeros(())

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.interact(self.lookup(sparse), dense, sparse)

