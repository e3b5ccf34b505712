"""``ctr prepare``: raw files -> validated Parquet splits, vocabularies and ``feature_map.json``.

The passes, each bounded in memory by a batch of rows, except the counts, which hold one entry per
distinct value of one field:
  1. parse + stage: parse, validate and transform every raw file, turn each categorical token
     into its code (``features.codes``: the integer, or the token's bytes as one word) and write
     the staged rows (integers from here on, rejected rows flagged), Polars streaming;
  2. count: each field's codes on the staged train rows, one streaming group-by per field over two
     integer columns. (Counting inside the parse's query, as extra sinks of ``collect_all``, made
     Polars run the parse once per sink: ten times slower.)
  3. rejects -> ``rejects.csv``, and the reject-share check;
  4. vocabularies from the counts: each distinct code's token key and text, taken once per value
     (or a parent's vocabularies extended, ``features.extend``); the counts of the values under
     min count are kept in ``pending/`` for the next day's extension;
  5. the staged rows in fixed slices, each encoded to ids by one table lookup per field
     (``KeyIndex``, over the codes) and appended to the Parquet file of its split.
The split of each row is known during the parse for the random split (a hash of the row position)
and the order split (a line count first gives the number of rows), and staged with it; the time
split's cut points need every row's time, so they are found on the staged rows.
Everything is written into a scratch directory beside the output, which replaces the output only
when complete, so an interrupted prepare leaves the previous result (or nothing) in place.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import ensure_writable, publish_dir, scratch_dir_beside
from common.errors import DataError
from common.locks import exclusive
from features.codes import LONG, code_kind, vocabulary_codes, with_codes, with_keys
from features.extend import PENDING_DIR, check_parent, extend_vocabulary, lineage, pending_file
from features.feature_map import FeatureMap, FieldInfo, SourceInfo, SplitInfo
from features.hashing import HASH_VERSION
from features.parse import (
    LINE,
    RAW,
    REASON,
    check_readable,
    count_data_rows,
    explain_read_failure,
    scan_delimited,
    scan_parquet_raw,
)
from features.schema import DatasetConfig, Layout, config_fingerprint, resolve_layout
from features.split import SPLIT_COLUMN, SPLITS, TIME_COLUMN, split_expr, time_cut_points
from features.transforms import LABEL_COLUMN, TOKEN, FeatureSpec, feature_expr, feature_specs
from features.vocab import SPECIAL_IDS, KeyIndex, count_query, fit_vocabulary, merged_counts

log = logging.getLogger("ctr.prepare")
FILE_COLUMN = "_file"
REJECTS_FILE = "rejects.csv"
SHOWN_REJECTS = 5
CHUNK_ROWS = 262_144
SAMPLE_ROWS = 10_000  # rows read ahead of the parse to size the token hash (its words per token)


@dataclass(frozen=True)
class PrepareResult:
    output: Path
    feature_map: FeatureMap
    seconds: float
    passes: dict[str, float]  # seconds per pass: where a prepare spends its time


def _side(field: str) -> str:
    """The column of a long-token field's text beside its key, which lets its vocabulary name the value."""
    return f"__side_{field}"


@dataclass(frozen=True)
class _Staging:
    """What pass 1 needs besides the file: the features, the token hash's words per string field,
    and the split rule when it is known during the parse (None: the time split)."""

    cfg: DatasetConfig
    layout: Layout
    specs: list[FeatureSpec]
    words: dict[str, int]
    split: pl.Expr | None

    @property
    def categorical(self) -> list[str]:
        return [s.name for s in self.specs if s.type == "categorical"]

    def sides(self) -> list[str]:
        """The fields whose codes are token keys: their counts carry the token text beside."""
        return [f for f in self.words if code_kind(f, self.words) == "key"]

    def scan(self, path: Path, row_offset: int) -> pl.LazyFrame:
        return _scan(self.cfg, self.layout, path, row_offset)


def _scan(cfg: DatasetConfig, layout: Layout, path: Path, row_offset: int) -> pl.LazyFrame:
    scan = scan_parquet_raw if cfg.format == "parquet" else scan_delimited
    return scan(path, layout, row_offset)


def _words_needed(cfg: DatasetConfig, layout: Layout, specs: list[FeatureSpec], paths: list[Path],
                  head: int | None) -> dict[str, int]:
    """8-byte words per string token field, from its longest token in the first ``head`` rows of the
    first file; with ``head`` None, in every row of every file (after the staged rows flagged a
    longer token: ``features.codes.LONG``)."""
    strings = [s for s in specs if s.transform == TOKEN]
    longest = dict.fromkeys((s.name for s in strings), 0)
    for path in paths[:1] if head is not None else paths:
        scan = _scan(cfg, layout, path, 0)
        try:
            found = (scan.head(head) if head is not None else scan).select(
                pl.col(s.source).str.len_bytes().max().alias(s.name) for s in strings).collect(engine="streaming")
        except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
            raise explain_read_failure(path, exc) from None
        longest = {f: max(n, found[f].item() or 0) for f, n in longest.items()}
    return {f: max(1, math.ceil(n / 8)) for f, n in longest.items()}


def _stage_file(path: Path, staging: _Staging, row_offset: int, target: Path, counts: Path) -> tuple[int, float]:
    """Pass 1 for one raw file: the staged rows and, when the split is known, each field's train
    counts from them; returns the file's data rows and the seconds the counts took."""
    cfg, layout = staging.cfg, staging.layout
    split_or_time = []
    if cfg.split.method == "time":
        split_or_time = [pl.col(cfg.split.time_column).to_physical().cast(pl.Int64).alias(TIME_COLUMN)]
    if staging.split is not None:  # each good row's split, staged: the counts and the encode read it
        split_or_time = [pl.when(pl.col(REASON).is_null()).then(staging.split).alias(SPLIT_COLUMN)]
    parsed = staging.scan(path, row_offset).select(
        pl.col(REASON), pl.col(RAW),  # a good row's line and file go unstaged: only the rejects name them
        pl.when(pl.col(REASON).is_not_null()).then(pl.col(LINE)).alias(LINE),
        pl.when(pl.col(REASON).is_not_null()).then(pl.lit(str(path))).alias(FILE_COLUMN),
        pl.col(layout.label).cast(pl.Float32).alias(LABEL_COLUMN),
        *(feature_expr(s) for s in staging.specs),
        *split_or_time,
        *(pl.col(f).alias(_side(f)) for f in staging.sides()),
    )
    coded = with_codes(parsed, staging.words)
    try:
        coded.sink_parquet(target, compression="lz4", statistics=False)
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        raise explain_read_failure(path, exc) from None
    counted = 0.0
    if staging.split is not None:
        counted = _count_all(pl.scan_parquet(target).filter(pl.col(SPLIT_COLUMN) == 0), staging, counts)
    n = pq.ParquetFile(target).metadata.num_rows
    if n == 0:
        raise DataError(f"{path}: no data rows" + (" after the header line" if layout.header else "") +
                        " (give the file with its rows)")
    return n, counted


def _count(rows: pl.LazyFrame, field: str, staging: _Staging) -> pl.LazyFrame:
    return count_query(rows, field, _side(field) if field in staging.sides() else None)


def _count_all(train: pl.LazyFrame, staging: _Staging, counts: Path) -> float:
    """Every field's train counts from the staged rows (codes, and the side columns), into ``counts``:
    one field at a time, so memory holds one field's distinct values."""
    started = time.perf_counter()
    for f in staging.categorical:
        _count(train, f, staging).collect(engine="streaming").write_parquet(counts / f"{f}.parquet", compression="lz4")
    return time.perf_counter() - started


@dataclass(frozen=True)
class _Staged:
    sources: list[SourceInfo]
    rows: int
    cuts: tuple[int, int] | None  # the time split's cut points
    count_seconds: float


def _stage_and_count(paths: list[Path], staging: _Staging, work: Path, first_row: int) -> _Staged:
    """Pass 1 over every file, into ``work/staged`` and ``work/counts/<file>``, row positions from
    ``first_row``; for the time split, its cut points, after which its counts are taken from the
    staged train rows."""
    for sub in ("staged", "counts"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir()
    sources, offset, counted = [], first_row, 0.0
    for k, path in enumerate(paths):
        counts = work / "counts" / f"part-{k:05d}"
        counts.mkdir()
        n, seconds = _stage_file(path, staging, offset, work / "staged" / f"part-{k:05d}.parquet", counts)
        counted += seconds
        sources.append(SourceInfo(path=str(path.resolve()), bytes=path.stat().st_size, rows=n))
        offset += n
        log.info("parsed %s: %d rows", path, n)
    if staging.split is not None:
        return _Staged(sources, offset - first_row, None, counted)
    good = pl.scan_parquet(work / "staged" / "*.parquet").filter(pl.col(REASON).is_null())
    cuts = time_cut_points(good, staging.cfg.split)
    train = good.filter(split_expr(staging.cfg.split, offset, cuts) == 0)
    shutil.rmtree(work / "counts")
    (work / "counts" / "all").mkdir(parents=True)
    counted = _count_all(train, staging, work / "counts" / "all")
    return _Staged(sources, offset - first_row, cuts, counted)


def _field_counts(work: Path, field: str) -> pl.LazyFrame:
    """One field's train counts by code, summed over the files' parts."""
    parts = sorted((work / "counts").glob(f"*/{field}.parquet"))
    return pl.scan_parquet(parts[0]) if len(parts) == 1 else merged_counts(pl.scan_parquet(parts), by="code")


def _long_tokens(work: Path) -> bool:
    """Whether a staged row holds a token longer than its field's code was sized for."""
    return bool(pl.scan_parquet(work / "staged" / "*.parquet").select(pl.col(LONG).any()).collect().item())


def _check_rejects(staged: pl.LazyFrame, total: int, limit: float, rejects_path: Path, keep_at: Path) -> int:
    """Write every rejected row with its file, line and reason; fail over the limit.

    On failure the rejects file is moved to ``keep_at`` (beside the output) so it survives the cleanup
    of the scratch directory and the user can read every reason.
    """
    rejects = staged.filter(pl.col(REASON).is_not_null()).select(
        pl.col(FILE_COLUMN).alias("file"), pl.col(LINE).alias("line"), pl.col(REASON).alias("reason"),
        pl.col(RAW).alias("raw"),
    )
    rejects.sink_csv(rejects_path, engine="streaming")
    head = pl.scan_csv(rejects_path, infer_schema=False).head(SHOWN_REJECTS).collect()
    n_rejected = pl.scan_csv(rejects_path, infer_schema=False).select(pl.len()).collect().item()
    if n_rejected and n_rejected > limit * total:
        os.replace(rejects_path, keep_at)
        rows = list(head.iter_rows(named=True))
        shown = "; ".join(f"{r['file']} line {r['line']}: {r['reason']}" for r in rows)
        raise DataError(
            f"{rows[0]['file']}:{rows[0]['line']}: {n_rejected} of {total} rows rejected ({n_rejected / total:.2%}), "
            f"over the limit of {limit:.2%}; first rejects: {shown} (every reject with its line and reason is in "
            f"{keep_at}; fix the data, or raise dataset.max_reject_fraction)")
    return n_rejected


def _write_splits(staged: pl.LazyFrame, n_rows: int, split: pl.Expr, dense: list[str], index: dict[str, KeyIndex],
                  work: Path, row_group_size: int) -> dict[str, int]:
    """Pass 3: staged rows -> one Parquet per split, in fixed slices of rows; returns rows per split.

    A writer thread compresses and writes one slice while the next is read and encoded, the fields'
    lookups on a thread per core (pyarrow and NumPy release the GIL); at most one slice waits for
    the writer, so memory stays at about two slices."""
    writers: dict[str, pq.ParquetWriter] = {}
    counts = dict.fromkeys(SPLITS, 0)

    def write(tables: list[tuple[str, pa.Table]]) -> None:
        for name, table in tables:
            if name not in writers:
                writers[name] = pq.ParquetWriter(work / f"{name}.parquet", table.schema, compression="zstd")
            if table.num_rows:
                writers[name].write_table(table, row_group_size=row_group_size)

    pending: Future[None] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-writer") as pool, \
                ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lookup") as lookups:
            for start in range(0, n_rows, CHUNK_ROWS):
                chunk = (staged.slice(start, CHUNK_ROWS).filter(pl.col(REASON).is_null())
                         .select(split.alias(SPLIT_COLUMN), LABEL_COLUMN, *dense, *index).collect())
                ids = lookups.map(lambda f: pl.Series(f, index[f].lookup(chunk[f]), dtype=pl.Int32), index)
                chunk = chunk.with_columns(ids)
                tables = [(name, chunk.filter(pl.col(SPLIT_COLUMN) == s_id).drop(SPLIT_COLUMN).to_arrow())
                          for s_id, name in enumerate(SPLITS)]
                for name, table in tables:
                    counts[name] += table.num_rows
                if pending is not None:
                    pending.result()  # raises the writer's error here
                pending = pool.submit(write, tables)
            if pending is not None:
                pending.result()
    finally:
        for writer in writers.values():
            writer.close()
    return counts


def prepare(cfg: DatasetConfig, raw: list[Path] | None = None, output: Path | None = None,
            extend: Path | None = None) -> PrepareResult:
    """Raw files -> splits, vocabularies and feature map in ``output`` (or ``dataset.output``); one
    prepare at a time per output, the result published whole or not at all. ``extend``: a prepared
    dataset whose ids the new rows keep (``features.extend``)."""
    out = Path(output or cfg.output)
    ensure_writable(out.parent)
    if extend is not None and Path(extend).resolve() == out.resolve():
        raise DataError(f"{out}: an extension is written beside its parent, not over it (give --output a new directory)")
    with exclusive(out, "ctr prepare"):
        return _prepare(cfg, raw, out, Path(extend) if extend is not None else None)


@dataclass(frozen=True)
class _Parent:
    """The dataset an extension grows: its folder and feature map."""

    root: Path
    fmap: FeatureMap

    def vocabulary(self, field: str) -> pl.DataFrame:
        return pl.read_parquet(self.root / "vocab" / f"{field}.parquet")

    def pending(self, field: str) -> pl.DataFrame:
        return pl.read_parquet(pending_file(self.root, field))


def _vocabulary(codes: pl.LazyFrame, min_count: int, field: str, words: dict[str, int],
                parent: _Parent | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(vocabulary, counts of the values under min count, by key: the same bytes every time) of one
    field, fitted or extended, from its counts by code."""
    counts = with_keys(codes.collect(engine="streaming"), code_kind(field, words))
    if parent is None:
        vocab, rare = fit_vocabulary(counts.lazy(), min_count), counts.filter(pl.col("count") < min_count)
    else:
        vocab, rare = extend_vocabulary(parent.vocabulary(field), parent.pending(field), counts, min_count)
    return vocab, rare.sort("key")


def _prepare(cfg: DatasetConfig, raw: list[Path] | None, out: Path, extend: Path | None) -> PrepareResult:
    started = time.perf_counter()
    layout = resolve_layout(cfg)
    paths = list(raw) if raw else [Path(p) for p in cfg.raw]
    if not paths:
        raise DataError(f"dataset '{cfg.name}': no raw files (set dataset.raw or pass --raw)")
    for path in paths:
        check_readable(path)
    if cfg.split.method == "time":
        kinds = {c.name: c.kind for c in layout.columns}
        if kinds.get(cfg.split.time_column) not in ("yymmddhh", "integer", "numeric"):
            raise DataError(f"dataset '{cfg.name}': split.time_column '{cfg.split.time_column}' is not a "
                        f"yymmddhh, integer or numeric column of the layout (name one that is)")
    specs = feature_specs(layout, cfg.integer_mode)
    categorical = [s.name for s in specs if s.type == "categorical"]
    dense = [s.name for s in specs if s.type == "dense"]
    unknown = sorted(set(cfg.min_count_per_field) - set(categorical))
    if unknown:
        raise DataError(f"dataset '{cfg.name}': min_count_per_field names unknown field(s) {unknown} "
                        f"(categorical fields are {categorical})")
    min_counts = {f: cfg.min_count_per_field.get(f, cfg.min_count) for f in categorical}
    parent = None
    if extend is not None:
        parent = _Parent(extend, FeatureMap.load(extend))
        check_parent(extend, parent.fmap, layout, specs, min_counts)
    first_row = parent.fmap.rows_through if parent else 0
    work = scratch_dir_beside(out)
    passes: dict[str, float] = {}
    mark = time.perf_counter()

    def done(name: str) -> None:
        nonlocal mark
        passes[name] = time.perf_counter() - mark
        mark = time.perf_counter()

    try:
        split = None
        if cfg.split.method == "random":
            split = split_expr(cfg.split, 0)
        elif cfg.split.method == "order":
            split = split_expr(cfg.split, sum(count_data_rows(p, layout, cfg.format) for p in paths), first_row=first_row)
        staging = _Staging(cfg, layout, specs, _words_needed(cfg, layout, specs, paths, SAMPLE_ROWS), split)
        result = _stage_and_count(paths, staging, work, first_row)
        if _long_tokens(work):
            staging = _Staging(cfg, layout, specs, _words_needed(cfg, layout, specs, paths, None), split)
            log.info("tokens longer than the first rows': parsing again with words per field %s", staging.words)
            result = _stage_and_count(paths, staging, work, first_row)
        sources, offset, cuts = result.sources, result.rows, result.cuts
        staged = pl.scan_parquet(work / "staged" / "*.parquet")
        done("parse + stage")
        passes["parse + stage"] -= result.count_seconds
        passes["count"] = result.count_seconds
        n_rejected = _check_rejects(staged, offset, cfg.max_reject_fraction, work / REJECTS_FILE,
                                    out.parent / f"{out.name}.{REJECTS_FILE}")
        done("rejects")
        (work / "vocab").mkdir()
        (work / PENDING_DIR).mkdir()
        index, sizes = {}, {}
        for field, min_count in min_counts.items():
            vocab, rare = _vocabulary(_field_counts(work, field), min_count, field, staging.words, parent)
            vocab.write_parquet(work / "vocab" / f"{field}.parquet", compression="zstd")
            rare.write_parquet(pending_file(work, field), compression="zstd")
            codes = vocabulary_codes(vocab, code_kind(field, staging.words))
            index[field], sizes[field] = KeyIndex.of(vocab, codes), vocab.height
        shutil.rmtree(work / "counts")
        done("vocabularies")
        split = pl.col(SPLIT_COLUMN) if cuts is None else split_expr(cfg.split, offset, cuts)
        counts = _write_splits(staged, offset, split, dense, index, work, cfg.row_group_size)
        done("encode + write splits")
        splits = {name: SplitInfo(file=f"{name}.parquet", rows=counts[name]) for name in SPLITS}
        if splits["train"].rows == 0:
            raise DataError(f"dataset '{cfg.name}': the train split is empty ({offset} rows read, split {cfg.split}) "
                            "(give more rows, or other split ratios)")
        shutil.rmtree(work / "staged")
        fields = [
            FieldInfo(name=s.name, type=s.type, source=s.source, transform=s.transform,
                      num_embeddings=sizes[s.name] + len(SPECIAL_IDS) if s.type == "categorical" else None,
                      min_count=min_counts.get(s.name), vocab_file=f"vocab/{s.name}.parquet" if s.type == "categorical" else None)
            for s in specs
        ]
        fmap = FeatureMap(
            dataset=cfg.name, layout=cfg.layout, label=LABEL_COLUMN, label_source=layout.label, fields=fields,
            special_ids=SPECIAL_IDS, splits=splits, split_rule=cfg.split, hash_version=HASH_VERSION,
            rows_read=offset, rows_rejected=n_rejected, sources=sources,
            config_fingerprint=config_fingerprint(cfg, [str(p) for p in paths]), raw_layout=layout,
            extends=lineage(extend, parent.fmap, paths) if parent else None,
        )
        fmap.save(work)
        publish_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("prepared %s: %d rows (%d rejected) in %.1fs -> %s", cfg.name, offset, n_rejected, seconds, out)
    return PrepareResult(output=out, feature_map=fmap, seconds=seconds, passes=passes)
