"""A raw log file read as an edge file's inputs, for ``ctr score`` and ``ctr evaluate`` on raw logs.

The rows are parsed and checked by ``ctr prepare``'s own parser (``features.parse``), so a raw file
an edge file scores is read exactly as training read it; a malformed row stops the job with its file,
line and reason instead of being skipped, since a score per row is the job. Each batch holds what a
device would hand the file: the raw numbers (NaN for a blank) and the token keys of the categorical
columns, plus the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from common.errors import DataError
from ctr.edge.raw import raw_columns
from features.hashing import token_keys
from features.parse import LINE, REASON, explain_read_failure, scan_delimited
from features.schema import Layout

BATCH_ROWS = 65536


@dataclass(frozen=True)
class RawBatch:
    numbers: np.ndarray  # float64 [B, N]
    keys: np.ndarray  # int64 [B, T]
    labels: np.ndarray  # float32 [B]


def is_raw(path: Path) -> bool:
    """A raw log is any file that is not Parquet (prepared splits are)."""
    return path.is_file() and path.suffix != ".parquet"


def _number(name: str, kind: str) -> pl.Expr:
    col = pl.col(name)
    if kind == "yymmddhh":  # back to the number the device reads from the log
        col = ((col.dt.year() - 2000) * 1_000_000 + col.dt.month() * 10_000 + col.dt.day() * 100 + col.dt.hour())
    return col.cast(pl.Float64).fill_null(float("nan")).alias(name)


def raw_batches(path: Path, layout: Layout, rows: int = BATCH_ROWS) -> Iterator[RawBatch]:
    """The file's rows in order, ``rows`` at a time."""
    numbers, tokens = raw_columns(layout)
    kinds = {c.name: c.kind for c in layout.columns}
    query = scan_delimited(path, layout, 0).select(
        pl.col(LINE), pl.col(REASON), pl.col(layout.label).cast(pl.Float32).alias("_label"),
        *(_number(c, kinds[c]) for c in numbers), *(pl.col(c) for c in tokens))
    try:
        for df in query.collect_batches(chunk_size=rows):
            bad = df.filter(pl.col(REASON).is_not_null())
            if bad.height:
                raise DataError(f"{path}:{bad[LINE][0]}: {bad[REASON][0]} (fix or drop the row: each row of a "
                                "scored file gets a score)")
            keys = [token_keys(df[c].to_arrow()) for c in tokens]
            yield RawBatch(numbers=df.select(numbers).to_numpy().astype(np.float64).reshape(df.height, len(numbers)),
                           keys=np.stack(keys, axis=1) if keys else np.zeros((df.height, 0), np.int64),
                           labels=df["_label"].to_numpy())
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        raise explain_read_failure(path, exc) from None
