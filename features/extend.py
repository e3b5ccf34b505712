"""``ctr prepare --extend``: a new day's raw rows encoded against an existing feature map.

Why: a model trained yesterday must read today's rows with the ids it was trained on. So an
extension never renumbers: every value of the parent keeps its id, and a value first seen (or
first frequent enough) today gets the next free id once its train count, summed over every day so
far, reaches ``min_count``. The counts of values still under ``min_count`` are kept beside the
vocabulary (``pending/<field>.parquet``) so that the next day can add to them.

Preparing day 1 and extending with days 2..k keeps the same values as preparing days 1..k at once
(same counts, same ``min_count``; with the random split the rows land in the same splits, since
row positions continue across days), but numbers them by the day they qualified, then by count,
where a one-go prepare numbers them by count over all days. The order split splits each day on
its own.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from common.digest import sha256_file
from common.errors import DataError
from features.feature_map import FILE_NAME, DayFile, FeatureMap, Lineage, feature_map_sha256
from features.schema import Layout
from features.transforms import FeatureSpec
from features.vocab import FIRST_VALUE_ID, fit_vocabulary, merged_counts, token_side

PENDING_DIR = "pending"


def pending_file(directory: Path, field: str) -> Path:
    """One field's counts of the values under ``min_count``, kept for the next day."""
    return directory / PENDING_DIR / f"{field}.parquet"


def check_parent(parent_dir: Path, parent: FeatureMap, layout: Layout, specs: list[FeatureSpec],
                 min_counts: dict[str, int]) -> None:
    """Refuse a parent whose fields, transforms, layout or min counts differ from the config's: its
    ids would mean something else."""
    where = parent_dir / FILE_NAME
    if parent.raw_layout is not None and parent.raw_layout != layout:
        raise DataError(f"{where}: the parent was prepared from another raw layout ({parent.layout}) "
                        "(extend it with a config of the same dataset.layout)")
    have = [(f.name, f.type, f.transform) for f in parent.fields]
    want = [(s.name, s.type, s.transform) for s in specs]
    if have != want:
        raise DataError(f"{where}: the parent's fields {have} differ from the config's {want} (extend it with "
                        "the dataset config it was prepared with: same layout and integer_mode)")
    kept = {f.name: f.min_count for f in parent.categorical}
    changed = {f: (kept[f], m) for f, m in min_counts.items() if kept[f] != m}
    if changed:
        raise DataError(f"{where}: min count (parent, config) differs for {changed} (keep the parent's min counts: "
                        "an extension adds to its counts)")
    for f in parent.categorical:
        if not pending_file(parent_dir, f.name).is_file():
            raise DataError(f"{pending_file(parent_dir, f.name)}: missing; the parent keeps no counts of its rare "
                            "values (prepare it again with this version of ctr prepare, then extend it)")


def lineage(parent_dir: Path, parent: FeatureMap, paths: list[Path]) -> Lineage:
    digest = feature_map_sha256(parent_dir)
    return Lineage(parent=str(parent_dir.resolve()), parent_sha256=digest, ancestors=[*parent.ancestry, digest],
                   rows_before=parent.rows_through,
                   files=[DayFile(path=str(p.resolve()), sha256=sha256_file(p)) for p in paths])


def _same_side(a: pl.DataFrame, b: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two count tables of one field with the same side column: where one names its values by byte
    length and the other by token (a day with longer tokens), both by token."""
    if a.columns == b.columns:
        return a, b
    return token_side(a), token_side(b)


def extend_vocabulary(old: pl.DataFrame, pending: pl.DataFrame, day: pl.DataFrame,
                      min_count: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(vocabulary, pending) of one field after a day: the parent's values with their ids and summed
    counts, then the values whose summed count reached ``min_count``, numbered on from the parent's
    last id by the vocabulary's order rule; and the counts of the values still under it."""
    pending, day = _same_side(pending, day)
    seen = merged_counts(pl.concat([pending, day]).lazy()).collect()
    added = seen.select("key", pl.col("count").alias("added"))
    kept = (old.join(added, on="key", how="left")
            .select("token", "key", pl.col("count") + pl.col("added").fill_null(0), "id"))
    fresh = seen.join(old.select("key"), on="key", how="anti")
    grown = fit_vocabulary(fresh.lazy(), min_count, first_id=FIRST_VALUE_ID + old.height)
    return pl.concat([kept, grown]), fresh.filter(pl.col("count") < min_count)
