"""OptFS: learn one gate per feature value (embedding row), then physically drop the gated-off rows.

Search: g = sigmoid(tau * m) / sigmoid(0.5) multiplies every looked-up row (m starts at 0.5, so g
starts at 1) under the penalty lambda * sum over ALL rows of sigmoid(tau * m); tau grows
geometrically from 1 to ``final_temp`` over the search epochs. The gates have their own plain SGD
(step ``lr``), updated sparsely: see ``FeatureGates``. The search starts from a fresh initialisation
(as the reference) or from the source checkpoint's weights (``start_from``). Then: hard mask m > 0,
rewind the weights to the snapshot taken at the start of ``rewind_epoch`` (0: the initial weights, a
lottery ticket), retrain with the mask fixed (an id remap: removed ids read a zero vector or the
field's OOV row) and early stopping, and finally compact every table to its kept rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from common.errors import ConfigError
from ctr.compress.stage import StageContext, StageOutput, max_difference, plain_model, source_layout, stage_payload
from ctr.compress.tables import REMAP_KEY, compact_rows, id_remap, table_key
from ctr.config import OptFSConfig, sample_rows
from ctr.distributed import plain_state_dict
from ctr.structure import SelectRows
from ctr.train import Trainer, TrainHooks
from features.vocab import OOV_ID

REFERENCE_ROWS = 36_672_494  # Criteo's train split (80% of 45,840,617 rows), on which the reference tuned lambda
REFERENCE_PENALTY = 1e-8
GATE_INIT = 0.5
SATURATED = 30.0  # |tau m| beyond which the penalty's pull on a row is one exact-to-rounding step
UNTOUCHED_GONE_AT = 0.5  # the share of the search after which a row no batch touched has m <= 0 (gate_lr's rule)


def temperature(epoch: int, epochs: int, final_temp: float) -> float:
    """tau = final_temp ** (epoch / (epochs - 1)): 1 in the first search epoch, final_temp in the last."""
    return 1.0 if epochs == 1 else final_temp ** (epoch / (epochs - 1))


def _potential(z: torch.Tensor) -> torch.Tensor:
    """2z + 2 sinh z: the penalty's gradient flow lowers it at a constant rate (see ``penalty_flow``)."""
    return 2 * z + 2 * torch.sinh(z)


def penalty_flow(m: torch.Tensor, steps: torch.Tensor | float, pull: float, tau: float) -> torch.Tensor:
    """m after ``steps`` SGD steps' worth of the penalty alone, integrated exactly (float64).

    The gradient flow dm/dt = -pull * d sigmoid(tau m)/dm, with pull = lr * lambda, is
    dz/dt = -pull tau^2 / (2 + 2 cosh z) for z = tau m, so 2z + 2 sinh z falls by pull * tau^2 per
    step. Flowing k steps at once equals flowing one step k times, which is what lets a row's
    penalty wait until a batch touches it. The potential is inverted by Newton's method (it is odd
    and increasing, with slope at least 4). Where |z| > SATURATED the pull is below 1e-13 of the
    drop and one Newton step from z is exact to rounding, without sinh's overflow."""
    z = tau * m.double()
    drop = pull * tau * tau * torch.as_tensor(steps, dtype=torch.float64)
    slope = torch.sigmoid(z) * torch.sigmoid(-z)  # 1 / (2 + 2 cosh z), without overflow
    far = z.abs() > SATURATED
    near = torch.where(far, 0.0, z)
    target = _potential(near) - drop
    root = torch.asinh(target / 4)  # exact near 0, within log 2 of the root for large |target|
    for _ in range(60):
        step = (_potential(root) - target) / (2 + 2 * torch.cosh(root))
        root = root - step
        if bool((step.abs() <= 1e-13 * (1 + root.abs())).all()):
            break
    return torch.where(far, z - drop * slope, root) / tau


def gate_lr_rule(penalty: float, steps_per_epoch: int, epochs: int, final_temp: float) -> float:
    """The gates' SGD step at which a row that no batch touches reaches m = 0 after
    ``UNTOUCHED_GONE_AT`` of the search's steps, under the temperature schedule and lambda =
    ``penalty`` (the pull is lr * lambda). Found by bisection on log lr: the crossing is monotone in lr."""
    deadline = UNTOUCHED_GONE_AT * steps_per_epoch * epochs

    def gone(lr: float) -> bool:
        m, done = torch.tensor([GATE_INIT], dtype=torch.float64), 0.0
        for epoch in range(epochs):
            steps = min(steps_per_epoch, deadline - done)
            if steps <= 0:
                break
            m = penalty_flow(m, steps, lr * penalty, temperature(epoch, epochs, final_temp))
            done += steps
        return bool(m.item() <= 0)

    low, high = -30.0, 30.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if gone(math.exp(mid)) else (mid, high)
    return math.exp(high)


class FeatureGates(nn.Module):
    """One learnable gate per row of every per-field table (after any earlier row selection, so a
    gate belongs to the value, or the values, that read that row), applied to the looked-up rows.

    The gates learn by their own SGD with step ``lr``, and a step costs what the batch touches, not
    the vocabulary: the data gradient exists only for touched rows, and the penalty's pull on a row
    is applied lazily, as its exact flow (``penalty_flow``) over the steps since the row was last
    brought up to date, just before a batch reads it, and for every row whenever the model leaves
    training mode (validation, the end of each epoch) or the temperature changes. A dense step
    m <- flow_1(m) - lr * grad over all rows gives the same numbers. ``m`` is float64 so that one
    long flow and many short ones round alike; the gates are buffers, outside the trainer's
    optimizers, and checkpointed with the model (``last``: the step each row is current at)."""

    def __init__(self, sizes: list[int], lr: float = 0.0, penalty: float = 0.0) -> None:
        super().__init__()
        self.sizes, self.lr, self.penalty = sizes, lr, penalty
        self.register_buffer("m", torch.full((sum(sizes),), GATE_INIT, dtype=torch.float64))
        self.register_buffer("last", torch.zeros(sum(sizes), dtype=torch.int64))
        self.register_buffer("clock", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tau", torch.ones((), dtype=torch.float64))
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).view(-1, 1))

    def gate(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tau * m) / torch.sigmoid(torch.tensor(GATE_INIT, dtype=torch.float64))

    @torch.no_grad()
    def _bring_up_to_date(self, rows: torch.Tensor) -> None:
        behind = self.clock - self.last.index_select(0, rows)
        late = behind > 0
        if self.penalty > 0 and bool(late.any()):
            rows, behind = rows[late], behind[late]
            self.m.index_copy_(0, rows, penalty_flow(self.m.index_select(0, rows), behind, self.lr * self.penalty,
                                                     float(self.tau)))
        self.last.index_fill_(0, rows, int(self.clock))

    @torch.no_grad()
    def settle(self) -> None:
        """Apply every row's pending penalty: the state the dense rule has at this step."""
        self._bring_up_to_date(torch.arange(self.m.numel()))

    def set_temperature(self, tau: float) -> None:
        self.settle()  # the pending pull was under the old temperature
        self.tau.fill_(tau)

    def train(self, mode: bool = True) -> "FeatureGates":
        if not mode:
            self.settle()
        return super().train(mode)

    @torch.no_grad()
    def _sgd_step(self, rows: torch.Tensor, m: torch.Tensor) -> None:
        """After the backward: the touched rows take this step's penalty flow and data gradient."""
        flowed = penalty_flow(m, 1.0, self.lr * self.penalty, float(self.tau)) if self.penalty > 0 else m
        self.m.index_copy_(0, rows, flowed - self.lr * m.grad)
        self.clock += 1
        self.last.index_fill_(0, rows, int(self.clock))

    def forward(self, emb: torch.Tensor, sparse: KeyedJaggedTensor, embedding: nn.Module) -> torch.Tensor:
        rows = embedding.table_rows(sparse).clamp(min=0) + self.offsets  # a removed id reads zeros anyway
        if self.training and torch.is_grad_enabled():
            touched, where = torch.unique(rows, return_inverse=True)
            self._bring_up_to_date(touched)
            source = self.m.index_select(0, touched).requires_grad_()
            source.register_post_accumulate_grad_hook(lambda m: self._sgd_step(touched, m))
            index = where.reshape(-1)
        else:
            source, index = self.m, rows.reshape(-1)
        # index_select, not m[ids]: the backward of advanced indexing accumulates with races on
        # several CPU threads, which made two runs of the same seed differ
        m = source.index_select(0, index).view_as(rows)
        return emb * self.gate(m).to(emb.dtype).T.unsqueeze(-1)

    def kept(self) -> list[torch.Tensor]:
        """Hard mask m > 0, split per field (after every pending penalty)."""
        self.settle()
        return list(torch.split(self.m > 0, self.sizes))


def masked_remap(remaps: list[torch.Tensor], kept: list[torch.Tensor], removed_to: str) -> torch.Tensor:
    """The remap with every id whose row is not kept sent to -1 (zero vector) or to its field's OOV row."""
    parts = []
    for old, mask in zip(remaps, kept):
        target = -1 if removed_to == "zero" else int(old[OOV_ID])
        alive = (old >= 0) & mask[old.clamp(min=0)]
        parts.append(torch.where(alive, old, torch.full_like(old, target)))
    return torch.cat(parts)


class OptFSStage:
    name = "optfs"
    sizes_to_target = False

    def __init__(self, cfg: OptFSConfig) -> None:
        self.cfg = cfg

    def penalty_weight(self, search_rows: int) -> float:
        """lambda: the config's, or the reference's scaled to the rows a search epoch reads (the same
        count threshold at any size; see ``OptFSConfig``)."""
        if self.cfg.penalty is not None:
            return self.cfg.penalty
        return REFERENCE_PENALTY * REFERENCE_ROWS / search_rows

    def _search(self, ctx: StageContext, source: dict[str, Any], steps: tuple,
                sizes: list[int]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int, float, float]:
        """The gates' hard mask, the rewind snapshot, the train rows one search epoch read, lambda and
        the gates' SGD step."""
        c = self.cfg
        snapshot: dict[str, torch.Tensor] = {}

        def on_epoch_start(trainer: Trainer) -> None:
            trainer.model.module.gates.set_temperature(temperature(trainer.state.epoch, c.search_epochs, c.final_temp))
            if trainer.state.epoch == c.rewind_epoch:
                snapshot.update({k: v for k, v in plain_state_dict(trainer.model).items() if not k.startswith("gates.")})

        # from init, the id remap of an earlier row selection still applies: it is data, not a weight
        start = source["model"] if c.start_from == "checkpoint" else \
            {k: v for k, v in source["model"].items() if k == REMAP_KEY}
        search_cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.search_epochs, "patience": c.search_epochs + 1, "lr_decay": 1.0, "eval_every_steps": None})})
        hooks = TrainHooks(steps=steps, initial_state=start, on_epoch_start=on_epoch_start,
                           train_rows=sample_rows(c.search_rows, c.search_fraction, ctx.fmap.splits["train"].rows,
                                                  c.search_epochs))
        trainer = Trainer(search_cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "search", hooks)
        lam = self.penalty_weight(trainer.train_data.num_rows)
        lr = self.gate_lr(lam, len(trainer.train_data), search_cfg.trainer.lr)
        hooks.attach = lambda model: setattr(model, "gates", FeatureGates(sizes, lr, lam))
        trainer.train()
        return trainer.model.module.gates.kept(), snapshot, trainer.train_data.num_rows, lam, lr

    def gate_lr(self, penalty: float, steps_per_epoch: int, trainer_lr: float) -> float:
        """``gate_lr``, or the rule's: a row no batch touches is gone halfway through the search
        (without a penalty nothing pulls: the trainer's lr)."""
        c = self.cfg
        if c.gate_lr is not None:
            return c.gate_lr
        return gate_lr_rule(penalty, steps_per_epoch, c.search_epochs, c.final_temp) if penalty > 0 else trainer_lr

    def _retrain(self, ctx: StageContext, steps: tuple, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        retrain_cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.retrain_epochs, "patience": c.retrain_patience, "eval_every_steps": None})})
        trainer = Trainer(retrain_cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "retrain",
                          TrainHooks(steps=steps, initial_state=state))
        trainer.train()
        trainer.load_best_weights()
        return plain_state_dict(trainer.model)

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        fields = ctx.fmap.categorical
        steps, _ = source_layout(ctx, source)
        if ctx.cfg.model.embedding.kind != "per_field":
            raise ConfigError(f"optfs selects rows of per-field tables; embedding kind '{ctx.cfg.model.embedding.kind}' "
                             "shares hashed tables (use kind 'per_field')")
        sizes = [int(source["model"][table_key(f.name)].shape[0]) for f in fields]
        kept, snapshot, search_rows, penalty, gate_lr = self._search(ctx, source, steps, sizes)
        remaps = id_remap(source["model"], fields)
        if self.cfg.removed_to == "oov":  # the OOV row must survive: removed ids read it
            kept = [k.clone().index_fill_(0, old[OOV_ID].clamp(min=0).view(1), True) if old[OOV_ID] >= 0 else k
                    for k, old in zip(kept, remaps)]
        # retrain with the whole tables, removed ids masked by the remap; then cut the tables
        masked = (*steps, SelectRows(rows=sizes, removed_to=self.cfg.removed_to, by=ctx.stage_id))
        start = {**snapshot, REMAP_KEY: masked_remap(remaps, kept, self.cfg.removed_to)}
        retrained = self._retrain(ctx, masked, start)
        state, rows = compact_rows(retrained, fields, kept)
        final = (*steps, SelectRows(rows=rows, removed_to=self.cfg.removed_to, by=ctx.stage_id))
        payload = stage_payload(source, state, final)
        exact = max_difference(plain_model(ctx.fmap, payload), plain_model(ctx.fmap, stage_payload(source, retrained, masked)),
                               ctx.check_batches())
        kept_rows = {f.name: int(k.sum()) for f, k in zip(fields, kept)}
        details = {
            "penalty": penalty, "gate_lr": gate_lr,
            "kept_rows": kept_rows,
            "kept_share": {f.name: kept_rows[f.name] / n for f, n in zip(fields, sizes)},
            "rows_before": sum(sizes), "rows_after": sum(kept_rows.values()), "search_train_rows": search_rows,
            "exact_max_diff": exact,
        }
        return StageOutput(payload=payload, details=details)
