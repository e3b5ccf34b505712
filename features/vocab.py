"""Per-field vocabularies with ``min_count``, fitted on the train split only, over token keys.

Id layout of every categorical field: 0 = padding (never produced by prepare; reserved for
multi-valued bags), 1 = out-of-vocabulary (rare or unseen values), 2 = blank, 3.. = values ordered by
descending train count, ties by value, so ids are deterministic.

A value is counted and looked up by its token key (``features.hashing``), an integer, from the
parse on; the value itself rides along once per distinct key, so a vocabulary file names what a
person reads (``token``) beside what the pipeline and the edge file match (``key``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

PADDING_ID, OOV_ID, BLANK_ID = 0, 1, 2
FIRST_VALUE_ID = 3
SPECIAL_IDS = {"padding": PADDING_ID, "oov": OOV_ID, "blank": BLANK_ID}
COUNT_COLUMNS = ("key", "token", "count")


def count_query(rows: pl.LazyFrame, field: str, token: str) -> pl.LazyFrame:
    """(key, token, count) of one field's non-blank values in ``rows``: a streaming group-by whose
    memory grows with the distinct values, not the rows. ``field`` holds the keys, ``token`` the values."""
    return (
        rows.select(pl.col(field).alias("key"), pl.col(token).alias("token"))
        .drop_nulls("key")
        .group_by("key")
        .agg(pl.col("token").first(), pl.len().cast(pl.Int64).alias("count"))
    )


def merged_counts(parts: pl.LazyFrame) -> pl.LazyFrame:
    """Counts of several files (or chunks) of one field summed per key."""
    return parts.group_by("key").agg(pl.col("token").first(), pl.col("count").sum())


def fit_vocabulary(counts: pl.LazyFrame, min_count: int) -> pl.DataFrame:
    """The (token, key, count, id) table of one field from its train counts."""
    return (
        counts.filter(pl.col("count") >= min_count)
        .sort(["count", "token"], descending=[True, False])
        .with_row_index("id", offset=FIRST_VALUE_ID)
        .select("token", "key", "count", pl.col("id").cast(pl.Int32))
        .collect(engine="streaming")
    )


class KeyIndex:
    """Token key -> id of one vocabulary, built once and probed by whole columns.

    An open-addressing table in NumPy (linear probing, at most half full, the key's low bits as its
    home slot: keys are already uniform hashes). A lookup is a few gathers per row, whatever the
    vocabulary's size; Polars' ``replace_strict`` or a join would rebuild their hash table for every
    slice of rows, which costs more than the lookups for a 10M-value field."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray) -> None:
        capacity = 1 << max(4, (2 * len(keys)).bit_length())
        self.mask = capacity - 1
        self.keys = np.zeros(capacity, np.int64)
        self.ids = np.zeros(capacity, np.int32)  # id 0 (padding, never a value's) marks an empty slot
        slots = keys & self.mask
        pending = np.arange(len(keys))
        while pending.size:
            free = self.ids[slots] == 0
            taken, first = np.unique(slots[free], return_index=True)  # one winner per free slot
            winners = pending[free][first]
            self.keys[taken], self.ids[taken] = keys[winners], ids[winners]
            rest = np.ones(pending.size, bool)
            rest[np.flatnonzero(free)[first]] = False
            pending, slots = pending[rest], (slots[rest] + 1) & self.mask

    @classmethod
    def of(cls, vocab: pl.DataFrame) -> "KeyIndex":
        return cls(vocab["key"].to_numpy(), vocab["id"].to_numpy())

    def lookup(self, keys: pl.Series) -> np.ndarray:
        """Ids (int32) of a column of keys: known values their id, others OOV, blank (null) the blank id."""
        values = keys.fill_null(0).to_numpy()
        out = np.full(values.size, OOV_ID, np.int32)
        pending = np.arange(values.size)
        slots = values & self.mask
        while pending.size:
            ids = self.ids[slots]
            hit = self.keys[slots] == values[pending]
            out[pending[hit & (ids != 0)]] = ids[hit & (ids != 0)]
            more = (ids != 0) & ~hit
            pending, slots = pending[more], (slots[more] + 1) & self.mask
        if keys.null_count():
            out[keys.is_null().to_numpy()] = BLANK_ID
        return out
