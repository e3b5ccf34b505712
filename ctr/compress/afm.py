"""AFM (atomic feature mimicking): low-rank compression of layer outputs and embeddings by PCA.

For a Linear layer y = W x + b, stream calibration rows through the frozen model, accumulate the mean
mu and covariance C of y in float64 (before any activation; a following BatchNorm is folded into the
Linear first), take the top-k eigenvectors U of C, and replace the layer by (U^T W, U^T b) followed
by (U, (I - U U^T) mu): their output is mu + U U^T (y - mu), the rank-k PCA reconstruction of y,
the best rank-k approximation of the outputs in squared error (an SVD of W ignores the data). Layers
are compressed in forward order, each on statistics of the already-compressed model upstream.

Embeddings: per field, the same statistics over the rows looked up (so weighted by frequency); the
table becomes (E - mu) U, k wide. Where the embeddings feed the first DNN layer directly, U and mu
are folded into that layer; where an interaction (FM, cross network) needs the whole vector, a
per-field up-projection restores it (e U^T + mu).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from ctr.capabilities import FACTORIZE_EMBEDDINGS, FACTORIZE_LAYERS
from ctr.compress.stage import (
    StageContext,
    StageOutput,
    fine_tune,
    max_difference,
    model_size,
    plain_model,
    source_layout,
    stage_payload,
    validation_metrics,
)
from ctr.config import AFMConfig, RankRule
from ctr.edge.layout import DENSE_PARAM_BYTES
from ctr.loader import Batch, ParquetBatches, head
from ctr.models import MODELS
from ctr.models.base import CTRModel, LowRankLinear, ModelSpec
from ctr.models.weights import ModelWeights
from ctr.structure import FactorizeEmbedding, FactorizeLinear, FoldNorm, Layout, Step

log = logging.getLogger("ctr.compress.afm")
EMBEDDING_STEP = 4  # fbgemm's width rule for the compressed tables
MAX_REPLANS = 3  # measured plans of the layer ranks before the stage keeps the last one


class Moments:
    """Running float64 sums of y and y y^T over rows: mean and covariance without a second pass."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(width, dtype=torch.float64)
        self.s2 = torch.zeros(width, width, dtype=torch.float64)

    def add(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
        self.n += y.shape[0]
        self.s1 += y.sum(0)
        self.s2 += y.T @ y

    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.s2 / self.n - torch.outer(mu, mu)


def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clipped at 0) and the matching eigenvectors (columns) of a covariance."""
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(0).clamp(min=0.0), vectors.flip(1)


def pca_pair(linear: nn.Linear, mu: torch.Tensor, axes: torch.Tensor) -> LowRankLinear:
    """The two Linears whose output is mu + U U^T (W x + b - mu), U = ``axes`` (out x k)."""
    w, b = linear.weight.detach().to(torch.float64), linear.bias.detach().to(torch.float64)
    u = axes.to(torch.float64)
    pair = LowRankLinear(linear.in_features, u.shape[1], linear.out_features)
    with torch.no_grad():
        pair[0].weight.copy_(u.T @ w)
        pair[0].bias.copy_(u.T @ b)
        pair[1].weight.copy_(u)
        pair[1].bias.copy_(mu - u @ (u.T @ mu))
    return pair


def fold_batch_norm(linear: nn.Linear, norm: nn.BatchNorm1d) -> nn.Linear:
    """One Linear equal to BatchNorm(Linear(x)) in evaluation mode."""
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale.unsqueeze(1))
        folded.bias.copy_((linear.bias - norm.running_mean) * scale + norm.bias)
    return folded


def rank_for(values: torch.Tensor, rule: RankRule, step: int = 1) -> int:
    """The rank a rule asks for, rounded up to a multiple of ``step`` and capped at the width."""
    width = values.numel()
    if rule.fixed is not None:
        k = rule.fixed
    elif rule.fraction is not None:
        k = int(torch.ceil(torch.tensor(rule.fraction * width)).item())
    else:
        retained = values.cumsum(0) / values.sum().clamp(min=1e-300)
        k = int((retained < rule.energy - 1e-12).sum().item()) + 1
    k = -(-max(k, 1) // step) * step
    return min(k, width)


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], budget: int) -> dict[str, int]:
    """Ranks for several layers within ``budget`` parameters (k (in + out + 1) + out each), losing the least retained variance: start every layer at rank 1 and keep
    giving the next rank to the layer whose next eigenvalue share per added parameter is largest.
    Each layer's variance is taken relative to its own total, so layers of any scale compare."""
    share = {name: values / values.sum().clamp(min=1e-300) for name, (values, _, _) in spectra.items()}
    cost = {name: i + o + 1 for name, (_, i, o) in spectra.items()}  # a row of U^T W, a column of U, a bias
    ranks = {name: 1 for name in spectra}
    used = sum(cost[name] + o for name, (_, _, o) in spectra.items())  # + the second factor's bias
    if used > budget:
        raise ConfigError(f"a budget of {budget:,} parameters is below rank 1 for every layer ({used:,} needed) "
                          "(raise afm.layers_budget_mb or compress.target_mb)")
    while True:
        best, gain = None, -1.0
        for name, k in ranks.items():
            values, i, o = spectra[name]
            if k < values.numel() and used + cost[name] <= budget and (k + 1) * cost[name] < i * o:
                g = float(share[name][k]) / cost[name]
                if g > gain:
                    best, gain = name, g
        if best is None:
            return ranks
        ranks[best] += 1
        used += cost[best]


def linear_targets(spec: ModelSpec, model: CTRModel) -> list[str]:
    """The Linears the model's spec says AFM may factorise, in forward order (never an output head)."""
    return [f"arch.{p}" for p in spec.factorizable(model.arch)]


def _moments(model: nn.Module, paths: list[str], batches: list[Any]) -> dict[str, Moments]:
    """Output moments of the modules at ``paths`` over the calibration batches (one forward pass)."""
    found = {p: Moments(model.get_submodule(p).out_features) for p in paths}
    hooks = [model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: found[p].add(out)) for p in paths]
    with torch.no_grad():
        for b in batches:
            model(b.dense, b.sparse)
    for h in hooks:
        h.remove()
    return found


def _embedding_moments(model: CTRModel, batches: list[Batch], widths: list[int]) -> list[Moments]:
    found = [Moments(w) for w in widths]
    with torch.no_grad():
        for b in batches:
            emb = model.embedding(b.sparse)
            for f, w in enumerate(widths):
                found[f].add(emb[:, f, :w])
    return found


class Factorisation:
    """The PCA pieces a stage chose (per field and per layer), and the model they claim to give:
    the source model whose looked-up rows and layer outputs are replaced by their reconstructions
    mu + U U^T (y - mu) (a removed row, which reads nothing, becomes mu)."""

    def __init__(self) -> None:
        self.fields: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mu, U) per field
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _reconstruct(y: torch.Tensor, mu: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return mu + (y - mu) @ u @ u.T

    def claimed(self, model: CTRModel) -> CTRModel:
        """Hooks on ``model`` (in place) that turn it into the factorised model it claims to equal."""
        if self.fields:
            def rows(module: nn.Module, inputs: tuple[Any, ...], emb: torch.Tensor) -> torch.Tensor:
                kept = (module.table_rows(inputs[0]) >= 0).T.unsqueeze(-1).to(emb.dtype)
                out = emb.clone()
                for f, (mu, u) in enumerate(self.fields):
                    w = u.shape[0]
                    out[:, f, :w] = mu + kept[:, f] * ((emb[:, f, :w] - mu) @ u @ u.T)
                return out

            model.embedding.register_forward_hook(rows)
        for path, (mu, u) in self.layers.items():
            model.get_submodule(path).register_forward_hook(
                lambda _m, _i, y, mu=mu, u=u: self._reconstruct(y, mu, u))
        return model


class AFMStage:
    name = "afm"
    sizes_to_target = True

    def __init__(self, cfg: AFMConfig) -> None:
        self.cfg = cfg

    def needs(self) -> frozenset[str]:
        return frozenset({FACTORIZE_EMBEDDINGS} if self.cfg.embeddings else ()) | \
            frozenset({FACTORIZE_LAYERS} if self.cfg.layers else ())

    def _fold_norms(self, ctx: StageContext, model: CTRModel) -> list[Step]:
        """Every BatchNorm the model's spec names folded into the Linear before it (exact in evaluation)."""
        steps: list[Step] = []
        for path in MODELS[ctx.cfg.model.name].foldable_norms(model.arch):
            parent, _, index = path.rpartition(".")
            layers, i = model.arch.get_submodule(parent), int(index)
            layers[i - 1] = fold_batch_norm(layers[i - 1], layers[i])
            layers[i] = nn.Identity()
            steps.append(FoldNorm(path=f"arch.{path}", by=ctx.stage_id))
        return steps

    def _compress_embeddings(self, ctx: StageContext, model: CTRModel, layout: Layout, batches: list[Batch],
                             found: Factorisation) -> tuple[dict[str, torch.Tensor], Step]:
        """New tables (E - mu) U; U and mu folded into the layer that alone reads the embeddings
        (the model says which, e.g. a DNN's first layer), else kept as a per-field projection."""
        fields, dim = ctx.fmap.categorical, ctx.cfg.model.embedding.dim
        widths = layout.stored_widths
        moments = _embedding_moments(model, batches, widths)
        state = ModelWeights({k: v.detach().clone() for k, v in model.state_dict().items()})
        axes, means, ranks = [], [], []
        for f, m in zip(fields, moments):
            values, vectors = principal_axes(m.covariance())
            k = rank_for(values, self.cfg.embedding_rank, EMBEDDING_STEP)
            axes.append(vectors[:, :k].to(torch.float32))
            means.append(m.mean().to(torch.float32))
            ranks.append(k)
            state.set_table(f.name, (state.table(f.name) - means[-1]) @ axes[-1])
        found.fields = list(zip(means, axes))
        target = MODELS[ctx.cfg.model.name].folds_into
        if target is not None and layout.projection_rank is None and f"arch.{target}" not in layout.factorized:
            first = f"arch.{target}"
            w, b = state.linear(first)
            starts = torch.tensor([0, *widths]).cumsum(0)
            blocks = [w[:, int(s):int(s) + wf] for s, wf in zip(starts, widths)]
            state.set_linear(first, torch.cat([blk @ u for blk, u in zip(blocks, axes)] + [w[:, int(starts[-1]):]], 1),
                             b + sum(blk @ mu for blk, mu in zip(blocks, means)))
            return state.state, FactorizeEmbedding(ranks=ranks, restores=list(widths), folded=True, by=ctx.stage_id)
        proj_w = torch.zeros(len(fields), max(ranks), dim)
        proj_b = torch.zeros(len(fields), dim)
        for f, (u, mu) in enumerate(zip(axes, means)):
            proj_w[f, :u.shape[1], :u.shape[0]] = u.T
            proj_b[f, :mu.numel()] = mu
        state.set_projection(proj_w, proj_b)
        return state.state, FactorizeEmbedding(ranks=ranks, restores=list(widths), folded=False, by=ctx.stage_id)

    @staticmethod
    def _probe(model: CTRModel, ranks: dict[str, int]) -> CTRModel:
        """A copy of ``model`` with each named layer a pair of factors of the given rank (untrained):
        a file of the planned shape, to measure."""
        probe = copy.deepcopy(model)
        for p, k in ranks.items():
            layer = probe.get_submodule(p)
            probe.set_submodule(p, LowRankLinear(layer.in_features, k, layer.out_features))
        return probe

    def _layer_budget(self, ctx: StageContext, model: CTRModel, targets: list[str]) -> int | None:
        if self.cfg.layers_budget_mb is None and ctx.target_mb is None:  # ranks by rule, no budget
            return None
        # the whole file less the factors, measured with every target already a pair of rank 1, so
        # the file's format part holds the code of the factorised layers too
        probe = self._probe(model, dict.fromkeys(targets, 1))
        factors = sum(v.numel() for p in targets for v in probe.get_submodule(p).parameters())
        others = sum(model_size(ctx.fmap, ctx.data_dir, probe)[1].values()) - DENSE_PARAM_BYTES * factors
        budget_bytes = (self.cfg.layers_budget_mb * 2**20 if self.cfg.layers_budget_mb is not None
                        else ctx.target_mb * 2**20 - others)
        if budget_bytes <= 0:
            raise ConfigError(f"compress.target_mb {ctx.target_mb}: the parts AFM does not factorise already take "
                             f"{others / 2**20:.3f} MB; compress the embeddings further (OptFS, OptEmbed, a lower "
                             f"afm.embedding_rank) or raise the target")
        return int(budget_bytes // DENSE_PARAM_BYTES)

    def _within_target(self, ctx: StageContext, model: CTRModel, spectra: dict[str, tuple[torch.Tensor, int, int]],
                       budget: int, planned: dict[str, int]) -> dict[str, int]:
        """The planned ranks, lowered until the planned file fits ``target_mb``. The file's format
        part (TorchScript's bytes beside the tensors) grows with the ranks, about a tenth of the
        dense bytes they add, which the rank-1 probe of ``_layer_budget`` cannot see: the planned
        file is measured and the excess taken off the budget (a DCNv2 recipe ended 13 kB over)."""
        for _ in range(MAX_REPLANS):
            excess = sum(model_size(ctx.fmap, ctx.data_dir, self._probe(model, planned))[1].values()) \
                - ctx.target_mb * 2**20
            if excess <= 0:
                break
            budget -= math.ceil(excess / DENSE_PARAM_BYTES)
            planned = allocate_ranks(spectra, budget)
        return planned

    def _compress_layers(self, ctx: StageContext, model: CTRModel, batches: list[Batch],
                         found: Factorisation) -> list[Step]:
        targets = linear_targets(MODELS[ctx.cfg.model.name], model)
        budget = self._layer_budget(ctx, model, targets)
        planned: dict[str, int] = {}
        if budget is not None:  # one pass over the uncompressed layers to share the budget out
            spectra = {}
            for p, m in _moments(model, targets, batches).items():
                layer = model.get_submodule(p)
                spectra[p] = (principal_axes(m.covariance())[0], layer.in_features, layer.out_features)
            planned = allocate_ranks(spectra, budget)
            if self.cfg.layers_budget_mb is None:
                planned = self._within_target(ctx, model, spectra, budget, planned)
        steps: list[Step] = []
        for p in targets:  # in forward order, each on the already-compressed model upstream
            layer = model.get_submodule(p)
            m = _moments(model, [p], batches)[p]
            values, vectors = principal_axes(m.covariance())
            k = planned.get(p) or rank_for(values, self.cfg.layer_rank)
            if k * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
                continue  # two factors would not be smaller
            pair = pca_pair(layer, m.mean(), vectors[:, :k])
            model.set_submodule(p, pair)
            found.layers[p] = (m.mean().to(torch.float32), vectors[:, :k].to(torch.float32))
            steps.append(FactorizeLinear(path=p, rank=k, by=ctx.stage_id))
        return steps

    def _finetune(self, ctx: StageContext, payload: dict[str, Any], steps: tuple[Step, ...], factorized: list[str],
                  teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        """Fine-tune the factorised model; with a teacher, add the feature-mimicking loss: the mean
        MSE between each factorised layer's output and the original layer's on the same batch."""
        c = self.cfg
        student_out: dict[str, torch.Tensor] = {}
        teacher_out: dict[str, torch.Tensor] = {}

        def attach(model: nn.Module) -> None:
            for p in factorized:
                model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: student_out.__setitem__(p, out))
                teacher.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: teacher_out.__setitem__(p, out))

            def run_teacher(module: nn.Module, args: tuple[Any, ...]) -> None:
                if module.training:
                    with torch.no_grad():
                        teacher(*args)

            model.register_forward_pre_hook(run_teacher)

        def mimic_loss(_model: nn.Module) -> torch.Tensor:
            losses = [torch.nn.functional.mse_loss(student_out[p], teacher_out[p]) for p in factorized]
            return c.mimic_weight * torch.stack(losses).mean()

        mimic = teacher is not None and bool(factorized)
        return fine_tune(ctx, payload["model"], steps, c.finetune_epochs, c.finetune_patience, c.finetune_lr_scale,
                         attach if mimic else None, mimic_loss if mimic else None)

    def _refuse_repeats(self, ctx: StageContext, layout: Layout) -> None:
        """AFM factorises each table and layer once: a second pass over the same parts is refused up front."""
        c = self.cfg
        if c.embeddings and "factorize_embedding" in layout.by:
            raise ConfigError(f"{ctx.stage_id}: afm.embeddings cannot follow {layout.by['factorize_embedding']}, "
                             "which already factorised the embeddings (set embeddings: false here, or drop one stage)")
        if c.layers and layout.factorized:
            raise ConfigError(f"{ctx.stage_id}: afm.layers cannot follow {layout.by['factorize_linear']}, which already "
                             "factorised the layers (set layers: false here, or drop one stage)")

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        c = self.cfg
        steps, layout = source_layout(ctx, source)
        self._refuse_repeats(ctx, layout)
        model = plain_model(ctx.fmap, source)
        train = ParquetBatches(ctx.data_dir / ctx.fmap.splits["train"].file, ctx.fmap, ctx.cfg.trainer.eval_batch_size)
        batches = head(train, c.calibration_rows)
        found = Factorisation()
        added: list[Step] = self._fold_norms(ctx, model)
        if c.embeddings:
            state, step = self._compress_embeddings(ctx, model, layout, batches, found)
            added.append(step)
            model = plain_model(ctx.fmap, stage_payload(source, state, (*steps, *added)))
        if c.layers:
            added += self._compress_layers(ctx, model, batches, found)
        final = (*steps, *added)
        payload = stage_payload(source, {k: v.detach().clone() for k, v in model.state_dict().items()}, final)
        reshaped = plain_model(ctx.fmap, payload)
        exact = max_difference(reshaped, found.claimed(plain_model(ctx.fmap, source)), ctx.check_batches())
        before = validation_metrics(ctx, reshaped)["auc"]
        after = None
        log.info("afm: validation AUC %.5f before fine-tuning", before)
        factorized = [s.path for s in added if isinstance(s, FactorizeLinear)]
        if c.finetune_epochs:
            teacher = plain_model(ctx.fmap, source) if c.mimic_weight > 0 else None
            tuned = {**payload, "model": self._finetune(ctx, payload, final, factorized, teacher)}
            after = validation_metrics(ctx, plain_model(ctx.fmap, tuned))["auc"]
        kept = after is not None and after > before  # fine-tuning can overfit a model already at its best epoch
        if kept:
            payload = tuned
        embedding = next((s for s in added if isinstance(s, FactorizeEmbedding)), None)
        details = {"factorized": {s.path: s.rank for s in added if isinstance(s, FactorizeLinear)},
                   "embedding_ranks": embedding.ranks if embedding else None,
                   "valid_auc_before_finetune": before, "valid_auc_after_finetune": after, "finetuned_kept": kept,
                   "exact_max_diff": exact}
        return StageOutput(payload=payload, details=details)
