"""A seeded 64-bit hash (splitmix64 finaliser) that gives identical bits in NumPy, Polars and torch.

Why our own: Python's ``hash()`` is salted per process and Polars' ``Expr.hash`` may change between
releases, so neither can decide which split a row lands in, or which embedding row an id reads,
across machines and versions. The one definition below is written against operators the three
share (wrapping 64-bit ``+``, ``*``, ``^``); only the logical right shift differs (floor division on
unsigned NumPy/Polars values, shift-and-mask on torch's signed int64), so it is passed in.
Bucketing uses the top 63 bits, ``(h >> 1) mod M``, which is the same for signed and unsigned views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
import polars as pl

if TYPE_CHECKING:  # the data pipeline hashes without torch, whose import alone costs a second
    import torch

HASH_VERSION = "splitmix64-v1"

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

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
        return _splitmix64(x, np.uint64, lambda z, k: z // np.uint64(1 << k))


def hash_expr(expr: pl.Expr, key: int) -> pl.Expr:
    """The same hash as :func:`hash_numpy`, as a lazy Polars expression (UInt64 result)."""

    def const(v: int) -> pl.Expr:
        return pl.lit(v, dtype=pl.UInt64)

    return _splitmix64(expr.cast(pl.UInt64) ^ const(key & 0xFFFFFFFFFFFFFFFF), const,
                       lambda z, k: z // const(1 << k))


def hash_torch(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The same hash on int64 tensors (keys broadcast against values, as int64 bit patterns).

    Scriptable torch ops only, so an exported model hashes exactly like the training model.
    """
    x = values.long() ^ keys
    return _splitmix64(x, _as_int64, lambda z, k: (z >> k) & ((1 << (64 - k)) - 1))


def bucket_torch(hashed: torch.Tensor, num_buckets: torch.Tensor | int) -> torch.Tensor:
    """(h >> 1) mod M on int64 hashes: the top 63 bits, identical for signed and unsigned views."""
    return ((hashed >> 1) & ((1 << 63) - 1)) % num_buckets


def key_torch(key: int) -> int:
    """A 64-bit hash key as the int64 that ``hash_torch`` expects."""
    return _as_int64(key)
