"""Scoring with Ray Data: the same models over the Parquet file(s), spread over a Ray cluster's CPUs.

Each Ray worker loads the models once (a callable class in an actor pool) and scores whole record
batches; Ray Data keeps the rows in file order, so the scores line up with the labels exactly as in
the local stream and the metrics are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

from ctr.config import RayConfig
from pipelines.evaluate import Scorer, load_scorer
from pipelines.ray_train import start_ray


class ScoreBatch:
    def __init__(self, paths: list[str], slices: list[str]) -> None:
        self.scorers = [load_scorer(Path(p)) for p in paths]
        self.slices = slices

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        label = self.scorers[0].label
        out = {"label": batch[label].astype(np.float32)}
        for i, s in enumerate(self.scorers):
            ids = np.stack([batch[c] for c in s.ids], 1).astype(np.int64)
            dense = (np.stack([batch[c] for c in s.dense], 1).astype(np.float32) if s.dense
                     else np.zeros((len(ids), 0), np.float32))
            out[f"score_{i}"] = s.score(dense, ids).astype(np.float32)
        for c in self.slices:
            out[f"slice_{c}"] = batch[c]
        return out


def ray_scores(data: Path, scorers: list[Scorer], slices: list[str],
               cfg: RayConfig = RayConfig()) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    start_ray(cfg)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    columns = sorted({scorers[0].label, *(c for s in scorers for c in (*s.dense, *s.ids)), *slices})
    scored = ray.data.read_parquet(str(data.resolve()), columns=columns).map_batches(
        ScoreBatch, fn_constructor_args=([str(s.path) for s in scorers], slices), batch_format="numpy",
        concurrency=1, num_cpus=cfg.cpus_per_worker)
    parts = list(scored.iter_batches(batch_format="numpy", batch_size=None))
    labels = np.concatenate([p["label"] for p in parts])
    scores = [np.concatenate([p[f"score_{i}"] for p in parts]) for i in range(len(scorers))]
    return labels, scores, {c: np.concatenate([p[f"slice_{c}"] for p in parts]) for c in slices}
