"""Per-field vocabularies with ``min_count``, fitted on the train split only, over token keys.

Id layout of every categorical field: 0 = padding (never produced by prepare; reserved for
multi-valued bags), 1 = out-of-vocabulary (rare or unseen values), 2 = blank, 3.. = values ordered by
descending train count, ties by value, so ids are deterministic.

A value is counted and looked up by its code (``features.codes``), an integer, from the parse on,
and known by its token key (``features.hashing``) in the vocabulary. The vocabulary file names what
a person reads (``token``) beside what the edge file matches (``key``); the text comes back from the
key itself (the hash is invertible for integers and for tokens of up to 8 bytes, given their
length), so no string is counted, except the tokens of fields whose values are longer.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.hashing import int_tokens, short_tokens

PADDING_ID, OOV_ID, BLANK_ID = 0, 1, 2
FIRST_VALUE_ID = 3
SPECIAL_IDS = {"padding": PADDING_ID, "oov": OOV_ID, "blank": BLANK_ID}


def count_query(rows: pl.LazyFrame, field: str, side: str | None) -> pl.LazyFrame:
    """(code, count[, token]) of one field's non-blank values in ``rows``: a streaming group-by whose
    memory grows with the distinct values, not the rows. ``field`` holds the codes
    (``features.codes``); ``side`` names the column of the tokens, for a field whose codes are token
    keys (tokens over 8 bytes, whose text no key gives back); None for the others."""
    kept = [pl.col(side).alias("token")] if side else []
    return (
        rows.select(pl.col(field).alias("code"), *kept)
        .drop_nulls("code")
        .group_by("code")
        .agg(pl.len().cast(pl.Int64).alias("count"), *(pl.col("token").first() for _ in kept))
    )


def merged_counts(parts: pl.LazyFrame, by: str = "key") -> pl.LazyFrame:
    """Counts of several files (or days) of one field summed per ``by`` (key, or code)."""
    side = [pl.col(c).first() for c in parts.collect_schema().names() if c not in (by, "count")]
    return parts.group_by(by).agg(pl.col("count").sum(), *side)


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
    """Code -> id of one vocabulary (``features.codes``), built once and probed by whole columns.

    An open-addressing table in NumPy (linear probing, at most half full). A code's home slot is the
    top bits of the code times an odd constant (Fibonacci hashing): codes are raw words and small
    integers, whose low bits alone would crowd a few slots. Each slot holds (code, id) side by side,
    so a probe costs one cache miss, not two. A lookup is a few gathers per row, whatever the
    vocabulary's size; Polars' ``replace_strict`` or a join would rebuild their hash table for every
    slice of rows, which costs more than the lookups for a 10M-value field."""

    _SPREAD = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, codes: np.ndarray, ids: np.ndarray) -> None:
        bits = max(4, (2 * len(codes)).bit_length())
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        self.slots = np.zeros((1 << bits, 2), np.int64)  # (code, id); id 0 (padding, never a value's) marks it empty
        slots = self._home(codes)
        pending = np.arange(len(codes))
        while pending.size:
            free = self.slots[slots, 1] == 0
            taken, first = np.unique(slots[free], return_index=True)  # one winner per free slot
            winners = pending[free][first]
            self.slots[taken, 0], self.slots[taken, 1] = codes[winners], ids[winners]
            rest = np.ones(pending.size, bool)
            rest[np.flatnonzero(free)[first]] = False
            pending, slots = pending[rest], (slots[rest] + 1) & self.mask

    def _home(self, codes: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((codes.view(np.uint64) * self._SPREAD) >> self.shift).view(np.int64)

    @classmethod
    def of(cls, vocab: pl.DataFrame, codes: np.ndarray) -> "KeyIndex":
        """The index of a vocabulary, given its values' codes in its row order."""
        return cls(codes, vocab["id"].to_numpy())

    def _held(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, ids) in ``slots``: one 16-byte gather per slot, through a complex128 view of the
        (code, id) pairs (NumPy gathers a 2-D row selection four times slower)."""
        held = np.take(self.slots.view(np.complex128).ravel(), slots).view(np.int64)
        return held[0::2], held[1::2]

    def lookup(self, codes: pl.Series) -> np.ndarray:
        """Ids (int32) of a column of codes: known values their id, others OOV, blank (null) the blank id.

        Every code reads its home slot in whole-column steps; only the few whose slot holds another
        code probe on, one slot per round."""
        values = codes.fill_null(0).to_numpy()
        blank = codes.is_null().to_numpy() if codes.null_count() else np.zeros(values.size, bool)
        slots = self._home(values)
        held, ids = self._held(slots)
        found = (held == values) & (ids != 0)  # an empty slot holds code 0, a value's code too
        out = np.where(found, ids, OOV_ID).astype(np.int32)
        out[blank] = BLANK_ID
        pending = np.flatnonzero(~found & (ids != 0) & ~blank)  # a blank probes no further
        slots = (slots[pending] + 1) & self.mask
        while pending.size:
            held, ids = self._held(slots)
            hit = (held == values[pending]) & (ids != 0)
            out[pending[hit]] = ids[hit]
            more = (ids != 0) & ~hit
            pending, slots = pending[more], (slots[more] + 1) & self.mask
        return out
