"""Synthetic Criteo TSV / Avazu CSV with a planted, known signal: the built-in default dataset.

Why: tests, the demo and the benchmarks need data of the real byte layout at any size, with an
answer key. Labels are drawn from a known teacher (first-order weights per value, low-rank pairwise
interactions between chosen fields, pure-noise fields, Zipf-like value frequencies), and the
teacher's own AUC on the drawn labels is the best AUC any model can reach on that data.
Everything is vectorised NumPy, written in chunks, and seeded: the same seed gives the same bytes.

Two families: the default scenarios (small vocabularies, the demo's and the tests' data) and the
full-size profiles (``profile=True``; both in ``pipelines.scenarios``), where every categorical field follows the real dataset: a
power law with tail exponent ``TAIL_EXPONENT`` over a support solved so that the expected number of
distinct values in the real row count equals the published figure (``PROFILE_DISTINCT``). Most values
of the large fields are then rare, as on real logs. Profile fields keep no per-value table: values
come from the inverse CDF and their teacher weights (uniform, of the same variance as the default
scenario's normal ones) from a hash of (field, value), so memory stays flat at any vocabulary.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from common.atomic import atomic_write_text
from common.errors import ConfigError
from common.yaml_config import COMMAND_LINE
from ctr.metrics import auc
from features.hashing import hash_numpy
from features.schema import AVAZU_CATEGORIES
from pipelines.scenarios import FieldSim, Kind, Scenario, power_law_index, scenario

log = logging.getLogger("ctr.generate")

CHUNK_ROWS = 200_000
INTERACTION_RANK = 4
_HEX_PAIRS = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2").view(np.uint16)  # byte -> 2 hex chars
TEACHER_FORMAT = "ctr-teacher-v1"  # what marks a <raw>.teacher.json as written by this generator


@dataclass
class GenerateReport:
    kind: str
    rows: int
    seed: int
    path: str
    teacher_auc: float
    positive_rate: float
    seconds: float
    informative: list[str] = field(default_factory=list)
    noise: list[str] = field(default_factory=list)
    profile: bool = False
    day: int | None = None
    drift: float = 0.0
    format: str = TEACHER_FORMAT


@dataclass(frozen=True)
class Day:
    """One file of a daily log (``ctr generate --days N --drift R``): its number, from 1, and the share
    of each profile field's ranks whose value is replaced by a new one per day.

    Rank k (drawn from the field's power law as always) shows value ``k + support * g`` on day d,
    where its generation ``g = floor(d * drift + phase_k)`` and ``phase_k`` is uniform in [0, 1) from a
    hash of (field, k). So each day a share ``drift`` of the ranks, at every level of popularity,
    passes to a value never drawn before, and the value it leaves is drawn no more. A new value's
    teacher weights come from the hash of (field, value), the rule every profile value follows, so
    a model that keeps up with the new values can be as good on day d as on day 1."""

    number: int
    drift: float = 0.0

    def values(self, f: FieldSim, t: Teacher, rank: np.ndarray) -> np.ndarray:
        if not self.drift or not f.support:
            return rank
        phase = (hashed_uniforms(rank, t.salt[f.name] + 4)[:, 0] + np.sqrt(3.0)) / (2.0 * np.sqrt(3.0))
        return rank + f.support * np.floor(self.number * self.drift + phase).astype(np.int64)

    def date(self) -> int:
        """Avazu's yymmdd of this day: the real log's first day, 2014-10-21, is day 1."""
        return int((datetime.date(2014, 10, 21) + datetime.timedelta(days=self.number - 1)).strftime("%y%m%d"))


@dataclass(frozen=True)
class Teacher:
    """All the teacher's parameters, drawn once from the seed."""

    cdf: dict[str, np.ndarray]
    first: dict[str, np.ndarray]
    factors: dict[str, np.ndarray]
    salt: dict[str, int]
    hour: np.ndarray
    bias: float


def draw_teacher(sc: Scenario, seed: int) -> Teacher:
    rng = np.random.default_rng([seed, 0])
    cdf, first, factors, salt = {}, {}, {}, {}
    in_pairs = {n for pair in sc.pairs for n in pair}
    for f in sc.fields:
        salt[f.name] = int(rng.integers(1, 2**31)) * 2 + 1
        if f.render == "count" or f.support:  # a profile field's weights are hashed, not tabled
            first[f.name] = rng.normal(0.0, f.weight, size=2)  # weight on log1p(v), and on blank
            continue
        p = 1.0 / np.arange(1, f.cardinality + 1) ** f.zipf
        cdf[f.name] = np.cumsum(p / p.sum())
        first[f.name] = rng.normal(0.0, f.weight, size=f.cardinality)
        if f.name in in_pairs:
            factors[f.name] = rng.normal(0.0, np.sqrt(sc.pair_scale / INTERACTION_RANK), size=(f.cardinality, INTERACTION_RANK))
    hour = rng.normal(0.0, sc.hour_weight, size=24)
    return Teacher(cdf, first, factors, salt, hour, bias=-1.6)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hashed_uniforms(index: np.ndarray, salt: int, parts: int = 1) -> np.ndarray:
    """``parts`` (<= 4) values per (salt, index), uniform with mean 0 and variance 1, the same every time
    they are asked for: a profile field's teacher weights without a table. One 64-bit hash per index,
    16 bits per value (steps of 5e-5: finer than any weight needs). [n, parts]"""
    with np.errstate(over="ignore"):  # splitmix64's finaliser of index * golden + salt: wrapping arithmetic
        h = hash_numpy((index.astype(np.uint64) - np.uint64(1)) * _GOLDEN + np.uint64(salt), 0)
    bits = np.stack([(h >> np.uint64(16 * k)) & np.uint64(0xFFFF) for k in range(parts)], 1)
    return (bits.astype(np.float64) + 0.5) * (2.0 * np.sqrt(3.0) / 65536.0) - np.sqrt(3.0)


def _first_weight(f: FieldSim, t: Teacher, idx: np.ndarray) -> np.ndarray:
    return hashed_uniforms(idx, t.salt[f.name])[:, 0] * f.weight if f.support else t.first[f.name][idx]


def _factor_rows(f: FieldSim, t: Teacher, idx: np.ndarray, pair_scale: float) -> np.ndarray:
    if not f.support:
        return t.factors[f.name][idx]
    return hashed_uniforms(idx, t.salt[f.name] + 2, INTERACTION_RANK) * np.sqrt(pair_scale / INTERACTION_RANK)


def _hex8(x: np.ndarray) -> np.ndarray:
    """uint32 -> 8 lowercase hex characters each, as a NumPy bytes array (no per-row Python): each of
    the four big-endian bytes looks up its two characters."""
    pairs = _HEX_PAIRS[x.astype(">u4").view(np.uint8).reshape(-1, 4)]
    return np.ascontiguousarray(pairs).view("S8").ravel()


def _hex_column(name: str, token: np.ndarray, blank: np.ndarray) -> pl.Series:
    """8-character hex strings, null where ``blank``: an Arrow string array over the rendered bytes
    (fixed offsets, a validity bitmap), handed to Polars without a per-value conversion."""
    data = _hex8(token)
    offsets = np.arange(0, 8 * len(data) + 1, 8, dtype=np.int32)
    valid = np.packbits(~blank, bitorder="little")
    array = pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(data), pa.py_buffer(valid),
                                        null_count=int(blank.sum()))
    return pl.Series(name, array)


def _draw_chunk(sc: Scenario, t: Teacher, rng: np.random.Generator, n: int,
                day: Day | None) -> tuple[dict[str, pl.Series], np.ndarray]:
    """One chunk of rendered columns and the teacher's click probabilities."""
    logit = np.full(n, t.bias)
    cols: dict[str, pl.Series] = {}
    picked: dict[str, np.ndarray] = {}
    for f in sc.fields:
        blank = rng.random(n) < f.blank
        if f.render == "count":
            v = np.floor(rng.lognormal(1.5, 1.6, size=n)).astype(np.int64)
            if f.name == "I2":  # Criteo's I2 holds -1 (and rarely -2) in about a tenth of the rows
                v = np.where(rng.random(n) < 0.1, -rng.integers(1, 3, size=n), v)
            w_log, w_blank = t.first[f.name]
            logit += np.where(blank, w_blank, w_log * (np.log1p(np.maximum(v, 0)) - 1.8))
            cols[f.name] = pl.Series(f.name, v).set(pl.Series(blank), None)
            continue
        if f.support:
            idx = power_law_index(rng.random(n), f.support, f.zipf)
            idx = day.values(f, t, idx) if day is not None else idx
        else:
            idx = np.minimum(np.searchsorted(t.cdf[f.name], rng.random(n)), f.cardinality - 1)
        picked[f.name] = np.where(blank, -1, idx)
        logit += np.where(blank, 0.0, _first_weight(f, t, idx))
        if f.render == "hex":
            token = ((idx.astype(np.uint64) + np.uint64(0x9E37)) * np.uint64(t.salt[f.name])) & np.uint64(0xFFFFFFFF)
            cols[f.name] = _hex_column(f.name, token, blank)
        else:
            cols[f.name] = pl.Series(f.name, idx + f.int_offset).set(pl.Series(blank), None)
    by_name = {f.name: f for f in sc.fields}
    for a, b in sc.pairs:
        ia, ib = picked[a], picked[b]
        dot = np.einsum("ij,ij->i", _factor_rows(by_name[a], t, np.maximum(ia, 0), sc.pair_scale),
                        _factor_rows(by_name[b], t, np.maximum(ib, 0), sc.pair_scale))
        logit += np.where((ia >= 0) & (ib >= 0), dot, 0.0)
    return cols, logit


def _avazu_frame(cols: dict[str, pl.Series], labels: np.ndarray, rng: np.random.Generator, t: Teacher,
                 logit: np.ndarray, day: Day | None) -> tuple[pl.DataFrame, np.ndarray]:
    """Avazu's columns around the drawn ones: an id, the click, and the hour (any of the real log's
    ten days, or the day's own date, in hour order within a day file)."""
    n = labels.size
    date = 14_10_00 + rng.integers(21, 31, size=n) if day is None else np.full(n, day.date())
    hour = rng.integers(0, 24, size=n)
    hour = hour if day is None else np.sort(hour)
    logit = logit + t.hour[hour]
    ids = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    frame = pl.DataFrame([
        pl.Series("id", ids).cast(pl.String),
        pl.Series("click", labels),
        pl.Series("hour", date * 100 + hour),
        *cols.values(),
    ])
    return frame, logit


def _render_chunk(sc: Scenario, teacher: Teacher, seed: int, chunk: int, n: int,
                  day: Day | None) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Chunk ``chunk`` of the file: its text, the teacher's click probabilities and the labels. Each
    chunk has its own seeded generator, so chunks can be drawn in any order, on any thread; a day
    file's are its own, under the same teacher."""
    rng = np.random.default_rng([seed, 1, chunk] if day is None else [seed, 2, day.number, chunk])
    cols, logit = _draw_chunk(sc, teacher, rng, n, day)
    u = rng.random(n)
    if sc.kind == "avazu":
        frame, logit = _avazu_frame(cols, np.zeros(n, dtype=np.int8), rng, teacher, logit, day)
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (u < p).astype(np.int8)
    if sc.kind == "avazu":
        frame = frame.with_columns(pl.Series("click", y))
    else:
        frame = pl.DataFrame([pl.Series("label", y), *cols.values()])
    text = io.BytesIO()
    frame.write_csv(text, separator="\t" if sc.kind == "criteo" else ",", include_header=False, null_value="",
                    quote_style="never")
    return text.getvalue(), p.astype(np.float32), y


def generate(kind: Kind, rows: int, out: Path, seed: int = 2024, profile: bool = False,
             noise: list[str] | None = None, day: Day | None = None) -> GenerateReport:
    """Write ``rows`` synthetic rows to ``out`` (atomically) and a ``<out>.teacher.json`` report;
    ``profile``: the full-size profile of ``kind`` (see the module docstring); ``noise``: the pure-noise
    categorical fields instead of the scenario's own (``with_noise``); ``day``: one day of a daily
    log under the seed's teacher (``Day``).

    Chunks are drawn on a pool of threads, one per core, and written in order (NumPy and Polars
    release the GIL in their loops; a pool of processes was slower on 2 cores, shipping 50 MB of text
    per chunk back); at most two chunks per thread are held, so memory stays flat at any size but for
    the probabilities and labels kept for the teacher's AUC (5 bytes a row)."""
    if rows <= 0:
        raise ConfigError(f"{COMMAND_LINE}: --rows {rows}: a generated log needs at least one row (give --rows 1 or more)")
    started = time.perf_counter()
    sc = scenario(kind, profile, noise)
    teacher = draw_teacher(sc, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    probs = np.empty(rows, dtype=np.float32)
    labels = np.empty(rows, dtype=np.int8)
    workers = os.cpu_count() or 1
    try:
        with tmp.open("wb") as fh, ThreadPoolExecutor(workers, thread_name_prefix="generate") as pool:
            if kind == "avazu":
                fh.write((",".join(["id", "click", "hour", *AVAZU_CATEGORIES]) + "\n").encode())
            pending: deque[tuple[int, Future]] = deque()

            def write_oldest() -> None:
                start, future = pending.popleft()
                text, p, y = future.result()
                fh.write(text)
                probs[start:start + len(y)], labels[start:start + len(y)] = p, y

            for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
                pending.append((start, pool.submit(_render_chunk, sc, teacher, seed, chunk, min(CHUNK_ROWS, rows - start), day)))
                if len(pending) > 2 * workers:
                    write_oldest()
            while pending:
                write_oldest()
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report = GenerateReport(
        kind=kind, rows=rows, seed=seed, path=str(out), teacher_auc=auc(labels, probs),
        positive_rate=float(labels.mean()), seconds=time.perf_counter() - started,
        informative=[f.name for f in sc.fields if f.weight > 0], noise=[f.name for f in sc.fields if f.weight == 0],
        profile=profile, day=day.number if day else None, drift=day.drift if day else 0.0,
    )
    atomic_write_text(out.with_name(out.name + ".teacher.json"), json.dumps(asdict(report), indent=2) + "\n")
    return report


def generate_days(kind: Kind, rows: int, folder: Path, days: int, drift: float, seed: int = 2024,
                  profile: bool = False, noise: list[str] | None = None) -> list[GenerateReport]:
    """``days`` files of ``rows`` rows each, ``day01.txt`` (or ``.csv``) onwards, under one teacher, a
    share ``drift`` of the values replaced per day (``Day``); drift needs a profile, whose values'
    weights are hashed (the default scenarios' are a table of fixed size)."""
    if days < 1 or not 0.0 <= drift <= 1.0:
        raise ConfigError(f"{COMMAND_LINE}: --days {days} --drift {drift}: out of range (give at least one day and a "
                          "drift in [0, 1])")
    if drift and not profile:
        raise ConfigError(f"{COMMAND_LINE}: --drift needs --profile (the default scenarios' values are a fixed table)")
    wide = [f.name for f in scenario(kind, profile, noise).fields
            if f.render == "hex" and f.support * (1 + int(days * drift + 1)) > 1 << 32]
    if wide:
        raise ConfigError(f"{COMMAND_LINE}: --days {days} --drift {drift}: fields {wide} would run out of distinct 8-hex "
                          "tokens (fewer days, or a lower drift)")
    suffix = "txt" if kind == "criteo" else "csv"
    return [generate(kind, rows, folder / f"day{d:02d}.{suffix}", seed, profile, noise, Day(d, drift))
            for d in range(1, days + 1)]


def read_teacher(raw: Path) -> dict[str, Any] | None:
    """The generator's report beside a raw file, or None: a missing file, or one the generator did
    not write (no matching ``format``), is only a missing extra, never an error."""
    path = raw.with_name(raw.name + ".teacher.json")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("format") != TEACHER_FORMAT:
        log.warning("%s: not a teacher report written by 'ctr generate' (no format %r); ignored", path, TEACHER_FORMAT)
        return None
    return report
