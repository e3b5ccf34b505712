"""What every compression stage shares: its context, the checkpoint it reads and writes, model size.

A stage is a small class with one job: ``run(ctx, source) -> StageOutput``. It never touches the
others; the recipe runner chains them, skips the ones already done and writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ctr.config import ExperimentConfig, ModelConfig
from ctr.distributed import load_plain_state_dict
from ctr.metrics import classification_metrics
from ctr.models import FIRST_ORDER_DIM, build_model
from ctr.modules.sparse import TableLayout
from ctr.train import predict
from features.feature_map import FeatureMap
from features.loader import ParquetBatches

REMAP_BYTES = 4  # an id remap entry is stored as int32 in the edge model
FIRST_ORDER_TABLES = "first_order.weights."


@dataclass(frozen=True)
class StageContext:
    cfg: ExperimentConfig
    fmap: FeatureMap
    data_dir: Path
    work_dir: Path  # this stage's own directory
    target_mb: float | None = None  # the recipe's size target, for the stage that sizes itself to it

    def split(self, name: str) -> ParquetBatches:
        return ParquetBatches(self.data_dir / self.fmap.splits[name].file, self.fmap, self.cfg.trainer.eval_batch_size)


@dataclass
class StageOutput:
    payload: dict[str, Any]  # the checkpoint: "model", "model_config", "tables", ...
    details: dict[str, Any] = field(default_factory=dict)  # stage-specific numbers for the report


class Stage(Protocol):
    name: str

    def run(self, ctx: StageContext, source: dict[str, Any]) -> StageOutput: ...


def plain_model(fmap: FeatureMap, payload: dict[str, Any]) -> nn.Module:
    """An unsharded CPU model rebuilt from a checkpoint (its config and table layout) with its weights."""
    model = build_model(fmap, ModelConfig(**payload["model_config"]), device=torch.device("cpu"),
                        tables=TableLayout(**payload.get("tables", {})))
    load_plain_state_dict(model, payload["model"])
    model.eval()
    return model


def _stored_bytes(key: str, value: torch.Tensor) -> int:
    if key.startswith(FIRST_ORDER_TABLES):  # the edge model stores the sum of fbgemm's 4 values: one weight
        return value.numel() // FIRST_ORDER_DIM * value.element_size()
    return value.numel() * (REMAP_BYTES if key.endswith(".remap") else value.element_size())


def model_size(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(float parameters, bytes, embedding bytes) of a model state as the edge model stores it: fp32
    weights, int32 id remaps, one weight per value for first-order tables; integer bookkeeping buffers
    (offsets, salts) count at their own size.
    Embedding bytes are the tables and the id remaps that lead into them."""
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    size = sum(_stored_bytes(k, v) for k, v in state.items())
    embedding = sum(_stored_bytes(k, v) for k, v in state.items() if ".ebc." in k or k.endswith(".remap"))
    return params, size, embedding


def validation_metrics(ctx: StageContext, payload: dict[str, Any]) -> dict[str, float]:
    return classification_metrics(*predict(plain_model(ctx.fmap, payload), ctx.split("valid")))
