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

import logging
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from ctr.compress.stage import StageContext, StageOutput, model_size, plain_model, validation_metrics
from ctr.compress.tables import table_key
from ctr.config import AFMConfig, RankRule
from ctr.distributed import plain_state_dict
from ctr.models import DNN, CTRModel, LowRankLinear
from ctr.modules.sparse import TableLayout
from ctr.train import Trainer, TrainHooks
from features.loader import ParquetBatches, head

log = logging.getLogger("ctr.compress.afm")
EMBEDDING_STEP = 4  # fbgemm's width rule for the compressed tables
BYTES_PER_PARAM = 4


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
        raise ValueError(f"a budget of {budget:,} parameters is below rank 1 for every layer ({used:,})")
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


def linear_targets(model: CTRModel) -> list[str]:
    """Factorisable Linear layers in forward order: cross layers, then the MLP (not the output head)."""
    paths = []
    if hasattr(model, "cross"):
        paths += [f"cross.layers.{i}.project" for i, layer in enumerate(model.cross.layers)
                  if isinstance(layer.project, nn.Linear)]
    paths += [f"mlp.layers.{i}" for i, m in enumerate(model.mlp.layers) if isinstance(m, nn.Linear)]
    return paths


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


def _embedding_moments(model: CTRModel, batches: list[Any], widths: list[int]) -> list[Moments]:
    found = [Moments(w) for w in widths]
    with torch.no_grad():
        for b in batches:
            emb = model.embedding(b.sparse)
            for f, w in enumerate(widths):
                found[f].add(emb[:, f, :w])
    return found


class AFMStage:
    name = "afm"

    def __init__(self, cfg: AFMConfig) -> None:
        self.cfg = cfg

    def _fold_norms(self, model: CTRModel, layout: TableLayout) -> TableLayout:
        layers = model.mlp.layers
        folded = list(layout.folded_norms)
        for i, m in enumerate(layers):
            if isinstance(m, nn.BatchNorm1d):
                layers[i - 1] = fold_batch_norm(layers[i - 1], m)
                layers[i] = nn.Identity()
                folded.append(f"mlp.layers.{i}")
        return replace(layout, folded_norms=folded)

    def _compress_embeddings(self, ctx: StageContext, model: CTRModel, layout: TableLayout,
                             batches: list[Any]) -> tuple[dict[str, torch.Tensor], TableLayout]:
        """New tables (E - mu) U; U and mu folded into a DNN's first layer, else kept as a projection."""
        fields, dim = ctx.fmap.categorical, ctx.cfg.model.embedding.dim
        widths = layout.widths or [dim] * len(fields)
        moments = _embedding_moments(model, batches, widths)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        axes, means, ranks = [], [], []
        for f, m in zip(fields, moments):
            values, vectors = principal_axes(m.covariance())
            k = rank_for(values, self.cfg.embedding_rank, EMBEDDING_STEP)
            axes.append(vectors[:, :k].to(torch.float32))
            means.append(m.mean().to(torch.float32))
            ranks.append(k)
            table = state[table_key(f.name)]
            state[table_key(f.name)] = (table - means[-1]) @ axes[-1]
        if isinstance(model, DNN):  # fold into the first layer: it reads the k-wide rows directly
            first = "mlp.layers.0"
            w, b = state[f"{first}.weight"], state[f"{first}.bias"]
            starts = torch.tensor([0, *widths]).cumsum(0)
            blocks = [w[:, int(s):int(s) + wf] for s, wf in zip(starts, widths)]
            state[f"{first}.weight"] = torch.cat([blk @ u for blk, u in zip(blocks, axes)] + [w[:, int(starts[-1]):]], 1)
            state[f"{first}.bias"] = b + sum(blk @ mu for blk, mu in zip(blocks, means))
            return state, replace(layout, widths=ranks)
        proj_w = torch.zeros(len(fields), max(ranks), dim)
        proj_b = torch.zeros(len(fields), dim)
        for f, (u, mu) in enumerate(zip(axes, means)):
            proj_w[f, :u.shape[1], :u.shape[0]] = u.T
            proj_b[f, :mu.numel()] = mu
        state["projection.weight"], state["projection.bias"] = proj_w, proj_b
        return state, replace(layout, widths=ranks, expanded=widths)

    def _layer_budget(self, ctx: StageContext, model: CTRModel, targets: list[str]) -> int | None:
        if self.cfg.layers_budget_mb is None and ctx.target_mb is None:  # ranks by rule, no budget
            return None
        factorisable = sum(model.get_submodule(p).weight.numel() + model.get_submodule(p).bias.numel() for p in targets)
        others = model_size(model.state_dict())[1] - BYTES_PER_PARAM * factorisable
        budget_bytes = (self.cfg.layers_budget_mb * 2**20 if self.cfg.layers_budget_mb is not None
                        else ctx.target_mb * 2**20 - others)
        if budget_bytes <= 0:
            raise ValueError(f"compress.target_mb {ctx.target_mb}: the parts AFM does not factorise already take "
                             f"{others / 2**20:.3f} MB; compress the embeddings further (OptFS, OptEmbed, a lower "
                             f"afm.embedding_rank) or raise the target")
        return int(budget_bytes // BYTES_PER_PARAM)

    def _compress_layers(self, ctx: StageContext, model: CTRModel, layout: TableLayout,
                         batches: list[Any]) -> TableLayout:
        targets = linear_targets(model)
        budget = self._layer_budget(ctx, model, targets)
        planned: dict[str, int] = {}
        if budget is not None:  # one pass over the uncompressed layers to share the budget out
            spectra = {}
            for p, m in _moments(model, targets, batches).items():
                layer = model.get_submodule(p)
                spectra[p] = (principal_axes(m.covariance())[0], layer.in_features, layer.out_features)
            planned = allocate_ranks(spectra, budget)
        factorized = dict(layout.factorized)
        for p in targets:  # in forward order, each on the already-compressed model upstream
            layer = model.get_submodule(p)
            m = _moments(model, [p], batches)[p]
            values, vectors = principal_axes(m.covariance())
            k = planned.get(p) or rank_for(values, self.cfg.layer_rank)
            if k * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
                continue  # two factors would not be smaller
            model.set_submodule(p, pca_pair(layer, m.mean(), vectors[:, :k]))
            factorized[p] = k
        return replace(layout, factorized=factorized)

    def _finetune(self, ctx: StageContext, payload: dict[str, Any], layout: TableLayout,
                  teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        """Fine-tune the factorised model; with a teacher, add the feature-mimicking loss: the mean
        MSE between each factorised layer's output and the original layer's on the same batch."""
        c = self.cfg
        student_out: dict[str, torch.Tensor] = {}
        teacher_out: dict[str, torch.Tensor] = {}

        def attach(model: nn.Module) -> None:
            for p in layout.factorized:
                model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: student_out.__setitem__(p, out))
                teacher.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: teacher_out.__setitem__(p, out))

            def run_teacher(module: nn.Module, args: tuple[Any, ...]) -> None:
                if module.training:
                    with torch.no_grad():
                        teacher(*args)

            model.register_forward_pre_hook(run_teacher)

        def mimic_loss(_model: nn.Module) -> torch.Tensor:
            losses = [torch.nn.functional.mse_loss(student_out[p], teacher_out[p]) for p in layout.factorized]
            return c.mimic_weight * torch.stack(losses).mean()

        mimic = teacher is not None and bool(layout.factorized)
        cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.finetune_epochs, "patience": c.finetune_patience, "eval_every_steps": None,
            "lr": ctx.cfg.trainer.lr * c.finetune_lr_scale, "sparse_lr": ctx.cfg.trainer.sparse_lr * c.finetune_lr_scale})})
        hooks = TrainHooks(tables=layout, initial_state=payload["model"], attach=attach if mimic else None,
                           extra_loss=mimic_loss if mimic else None)
        trainer = Trainer(cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "finetune", hooks)
        trainer.train(resume=(trainer.ckpt_dir / "last.pt").is_file())
        trainer.load_best_weights()
        return plain_state_dict(trainer.model)

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        c = self.cfg
        layout = TableLayout(**source.get("tables", {}))
        model = plain_model(ctx.fmap, source)
        if not isinstance(model, CTRModel) or layout.expanded or layout.factorized:
            raise ValueError("afm compresses DNN, DeepFM and DCNv2 once (no earlier afm stage); got "
                             f"model '{source['model_config']['name']}'")
        if ctx.cfg.model.embedding.kind != "per_field" and c.embeddings:
            raise ValueError("afm.embeddings needs per-field tables (embedding kind 'per_field')")
        train = ParquetBatches(ctx.data_dir / ctx.fmap.splits["train"].file, ctx.fmap, ctx.cfg.trainer.eval_batch_size)
        batches = head(train, c.calibration_rows)
        layout = self._fold_norms(model, layout)
        if c.embeddings:
            state, layout = self._compress_embeddings(ctx, model, layout, batches)
            model = plain_model(ctx.fmap, {**source, "model": state, "tables": asdict(layout)})
        if c.layers:
            layout = self._compress_layers(ctx, model, layout, batches)
        payload = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                   "model_config": source["model_config"], "tables": asdict(layout)}
        before = validation_metrics(ctx, payload)["auc"]
        after = None
        log.info("afm: validation AUC %.5f before fine-tuning", before)
        if c.finetune_epochs:
            teacher = plain_model(ctx.fmap, source) if c.mimic_weight > 0 else None
            tuned = {**payload, "model": self._finetune(ctx, payload, layout, teacher)}
            after = validation_metrics(ctx, tuned)["auc"]
        kept = after is not None and after > before  # fine-tuning can overfit a model already at its best epoch
        if kept:
            payload = tuned
        details = {"factorized": layout.factorized, "embedding_ranks": layout.widths if c.embeddings else None,
                   "valid_auc_before_finetune": before, "valid_auc_after_finetune": after, "finetuned_kept": kept}
        return StageOutput(payload=payload, details=details)
