"""Typed raw columns -> model features: categorical tokens (later mapped to ids) and dense floats.

Each transform carries a version string that is saved in the feature map, so a model trained on one
version can refuse data prepared by another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from features.schema import Layout

FeatureType = Literal["categorical", "dense"]

CRITEO_BUCKET = "criteo_log2_bucket_v1"
SIGNED_LOG1P = "signed_log1p_v1"
TOKEN = "token_v1"
HOUR_OF_DAY, WEEKDAY, IS_WEEKEND = "hour_of_day_v1", "weekday_v1", "is_weekend_v1"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    type: FeatureType
    source: str
    transform: str


def criteo_bucket(value: pl.Expr) -> pl.Expr:
    """Criteo integer -> bucket token: v <= 2 keeps v; v > 2 becomes 3 + floor(ln(v)^2).

    The offset of 3 keeps the log buckets apart from the literal small values (-2..2): without it,
    v = 1 and v = 3 (ln(3)^2 = 1.2) would share a token, as in the plain FuxiCTR formula. Blank stays
    null and gets the field's blank id later.
    """
    # clip so the unused branch never sees log(v <= 0) (NaN / -inf would fail the integer cast)
    log_bucket = (value.clip(lower_bound=3).cast(pl.Float64).log() ** 2).floor().cast(pl.Int64) + 3
    return pl.when(value > 2).then(log_bucket).otherwise(value)


def signed_log1p(value: pl.Expr) -> pl.Expr:
    """sign(v) * ln(1 + |v|), blank -> 0: keeps Criteo's negative I2 values finite and ordered."""
    v = value.cast(pl.Float64)
    return (v.sign() * v.abs().log1p()).fill_null(0.0).cast(pl.Float32)


def feature_specs(layout: Layout, integer_mode: Literal["bucket", "numeric"]) -> list[FeatureSpec]:
    """The model features a layout produces, in feature-map order."""
    specs: list[FeatureSpec] = []
    for col in layout.columns:
        if col.kind == "categorical":
            specs.append(FeatureSpec(col.name, "categorical", col.name, TOKEN))
        elif col.kind == "integer" and integer_mode == "bucket":
            specs.append(FeatureSpec(col.name, "categorical", col.name, CRITEO_BUCKET))
        elif col.kind in ("integer", "numeric"):
            specs.append(FeatureSpec(col.name, "dense", col.name, SIGNED_LOG1P))
        elif col.kind == "yymmddhh":
            specs.append(FeatureSpec(col.name, "categorical", col.name, HOUR_OF_DAY))
            specs.append(FeatureSpec(f"{col.name}_weekday", "categorical", col.name, WEEKDAY))
            specs.append(FeatureSpec(f"{col.name}_is_weekend", "categorical", col.name, IS_WEEKEND))
    dense = [s for s in specs if s.type == "dense"]
    categorical = [s for s in specs if s.type == "categorical"]
    return dense + categorical


def feature_expr(spec: FeatureSpec) -> pl.Expr:
    """Expression from the typed source column to the feature (token or dense float)."""
    src = pl.col(spec.source)
    exprs = {
        TOKEN: lambda: src,
        CRITEO_BUCKET: lambda: criteo_bucket(src),
        SIGNED_LOG1P: lambda: signed_log1p(src),
        HOUR_OF_DAY: lambda: src.dt.hour().cast(pl.Int64),
        WEEKDAY: lambda: src.dt.weekday().cast(pl.Int64),
        IS_WEEKEND: lambda: (src.dt.weekday() >= 6).cast(pl.Int64),
    }
    return exprs[spec.transform]().alias(spec.name)
