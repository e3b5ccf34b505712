"""Per-field vocabularies with ``min_count``, fitted on the train split only.

Id layout of every categorical field: 0 = padding (never produced by prepare; reserved for
multi-valued bags), 1 = out-of-vocabulary (rare or unseen values), 2 = blank, 3.. = values ordered by
descending train count, ties by value, so ids are deterministic.
"""

from __future__ import annotations

import polars as pl

PADDING_ID, OOV_ID, BLANK_ID = 0, 1, 2
FIRST_VALUE_ID = 3
SPECIAL_IDS = {"padding": PADDING_ID, "oov": OOV_ID, "blank": BLANK_ID}


def vocabulary_query(train: pl.LazyFrame, field: str, min_count: int) -> pl.LazyFrame:
    """Lazy (token, count, id) table of one field: streaming group-by, memory ~ distinct values."""
    return (
        train.select(pl.col(field).alias("token"))
        .drop_nulls()
        .group_by("token")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .filter(pl.col("count") >= min_count)
        .sort(["count", "token"], descending=[True, False])
        .with_row_index("id", offset=FIRST_VALUE_ID)
        .select("token", "count", pl.col("id").cast(pl.Int32))
    )


def fit_vocabularies(train: pl.LazyFrame, min_counts: dict[str, int]) -> dict[str, pl.DataFrame]:
    """Every field's vocabulary, one streaming query per field.

    One query at a time on purpose: ``collect_all`` of all fields ran about twice as fast but its
    peak memory grew with the number of rows (1.9 GB at 4M Criteo rows against 0.25 GB sequentially).
    """
    return {f: vocabulary_query(train, f, mc).collect(engine="streaming") for f, mc in min_counts.items()}


def encode(field: str, vocab: pl.DataFrame) -> pl.Expr:
    """Token -> id (Int32): known values their id, others OOV, blank (null) the blank id.

    String tokens of a vocabulary in id order go through an Enum of it (its positions are the ids
    minus FIRST_VALUE_ID): about 30% faster than a ``replace_strict`` lookup on Criteo's hex strings."""
    col = pl.col(field)
    in_id_order = vocab["id"].equals(pl.int_range(FIRST_VALUE_ID, FIRST_VALUE_ID + vocab.height, dtype=pl.Int32,
                                                   eager=True).alias("id"), check_dtypes=False)
    if vocab.schema["token"] == pl.String and in_id_order:
        position = col.cast(pl.Enum(vocab["token"]), strict=False).to_physical().cast(pl.Int32)
        ids = (position + FIRST_VALUE_ID).fill_null(OOV_ID)
    else:
        ids = col.replace_strict(vocab["token"], vocab["id"], default=OOV_ID, return_dtype=pl.Int32)
    return pl.when(col.is_null()).then(pl.lit(BLANK_ID, dtype=pl.Int32)).otherwise(ids).alias(field)
