"""Codes: what a prepare counts and looks values up by between the parse and the vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features.codes import LONG, vocabulary_codes, with_codes, with_keys, word_code
from features.hashing import int_keys, token_keys
from features.schema import ColumnSpec
from features.vocab import fit_vocabulary

from conftest import run_prepare


def _signed(word: bytes) -> int:
    return int.from_bytes(word.ljust(8, b"\0"), "little", signed=True)


def test_a_short_token_is_its_bytes_zero_padded() -> None:
    got = pl.select(word_code(pl.lit(pl.Series(["abc", "abcdefgh", "é", None, "\xff\xff"])))).to_series().to_list()
    # "é" is c3 a9 in UTF-8; "\xff\xff" is two characters of two bytes each (c3 bf c3 bf)
    assert got == [0x636261, _signed(b"abcdefgh"), 0xA9C3, None, 0xBFC3BFC3]


def test_each_distinct_code_gets_the_token_key_and_its_text_back() -> None:
    tokens = ["a", "b0", "68fd1e64", "é"]
    counts = pl.DataFrame({"code": [_signed(t.encode()) for t in tokens], "count": [5, 4, 3, 2]})
    keyed = with_keys(counts, "word")
    assert keyed["key"].to_list() == token_keys(pa.array(tokens)).tolist()
    assert keyed["length"].to_list() == [1, 2, 8, 2]
    vocab = fit_vocabulary(keyed.lazy(), 1)
    assert vocab["token"].to_list() == tokens
    assert vocabulary_codes(vocab, "word").tolist() == counts["code"].to_list()

    ints = with_keys(pl.DataFrame({"code": [0, -1, 24], "count": [3, 2, 1]}), "integer")
    assert ints["key"].to_list() == int_keys(np.array([0, -1, 24])).tolist()
    assert vocabulary_codes(fit_vocabulary(ints.lazy(), 1), "integer").tolist() == [0, -1, 24]


def test_a_token_longer_than_its_words_flags_the_row() -> None:
    frame = pl.LazyFrame({"a": ["12345678", "123456789", None], "b": ["x" * 16, "y", "z" * 17]})
    got = with_codes(frame, {"a": 1, "b": 2}).collect()
    assert got[LONG].to_list() == [False, True, True]
    assert got["b"].to_list()[:2] == token_keys(pa.array(["x" * 16, "y"])).tolist()
    assert with_codes(pl.LazyFrame({"i": [1, 2]}), {}).collect()[LONG].to_list() == [False, False]


def test_a_line_with_a_nul_byte_is_rejected(tmp_path: Path) -> None:
    """Zero padding names short tokens exactly only if no token holds a NUL byte: such a line is
    rejected, and "a" keeps its count apart from "a\\0"."""
    raw = tmp_path / "nul.csv"
    raw.write_bytes(b"1,a\n0,a\x00\n1,a\n0,b\n")
    columns = [ColumnSpec(name="label", kind="label"), ColumnSpec(name="c", kind="categorical")]
    result = run_prepare(raw, tmp_path / "out", layout="generic", columns=columns, separator=",", header=False,
                         split={"method": "order", "ratios": [1.0, 0.0, 0.0]}, max_reject_fraction=0.5)
    assert result.feature_map.rows_rejected == 1
    rejects = pl.read_csv(tmp_path / "out" / "rejects.csv")
    assert rejects.select("line", "reason").rows() == [(2, "the line holds a NUL byte")]
    vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "c.parquet")
    assert vocab.select("token", "count").rows() == [("a", 2), ("b", 1)]
