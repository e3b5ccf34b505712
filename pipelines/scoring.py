"""Scores of models on rows: prepared Parquet streamed in record batches (one pass for every model),
a raw log through edge files, and ``ctr score``'s single-model pass with its written scores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common.atomic import atomic_write, ensure_writable
from common.errors import DataError
from ctr.loader import stack_columns
from ctr.metrics import classification_metrics, one_class_metrics
from deploy.raw_rows import is_raw, raw_batches
from pipelines.score_inputs import check_columns, check_types, check_values, open_parquet, parquet_files
from pipelines.scorers import Scorer, load_scorer

log = logging.getLogger("ctr.evaluate")

BATCH_ROWS = 65536


def score_raw(path: Path, scorers: list[Scorer], fields: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(labels, scores per model) of a raw log, read once for every model: each must be an edge file
    (its transforms and vocabulary inside) of the same raw layout."""
    for s in scorers:
        if s.raw is None or s.layout is None:
            raise DataError(f"{path}: a raw log is scored by edge files; {s.path} is a run or checkpoint (export it "
                            "with ctr export, or score the prepared split)")
        if s.layout != scorers[0].layout:
            raise DataError(f"{path}: models {scorers[0].path} and {s.path} read different raw layouts (score each alone)")
    if fields:
        raise DataError(f"{path}: slices and groups read prepared splits; a raw log gives none (score the prepared split)")
    labels, scores = [], [[] for _ in scorers]
    for batch in raw_batches(path, scorers[0].layout):
        labels.append(batch.labels)
        for out, s in zip(scores, scorers):
            out.append(s.raw(batch.numbers, batch.keys).astype(np.float32))
    if not labels:
        raise DataError(f"{path}: the file has no rows")
    return np.concatenate(labels), [np.concatenate(s) for s in scores]


def score_file(path: Path, scorers: list[Scorer], slices: list[str], columns: list[str],
               batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Per record batch of one file: labels (checked to be 0/1), each model's scores, slice values.
    Both the local stream and each Ray task score a file through this, batch for batch, so their
    scores are the same bits."""
    label, seen = scorers[0].label, 0
    for batch in open_parquet(path).iter_batches(batch_size=batch_size, columns=columns):
        y = check_values(path, batch, seen, scorers[0], label)
        for s in scorers[1:]:
            check_values(path, batch, seen, s, None)
        out = {"label": y.astype(np.float32)}
        for i, s in enumerate(scorers):
            out[f"score_{i}"] = s.score(*stack_columns(_arrow_column(batch), s.ids, s.dense, len(y))).astype(np.float32)
        for c in slices:
            out[f"slice_{c}"] = batch.column(c).to_numpy(zero_copy_only=False)
        seen += len(y)
        yield out


def _arrow_column(batch: pa.RecordBatch) -> Callable[[str], np.ndarray]:
    return lambda name: batch.column(name).to_numpy()


def gather(parts: list[dict[str, np.ndarray]], models: int,
           slices: list[str]) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """(labels, scores per model, slice values) from per-batch parts in row order."""
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    return cat("label"), [cat(f"score_{i}") for i in range(models)], {c: cat(f"slice_{c}") for c in slices}


def score_stream(files: list[Path], scorers: list[Scorer], slices: list[str], batch_size: int,
                  progress: bool) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    columns = check_columns(files, scorers, slices)
    total = sum(open_parquet(f).metadata.num_rows for f in files)
    parts = []
    with tqdm(total=total, unit="row", unit_scale=True, desc="scoring", disable=not progress) as bar:
        for path in files:
            for part in score_file(path, scorers, slices, columns, batch_size):
                parts.append(part)
                bar.update(len(part["label"]))
    return gather(parts, len(scorers), slices)


def per_model_data(datas: list[Path], scorers: list[Scorer], fields: list[str], batch_size: int,
                    progress: bool) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """Scores of each model on its own encoding of the same rows (e.g. data prepared with another
    min count): each distinct data set is streamed once for its models, and every set's labels must
    equal the first's row for row, or the DeLong tests would pair different rows."""
    scores: list[np.ndarray | None] = [None] * len(scorers)
    labels, slice_values = None, {}
    for data in dict.fromkeys(datas):
        mine = [i for i, d in enumerate(datas) if d == data]
        y, got, values = score_stream(parquet_files(data), [scorers[i] for i in mine], fields if labels is None else [],
                                       batch_size, progress)
        if labels is None:
            labels, slice_values = y, values
        elif not np.array_equal(y, labels):
            raise DataError(f"{data}: its labels differ from those of {datas[0]} (give each model the same test rows, "
                            "prepared with that model's feature map)")
        for i, s in zip(mine, got):
            scores[i] = s
    return labels, scores, slice_values


def score_parquet(model_file: Path, data: Path, out: Path | None, batch_size: int = BATCH_ROWS) -> dict[str, Any]:
    """``ctr score``: a model over a prepared Parquet file, or (an edge file) over a raw log; the
    scores written atomically to ``out``; where the file has labels, logloss, calibration and (with
    both classes) AUC and NE too."""
    scorer = load_scorer(model_file)
    if out is not None:
        ensure_writable(out.parent)
    if is_raw(data):
        labels_raw, (probs_raw,) = score_raw(data, [scorer], [])
        return _score_result(probs_raw, labels_raw, data, out)
    files = parquet_files(data)
    if len(files) != 1:
        raise DataError(f"{data}: ctr score reads one Parquet file and this directory holds {len(files)} "
                        "(score them one at a time, or use ctr evaluate)")
    path = files[0]
    file = open_parquet(path)
    have = set(file.schema_arrow.names)
    missing = [c for c in scorer.dense + scorer.ids if c not in have]
    if missing:
        raise DataError(f"{path}: columns {missing} that the model reads are missing (score data prepared with the "
                        "model's feature map)")
    label = scorer.label if scorer.label in have else None
    check_types(path, file.schema_arrow, scorer, label)
    scores, labels, seen = [], [], 0
    for batch in file.iter_batches(batch_size=batch_size, columns=scorer.dense + scorer.ids + ([label] if label else [])):
        y = check_values(path, batch, seen, scorer, label)
        scores.append(scorer.score(*stack_columns(_arrow_column(batch), scorer.ids, scorer.dense, batch.num_rows)))
        if y is not None:
            labels.append(y.astype(np.float32))
        seen += batch.num_rows
    probs = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    return _score_result(probs, np.concatenate(labels) if labels else None, path, out)


def _score_result(probs: np.ndarray, y: np.ndarray | None, path: Path, out: Path | None) -> dict[str, Any]:
    """The scores written atomically to ``out``; with labels, logloss, calibration, and with both
    classes AUC and NE."""
    result: dict[str, Any] = {"rows": int(probs.size)}
    if out is not None:
        atomic_write(out, lambda fh: pq.write_table(pa.table({"score": probs}), fh))
        result["scores"] = str(out)
    if y is not None and probs.size:
        if 0 < y.sum() < y.size:
            result.update(classification_metrics(y, probs))
        else:
            log.warning("%s: every label is %d: AUC and NE are undefined", path, int(y[0]))
            result.update(one_class_metrics(y, probs))
    return result
