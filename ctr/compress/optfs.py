"""OptFS: learn one gate per feature value (embedding row), then physically drop the gated-off rows.

Search: g = sigmoid(tau m) / sigmoid(tau m0) multiplies every looked-up row (m starts at m0 = 0.5,
so g starts at 1) under the penalty lambda * sum over ALL rows of sigmoid(tau m); tau grows
geometrically from 1 to ``final_temp`` over the search epochs, which read disjoint samples of the
train split (one pass: a row read twice is partly memorised and looks more useful than it is). The
gates have their own Adam, dense as in the reference: see ``FeatureGates``. The search starts from a
fresh initialisation (as the reference) or from the source checkpoint's weights (``start_from``).
Then: hard mask m > 0, and a field whose kept rows do not lower the held-out loss significantly is
removed whole (``field_significance``: one value's evidence is bounded by its count, a field's is pooled);
rewind the weights to the snapshot taken at the start of ``rewind_epoch`` (0: the initial weights, a
lottery ticket), retrain with the mask fixed (an id remap: removed ids read a zero vector or the
field's OOV row) and early stopping, and finally compact every table to its kept rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctr.capabilities import SELECT_ROWS
from ctr.checkpoint import load_checkpoint, save_checkpoint
from ctr.compress.field_significance import FieldTest, HeldOut, field_test
from ctr.compress.stage import StageContext, StageOutput, max_difference, plain_model, source_layout
from ctr.compress.stage import stage_payload, train_phase
from ctr.compress.tables import compact_rows, id_remap
from ctr.config import OptFSConfig, sample_rows
from ctr.distributed import plain_state_dict
from ctr.models.weights import ModelWeights
from ctr.structure import SelectRows
from ctr.train import Trainer, TrainHooks
from features.vocab import OOV_ID

# lambda x train rows: the reference's 1e-8 on Criteo's train split (80% of 45,840,617 rows)
REFERENCE_PENALTY_ROWS = 1e-8 * 36_672_494
GATE_INIT = 0.5
UNTOUCHED_GONE_AT = 0.5  # the share of the search after which a row no batch touched has m <= 0 (gate_lr's rule)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-30  # only guards 0 / 0: the penalty's gradient on a row falls to 1e-9 and below at large train sets


def temperature(epoch: int, epochs: int, final_temp: float) -> float:
    """tau = final_temp ** (epoch / (epochs - 1)): 1 in the first search epoch, final_temp in the last."""
    return 1.0 if epochs == 1 else final_temp ** (epoch / (epochs - 1))


class FeatureGates(nn.Module):
    """One learnable gate per row of every per-field table (after any earlier row selection, so a
    gate belongs to the value, or the values, that read that row), applied to the looked-up rows.

    The gates learn by their own Adam (step ``lr``) on loss + ``penalty`` x sum of sigmoid(tau m)
    over every row, so every row feels the penalty at every step, as in the reference. Why Adam and
    not plain SGD: a row's data gradient grows with its count in the batch, 1000x from the head of a
    field to its tail, and no single SGD step both moves a tail row and keeps a head row stable; Adam
    moves a row whose gradient is the penalty alone by ``lr`` per step, and keeps a row only while
    its data gradient's mean outweighs the penalty's. The data gradient is taken for the touched rows
    only; the Adam step runs over every row (with 2.64M rows a search step took 101 ms against the
    plain training step's 86 ms on 2 cores). The state is float64 buffers, outside the trainer's
    optimizers and checkpointed with the model, so a resumed search continues exactly."""

    def __init__(self, sizes: list[int], lr: float = 0.0, penalty: float = 0.0) -> None:
        super().__init__()
        self.sizes, self.lr, self.penalty = sizes, lr, penalty
        rows = sum(sizes)
        self.register_buffer("m", torch.full((rows,), GATE_INIT, dtype=torch.float64))
        self.register_buffer("moment1", torch.zeros(rows, dtype=torch.float64))
        self.register_buffer("moment2", torch.zeros(rows, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tau", torch.ones((), dtype=torch.float64))
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).view(-1, 1))

    def gate(self, m: torch.Tensor) -> torch.Tensor:
        """sigmoid(tau m) / sigmoid(tau m0): 1 at the initial m0 at every temperature, so raising tau
        sharpens the gates towards 0 or 1 without rescaling the rows still near m0 (the reference
        divides by sigmoid(m0), and those rows grow to 1 / sigmoid(m0) = 1.6x as tau rises)."""
        return torch.sigmoid(self.tau * m) / torch.sigmoid(self.tau * GATE_INIT)

    def set_temperature(self, tau: float) -> None:
        self.tau.fill_(tau)

    @torch.no_grad()
    def _adam_step(self, rows: torch.Tensor, touched: torch.Tensor) -> None:
        """After the backward: the penalty's gradient on every row plus the data gradient on the
        touched ones (``rows``, unique), then one Adam step over all rows."""
        z = self.tau * self.m
        grad = torch.sigmoid(z).mul_(torch.sigmoid(-z)).mul_(self.penalty * self.tau)  # d/dm penalty sigmoid(tau m)
        grad.index_add_(0, rows, touched.grad)
        self.steps += 1
        (b1, b2), t = ADAM_BETAS, int(self.steps)
        self.moment1.lerp_(grad, 1 - b1)
        self.moment2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.moment2 / (1 - b2 ** t)).sqrt_().add_(ADAM_EPS)
        self.m.addcdiv_(self.moment1, denom, value=-self.lr / (1 - b1 ** t))

    def forward(self, emb: torch.Tensor, sparse: KeyedJaggedTensor, embedding: nn.Module) -> torch.Tensor:
        rows = embedding.table_rows(sparse).clamp(min=0) + self.offsets  # a removed id reads zeros anyway
        if self.training and torch.is_grad_enabled():
            touched, where = torch.unique(rows, return_inverse=True)
            source = self.m.index_select(0, touched).requires_grad_()
            source.register_post_accumulate_grad_hook(lambda m: self._adam_step(touched, m))
            index = where.reshape(-1)
        else:
            source, index = self.m, rows.reshape(-1)
        # index_select, not m[ids]: the backward of advanced indexing accumulates with races on
        # several CPU threads, which made two runs of the same seed differ
        m = source.index_select(0, index).view_as(rows)
        return emb * self.gate(m).to(emb.dtype).T.unsqueeze(-1)

    def kept(self) -> list[torch.Tensor]:
        """Hard mask m > 0, split per field."""
        return list(torch.split(self.m > 0, self.sizes))


def masked_remap(remaps: list[torch.Tensor], kept: list[torch.Tensor], removed_to: str) -> torch.Tensor:
    """The remap with every id whose row is not kept sent to -1 (zero vector) or to its field's OOV row."""
    parts = []
    for old, mask in zip(remaps, kept):
        target = -1 if removed_to == "zero" else int(old[OOV_ID])
        alive = (old >= 0) & mask[old.clamp(min=0)]
        parts.append(torch.where(alive, old, torch.full_like(old, target)))
    return torch.cat(parts)


@dataclass
class Search:
    kept: list[torch.Tensor]  # per field, the rows kept (gates and field test)
    snapshot: dict[str, torch.Tensor]  # the weights to rewind to
    test: FieldTest  # the held-out field test's gains and verdicts
    train_rows: int  # the rows one search epoch read
    penalty: float
    gate_lr: float


class OptFSStage:
    name = "optfs"
    sizes_to_target = False

    def __init__(self, cfg: OptFSConfig) -> None:
        self.cfg = cfg

    def needs(self) -> frozenset[str]:
        return frozenset({SELECT_ROWS})

    def gate_settings(self, train_rows: int, batch_size: int) -> tuple[int | None, float, float]:
        """The rows each search epoch reads (None: all), the gates' Adam step and lambda, each the
        config's or its rule's (``OptFSConfig``): the step makes a row that no batch touches reach
        m = 0 ``UNTOUCHED_GONE_AT`` of the way through the search (Adam moves it by the step each
        step), and lambda is the reference's scaled to the train split's rows."""
        c = self.cfg
        rows = sample_rows(c.search_rows, c.search_fraction, train_rows, c.search_epochs, one_pass=True)
        steps = -(-(rows or train_rows) // batch_size) * c.search_epochs
        lr = c.gate_lr if c.gate_lr is not None else GATE_INIT / (UNTOUCHED_GONE_AT * steps)
        return rows, lr, c.penalty if c.penalty is not None else REFERENCE_PENALTY_ROWS / train_rows

    def _search(self, ctx: StageContext, source: dict[str, Any], steps: tuple, sizes: list[int]) -> Search:
        """Train with the gates (the ``search`` phase), then test every field on the validation rows
        with the searched weights. The weights to rewind to are saved when their epoch starts, so a
        search killed after that epoch still has them."""
        c = self.cfg

        def weights(trainer: Trainer) -> dict[str, torch.Tensor]:  # the model's, without the gates
            return ModelWeights(plain_state_dict(trainer.model)).without_gates()

        def on_epoch_start(trainer: Trainer) -> None:
            trainer.model.module.gates.set_temperature(temperature(trainer.state.epoch, c.search_epochs, c.final_temp))
            if trainer.state.epoch == c.rewind_epoch:
                save_checkpoint(ctx.stage.rewind, {"model": weights(trainer)})

        # from init, the id remap of an earlier row selection still applies: it is data, not a weight
        start = source["model"] if c.start_from == "checkpoint" else ModelWeights(source["model"]).only_remap()
        rows, lr, lam = self.gate_settings(ctx.fmap.splits["train"].rows, ctx.cfg.trainer.batch_size)
        hooks = TrainHooks(steps=steps, initial_state=start, on_epoch_start=on_epoch_start,
                           attach=lambda model: setattr(model, "gates", FeatureGates(sizes, lr, lam)))
        trainer = train_phase(ctx, "search", hooks, c.search_epochs, c.search_epochs + 1, best=False, sample=rows,
                              disjoint=True, lr_decay=1.0)
        gates = trainer.model.module.gates
        searched = plain_model(ctx.fmap, stage_payload(source, weights(trainer), steps))
        searched.gates = gates
        test = field_test(HeldOut(searched, ctx.split("valid")), len(sizes), c.field_p)
        kept = [k & keep for k, keep in zip(gates.kept(), test.kept)]
        snapshot = load_checkpoint(ctx.stage.rewind)["model"]
        return Search(kept, snapshot, test, trainer.train_data.num_rows, lam, lr)

    def _retrain(self, ctx: StageContext, steps: tuple, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        trainer = train_phase(ctx, "retrain", TrainHooks(steps=steps, initial_state=state), c.retrain_epochs,
                              c.retrain_patience)
        return plain_state_dict(trainer.model)

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        fields = ctx.fmap.categorical
        steps, _ = source_layout(ctx, source)
        sizes = [int(ModelWeights(source["model"]).table(f.name).shape[0]) for f in fields]
        search = self._search(ctx, source, steps, sizes)
        kept = search.kept
        remaps = id_remap(source["model"], fields)
        if self.cfg.removed_to == "oov":  # the OOV row must survive: removed ids read it
            kept = [k.clone().index_fill_(0, old[OOV_ID].clamp(min=0).view(1), True) if old[OOV_ID] >= 0 else k
                    for k, old in zip(kept, remaps)]
        # retrain with the whole tables, removed ids masked by the remap; then cut the tables
        masked = (*steps, SelectRows(rows=sizes, removed_to=self.cfg.removed_to, by=ctx.stage_id))
        start = ModelWeights(search.snapshot)
        start.set_remap(masked_remap(remaps, kept, self.cfg.removed_to))
        retrained = self._retrain(ctx, masked, start.state)
        state, rows = compact_rows(retrained, fields, kept)
        final = (*steps, SelectRows(rows=rows, removed_to=self.cfg.removed_to, by=ctx.stage_id))
        payload = stage_payload(source, state, final)
        exact = max_difference(plain_model(ctx.fmap, payload), plain_model(ctx.fmap, stage_payload(source, retrained, masked)),
                               ctx.check_batches())
        kept_rows = {f.name: int(k.sum()) for f, k in zip(fields, kept)}
        details = {
            "penalty": search.penalty, "gate_lr": search.gate_lr,
            "field_test": {f.name: {"gain": g.gain, "z": g.z} for f, g in zip(fields, search.test.gains)},
            "fields_removed": [f.name for f, keep in zip(fields, search.test.kept) if not keep],
            "removed_fields_gain": None if search.test.removed_gain is None else
            {"gain": search.test.removed_gain.gain, "z": search.test.removed_gain.z},
            "kept_rows": kept_rows,
            "kept_share": {f.name: kept_rows[f.name] / n for f, n in zip(fields, sizes)},
            "rows_before": sum(sizes), "rows_after": sum(kept_rows.values()), "search_train_rows": search.train_rows,
            "exact_max_diff": exact,
        }
        return StageOutput(payload=payload, details=details)
