"""Checks on the data a model is scored on, each failing as one line that names the file and row:
Parquet that opens, the columns a model reads with the types it reads, no missing value, 0/1 labels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.digest import sha256_file
from common.errors import DataError, one_line
from pipelines.scorers import Scorer


def parquet_files(data: Path) -> list[Path]:
    """The file itself, or every ``*.parquet`` of a directory in name order (the row order used)."""
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data] if data.is_file() else []
    if not files:
        raise DataError(f"{data}: no such Parquet file, or a directory without *.parquet files (check the path)")
    return files


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({one_line(exc, 160)}) "
                        "(give a Parquet file, e.g. a split written by ctr prepare)") from None


def check_types(path: Path, schema: pa.Schema, scorer: Scorer, label: str | None) -> None:
    """Ids must be integers (a float id would be truncated, a string one has no row), dense
    features and the label numbers."""
    for c in scorer.ids:
        kind = schema.field(c).type
        if not pa.types.is_integer(kind):
            raise DataError(f"{path}: column '{c}' holds {kind}, but the model reads integer ids from the feature map "
                            "(prepare the raw data with ctr prepare, which encodes the values)")
    for c in [*scorer.dense, *([label] if label else [])]:
        kind = schema.field(c).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise DataError(f"{path}: column '{c}' holds {kind}, not numbers (prepare the data with ctr prepare)")


def check_values(path: Path, batch: pa.RecordBatch, seen: int, scorer: Scorer, label: str | None) -> np.ndarray | None:
    """No missing value in what the model reads; labels 0 or 1. Returns the labels (if any)."""
    for c in [*scorer.ids, *scorer.dense, *([label] if label else [])]:
        column = batch.column(c)
        if column.null_count:
            row = seen + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row}: column '{c}' is empty (null) (fill it, or drop the row)")
    if label is None:
        return None
    y = batch.column(label).to_numpy(zero_copy_only=False)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(f"{path}: row {seen + int(np.flatnonzero(bad)[0])}: label {y[bad][0].item()} is not 0 or 1 "
                        "(labels are clicks: 0 or 1)")
    return y


def data_hash(files: list[Path]) -> str:
    """The file's sha256; for several files, the sha256 of their names and sha256s in order."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def check_columns(files: list[Path], scorers: list[Scorer], slices: list[str]) -> list[str]:
    """The columns to read; every file must hold what every model reads, and rows."""
    rows = 0
    for path in files:
        meta = open_parquet(path)
        have = set(meta.schema_arrow.names)
        for s in scorers:
            missing = [c for c in [s.label, *s.dense, *s.ids] if c not in have]
            if missing:
                raise DataError(f"{path}: model {s.path} reads columns {missing} that the file lacks "
                                f"(its feature map does not match this data)")
            check_types(path, meta.schema_arrow, s, s.label)
        unknown = [c for c in slices if c not in have]
        if unknown:
            raise DataError(f"{path}: slice or group field(s) {unknown} are not columns of the file "
                            "(name columns of the data)")
        rows += meta.metadata.num_rows
    if rows == 0:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: the file has no rows")
    return sorted({scorers[0].label, *(c for s in scorers for c in (*s.dense, *s.ids)), *slices})
