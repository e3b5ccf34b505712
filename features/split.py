"""Train/valid/test assignment as one lazy expression (0 = train, 1 = valid, 2 = test)."""

from __future__ import annotations

import polars as pl

from features.hashing import hash_expr, mix_seed
from features.parse import ROW
from features.schema import SplitConfig

SPLITS = ("train", "valid", "test")
SPLIT_COLUMN = "_split"
TIME_COLUMN = "_time"
_SPLIT_STREAM = 0x5EED


def _assign(position: pl.Expr, cut1: float | int, cut2: float | int) -> pl.Expr:
    return (
        pl.when(position < cut1).then(pl.lit(0, pl.Int8)).when(position < cut2).then(pl.lit(1, pl.Int8))
        .otherwise(pl.lit(2, pl.Int8)).alias(SPLIT_COLUMN)
    )


def split_expr(cfg: SplitConfig, n_rows: int, time_cuts: tuple[int, int] | None = None, first_row: int = 0) -> pl.Expr:
    """Split of each row from its global position (random, order) or its ``_time`` value (time).
    ``first_row``: the position of the first of the ``n_rows`` the order split divides (an extension's
    day starts where its parents' rows end).

    random: the top 53 bits of a seeded hash of the row position, as a uniform draw in [0, 1),
    so a row's split depends only on (seed, position) and not on chunking or thread count.
    """
    r_train, r_valid, _ = cfg.ratios
    if cfg.method == "random":
        draw = hash_expr(pl.col(ROW), mix_seed(cfg.seed, _SPLIT_STREAM)) // pl.lit(1 << 11, dtype=pl.UInt64)
        scale = float(1 << 53)
        return _assign(draw.cast(pl.Float64), r_train * scale, (r_train + r_valid) * scale)
    if cfg.method == "order":
        position = (pl.col(ROW) - pl.lit(first_row, pl.UInt64)).cast(pl.Float64)
        return _assign(position, r_train * n_rows, (r_train + r_valid) * n_rows)
    assert time_cuts is not None, "time split needs cut points"
    return _assign(pl.col(TIME_COLUMN), time_cuts[0], time_cuts[1])


def time_cut_points(valid_rows: pl.LazyFrame, cfg: SplitConfig) -> tuple[int, int]:
    """Quantiles of ``_time`` at the train and train+valid shares (nearest observed values)."""
    r_train, r_valid, _ = cfg.ratios
    cuts = valid_rows.select(
        pl.col(TIME_COLUMN).quantile(r_train, "nearest").alias("a"),
        pl.col(TIME_COLUMN).quantile(min(r_train + r_valid, 1.0), "nearest").alias("b"),
    ).collect(engine="streaming")
    return cuts["a"][0], cuts["b"][0]
