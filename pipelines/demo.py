"""``ctr demo``: the main job on the built-in default dataset, end to end on one machine.

Today that is: generate the synthetic Criteo-layout log (if missing), prepare it into Parquet splits,
and stream the train split through the batch loader once, reporting what each step produced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from features.loader import ParquetBatches
from pipelines.prepare_job import run_prepare

DEFAULT_CONFIG = Path("configs/datasets/synthetic.yaml")


def run_demo(config: Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> dict[str, float]:
    result = run_prepare(config, overrides or [], raw=None, output=None)
    fmap = result.feature_map
    teacher = Path(fmap.sources[0].path + ".teacher.json")
    started = time.perf_counter()
    batches = ParquetBatches(result.output / fmap.splits["train"].file, fmap, batch_size=4096, shuffle=True, seed=1)
    rows = sum(b.size for b in batches)
    seconds = time.perf_counter() - started
    summary = {
        "rows_read": fmap.rows_read,
        "rows_rejected": fmap.rows_rejected,
        **{f"{name}_rows": info.rows for name, info in fmap.splits.items()},
        "categorical_fields": len(fmap.categorical),
        "embedding_rows": sum(f.num_embeddings or 0 for f in fmap.categorical),
        "prepare_seconds": round(result.seconds, 2),
        "loader_rows_per_s": round(rows / seconds),
    }
    if teacher.is_file():
        summary["teacher_auc"] = round(json.loads(teacher.read_text())["teacher_auc"], 4)
    return summary
