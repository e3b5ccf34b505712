"""The project's one 64-bit hash (splitmix64), with identical bits in NumPy, Polars, torch and TorchScript.

Two uses, one mixing function:
- ``hash_numpy`` / ``hash_expr`` / ``hash_torch``: a seeded hash of integers (row positions for the
  random split, feature ids for hashed embeddings);
- the token key (``token_keys``, ``int_keys``; see README "The token hash"): what a raw categorical
  value is known by in the vocabularies and in the edge file. A string token's key hashes its UTF-8
  bytes eight at a time, little end first: ``h = mix(len ^ TOKEN_SEED)``, then ``h = mix(h ^ word)``
  per word, the last word zero-padded; an integer token's key is ``mix(v ^ INT_SEED)`` on its int64
  bits. Any language with wrapping 64-bit arithmetic computes both in a few lines.

Why our own: Python's ``hash()`` is salted per process and Polars' ``Expr.hash`` may change between
releases, so neither can decide which split a row lands in, or which embedding row an id reads,
across machines and versions. The one definition below is written against operators the three
share (wrapping 64-bit ``+``, ``*``, ``^``); only the logical right shift differs (``>>`` on unsigned
NumPy values, floor division on Polars', which has no shift, shift-and-mask on torch's signed int64),
so it is passed in.
Bucketing uses the top 63 bits, ``(h >> 1) mod M``, which is the same for signed and unsigned views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

if TYPE_CHECKING:  # the data pipeline hashes without torch, whose import alone costs a second
    import torch

HASH_VERSION = "splitmix64-v1"
TOKEN_KEY_VERSION = "ctr-token64-v1"

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
TOKEN_SEED = 0x243F6A8885A308D3  # the first hex digits of pi: nothing up the sleeve
INT_SEED = 0x13198A2E03707344

T = TypeVar("T")  # np.ndarray, pl.Expr or torch.Tensor


def _splitmix64(x: T, const: Callable[[int], object], shr: Callable[[T, int], T]) -> T:
    z = x + const(_GOLDEN)
    z = (z ^ shr(z, 30)) * const(_MUL1)
    z = (z ^ shr(z, 27)) * const(_MUL2)
    return z ^ shr(z, 31)


def _as_int64(v: int) -> int:
    """The int64 with the same 64 bits as the unsigned value ``v``."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def mix_seed(seed: int, stream: int) -> int:
    """Derive an independent 64-bit key for one use (one field, one split rule) of a user seed."""
    key = np.array([(seed * 0x100000001B3 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return int(hash_numpy(key, 0)[0])


def hash_numpy(values: np.ndarray, key: int) -> np.ndarray:
    """Hash uint64-castable values with a 64-bit key; returns uint64."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64, copy=False) ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        return _splitmix64(x, np.uint64, lambda z, k: z >> np.uint64(k))  # a shift: 3x faster than // 2^k


def unhash_numpy(hashed: np.ndarray, key: int) -> np.ndarray:
    """The values whose ``hash_numpy(values, key)`` is ``hashed`` (uint64): splitmix64 is a bijection,
    undone step by step (``y = z ^ (z >> s)`` by ``z = y ^ (y >> s) ^ (y >> 2s) ^ ...``, a multiply by
    the constant's inverse mod 2^64)."""

    def unshift(y: np.ndarray, s: int) -> np.ndarray:
        z = y.copy()
        for k in range(s, 64, s):
            z ^= y >> np.uint64(k)
        return z

    with np.errstate(over="ignore"):
        z = unshift(hashed.astype(np.uint64), 31) * np.uint64(pow(_MUL2, -1, 1 << 64))
        z = unshift(z, 27) * np.uint64(pow(_MUL1, -1, 1 << 64))
        return (unshift(z, 30) - np.uint64(_GOLDEN)) ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)


def hash_expr(expr: pl.Expr, key: int) -> pl.Expr:
    """The same hash as :func:`hash_numpy`, as a lazy Polars expression (UInt64 result)."""

    def const(v: int) -> pl.Expr:
        return pl.lit(v, dtype=pl.UInt64)

    return _splitmix64(expr.cast(pl.UInt64) ^ const(key & 0xFFFFFFFFFFFFFFFF), const,
                       lambda z, k: z // const(1 << k))


def mix_torch(x):  # type: ignore[no-untyped-def]
    """splitmix64 on an int64 tensor, in ops TorchScript and ONNX compile: the constants are the
    int64 bit patterns of ``_GOLDEN``, ``_MUL1``, ``_MUL2``, the logical shifts are shift-and-mask.
    Unannotated on purpose: TorchScript then types ``x`` as a Tensor without resolving ``torch``,
    which this module imports only for type checkers (the data pipeline hashes without torch)."""
    z = x + -7046029254386353131
    z = (z ^ ((z >> 30) & 17179869183)) * -4658895280553007687
    z = (z ^ ((z >> 27) & 137438953471)) * -7723592293110705685
    return z ^ ((z >> 31) & 8589934591)


def hash_torch(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The same hash on int64 tensors (keys broadcast against values, as int64 bit patterns)."""
    return mix_torch(values.long() ^ keys)


def short_tokens(keys: np.ndarray, lengths: np.ndarray) -> pa.StringArray:
    """The string tokens of at most 8 bytes behind their keys (int64), given their byte lengths: such
    a key is ``mix(mix(len ^ TOKEN_SEED) ^ word)``, so the word, and the token, come back exactly.
    This is how a vocabulary gets its values' text without strings in the counting."""
    words = unhash_numpy(keys.view(np.uint64), 0) ^ hash_numpy(lengths.astype(np.uint64), TOKEN_SEED)
    data = words.astype("<u8").view(np.uint8).reshape(-1, 8)[np.arange(8) < lengths[:, None]]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    return pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def int_tokens(keys: np.ndarray) -> np.ndarray:
    """The integer tokens behind their keys (int64): the inverse of ``int_keys``."""
    return unhash_numpy(keys.view(np.uint64), INT_SEED).view(np.int64)


def int_keys(values: np.ndarray) -> np.ndarray:
    """Token keys (int64 bit patterns) of integer tokens: Criteo's buckets, Avazu's hour fields."""
    return hash_numpy(values.astype(np.int64, copy=False).view(np.uint64), INT_SEED).view(np.int64)


def token_keys(tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Token keys (int64 bit patterns) of string tokens, vectorised over the Arrow buffers: one pass
    per 8-byte word over the tokens that are that long. A null token is keyed as the empty string
    (blank)."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    tokens = tokens.cast(pa.large_binary()).fill_null(b"")
    offsets = np.frombuffer(tokens.buffers()[1], dtype=np.int64)[tokens.offset:tokens.offset + len(tokens) + 1]
    data = np.frombuffer(tokens.buffers()[2], dtype=np.uint8) if tokens.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(8, np.uint8)])  # the last word reads past the end
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):
        h = hash_numpy(lengths.astype(np.uint64), TOKEN_SEED)
        lane = np.arange(8)
        for k in range(int(-(-lengths.max() // 8)) if lengths.size else 0):
            active = np.flatnonzero(lengths > 8 * k)
            at = starts[active, None] + 8 * k + lane
            raw = np.where(lane < (lengths[active, None] - 8 * k), data[at], 0).astype(np.uint8)
            h[active] = hash_numpy(np.ascontiguousarray(raw).view("<u8").ravel() ^ h[active], 0)
    return h.view(np.int64)


def _mixed_columns(frame: pl.LazyFrame, names: list[str]) -> pl.LazyFrame:
    """splitmix64 on UInt64 columns in place, one ``with_columns`` per step: written as one nested
    expression, each step would repeat its input's whole tree twice (``z ^ (z >> k)``)."""
    col, u64 = pl.col, (lambda v: pl.lit(v, dtype=pl.UInt64))
    frame = frame.with_columns((col(n) + u64(_GOLDEN)).alias(n) for n in names)
    for shift, mul in ((30, _MUL1), (27, _MUL2)):
        frame = frame.with_columns(((col(n) ^ (col(n) // u64(1 << shift))) * u64(mul)).alias(n) for n in names)
    return frame.with_columns((col(n) ^ (col(n) // u64(1 << 31))).alias(n) for n in names)


def _word(token: pl.Expr, size: pl.Expr, k: int, words: int) -> pl.Expr:
    """The ``k``-th 8-byte word of each token, zero-padded, as UInt64 (little end first). A token of
    exactly 8 bytes is read as it is; only the others are padded (NUL characters: ``pad_end``
    counts characters, so it adds at least the bytes missing, multi-byte characters too), which
    keeps the common fixed-width hex tokens of Criteo and Avazu off the slow path."""
    as_word = {"dtype": pl.UInt64, "endianness": "little"}
    padded = token.str.pad_end(8 * words, "\0").cast(pl.Binary).bin.slice(8 * k, 8).bin.reinterpret(**as_word)
    if k > 0:
        return padded
    exact = token.cast(pl.Binary).bin.reinterpret(**as_word)
    return pl.coalesce(exact, pl.when(size != 8).then(token).str.pad_end(8 * words, "\0").cast(pl.Binary)
                       .bin.slice(0, 8).bin.reinterpret(**as_word))


def with_token_keys(frame: pl.LazyFrame, strings: dict[str, int]) -> pl.LazyFrame:
    """Each String column of ``strings`` replaced by its token key (Int64 bit pattern; null, a blank,
    stays null), with the bits of ``token_keys``, in whole-column Polars ops that run inside the
    parse's streaming query: how a prepare keys the fields whose tokens are longer than one word
    (``features.codes``). ``strings`` maps a column to the 8-byte words its longest token needs; a
    longer token gets a key from its first words and its length clipped (the caller checks the
    lengths; such a key matches no value the vocabulary holds). A string token's first step,
    ``mix(len ^ TOKEN_SEED)``, is read from a table of the lengths instead of computed."""
    col = pl.col
    key, size, word = "__key_{}".format, "__len_{}".format, "__word_{}".format
    longest = 8 * max(strings.values(), default=0) + 1
    first = pl.Series(hash_numpy(np.arange(longest + 1, dtype=np.uint64), TOKEN_SEED))
    frame = frame.with_columns(col(n).str.len_bytes().alias(size(n)) for n in strings)
    frame = frame.with_columns(
        pl.lit(first).gather(col(size(n)).clip(upper_bound=longest)).alias(key(n)) for n in strings)
    for k in range(max(strings.values(), default=0)):
        step = [n for n, w in strings.items() if w > k]
        frame = frame.with_columns(
            (col(key(n)) ^ _word(col(n), col(size(n)), k, strings[n])).alias(word(n)) for n in step)
        frame = _mixed_columns(frame, [word(n) for n in step])
        frame = frame.with_columns(
            (col(word(n)) if k == 0 else pl.when(col(size(n)) > 8 * k).then(col(word(n))).otherwise(col(key(n))))
            .alias(key(n)) for n in step)
    frame = frame.with_columns(col(key(n)).reinterpret(signed=True).alias(n) for n in strings)
    return frame.drop([t(n) for n in strings for t in (key, size, word)])


# a blank value (empty token, NaN number) is known by the empty token's key: its length 0, no words
# (written out, not ``token_keys(pa.array([""]))``: ``pa.array`` imports pandas, half a second of start-up)
BLANK_KEY = int(hash_numpy(np.zeros(1, np.uint64), TOKEN_SEED).view(np.int64)[0])


def bucket_torch(hashed: torch.Tensor, num_buckets: torch.Tensor | int) -> torch.Tensor:
    """(h >> 1) mod M on int64 hashes: the top 63 bits, identical for signed and unsigned views."""
    return ((hashed >> 1) & ((1 << 63) - 1)) % num_buckets


def key_torch(key: int) -> int:
    """A 64-bit hash key as the int64 that ``hash_torch`` expects."""
    return _as_int64(key)
