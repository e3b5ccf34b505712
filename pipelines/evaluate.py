"""``ctr evaluate``: score models on held-out rows, exact metrics with DeLong intervals, a report.

Models are exported edge files (``.pt`` with their manifest) or run directories / checkpoints; the
data a prepared split (or one per model, each in its model's encoding) or, for edge files, a raw
log. What stays in memory is one score per row and model, the labels, and the values of the fields
asked for per-slice AUC. Outputs: ``metrics.json`` (with the models' and the data's sha256) and
``report.html``. The pieces: ``scorers`` (a model as a scorer), ``score_inputs`` (checks),
``scoring`` (the passes), ``ctr.metrics`` (the statistics), ``report`` (tables and plots).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.atomic import atomic_write_text, ensure_writable
from common.errors import DataError
from ctr.metrics import auc_interval, classification_metrics, delong_test, group_auc, one_class_metrics, reliability, slice_aucs
from deploy.raw_rows import is_raw
from pipelines.report import report_html, report_plots
from pipelines.score_inputs import check_columns, data_hash, parquet_files
from pipelines.scorers import Scorer, load_scorer
from pipelines.scoring import BATCH_ROWS, per_model_data, score_raw, score_stream

log = logging.getLogger("ctr.evaluate")

ScoresFrom = Callable[[list[Scorer], list[str]], tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]]


def evaluate(models: list[Path], data: Path | list[Path], out_dir: Path, slices: list[str] | None = None,
             top_values: int = 10, batch_size: int = BATCH_ROWS, progress: bool = True,
             scores_from: ScoresFrom | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every model on ``data`` (a Parquet file or a directory of them; or one per model: the
    same rows, each encoded by its model's feature map); writes ``metrics.json`` and ``report.html``
    into ``out_dir``. ``slices``: fields to report AUC per value for; ``groups``: fields to report
    group AUC by (a user or device id). ``scores_from``: another scoring backend (the Ray one) in
    place of the local stream, given the scorers and the extra fields to read."""
    datas = data if isinstance(data, list) else [data]
    if len(datas) not in (1, len(models)):
        raise DataError(f"{datas[0]}: {len(datas)} data sets for {len(models)} models (give one, or one per model)")
    if len(set(datas)) > 1 and scores_from is not None:
        raise DataError(f"{datas[0]}: Ray scoring reads one data set (give one --data, or score locally)")
    data = datas[0]
    files = [data] if is_raw(data) else parquet_files(data)
    ensure_writable(out_dir)  # before the scoring, not after it
    scorers = [load_scorer(m) for m in models]
    slices, groups = slices or [], groups or []
    fields = sorted({*slices, *groups})
    if is_raw(data) and len(set(datas)) == 1 and scores_from is None:
        labels, scores = score_raw(data, scorers, fields)
        slice_values: dict[str, np.ndarray] = {}
    elif len(set(datas)) > 1:
        labels, scores, slice_values = per_model_data(datas, scorers, fields, batch_size, progress)
    elif scores_from is None:
        labels, scores, slice_values = score_stream(files, scorers, fields, batch_size, progress)
    else:
        check_columns(files, scorers, fields)
        labels, scores, slice_values = scores_from(scorers, fields)
    both = 0 < labels.sum() < labels.size
    if not both:
        log.warning("%s: every label is %d: AUC, its interval, NE and the DeLong tests are undefined; logloss and "
                    "calibration are still reported", data, int(labels[0]))
    results = []
    for s, probs in zip(scorers, scores):
        metrics = classification_metrics(labels, probs) if both else {**one_class_metrics(labels, probs)}
        low, high = auc_interval(labels, probs)[1:] if both else (None, None)
        results.append({"name": s.name, "path": str(s.path), "sha256": s.sha256, "bytes": s.bytes, **metrics,
                        "auc_ci": [low, high], "reliability": reliability(labels, probs),
                        "slices": {c: slice_aucs(labels, probs, slice_values[c], top_values) for c in slices},
                        "groups": {c: group_auc(labels, probs, slice_values[c]) for c in groups}})
    comparisons = [{"model": r["name"], "against": results[0]["name"], **delong_test(labels, probs, scores[0])}
                   for r, probs in zip(results[1:], scores[1:])] if both else []
    result = {"data": {"path": str(data), "files": len(files), "sha256": data_hash(files), "rows": int(labels.size)},
              "models": results, "comparisons": comparisons}
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = next((s.recipe for s in scorers if s.recipe), [])
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / "report.html", report_html(result, report_plots(labels, scores, [s.name for s in scorers], results, recipe)))
    return result
