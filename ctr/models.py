"""CTR models composed from the named modules; ``build_model`` maps the ``model:`` config section.

Every model takes (dense [B, n_dense], sparse KJT) and returns (logits [B], embedding penalty):
the penalty is the mean squared norm of the embedding rows looked up for the batch, so an L2 on
embeddings reaches exactly the rows the fused optimizer updates.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctr.config import ModelConfig
from ctr.modules import META
from ctr.modules.interactions import CrossNetwork, factorization_machine
from ctr.modules.mlp import MLP
from ctr.modules.sparse import SparseArch, TableLayout, make_sparse_arch, prefix_columns
from features.feature_map import FeatureMap

FIRST_ORDER_DIM = 4  # fbgemm's smallest width; the four values of a row are summed into one weight


def _penalty(*embeddings: torch.Tensor) -> torch.Tensor:
    return sum(e.pow(2).sum() for e in embeddings) / embeddings[0].shape[0]


class FirstOrder(nn.Module):
    """Logistic-regression part: one weight per feature value plus a linear term on dense features."""

    def __init__(self, fmap: FeatureMap, init_range: float, device: torch.device) -> None:
        super().__init__()
        self.weights = SparseArch(fmap.categorical, FIRST_ORDER_DIM, init_range, prefix="lr", device=device)
        self.dense = nn.Linear(len(fmap.dense), 1) if fmap.dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(sparse)
        out = w.sum(dim=(1, 2)) + self.bias
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(1)
        return out, w


class CTRModel(nn.Module):
    """Shared front: embeddings of every lookup key (a field, or a field's chunk with unified
    embeddings), and their concatenation with the dense features.

    ``forward`` = ``lookup`` then ``interact``: a width search scores many masks of the same looked-up
    rows by calling ``interact`` on cached embeddings. With per-field widths (OptEmbed) the flat input
    holds only the stored columns, so the first layer that reads it is that much narrower.
    """

    def __init__(self, fmap: FeatureMap, cfg: ModelConfig, device: torch.device, tables: TableLayout | None) -> None:
        super().__init__()
        self.embedding = make_sparse_arch(fmap.categorical, cfg.embedding, device, tables)
        wide = self.embedding.num_keys * cfg.embedding.dim
        layout = tables or TableLayout()
        # AFM's per-field up-projection: narrow table rows -> the widths the interactions read
        self.projection = (FieldProjection(layout.widths, layout.expanded, cfg.embedding.dim)
                           if layout.expanded else None)
        widths = layout.expanded or layout.widths
        columns = (torch.cat([prefix_columns(widths, cfg.embedding.dim), wide + torch.arange(len(fmap.dense))])
                   if widths else None)
        self.register_buffer("columns", columns, persistent=False)
        self.flat_width = len(columns) if columns is not None else wide + len(fmap.dense)
        self.gates: nn.Module | None = None  # set by a compression search (OptFS gates, OptEmbed masks)

    def lookup(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.embedding(sparse)
        if self.projection is not None:
            emb = self.projection(emb)
        return emb if self.gates is None else self.gates(emb, sparse)

    def flat(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = torch.cat([emb.flatten(1), dense], dim=1)
        return x if self.columns is None else x.index_select(1, self.columns)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.interact(self.lookup(sparse), dense, sparse)


class FieldProjection(nn.Module):
    """Per field f: a ``widths[f]``-wide row -> ``expanded[f]`` values (e U_f^T + mu_f), zero-padded
    to ``dim``; the projection of AFM-compressed embeddings where an interaction needs them whole."""

    def __init__(self, widths: list[int], expanded: list[int], dim: int) -> None:
        super().__init__()
        self.k = max(widths)
        self.weight = nn.Parameter(torch.zeros(len(widths), self.k, dim))
        self.bias = nn.Parameter(torch.zeros(len(widths), dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bfk,fkd->bfd", emb[:, :, :self.k], self.weight) + self.bias


class LowRankLinear(nn.Sequential):
    """A Linear replaced by two (in -> k -> out), e.g. by AFM."""

    def __init__(self, in_features: int, rank: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, rank), nn.Linear(rank, out_features))
        self.in_features, self.rank, self.out_features = in_features, rank, out_features


def restructure(model: nn.Module, layout: TableLayout) -> None:
    """Apply the recorded module replacements: folded BatchNorms -> identity, Linear -> LowRankLinear."""
    for path in layout.folded_norms:
        model.set_submodule(path, nn.Identity())
    for path, rank in layout.factorized.items():
        linear = model.get_submodule(path)
        model.set_submodule(path, LowRankLinear(linear.in_features, rank, linear.out_features))


class LogisticRegression(nn.Module):
    def __init__(self, fmap: FeatureMap, cfg: ModelConfig, device: torch.device, tables: TableLayout | None) -> None:
        super().__init__()
        if tables is not None and tables != TableLayout():
            raise ValueError("model 'lr' has only first-order weights: no embedding table or layer to reshape")
        self.first_order = FirstOrder(fmap, cfg.embedding.init_range, device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, w = self.first_order(dense, sparse)
        return logit, _penalty(w)


class DNN(CTRModel):
    def __init__(self, fmap: FeatureMap, cfg: ModelConfig, device: torch.device, tables: TableLayout | None) -> None:
        super().__init__(fmap, cfg, device, tables)
        self.mlp = MLP(self.flat_width, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.head = nn.Linear(self.mlp.out_features, 1)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.mlp(self.flat(emb, dense))).squeeze(1), _penalty(emb)


class DeepFM(CTRModel):
    def __init__(self, fmap: FeatureMap, cfg: ModelConfig, device: torch.device, tables: TableLayout | None) -> None:
        super().__init__(fmap, cfg, device, tables)
        self.first_order = FirstOrder(fmap, cfg.embedding.init_range, device)
        self.mlp = MLP(self.flat_width, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.head = nn.Linear(self.mlp.out_features, 1)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        linear, w = self.first_order(dense, sparse)
        logit = linear + factorization_machine(emb) + self.head(self.mlp(self.flat(emb, dense))).squeeze(1)
        return logit, _penalty(emb, w)


class DCNv2(CTRModel):
    def __init__(self, fmap: FeatureMap, cfg: ModelConfig, device: torch.device, tables: TableLayout | None) -> None:
        super().__init__(fmap, cfg, device, tables)
        self.structure = cfg.structure
        self.cross = CrossNetwork(self.flat_width, cfg.cross_layers, cfg.low_rank)
        self.mlp = MLP(self.flat_width, cfg.hidden, cfg.dropout, cfg.batch_norm)
        stacked = cfg.structure == "stacked"  # stacked: MLP(cross(x0)); parallel: [cross(x0), MLP(x0)]
        self.head = nn.Linear(self.mlp.out_features if stacked else self.flat_width + self.mlp.out_features, 1)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.flat(emb, dense)
        if self.structure == "stacked":
            out = self.mlp(self.cross(x0))
        else:
            out = torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        return self.head(out).squeeze(1), _penalty(emb)


MODELS: dict[str, type[nn.Module]] = {"lr": LogisticRegression, "dnn": DNN, "deepfm": DeepFM, "dcnv2": DCNv2}


def build_model(fmap: FeatureMap, cfg: ModelConfig, device: torch.device = META,
                tables: TableLayout | None = None) -> nn.Module:
    """The model named by ``cfg.name``. Tables stay on the meta device (the default) until
    DistributedModelParallel places them; ``device=cpu`` gives a plain, unsharded model.
    ``tables`` rebuilds the reshaped per-field tables a compression stage left behind."""
    model = MODELS[cfg.name](fmap, cfg, device, tables)
    if tables is not None:
        restructure(model, tables)
    return model
