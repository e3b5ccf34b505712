"""Scoring with Ray Data: the same models over many Parquet files, spread over a Ray cluster's CPUs.

The unit of work is one file: each task (an actor that loads the models once) scores its file
through the same per-batch code as the local stream, so the scores are the same bits; Ray Data
keeps the files' order, so they line up with the labels exactly as in the local run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

from ctr.config import RayConfig
from pipelines.ray_train import start_ray
from pipelines.score_inputs import check_columns, parquet_files
from pipelines.scorers import Scorer, load_scorer
from pipelines.scoring import BATCH_ROWS, gather, score_file


class ScoreFiles:
    def __init__(self, models: list[str], slices: list[str], columns: list[str], batch_size: int) -> None:
        self.scorers = [load_scorer(Path(m)) for m in models]
        self.slices, self.columns, self.batch_size = slices, columns, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [part for path in batch["path"]
                 for part in score_file(Path(str(path)), self.scorers, self.slices, self.columns, self.batch_size)]
        labels, scores, values = gather(parts, len(self.scorers), self.slices)
        return {"label": labels, **{f"score_{i}": s for i, s in enumerate(scores)},
                **{f"slice_{c}": v for c, v in values.items()}}


def ray_scores(data: Path, scorers: list[Scorer], slices: list[str], cfg: RayConfig = RayConfig(),
               batch_size: int = BATCH_ROWS) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    files = parquet_files(data)
    columns = check_columns(files, scorers, slices)
    start_ray(cfg)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    scored = ray.data.from_items([{"path": str(f.resolve())} for f in files]).map_batches(
        ScoreFiles, fn_constructor_args=([str(s.path) for s in scorers], slices, columns, batch_size),
        batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=len(files)))
    return gather(list(scored.iter_batches(batch_format="numpy", batch_size=None)), len(scorers), slices)
