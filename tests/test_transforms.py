import math

import numpy as np
import polars as pl
import pytest

from features.schema import SplitConfig
from features.split import SPLIT_COLUMN, split_expr
from features.transforms import criteo_bucket, feature_expr, FeatureSpec, signed_log1p, HOUR_OF_DAY, WEEKDAY, IS_WEEKEND
from features.vocab import BLANK_ID, OOV_ID, encode, fit_vocabularies
from features.parse import ROW


def test_criteo_bucket_hand_values() -> None:
    v = pl.Series("v", [-2, -1, 0, 1, 2, 3, 7, 8, 100, None])
    got = pl.select(criteo_bucket(pl.lit(v))).to_series().to_list()
    # v <= 2 kept; v > 2 -> 3 + floor(ln(v)^2): ln3^2=1.21 -> 4, ln7^2=3.79 -> 6, ln8^2=4.32 -> 7, ln100^2=21.2 -> 24
    assert got == [-2, -1, 0, 1, 2, 4, 6, 7, 24, None]
    assert 3 + math.floor(math.log(100) ** 2) == 24


def test_signed_log1p() -> None:
    got = pl.select(signed_log1p(pl.lit(pl.Series([-1, 0, 1, None])))).to_series().to_list()
    assert got == pytest.approx([-math.log(2), 0.0, math.log(2), 0.0])


def test_hour_expansion() -> None:
    # 14102100 = Tuesday 2014-10-21 00h; 14102517 = Saturday 2014-10-25 17h
    df = pl.DataFrame({"hour": ["1410210000", "1410251700"]}).select(
        pl.col("hour").str.strptime(pl.Datetime("us"), "%y%m%d%H%M"))
    specs = [FeatureSpec("h", "categorical", "hour", t) for t in (HOUR_OF_DAY, WEEKDAY, IS_WEEKEND)]
    out = df.select([feature_expr(s).alias(s.transform) for s in specs]).rows()
    assert out == [(0, 2, 0), (17, 6, 1)]


def test_vocabulary_min_count_order_and_specials() -> None:
    train = pl.LazyFrame({"c": ["b", "a", "b", "c", "a", "b", None, "d"]})
    vocab = fit_vocabularies(train, {"c": 2})["c"]
    # counts: b=3, a=2 kept (ids from 3, by count desc); c, d below min_count
    assert vocab.rows() == [("b", 3, 3), ("a", 2, 4)]
    ids = pl.DataFrame({"c": ["a", "b", "c", None, "zzz"]}).select(encode("c", vocab)).to_series().to_list()
    assert ids == [4, 3, OOV_ID, BLANK_ID, OOV_ID]
    # a vocabulary not in id order takes the lookup path, with the same ids
    shuffled = pl.DataFrame({"c": ["a", "b", "c", None, "zzz"]}).select(encode("c", vocab.reverse())).to_series()
    assert shuffled.to_list() == ids
    # integer tokens (bucketed Criteo integers) too
    ints = fit_vocabularies(pl.LazyFrame({"i": [7, 7, 5, 5, 5, 9]}), {"i": 2})["i"]
    assert pl.DataFrame({"i": [5, 7, 9, None]}).select(encode("i", ints)).to_series().to_list() == [3, 4, OOV_ID, BLANK_ID]


def test_random_split_shares_and_determinism() -> None:
    rows = pl.DataFrame({ROW: np.arange(100_000, dtype=np.uint64)})
    cfg = SplitConfig(method="random", ratios=(0.8, 0.1, 0.1), seed=3)
    a = rows.select(split_expr(cfg, 100_000)).to_series()
    b = rows.select(split_expr(cfg, 100_000)).to_series()
    c = rows.select(split_expr(SplitConfig(seed=4), 100_000)).to_series()
    shares = a.value_counts(sort=True, name="n")
    assert a.equals(b) and not a.equals(c)
    assert shares.filter(pl.col(SPLIT_COLUMN) == 0)["n"][0] == pytest.approx(80_000, rel=0.01)
    assert shares.filter(pl.col(SPLIT_COLUMN) == 2)["n"][0] == pytest.approx(10_000, rel=0.05)


def test_order_split() -> None:
    rows = pl.DataFrame({ROW: np.arange(10, dtype=np.uint64)})
    got = rows.select(split_expr(SplitConfig(method="order"), 10)).to_series().to_list()
    assert got == [0] * 8 + [1, 2]


def test_split_ratios_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(ratios=(0.5, 0.2, 0.2))
