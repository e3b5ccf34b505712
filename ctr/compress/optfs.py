"""OptFS: learn one gate per feature value (embedding row), then physically drop the gated-off rows.

Search: g = sigmoid(tau * m) / sigmoid(0.5) multiplies every looked-up row (m starts at 0.5, so g
starts at 1); the loss adds lambda * sum over ALL rows of sigmoid(tau * m), densely, so rows absent
from a batch still feel the penalty; tau grows geometrically from 1 to ``final_temp`` over the search
epochs. The gates are dense parameters in the dense optimizer, apart from the fused embedding update.
The search starts from a fresh initialisation (as the reference) or from the source checkpoint's
weights (``start_from``). Then: hard mask m > 0, rewind the weights to the snapshot taken at the
start of ``rewind_epoch`` (0: the initial weights, a lottery ticket),
retrain with the mask fixed (an id remap: removed ids read a zero vector or the field's OOV row) and
early stopping, and finally compact every table to its kept rows.
"""

from __future__ import annotations

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

REFERENCE_ROWS = 6.8e6  # Criteo's vocabulary, on which the reference tuned lambda
REFERENCE_PENALTY = 1e-8
GATE_INIT = 0.5


def temperature(epoch: int, epochs: int, final_temp: float) -> float:
    """tau = final_temp ** (epoch / (epochs - 1)): 1 in the first search epoch, final_temp in the last."""
    return 1.0 if epochs == 1 else final_temp ** (epoch / (epochs - 1))


class FeatureGates(nn.Module):
    """One learnable gate per row of every per-field table (after any earlier row selection, so a
    gate belongs to the value, or the values, that read that row), applied to the looked-up rows."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.m = nn.Parameter(torch.full((sum(sizes),), GATE_INIT))
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).view(-1, 1))
        self.tau = 1.0

    def gate(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tau * m) / torch.sigmoid(torch.tensor(GATE_INIT))

    def forward(self, emb: torch.Tensor, sparse: KeyedJaggedTensor, embedding: nn.Module) -> torch.Tensor:
        rows = embedding.table_rows(sparse).clamp(min=0) + self.offsets  # a removed id reads zeros anyway
        # index_select, not m[ids]: the backward of advanced indexing accumulates with races on
        # several CPU threads, which made two runs of the same seed differ
        m = self.m.index_select(0, rows.reshape(-1)).view_as(rows)
        return emb * self.gate(m).T.unsqueeze(-1)

    def penalty(self) -> torch.Tensor:
        return torch.sigmoid(self.tau * self.m).sum()

    def kept(self) -> list[torch.Tensor]:
        """Hard mask m > 0, split per field."""
        return list(torch.split(self.m.detach() > 0, self.sizes))


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

    def __init__(self, cfg: OptFSConfig) -> None:
        self.cfg = cfg

    def penalty_weight(self, rows: int) -> float:
        if self.cfg.penalty is not None:
            return self.cfg.penalty
        return REFERENCE_PENALTY * REFERENCE_ROWS / rows

    def _search(self, ctx: StageContext, source: dict[str, Any], steps: tuple,
                sizes: list[int]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
        """The gates' hard mask, the rewind snapshot and the train rows one search epoch read."""
        c = self.cfg
        lam = self.penalty_weight(sum(sizes))
        snapshot: dict[str, torch.Tensor] = {}

        def attach(model: nn.Module) -> None:
            model.gates = FeatureGates(sizes)

        def on_epoch_start(trainer: Trainer) -> None:
            gates = trainer.model.module.gates
            gates.tau = temperature(trainer.state.epoch, c.search_epochs, c.final_temp)
            if trainer.state.epoch == c.rewind_epoch:
                snapshot.update({k: v for k, v in plain_state_dict(trainer.model).items() if not k.startswith("gates.")})

        # from init, the id remap of an earlier row selection still applies: it is data, not a weight
        start = source["model"] if c.start_from == "checkpoint" else \
            {k: v for k, v in source["model"].items() if k == REMAP_KEY}
        search_cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.search_epochs, "patience": c.search_epochs + 1, "lr_decay": 1.0, "eval_every_steps": None})})
        trainer = Trainer(search_cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "search", TrainHooks(
            steps=steps, initial_state=start, attach=attach, on_epoch_start=on_epoch_start,
            extra_loss=lambda model: lam * model.module.gates.penalty(),
            lr_ratio={"gates.": (c.gate_lr or search_cfg.trainer.lr) / search_cfg.trainer.lr},
            train_rows=sample_rows(c.search_rows, c.search_fraction, ctx.fmap.splits["train"].rows)))
        trainer.train()
        return trainer.model.module.gates.kept(), snapshot, trainer.train_data.num_rows

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
        kept, snapshot, search_rows = self._search(ctx, source, steps, sizes)
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
            "penalty": self.penalty_weight(sum(sizes)),
            "kept_rows": kept_rows,
            "kept_share": {f.name: kept_rows[f.name] / n for f, n in zip(fields, sizes)},
            "rows_before": sum(sizes), "rows_after": sum(kept_rows.values()), "search_train_rows": search_rows,
            "exact_max_diff": exact,
        }
        return StageOutput(payload=payload, details=details)
