"""OptEmbed: prune embedding rows by learned per-field thresholds and give every field its own width.

1. Supernet: every looked-up row is kept iff its full-width L1 norm exceeds its field's threshold
   t_f (a unit step whose backward is the long-tailed straight-through estimator of Dynamic Sparse
   Training, so pruned rows can come back); the loss adds alpha * sum_f exp(-t_f), which pushes the
   thresholds up; the thresholds have their own plain SGD. Each sample and field trains a random
   prefix of the row (a multiple of 4, fbgemm's width rule), so every narrower width is trained too.
2. Evolutionary search over per-field widths, scored by validation AUC on a cached subsample: the
   looked-up rows are computed once, and each candidate only masks them and runs the layers after
   the embeddings. Crossover cuts the list of FIELDS at one point (the reference cut at a dimension
   index, which mostly copied a parent).
3. Retrain with real tables: kept rows only, each field ``width`` columns wide, and the first layer
   that reads the embeddings sliced to match (exactly the masked model, before retraining), from the
   supernet's weights or rewound to its starting weights (on data where a second epoch overfits,
   only the rewind can reach the baseline's AUC).

Every phase resumes: the two training phases from their checkpoints, the search from its last
logged generation.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from common.atomic import atomic_write_text
from common.errors import ConfigError
from common.json_lines import append_json_line, read_json_lines
from ctr.capabilities import NARROW_WIDTHS, SELECT_ROWS
from ctr.checkpoint import load_checkpoint, save_checkpoint
from ctr.compress.stage import StageContext, StageOutput, max_difference, plain_model, source_layout
from ctr.compress.stage import stage_payload, train_phase
from ctr.compress.tables import compact_rows, narrow_state
from ctr.config import OptEmbedConfig, sample_rows
from ctr.distributed import load_plain_state_dict, plain_state_dict
from ctr.loader import Batch, head
from ctr.metrics import auc
from ctr.models import build_model, model_layout
from ctr.models.base import GATES, CTRModel
from ctr.models.weights import ModelWeights
from ctr.structure import Layout, NarrowWidths, SelectRows, Step
from ctr.train import Trainer, TrainHooks

log = logging.getLogger("ctr.compress.optembed")
WIDTH_STEP = 4  # fbgemm's width rule: every candidate width is a multiple of 4


def step_gradient(x: torch.Tensor) -> torch.Tensor:
    """The straight-through derivative of the unit step: 2 - 4|x| on |x| <= 0.4, 0.4 on
    0.4 < |x| <= 1, 0 beyond (continuous at 0.4, a long tail up to 1)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2.0 - 4.0 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


class BinaryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * step_gradient(x)


def prefix_mask(widths: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., dim]`` mask keeping the first ``widths[...]`` values of each row."""
    return torch.arange(dim, device=widths.device) < widths.unsqueeze(-1)


class OptEmbedMask(nn.Module):
    """The supernet's masks on the looked-up rows ``[B, F, D]``: a row mask by threshold (if
    ``rows``), then a prefix width: random per sample and field in training (at most the field's
    stored width ``limits[f]``), ``widths`` (a search candidate) or the full width in evaluation."""

    def __init__(self, limits: list[int], dim: int, rows: bool) -> None:
        super().__init__()
        self.dim = dim
        self.threshold = nn.Parameter(torch.zeros(len(limits))) if rows else None
        self.register_buffer("limits", torch.tensor(limits, dtype=torch.int64), persistent=False)
        self.widths: torch.Tensor | None = None

    def row_mask(self, emb: torch.Tensor) -> torch.Tensor:
        assert self.threshold is not None
        return BinaryStep.apply(emb.abs().sum(-1) - self.threshold)

    def forward(self, emb: torch.Tensor, sparse: KeyedJaggedTensor, embedding: nn.Module) -> torch.Tensor:
        if self.threshold is not None:
            emb = emb * self.row_mask(emb).unsqueeze(-1)
        if self.training:
            widths = torch.minimum(WIDTH_STEP * torch.randint(1, self.dim // WIDTH_STEP + 1, emb.shape[:2]), self.limits)
        elif self.widths is not None:
            widths = self.widths
        else:
            return emb
        return emb * prefix_mask(widths, self.dim).to(emb.dtype)

    def penalty(self) -> torch.Tensor:
        assert self.threshold is not None
        return torch.exp(-self.threshold).sum()


def mutate(candidate: np.ndarray, prob: float, choices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy in which each field's width is redrawn from ``choices`` with probability ``prob``."""
    redraw = rng.random(candidate.size) < prob
    return np.where(redraw, rng.choice(choices, size=candidate.size), candidate)


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One-point crossover over fields: a's widths before a cut in [1, F-1], b's from it on."""
    cut = int(rng.integers(1, a.size)) if a.size > 1 else 0
    return np.concatenate([a[:cut], b[cut:]])


class WidthSearch:
    """Evolution over per-field widths with fitness = AUC on cached, row-masked embeddings."""

    def __init__(self, cfg: OptEmbedConfig, model: nn.Module, cache: list[tuple[torch.Tensor, Batch]],
                 kept_rows: np.ndarray, full_params: int, seed: int) -> None:
        self.cfg, self.model, self.cache = cfg, model, cache
        self.dim = model.gates.dim
        self.limits = model.gates.limits.numpy()  # each field's stored width: no candidate is wider
        self.choices = np.arange(WIDTH_STEP, self.dim + 1, WIDTH_STEP)
        self.kept_rows = kept_rows
        self.budget = None if cfg.max_embedding_share is None else cfg.max_embedding_share * full_params
        self.labels = np.concatenate([b.labels.numpy() for _, b in cache])
        self.scores: dict[tuple[int, ...], float] = {}
        self.rng = np.random.default_rng(seed)
        narrowest = int(kept_rows.sum()) * WIDTH_STEP
        if self.budget is not None and narrowest > self.budget:
            raise ConfigError(f"optembed.max_embedding_share {cfg.max_embedding_share} is below what the narrowest "
                             f"candidate (every field {WIDTH_STEP} wide) needs: {narrowest / full_params:.4f} (raise the share)")

    def params(self, widths: np.ndarray) -> int:
        return int((self.kept_rows * widths).sum())

    def fitness(self, widths: np.ndarray) -> float:
        key = tuple(int(w) for w in widths)
        if key not in self.scores:
            if self.budget is not None and self.params(widths) > self.budget:
                self.scores[key] = -np.inf
            else:
                mask = prefix_mask(torch.as_tensor(widths), self.dim).to(torch.float32)
                with torch.no_grad():
                    probs = [torch.sigmoid(self.model.interact(emb * mask, b.dense, b.sparse)[0]).numpy()
                             for emb, b in self.cache]
                self.scores[key] = auc(self.labels, np.concatenate(probs))
        return self.scores[key]

    def fit_budget(self, widths: np.ndarray) -> np.ndarray:
        """Narrow random fields one step at a time until the candidate fits the budget."""
        widths = widths.copy()
        while self.budget is not None and self.params(widths) > self.budget:
            wide = np.flatnonzero(widths > WIDTH_STEP)
            widths[self.rng.choice(wide)] -= WIDTH_STEP
        return widths

    def initial(self) -> list[np.ndarray]:
        n = self.kept_rows.size
        return [self.fit_budget(np.minimum(self.rng.choice(self.choices, size=n), self.limits))
                for _ in range(self.cfg.population)]

    def next_generation(self, ranked: list[np.ndarray]) -> list[np.ndarray]:
        c = self.cfg
        parents = ranked[:c.parents]
        mutants = [np.minimum(mutate(p, c.mutation_prob, self.choices, self.rng), self.limits)
                   for p in parents[:c.population // 2]]
        children = []
        while len(mutants) + len(children) < c.population:
            i, j = self.rng.choice(len(parents), size=2, replace=False)
            children.append(crossover(parents[i], parents[j], self.rng))
        return mutants + children

    def run(self, log_path: Any) -> dict[str, Any]:
        """Run the generations (continuing after the last one logged) and return the best candidate."""
        done = read_json_lines(log_path) if log_path.is_file() else []
        if done:
            last = done[-1]
            population = [np.array(p) for p in last["next_population"]]
            self.rng.bit_generator.state = last["rng"]
            best = (last["best_auc"], np.array(last["best_widths"]))
        else:
            population, best = self.initial(), (-np.inf, None)
        for generation in range(len(done), self.cfg.generations):
            ranked = sorted(population, key=self.fitness, reverse=True)
            if self.fitness(ranked[0]) > best[0]:
                best = (self.fitness(ranked[0]), ranked[0])
            population = self.next_generation(ranked)
            append_json_line(log_path, {
                "generation": generation, "best_auc": best[0], "best_widths": best[1].tolist(),
                "best_params": self.params(best[1]),
                "next_population": [p.tolist() for p in population], "rng": self.rng.bit_generator.state})
            log.info("generation %d: best AUC %.5f, embedding parameters %d", generation, best[0], self.params(best[1]))
        if best[1] is None or not np.isfinite(best[0]):
            raise RuntimeError("the width search found no candidate within the budget")
        return {"widths": best[1].tolist(), "auc": best[0], "params": self.params(best[1]),
                "scored_here": len(self.scores)}  # distinct candidates scored by this process


class OptEmbedStage:
    name = "optembed"
    sizes_to_target = False

    def __init__(self, cfg: OptEmbedConfig) -> None:
        self.cfg = cfg

    def needs(self) -> frozenset[str]:
        return frozenset({NARROW_WIDTHS, SELECT_ROWS} if self.cfg.rows else {NARROW_WIDTHS})

    def _mask(self, ctx: StageContext, layout: Layout) -> OptEmbedMask:
        return OptEmbedMask(layout.stored_widths, ctx.cfg.model.embedding.dim, self.cfg.rows)

    def _supernet(self, ctx: StageContext, source: dict[str, Any], steps: tuple[Step, ...],
                  layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The supernet's best weights, and its starting weights (kept on disk for a rewind)."""
        c = self.cfg
        rewind = ctx.stage.rewind

        def attach(model: nn.Module) -> None:
            model.gates = self._mask(ctx, layout)

        def snapshot(trainer: Trainer) -> None:
            if trainer.state.epoch == 0:
                save_checkpoint(rewind, {"model": ModelWeights(plain_state_dict(trainer.model)).without_gates()})

        # from init, the id remap of an earlier row selection still applies: it is data, not a weight
        start = source["model"] if c.start_from == "checkpoint" else ModelWeights(source["model"]).only_remap()
        penalty = (lambda model: c.threshold_penalty * model.module.gates.penalty()) if c.rows else None
        hooks = TrainHooks(steps=steps, initial_state=start, attach=attach, extra_loss=penalty,
                           sgd_lr={f"{GATES}.": c.threshold_lr}, on_epoch_start=snapshot)
        sample = sample_rows(c.supernet_rows, c.supernet_fraction, ctx.fmap.splits["train"].rows, c.supernet_epochs)
        best = plain_state_dict(train_phase(ctx, "supernet", hooks, c.supernet_epochs, ctx.cfg.trainer.patience,
                                            sample=sample).model)
        return best, load_checkpoint(rewind)["model"]

    def _kept_rows(self, ctx: StageContext, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Rows whose stored L1 norm passes their field's threshold (all rows with ``rows: false``)."""
        fields = ctx.fmap.categorical
        weights = ModelWeights(state)
        tables = [weights.table(f.name) for f in fields]
        if not self.cfg.rows:
            return [torch.ones(t.shape[0], dtype=torch.bool) for t in tables]
        return [t.abs().sum(1) > th for t, th in zip(tables, weights.gate("threshold"))]

    def _masked_supernet(self, ctx: StageContext, state: dict[str, torch.Tensor], steps: tuple[Step, ...],
                         layout: Layout, widths: list[int] | None = None) -> CTRModel:
        """The supernet in evaluation: its row mask, and the prefix ``widths`` (None: full width)."""
        model = build_model(ctx.fmap, ctx.cfg.model, device=torch.device("cpu"), steps=steps)
        model.gates = self._mask(ctx, layout)
        load_plain_state_dict(model, state)
        if widths is not None:
            model.gates.widths = torch.tensor(widths)
        return model.eval()

    def _search(self, ctx: StageContext, state: dict[str, torch.Tensor], steps: tuple[Step, ...], layout: Layout,
                kept: list[torch.Tensor]) -> dict[str, Any]:
        result_path = ctx.stage.search_result
        if result_path.is_file():
            return json.loads(result_path.read_text())
        started = time.perf_counter()
        dim = ctx.cfg.model.embedding.dim
        model = self._masked_supernet(ctx, state, steps, layout)
        with torch.no_grad():
            cache = [(model.lookup(b.sparse), b) for b in head(ctx.split("valid"), self.cfg.search_rows)]
        cached = sum(b.size for _, b in cache)
        rows = np.array([int(k.sum()) for k in kept])
        full = sum(ModelWeights(state).table(f.name).shape[0] for f in ctx.fmap.categorical) * dim
        search = WidthSearch(self.cfg, model, cache, rows, full, ctx.cfg.trainer.seed)
        result = {**search.run(ctx.stage.search_log), "rows": cached,
                  "seconds": time.perf_counter() - started}
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
        return result

    def _narrow(self, ctx: StageContext, state: dict[str, torch.Tensor], steps: tuple[Step, ...],
                kept: list[torch.Tensor], widths: list[int]) -> tuple[dict[str, torch.Tensor], tuple[Step, ...]]:
        """Real tables: the kept rows only (with ``rows``), each field ``widths[f]`` wide, and every
        layer that reads the flat input sliced to match; the structure steps that say so."""
        fields = ctx.fmap.categorical
        state = ModelWeights(state).without_gates()
        if self.cfg.rows:
            state, rows = compact_rows(state, fields, kept)
            steps = (*steps, SelectRows(rows=rows, by=ctx.stage_id))
        before = model_layout(ctx.fmap, ctx.cfg.model, steps)
        narrowed = (*steps, NarrowWidths(widths=list(widths), by=ctx.stage_id))
        shapes = {k: v.shape for k, v in build_model(ctx.fmap, ctx.cfg.model, steps=narrowed).state_dict().items()}
        after = model_layout(ctx.fmap, ctx.cfg.model, narrowed)
        return narrow_state(state, shapes, fields, before, after, len(ctx.fmap.dense)), narrowed

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        steps, layout = source_layout(ctx, source)
        fields = ctx.fmap.categorical
        supernet, initial = self._supernet(ctx, source, steps, layout)
        kept = self._kept_rows(ctx, supernet)
        found = self._search(ctx, supernet, steps, layout, kept)
        # the reshaped model must be the masked supernet it came from, before any retraining
        narrowed_state, narrowed = self._narrow(ctx, supernet, steps, kept, found["widths"])
        claimed = self._masked_supernet(ctx, supernet, steps, layout, found["widths"])
        exact = max_difference(plain_model(ctx.fmap, stage_payload(source, narrowed_state, narrowed)), claimed,
                               ctx.check_batches())
        start_state = (narrowed_state if self.cfg.retrain_from == "supernet"
                       else self._narrow(ctx, initial, steps, kept, found["widths"])[0])
        c = self.cfg
        hooks = TrainHooks(steps=narrowed, initial_state=start_state)
        state = plain_state_dict(train_phase(ctx, "retrain", hooks, c.retrain_epochs, c.retrain_patience).model)
        payload = stage_payload(source, state, narrowed)
        rows_before = sum(int(k.numel()) for k in kept)
        details = {
            "widths": dict(zip((f.name for f in fields), found["widths"])),
            "kept_rows": {f.name: int(k.sum()) for f, k in zip(fields, kept)},
            "rows_before": rows_before, "rows_after": sum(int(k.sum()) for k in kept),
            "search_auc": found["auc"], "search_seconds": found["seconds"], "search_rows": found["rows"],
            "exact_max_diff": exact,
        }
        if self.cfg.rows:
            details["thresholds"] = dict(zip((f.name for f in fields), ModelWeights(supernet).gate("threshold").tolist()))
        return StageOutput(payload=payload, details=details)
