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

from ctr.compress.stage import StageContext, StageOutput
from ctr.compress.tables import REMAP_KEY, compact_rows
from ctr.config import OptFSConfig
from ctr.distributed import plain_state_dict
from ctr.modules.sparse import TableLayout
from ctr.train import Trainer, TrainHooks
from features.feature_map import FieldInfo
from features.vocab import OOV_ID

REFERENCE_ROWS = 6.8e6  # Criteo's vocabulary, on which the reference tuned lambda
REFERENCE_PENALTY = 1e-8
GATE_INIT = 0.5


def temperature(epoch: int, epochs: int, final_temp: float) -> float:
    """tau = final_temp ** (epoch / (epochs - 1)): 1 in the first search epoch, final_temp in the last."""
    return 1.0 if epochs == 1 else final_temp ** (epoch / (epochs - 1))


class FeatureGates(nn.Module):
    """One learnable gate per row of every per-field table, applied to the looked-up rows."""

    def __init__(self, fields: list[FieldInfo]) -> None:
        super().__init__()
        sizes = [int(f.num_embeddings or 0) for f in fields]
        self.num_fields = len(fields)
        self.sizes = sizes
        self.m = nn.Parameter(torch.full((sum(sizes),), GATE_INIT))
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).view(-1, 1))
        self.tau = 1.0

    def gate(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tau * m) / torch.sigmoid(torch.tensor(GATE_INIT))

    def forward(self, emb: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        ids = sparse.values().view(self.num_fields, -1) + self.offsets
        # index_select, not m[ids]: the backward of advanced indexing accumulates with races on
        # several CPU threads, which made two runs of the same seed differ
        m = self.m.index_select(0, ids.reshape(-1)).view_as(ids)
        return emb * self.gate(m).T.unsqueeze(-1)

    def penalty(self) -> torch.Tensor:
        return torch.sigmoid(self.tau * self.m).sum()

    def kept(self) -> list[torch.Tensor]:
        """Hard mask m > 0, split per field."""
        return list(torch.split(self.m.detach() > 0, self.sizes))


def remap_for(kept: list[torch.Tensor], removed_to: str) -> torch.Tensor:
    """Full-size remap: kept ids keep their row, removed ids go to -1 (zero vector) or the OOV id."""
    parts = []
    for mask in kept:
        ids = torch.arange(mask.numel(), dtype=torch.int64)
        parts.append(torch.where(mask, ids, torch.full_like(ids, -1 if removed_to == "zero" else OOV_ID)))
    return torch.cat(parts)


class OptFSStage:
    name = "optfs"

    def __init__(self, cfg: OptFSConfig) -> None:
        self.cfg = cfg

    def penalty_weight(self, fields: list[FieldInfo]) -> float:
        if self.cfg.penalty is not None:
            return self.cfg.penalty
        return REFERENCE_PENALTY * REFERENCE_ROWS / sum(int(f.num_embeddings or 0) for f in fields)

    def _search(self, ctx: StageContext, source: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        c, fields = self.cfg, ctx.fmap.categorical
        lam = self.penalty_weight(fields)
        snapshot: dict[str, torch.Tensor] = {}

        def attach(model: nn.Module) -> None:
            model.gates = FeatureGates(fields)

        def on_epoch_start(trainer: Trainer) -> None:
            gates = trainer.model.module.gates
            gates.tau = temperature(trainer.state.epoch, c.search_epochs, c.final_temp)
            if trainer.state.epoch == c.rewind_epoch:
                snapshot.update({k: v for k, v in plain_state_dict(trainer.model).items() if not k.startswith("gates.")})

        search_cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.search_epochs, "patience": c.search_epochs + 1, "lr_decay": 1.0, "eval_every_steps": None})})
        trainer = Trainer(search_cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "search", TrainHooks(
            initial_state=source["model"] if c.start_from == "checkpoint" else None,
            attach=attach, on_epoch_start=on_epoch_start,
            extra_loss=lambda model: lam * model.module.gates.penalty(),
            lr_ratio={"gates.": (c.gate_lr or search_cfg.trainer.lr) / search_cfg.trainer.lr}))
        trainer.train()
        kept = trainer.model.module.gates.kept()
        if self.cfg.removed_to == "oov":  # the OOV row must survive: removed ids read it
            kept = [k.clone().index_fill_(0, torch.tensor([OOV_ID]), True) for k in kept]
        return kept, snapshot

    def _retrain(self, ctx: StageContext, kept: list[torch.Tensor], snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        state = {**snapshot, REMAP_KEY: remap_for(kept, c.removed_to)}
        retrain_cfg = ctx.cfg.model_copy(update={"trainer": ctx.cfg.trainer.model_copy(update={
            "epochs": c.retrain_epochs, "patience": c.retrain_patience, "eval_every_steps": None})})
        trainer = Trainer(retrain_cfg, ctx.fmap, ctx.data_dir, ctx.work_dir / "retrain",
                          TrainHooks(tables=TableLayout(remapped=True), initial_state=state))
        trainer.train()
        trainer.load_best_weights()
        return plain_state_dict(trainer.model)

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        fields = ctx.fmap.categorical
        kept, snapshot = self._search(ctx, source)
        retrained = self._retrain(ctx, kept, snapshot)
        state, rows = compact_rows(retrained, fields, kept)
        payload = {"model": state, "model_config": source["model_config"], "tables": {"rows": rows, "remapped": True}}
        vocab = {f.name: int(f.num_embeddings or 0) for f in fields}
        kept_rows = {f.name: int(k.sum()) for f, k in zip(fields, kept)}
        details = {
            "penalty": self.penalty_weight(fields),
            "kept_rows": kept_rows,
            "kept_share": {name: kept_rows[name] / vocab[name] for name in vocab},
            "rows_before": sum(vocab.values()), "rows_after": sum(kept_rows.values()),
        }
        return StageOutput(payload=payload, details=details)


