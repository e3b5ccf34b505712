"""Quantize: embedding rows as 8, 4 or 2-bit row-wise codes, then quantization-aware fine-tuning.

Each field's rows are stored as integer codes with an fp16 scale and bias per row (the arithmetic
of ``ctr.modules.quantized``, shared by training and the edge file). Under a byte budget the bits
are chosen per field, greedily as AFM chooses ranks: every field starts at the fewest bits, and the
next upgrade goes to the field whose expected damage falls most per added byte. A field's damage
at b bits is its mean squared gradient of the loss per looked-up row times the mean squared
quantization error of its looked-up rows (a second-order estimate of the loss increase, both
frequency-weighted by measuring them on calibration rows). The model then trains on through the
codes with a straight-through gradient, so the rows move to where their codes predict well.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from common.errors import ConfigError
from ctr.capabilities import QUANTIZE_ROWS
from ctr.compress.stage import (
    StageContext,
    StageOutput,
    fine_tune,
    model_size,
    plain_model,
    source_layout,
    stage_payload,
    validation_metrics,
)
from ctr.config import QuantizeConfig
from ctr.edge.layout import edge_slots, row_bytes, vocabulary_keys
from ctr.loader import Batch, ParquetBatches, head
from ctr.models.base import CTRModel
from ctr.modules.quantized import levels_of, read_back, stored_columns
from ctr.structure import Layout, QuantizeRows, Step

log = logging.getLogger("ctr.compress.quantize")
def allocate_bits(rows: list[int], widths: list[int], damage: list[dict[int, float]], budget: int,
                  choices: list[int]) -> list[int]:
    """Per field, bits from ``choices`` whose tables fit ``budget`` bytes, losing the least damage:
    start every field at the fewest bits and keep giving the next width up to the field whose
    damage falls most per added byte, while the budget allows."""
    ladder = sorted(set(choices))
    bits = [ladder[0]] * len(rows)
    used = sum(r * row_bytes(w, ladder[0]) for r, w in zip(rows, widths))
    if used > budget:
        raise ConfigError(f"the tables need {used:,} bytes at {ladder[0]} bits in every field, over the budget of "
                          f"{budget:,} (raise compress.target_mb, or select rows first: OptFS, OptEmbed)")
    while True:
        best, gain, cost = None, 0.0, 0
        for f, b in enumerate(bits):
            if b == ladder[-1]:
                continue
            up = ladder[ladder.index(b) + 1]
            extra = rows[f] * (row_bytes(widths[f], up) - row_bytes(widths[f], b))
            g = (damage[f][b] - damage[f][up]) / max(extra, 1)
            if used + extra <= budget and (best is None or g > gain):
                best, gain, cost = f, g, extra
        if best is None:
            return bits
        bits[best] = ladder[ladder.index(bits[best]) + 1]
        used += cost


def field_damage(model: CTRModel, batches: list[Batch], widths: list[int], choices: list[int]) -> list[dict[int, float]]:
    """Per field and width: mean squared loss gradient of a looked-up row x mean squared error its
    codes make, over the calibration rows."""
    fields = len(widths)
    stored = stored_columns(widths, model.dim)
    grad_sq = torch.zeros(fields, dtype=torch.float64)
    error = {b: torch.zeros(fields, dtype=torch.float64) for b in choices}
    rows = 0
    for batch in batches:
        emb = model.lookup(batch.sparse).detach().requires_grad_(True)
        logits, _ = model.interact(emb, batch.dense, batch.sparse)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, emb)
        grad_sq += grad.detach().pow(2).sum((0, 2)).to(torch.float64)
        x = emb.detach()
        for b in choices:
            error[b] += (read_back(x, float(levels_of(b)), stored.unsqueeze(0)) - x).pow(2).sum((0, 2)).to(torch.float64)
        rows += x.shape[0]
    return [{b: float(grad_sq[f] / rows) * float(error[b][f] / rows) for b in choices} for f in range(fields)]


class QuantizeStage:
    name = "quantize"
    sizes_to_target = True

    def __init__(self, cfg: QuantizeConfig) -> None:
        self.cfg = cfg

    def needs(self) -> frozenset[str]:
        return frozenset({QUANTIZE_ROWS})

    def _bits(self, ctx: StageContext, source: dict[str, Any], steps: tuple[Step, ...], model: CTRModel,
              layout: Layout) -> tuple[list[int], dict[str, Any]]:
        c, fields = self.cfg, len(ctx.fmap.categorical)
        if c.bits is not None:
            return [c.bits] * fields, {}
        if ctx.target_mb is None:
            return [8] * fields, {}
        rows = [s.ids.size for s in edge_slots(model, ctx.fmap, vocabulary_keys(ctx.data_dir, ctx.fmap))]
        widths = layout.stored_widths
        # the whole file less its tables, measured with every code in use (each code's tables are one
        # more group of tensors in the file), so any allocation's file fits
        mixed = [c.choices[f % len(c.choices)] for f in range(fields)]
        probe = plain_model(ctx.fmap, stage_payload(source, source["model"], (*steps, QuantizeRows(bits=mixed, by=ctx.stage_id))))
        tables = sum(r * row_bytes(w, b) for r, w, b in zip(rows, widths, mixed))
        others = sum(model_size(ctx.fmap, ctx.data_dir, probe)[1].values()) - tables
        budget = int(ctx.target_mb * 2**20) - others
        if budget <= 0:
            raise ConfigError(f"compress.target_mb {ctx.target_mb}: the parts quantize does not touch (dense layers, "
                              f"vocabulary) already take {others / 2**20:.3f} MB (raise the target, or compress those "
                              "first: AFM layers, fewer rows)")
        train = ParquetBatches(ctx.data_dir / ctx.fmap.splits["train"].file, ctx.fmap, ctx.cfg.trainer.eval_batch_size)
        damage = field_damage(model, head(train, c.calibration_rows), widths, list(c.choices))
        try:
            bits = allocate_bits(rows, widths, damage, budget, list(c.choices))
        except ConfigError as exc:
            raise ConfigError(f"{ctx.stage_id}: compress.target_mb {ctx.target_mb:g}: {exc}") from None
        return bits, {"damage": damage, "table_budget": budget}

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput:
        c = self.cfg
        steps, layout = source_layout(ctx, source)
        model = plain_model(ctx.fmap, source)
        bits, allocation = self._bits(ctx, source, steps, model, layout)
        final = (*steps, QuantizeRows(bits=bits, by=ctx.stage_id))
        payload = stage_payload(source, source["model"], final)
        before = validation_metrics(ctx, plain_model(ctx.fmap, payload))["auc"]
        log.info("quantize: bits %s; validation AUC %.5f before fine-tuning", bits, before)
        after = None
        if c.finetune_epochs:
            tuned = {**payload, "model": fine_tune(ctx, payload["model"], final, c.finetune_epochs,
                                                   c.finetune_patience, c.finetune_lr_scale)}
            after = validation_metrics(ctx, plain_model(ctx.fmap, tuned))["auc"]
            if after > before:  # fine-tuning can overfit a model already at its best epoch
                payload = tuned
        details = {"bits": bits, "valid_auc_before_finetune": before, "valid_auc_after_finetune": after,
                   "finetuned_kept": after is not None and after > before, **allocation}
        return StageOutput(payload=payload, details=details)
