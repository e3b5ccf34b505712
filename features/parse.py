"""Raw file -> typed, validated rows, lazily and without per-row Python.

Every line becomes one row holding its typed values plus ``_line`` (1-based line in its file),
``_row`` (position among all data rows of all input files, the key of the random split) and
``_reason`` (null for a good row, else why it is rejected). Rejected rows keep their raw text in
``_raw`` so the rejects file shows exactly what was wrong. Delimited files are read as whole lines
(``scan_lines``) and split in Polars, so a row with the wrong number of fields is caught and reported
instead of aborting the whole read as a CSV parser would. A line holding a NUL byte is rejected:
no text log has one, and a token without one is what lets a prepare carry short tokens as their
zero-padded bytes (``features.codes``).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from common.errors import DataError
from features.schema import ColumnSpec, Layout

LINE, ROW, REASON, RAW = "_line", "_row", "_reason", "_raw"
NUL = "\x00"
UTF8_PROBE_BYTES = 1 << 24


def check_readable(path: Path) -> None:
    """Fail early, naming the file, for the cases a lazy scan would report obscurely."""
    if not path.exists():
        raise DataError(f"{path}: raw file not found (check dataset.raw or --raw)")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (give the raw log file itself)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable: permission denied (fix its permissions)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (give the raw log with its rows)")


def first_invalid_utf8_line(path: Path) -> int | None:
    """Line number of the first line that is not valid UTF-8 (only called on the error path)."""
    line_no = 1
    carry = b""
    with path.open("rb") as fh:
        while chunk := fh.read(UTF8_PROBE_BYTES):
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            for raw in lines:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return line_no
                line_no += 1
    try:
        carry.decode("utf-8")
    except UnicodeDecodeError:
        return line_no
    return None


def check_header(path: Path, layout: Layout) -> None:
    """Header files must name the layout's columns in its order (Avazu, Kaggle and x4 CSVs)."""
    with path.open("rb") as fh:
        first = fh.readline().rstrip(b"\r\n")
    try:
        found = first.decode("utf-8").split(layout.separator)
    except UnicodeDecodeError:
        raise DataError(f"{path} line 1: header is not valid UTF-8") from None
    expected = [c.name for c in layout.columns]
    if found != expected:
        diff = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b), min(len(expected), len(found)))
        want = expected[diff] if diff < len(expected) else "<end of header>"
        got = found[diff] if diff < len(found) else "<end of header>"
        raise DataError(
            f"{path} line 1: header does not match the layout: column {diff + 1} should be '{want}', "
            f"found '{got}' (expected {len(expected)} columns: {','.join(expected)})"
        )


def _typed(col: ColumnSpec, text: pl.Expr) -> tuple[pl.Expr, pl.Expr | None]:
    """(typed value, rejection reason or None) for one raw text column."""
    blank = text.is_null() | (text == "")
    shown = pl.lit(f"column '{col.name}': ")
    if col.kind == "label":
        value = text.str.to_integer(strict=False)
        bad = value.is_null() | ~value.is_in([0, 1])
        reason = pl.format("column '{}': expected 0 or 1, found '{}'", pl.lit(col.name), text.fill_null(""))
        return value.cast(pl.Int8), pl.when(bad).then(reason)
    if col.kind == "categorical":
        return pl.when(blank).then(None).otherwise(text), None
    if col.kind == "integer":
        value = text.str.to_integer(strict=False)
        reason = pl.concat_str([shown, pl.lit("expected an integer, found '"), text, pl.lit("'")])
        return value, pl.when(~blank & value.is_null()).then(reason)
    if col.kind == "numeric":
        value = text.cast(pl.Float64, strict=False)
        # inf, -Infinity and 1e400 (which parses to inf) would reach the model as inf and NaN losses
        reason = pl.concat_str([shown, pl.lit("expected a finite number, found '"), text, pl.lit("'")])
        return value, pl.when(~blank & (value.is_null() | ~value.is_finite())).then(reason)
    if col.kind == "yymmddhh":
        # Polars wants hour and minute together, so parse YYMMDDHH as YYMMDDHH + "00"
        value = (text + "00").str.strptime(pl.Datetime("us"), "%y%m%d%H%M", strict=False)
        bad = value.is_null() | (text.str.len_bytes() != 8)
        reason = pl.format("column '{}': expected a YYMMDDHH hour, found '{}'", pl.lit(col.name), text.fill_null(""))
        return value, pl.when(bad).then(reason)
    raise AssertionError(col.kind)


def _validated(texts: dict[str, pl.Expr], layout: Layout, extra_reason: pl.Expr | None) -> list[pl.Expr]:
    typed: list[pl.Expr] = []
    reasons: list[pl.Expr] = [] if extra_reason is None else [extra_reason]
    for col in layout.columns:
        if col.kind == "drop":
            continue
        value, reason = _typed(col, texts[col.name])
        typed.append(value.alias(col.name))
        if reason is not None:
            reasons.append(reason)
    return [*typed, pl.coalesce(reasons).alias(REASON)]


def scan_delimited(path: Path, layout: Layout, row_offset: int) -> pl.LazyFrame:
    """Lazy typed rows of one delimited file (no quoting: Criteo and Avazu never quote)."""
    check_readable(path)
    if layout.header:
        check_header(path, layout)
    n = len(layout.columns)
    sep = layout.separator
    first_data_line = 2 if layout.header else 1
    lines = pl.scan_lines(path, name="text", row_index_name=LINE, row_index_offset=1)
    if layout.header:
        lines = lines.filter(pl.col(LINE) >= first_data_line)
    # split once into a struct and unnest it: referring to one split expression per column would
    # repeat the split for every column
    split = lines.with_columns(pl.col("text").str.splitn(sep, n + 1).alias("_parts")).unnest("_parts")
    fields = {c.name: pl.col(f"field_{i}") for i, c in enumerate(layout.columns)}
    too_many = pl.col(f"field_{n}").is_not_null()
    too_few = pl.col(f"field_{n - 1}").is_null()
    found = pl.col("text").str.count_matches(sep, literal=True) + 1
    count_reason = pl.when(too_many | too_few).then(
        pl.format("expected {} fields separated by {}, found {}", pl.lit(n), pl.lit(repr(sep)), found)
    ).when(pl.col("text").str.contains(NUL, literal=True)).then(pl.lit("the line holds a NUL byte"))
    return split.select(
        pl.col(LINE),
        (pl.col(LINE).cast(pl.UInt64) - first_data_line + row_offset).alias(ROW),
        *_validated(fields, layout, count_reason),
        pl.col("text").alias(RAW),
    ).with_columns(pl.when(pl.col(REASON).is_not_null()).then(pl.col(RAW)).otherwise(None).alias(RAW))


def scan_parquet_raw(path: Path, layout: Layout, row_offset: int) -> pl.LazyFrame:
    """Lazy typed rows of a raw Parquet file; columns are matched by name, ``_line`` is the row number."""
    check_readable(path)
    try:
        names = pl.scan_parquet(path).collect_schema().names()
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc} (give a Parquet file, or format: delimited)") from None
    missing = [c.name for c in layout.columns if c.kind != "drop" and c.name not in names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks column(s) {missing}; it has {names} (declare its columns with layout: generic)")
    texts = {c.name: pl.col(c.name).cast(pl.String) for c in layout.columns if c.kind != "drop"}
    nul = [pl.when(texts[c.name].str.contains(NUL, literal=True)).then(pl.lit(f"column '{c.name}': holds a NUL byte"))
           for c in layout.columns if c.kind == "categorical"]
    return (
        pl.scan_parquet(path)
        .with_row_index(LINE, offset=1)
        .select(
            pl.col(LINE),
            (pl.col(LINE).cast(pl.UInt64) - 1 + row_offset).alias(ROW),
            *_validated(texts, layout, pl.coalesce(nul) if nul else None),
            pl.lit(None, dtype=pl.String).alias(RAW),
        )
    )


def count_data_rows(path: Path, layout: Layout, fmt: str) -> int:
    """Data rows of a raw file, as the parse numbers them (every line but a header), without parsing:
    the order split needs the total before the parse to know the train rows while it counts."""
    if fmt == "parquet":
        try:
            return pl.scan_parquet(path).select(pl.len()).collect().item()
        except (pl.exceptions.ComputeError, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file: {exc} (give a Parquet file, or format: delimited)") from None
    try:
        lines = pl.scan_lines(path, name="text").select(pl.len()).collect(engine="streaming").item()
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        raise explain_read_failure(path, exc) from None
    return max(lines - (1 if layout.header else 0), 0)


def explain_read_failure(path: Path, exc: Exception) -> DataError:
    """Turn a Polars read error into one that names the file and, for bad encoding, the line."""
    if "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
        line = first_invalid_utf8_line(path)
        where = f" line {line}" if line is not None else ""
        return DataError(f"{path}{where}: not valid UTF-8 text (is this a compressed or binary file?)")
    return DataError(f"{path}: cannot be read: {exc}")
