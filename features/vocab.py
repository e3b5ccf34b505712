"""Per-field vocabularies with ``min_count``, fitted on the train split only, over token keys.

Id layout of every categorical field: 0 = padding (never produced by prepare; reserved for
multi-valued bags), 1 = out-of-vocabulary (rare or unseen values), 2 = blank, 3.. = values ordered by
descending train count, ties by value, so ids are deterministic.

A value is counted and looked up by its token key (``features.hashing``), an integer, from the
parse on. The vocabulary file names what a person reads (``token``) beside what the pipeline and
the edge file match (``key``); the text comes back from the key itself (the hash is invertible for
integers and for tokens of up to 8 bytes, given their length), so no string is counted, except the
tokens of fields whose values are longer.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.hashing import int_tokens, short_tokens

PADDING_ID, OOV_ID, BLANK_ID = 0, 1, 2
FIRST_VALUE_ID = 3
SPECIAL_IDS = {"padding": PADDING_ID, "oov": OOV_ID, "blank": BLANK_ID}


def count_query(rows: pl.LazyFrame, field: str, side: tuple[str, str] | None) -> pl.LazyFrame:
    """(key, count[, length or token]) of one field's non-blank values in ``rows``: a streaming
    group-by whose memory grows with the distinct values, not the rows. ``field`` holds the keys;
    ``side`` names a column and what it holds: the tokens' byte lengths ("length", for tokens of at
    most 8 bytes, whose text their key gives back) or the tokens ("token", longer ones); None for
    integer tokens, which their key gives back."""
    kept = [pl.col(side[0]).alias(side[1])] if side else []
    return (
        rows.select(pl.col(field).alias("key"), *kept)
        .drop_nulls("key")
        .group_by("key")
        .agg(pl.len().cast(pl.Int64).alias("count"), *(pl.col(side[1]).first() for _ in kept))
    )


def merged_counts(parts: pl.LazyFrame) -> pl.LazyFrame:
    """Counts of several files (or chunks) of one field summed per key."""
    side = [pl.col(c).first() for c in parts.collect_schema().names() if c not in ("key", "count")]
    return parts.group_by("key").agg(pl.col("count").sum(), *side)


def _tokens(kept: pl.DataFrame) -> pl.Series:
    """The values behind a vocabulary's keys: from the counts' side column, or from the keys."""
    keys = kept["key"].to_numpy()
    if "token" in kept.columns:
        return kept["token"]
    if "length" in kept.columns:
        return pl.Series("token", short_tokens(keys, kept["length"].to_numpy()))
    return pl.Series("token", int_tokens(keys))


def token_side(counts: pl.DataFrame) -> pl.DataFrame:
    """Counts whose side column is the byte length, with the token there instead (the text the key
    and the length give back); other counts as they are."""
    if "length" not in counts.columns:
        return counts
    return counts.with_columns(_tokens(counts).alias("token")).select("key", "count", "token")


def fit_vocabulary(counts: pl.LazyFrame, min_count: int, first_id: int = FIRST_VALUE_ID) -> pl.DataFrame:
    """The (token, key, count, id) table of one field from its train counts, ids from ``first_id``
    (an extension appends after the ids it keeps)."""
    kept = counts.filter(pl.col("count") >= min_count).collect(engine="streaming")
    return (
        kept.with_columns(_tokens(kept).alias("token"))
        .sort(["count", "token"], descending=[True, False])
        .with_row_index("id", offset=first_id)
        .select("token", "key", "count", pl.col("id").cast(pl.Int32))
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
        """Ids (int32) of a column of keys: known values their id, others OOV, blank (null) the blank id.

        Every key reads its home slot in whole-column steps; only the few whose slot holds another
        key probe on, one slot per round."""
        values = keys.fill_null(0).to_numpy()
        blank = keys.is_null().to_numpy() if keys.null_count() else np.zeros(values.size, bool)
        slots = values & self.mask
        ids = self.ids[slots]
        found = (self.keys[slots] == values) & (ids != 0)
        out = np.where(found, ids, np.int32(OOV_ID))
        out[blank] = BLANK_ID
        pending = np.flatnonzero(~found & (ids != 0) & ~blank)  # a blank probes no further
        slots = (slots[pending] + 1) & self.mask
        while pending.size:
            ids = self.ids[slots]
            hit = (self.keys[slots] == values[pending]) & (ids != 0)
            out[pending[hit]] = ids[hit]
            more = (ids != 0) & ~hit
            pending, slots = pending[more], (slots[more] + 1) & self.mask
        return out
