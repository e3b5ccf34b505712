import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from features.schema import SplitConfig
from features.split import SPLIT_COLUMN, split_expr
from features.transforms import criteo_bucket, feature_expr, FeatureSpec, signed_log1p, HOUR_OF_DAY, WEEKDAY, IS_WEEKEND
from features.codes import vocabulary_codes, with_codes, with_keys
from features.hashing import int_keys, token_keys
from features.vocab import BLANK_ID, OOV_ID, KeyIndex, count_query, fit_vocabulary, merged_counts
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


def _vocabulary(values: list[object], min_count: int, strings: bool = True) -> pl.DataFrame:
    """Counted as prepare counts: by code, each distinct code then keyed (its text from the key)."""
    coded = with_codes(pl.LazyFrame({"c": values}), {"c": 1} if strings else {})
    counts = count_query(coded, "c", None).collect()
    return fit_vocabulary(with_keys(counts, "word" if strings else "integer").lazy(), min_count)


def _ids(vocab: pl.DataFrame, values: list[object], strings: bool = True) -> list[int]:
    coded = with_codes(pl.LazyFrame({"c": values}), {"c": 1} if strings else {}).collect()
    codes = vocabulary_codes(vocab, "word" if strings else "integer")
    return KeyIndex.of(vocab, codes).lookup(coded["c"]).tolist()


def test_vocabulary_min_count_order_and_specials() -> None:
    vocab = _vocabulary(["b", "a", "b", "c", "a", "b", None, "d"], 2)
    # counts: b=3, a=2 kept (ids from 3, by count desc); c, d below min_count
    assert vocab.select("token", "count", "id").rows() == [("b", 3, 3), ("a", 2, 4)]
    assert vocab["key"].to_list() == token_keys(pa.array(["b", "a"])).tolist()
    assert _ids(vocab, ["a", "b", "c", None, "zzz"]) == [4, 3, OOV_ID, BLANK_ID, OOV_ID]
    # equal counts: ordered by the value, as a person would sort them
    assert _vocabulary(["y", "x", "z", "x", "y", "z"], 1)["token"].to_list() == ["x", "y", "z"]
    # integer tokens (bucketed Criteo integers) too, keyed by int_keys
    ints = _vocabulary([7, 7, 5, 5, 5, 9], 2, strings=False)
    assert ints["key"].to_list() == int_keys(np.array([5, 7])).tolist()
    assert _ids(ints, [5, 7, 9, None], strings=False) == [3, 4, OOV_ID, BLANK_ID]


def test_longer_tokens_are_counted_with_their_text() -> None:
    long = ["a-token-of-many-bytes", "another-long-one", "a-token-of-many-bytes"]
    keyed = with_codes(pl.LazyFrame({"c": long, "t": long}), {"c": 3})
    vocab = fit_vocabulary(with_keys(count_query(keyed, "c", "t").collect(), "key").lazy(), 1)
    assert vocab.select("token", "count", "id").rows() == [("a-token-of-many-bytes", 2, 3), ("another-long-one", 1, 4)]


def test_counts_of_parts_merge_per_key() -> None:
    parts = pl.LazyFrame({"key": [10, 11, 10], "token": ["a", "b", "a"], "count": [2, 1, 3]})
    assert merged_counts(parts).sort("key").select("key", "token", "count").collect().rows() == [(10, "a", 5), (11, "b", 1)]


def test_key_index_finds_every_code_of_a_crowded_table() -> None:
    """Codes that share their home slot probe on to the next ones, found or not. The home slot is the
    top bits of code * 0x9E3779B97F4A7C15 mod 2^64, so the codes j / 0x9E37... (mod 2^64) for small j
    all have slot 0; code 0 (a Criteo bucket) must not be taken for an empty slot."""
    inverse = pow(0x9E3779B97F4A7C15, -1, 1 << 64)
    crowded = np.array([j * inverse % (1 << 64) for j in range(1, 3000)], dtype=np.uint64).view(np.int64)
    codes = np.concatenate([crowded, [5, 7]])
    ids = np.arange(3, 3 + codes.size, dtype=np.int32)
    index = KeyIndex(codes, ids)
    assert (index._home(crowded) == 0).all()
    absent = np.array([3000 * inverse % (1 << 64)], dtype=np.uint64).view(np.int64)  # slot 0 too
    probe = pl.Series(np.concatenate([codes[::-1], absent, np.array([0, 6], dtype=np.int64)]))
    assert index.lookup(probe).tolist() == ids[::-1].tolist() + [OOV_ID, OOV_ID, OOV_ID]


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
