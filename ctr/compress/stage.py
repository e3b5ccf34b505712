"""What every compression stage shares: its context, the checkpoint it reads and writes, model size.

A stage is a small class with one job: ``run(ctx, source) -> StageOutput``. It reads the source's
structure steps and appends its own, so it never needs to know which stages ran before it; the
recipe runner chains them, reuses the ones whose inputs did not change and writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ctr.capabilities import EDGE_FORM
from ctr.distributed import load_plain_state_dict, plain_state_dict
from ctr.edge.model import edge_of, file_parts, scripted_file
from ctr.experiment import ExperimentConfig
from ctr.loader import Batch, ParquetBatches, head
from ctr.metrics import classification_metrics
from ctr.models import build_model, model_config, model_layout
from ctr.models.base import CTRModel
from ctr.run_dir import StageDir
from ctr.structure import Layout, Step, step_to_dict, steps_from_payload
from ctr.train import Runtime, Trainer, TrainHooks, predict
from features.feature_map import FeatureMap

CHECK_ROWS = 4096  # validation rows on which a stage checks that its reshaped model equals the claimed one


@dataclass(frozen=True)
class StageContext:
    cfg: ExperimentConfig
    fmap: FeatureMap
    data_dir: Path
    stage: StageDir  # this stage's own folder
    stage_id: str = ""  # e.g. "02_afm": recorded in the steps this stage adds
    target_mb: float | None = None  # the recipe's size target, for the stage that sizes itself to it

    def split(self, name: str) -> ParquetBatches:
        return ParquetBatches(self.data_dir / self.fmap.splits[name].file, self.fmap, self.cfg.trainer.eval_batch_size)

    def check_batches(self) -> list[Batch]:
        return head(ParquetBatches(self.data_dir / self.fmap.splits["valid"].file, self.fmap, CHECK_ROWS), CHECK_ROWS)


@dataclass
class StageOutput:
    payload: dict[str, Any]  # the checkpoint: "model", "model_config", "steps"
    details: dict[str, Any] = field(default_factory=dict)  # stage-specific numbers for the report


class Stage(Protocol):
    name: str
    sizes_to_target: bool  # sizes itself to the recipe's target_mb (see recipe.sizing_stage)

    def needs(self) -> frozenset[str]: ...  # the capabilities (``ctr.capabilities``) its settings use

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput: ...


def source_layout(ctx: StageContext, source: dict[str, Any]) -> tuple[tuple[Step, ...], Layout]:
    steps = steps_from_payload(source)
    return steps, model_layout(ctx.fmap, ctx.cfg.model, steps)


def stage_payload(source: dict[str, Any], state: dict[str, torch.Tensor], steps: tuple[Step, ...]) -> dict[str, Any]:
    return {"model": state, "model_config": source["model_config"], "steps": [step_to_dict(s) for s in steps]}


def plain_model(fmap: FeatureMap, payload: dict[str, Any]) -> CTRModel:
    """An unsharded CPU model rebuilt from a checkpoint (its config and structure steps) with its weights."""
    model = build_model(fmap, model_config(**payload["model_config"]), device=torch.device("cpu"),
                        steps=steps_from_payload(payload))
    load_plain_state_dict(model, payload["model"])
    model.eval()
    return model


def max_difference(a: torch.nn.Module, b: torch.nn.Module, batches: list[Batch]) -> float:
    """Largest |probability difference| of two models over the batches: how exactly one is the other."""
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            pa = torch.sigmoid(a(batch.dense, batch.sparse)[0])
            pb = torch.sigmoid(b(batch.dense, batch.sparse)[0])
            worst = max(worst, float((pa - pb).abs().max()))
    return worst


def model_size(fmap: FeatureMap, data_dir: Path, model: CTRModel) -> tuple[int, dict[str, int]]:
    """(float parameters, bytes by part) of a plain model, the bytes those of the whole fp32 edge
    file that ``ctr export`` would write (built and written in memory): what a device holds."""
    state = model.state_dict()
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    if EDGE_FORM not in model.capabilities:  # LR: its tables and dense term as stored in training
        return params, {"embedding tables": sum(v.numel() * v.element_size() for v in state.values()),
                        "vocabulary": 0, "transforms": 0, "dense layers": 0, "format": 0}
    edge = edge_of(model, fmap, data_dir)
    return params, file_parts(edge, len(scripted_file(edge)))


def validation_metrics(ctx: StageContext, model: CTRModel) -> dict[str, float]:
    return classification_metrics(*predict(model, ctx.split("valid")))


def train_phase(ctx: StageContext, phase: str, hooks: TrainHooks, epochs: int, patience: int, best: bool = True,
                sample: int | None = None, disjoint: bool = False, **trainer: Any) -> Trainer:
    """One training phase of a stage (a search, a retrain, a fine-tune): the experiment's trainer with
    these epochs, patience (early stopping on validation AUC) and ``trainer`` overrides, validating
    once per epoch, in the phase's own folder of the stage. ``sample``: each epoch reads a seeded
    sample of whole row groups holding this many train rows (a search), each a new one with
    ``disjoint`` (no row read twice while the split lasts). A phase that was killed resumes from its
    last checkpoint, at the step where it stopped, whichever stage it belongs to. Returns the trainer
    holding its best-on-validation weights (``best``) or its last ones."""
    cfg = ctx.cfg.trainer.model_copy(update={"epochs": epochs, "patience": patience, "eval_every_steps": None, **trainer})
    rows = ParquetBatches(ctx.data_dir / ctx.fmap.splits["train"].file, ctx.fmap, cfg.batch_size, shuffle=cfg.shuffle,
                          seed=cfg.seed, sample_rows=sample, disjoint=disjoint)
    run = ctx.stage.phase(phase)
    phase_trainer = Trainer(ctx.cfg.model_copy(update={"trainer": cfg}), ctx.fmap, ctx.data_dir, run.root, hooks,
                            Runtime(train_data=rows))
    phase_trainer.train(resume=run.last.is_file())
    if best:
        phase_trainer.load_best_weights()
    return phase_trainer


def fine_tune(ctx: StageContext, initial_state: dict[str, torch.Tensor], steps: tuple[Step, ...], epochs: int,
              patience: int, lr_scale: float, attach: Callable[[torch.nn.Module], None] | None = None,
              extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The reshaped model trained on from ``initial_state`` at ``lr_scale`` times both learning rates
    (a small step: the weights are already near a good point): the ``finetune`` phase. Returns the
    best-on-validation weights."""
    hooks = TrainHooks(steps=steps, initial_state=initial_state, attach=attach, extra_loss=extra_loss)
    tuned = train_phase(ctx, "finetune", hooks, epochs, patience, lr=ctx.cfg.trainer.lr * lr_scale,
                        sparse_lr=ctx.cfg.trainer.sparse_lr * lr_scale)
    return plain_state_dict(tuned.model)
