"""What a prepare counts and looks a categorical value up by, between the parse and the vocabulary: its code.

Why not the token key itself: the key (``features.hashing``) takes a dozen whole-column operations
per field, and a prepare would pay them for every row, while the vocabulary needs them once per
distinct value. A code is cheap to take from the parsed column and names the value exactly:
  - ``integer``: an integer token (a Criteo bucket, an hour field) is its own code;
  - ``word``: a string token of at most 8 bytes is its bytes, zero-padded, read as one little-endian
    64-bit word. This is exact because the parse rejects any line holding a NUL byte, so no token
    ends in one and the padding cannot be confused with the token's own bytes;
  - ``key``: a field with longer tokens is hashed at parse time (``with_token_keys``): its code is
    its token key, and its counts carry the token text beside it.
The vocabulary turns each distinct code into the token key and the text (``with_keys``); the encode
pass looks the staged codes up in an index of the vocabulary's codes (``vocabulary_codes``), so every
row gets the id of its value's token key, as if the key had been taken per row.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl

from features.hashing import TOKEN_SEED, hash_numpy, int_keys, with_token_keys

CodeKind = Literal["integer", "word", "key"]
WORD_BYTES = 8
LONG = "_long"  # staged flag: the row has a token longer than its field's hash was sized for
_U64 = {"dtype": pl.UInt64, "endianness": "little"}


def code_kind(field: str, words: dict[str, int]) -> CodeKind:
    """A field's code: ``words`` maps each string field to the 8-byte words its longest token needs."""
    if field not in words:
        return "integer"
    return "word" if words[field] == 1 else "key"


def word_code(token: pl.Expr) -> pl.Expr:
    """The zero-padded word of each token of at most 8 bytes (Int64 bit pattern; null stays null). A
    token of exactly 8 bytes (Criteo's and Avazu's hex ids) is read as it is; only the others pay for
    the padding, whose character count can exceed the bytes wanted (hence the slice)."""
    exact = token.cast(pl.Binary).bin.reinterpret(**_U64)
    padded = (pl.when(token.str.len_bytes() != WORD_BYTES).then(token).str.pad_end(WORD_BYTES, "\0")
              .cast(pl.Binary).bin.slice(0, WORD_BYTES).bin.reinterpret(**_U64))
    return pl.coalesce(exact, padded).reinterpret(signed=True)


def with_codes(frame: pl.LazyFrame, words: dict[str, int]) -> pl.LazyFrame:
    """Each string token column replaced by its code, and the ``LONG`` flag of the rows whose token
    outgrows its field's words (the prepare then parses again with more: ``words_needed``). Integer
    token columns are their own codes and stay as they are."""
    flag = pl.any_horizontal(pl.col(f).str.len_bytes() > WORD_BYTES * w for f, w in words.items()) if words \
        else pl.lit(False)
    frame = frame.with_columns(flag.fill_null(False).alias(LONG))
    frame = frame.with_columns(word_code(pl.col(f)).alias(f) for f, w in words.items() if w == 1)
    return with_token_keys(frame, {f: w for f, w in words.items() if w > 1})


def _word_lengths(words: np.ndarray) -> np.ndarray:
    """Byte lengths of zero-padded words (uint64): up to the last non-zero byte."""
    nonzero = words.view(np.uint8).reshape(-1, WORD_BYTES) != 0
    return np.where(nonzero.any(1), WORD_BYTES - np.argmax(nonzero[:, ::-1], 1), 0).astype(np.uint32)


def with_keys(counts: pl.DataFrame, kind: CodeKind) -> pl.DataFrame:
    """A field's counts by code -> by token key, as the vocabulary reads them: (key, count) for
    integers, (key, count, length) for words, whose text the key and length give back
    (``short_tokens``), (key, count, token) for longer tokens."""
    codes = counts["code"].to_numpy()
    rest = [c for c in counts.columns if c != "code"]
    if kind == "key":
        return counts.select(pl.col("code").alias("key"), *rest)
    if kind == "integer":
        return counts.select(pl.Series("key", int_keys(codes)), *rest)
    words = codes.view(np.uint64)
    lengths = _word_lengths(words)
    with np.errstate(over="ignore"):
        keys = hash_numpy(hash_numpy(lengths.astype(np.uint64), TOKEN_SEED) ^ words, 0).view(np.int64)
    return counts.select(pl.Series("key", keys), *rest, pl.Series("length", lengths))


def vocabulary_codes(vocab: pl.DataFrame, kind: CodeKind) -> np.ndarray:
    """The code of each vocabulary value (int64), from its token: what the staged rows hold."""
    if kind == "key":
        return vocab["key"].to_numpy()
    if kind == "integer":
        return vocab["token"].cast(pl.Int64).to_numpy()
    return vocab.select(word_code(pl.col("token")))["token"].to_numpy()
