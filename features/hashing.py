"""A seeded 64-bit hash (splitmix64 finaliser) that gives identical bits in NumPy and Polars.

Why our own: Python's ``hash()`` is salted per process and Polars' ``Expr.hash`` may change between
releases, so neither can decide which split a row lands in across machines and versions. The one
definition below is written against operators that NumPy arrays and Polars expressions share
(wrapping uint64 ``+``, ``*``, ``^`` and floor division as a logical right shift), so the generator
and the prepare job cannot drift apart.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np
import polars as pl

HASH_VERSION = "splitmix64-v1"

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

T = TypeVar("T", np.ndarray, pl.Expr)


def _splitmix64(x: T, const: Callable[[int], object]) -> T:
    z = x + const(_GOLDEN)
    z = (z ^ (z // const(1 << 30))) * const(_MUL1)
    z = (z ^ (z // const(1 << 27))) * const(_MUL2)
    return z ^ (z // const(1 << 31))


def mix_seed(seed: int, stream: int) -> int:
    """Derive an independent 64-bit key for one use (one field, one split rule) of a user seed."""
    key = np.array([(seed * 0x100000001B3 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return int(hash_numpy(key, 0)[0])


def hash_numpy(values: np.ndarray, key: int) -> np.ndarray:
    """Hash uint64-castable values with a 64-bit key; returns uint64."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64, copy=False) ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        return _splitmix64(x, np.uint64)


def hash_expr(expr: pl.Expr, key: int) -> pl.Expr:
    """The same hash as :func:`hash_numpy`, as a lazy Polars expression (UInt64 result)."""

    def const(v: int) -> pl.Expr:
        return pl.lit(v, dtype=pl.UInt64)

    return _splitmix64(expr.cast(pl.UInt64) ^ const(key & 0xFFFFFFFFFFFFFFFF), const)
