"""Synthetic Criteo TSV / Avazu CSV with a planted, known signal: the built-in default dataset.

Why: tests, the demo and the benchmarks need data of the real byte layout at any size, with an
answer key. Labels are drawn from a known teacher (first-order weights per value, low-rank pairwise
interactions between chosen fields, pure-noise fields, Zipf-like value frequencies), and the
teacher's own AUC on the drawn labels is the best AUC any model can reach on that data.
Everything is vectorised NumPy, written in chunks, and seeded: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from common.atomic import atomic_write_text
from common.errors import ConfigError
from common.yaml_config import COMMAND_LINE
from ctr.metrics import auc
from features.schema import AVAZU_CATEGORIES, CRITEO_CATEGORIES, CRITEO_INTEGERS

log = logging.getLogger("ctr.generate")

Kind = Literal["criteo", "avazu"]
CHUNK_ROWS = 200_000
# scales the Criteo teacher's weights: 0.65 puts its AUC near 0.80, like the best models on real Criteo
CRITEO_SIGNAL = 0.65
INTERACTION_RANK = 4
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass(frozen=True)
class FieldSim:
    """How one synthetic column is drawn and how much it matters to the teacher."""

    name: str
    cardinality: int
    weight: float  # std of the first-order weights; 0 = pure noise
    render: Literal["hex", "int", "count"] = "hex"
    blank: float = 0.0  # share of blank cells
    zipf: float = 1.1
    int_offset: int = 0  # "int" render: value index + offset


@dataclass(frozen=True)
class Scenario:
    kind: Kind
    fields: list[FieldSim]
    pairs: list[tuple[str, str]]
    pair_scale: float
    hour_weight: float = 0.0


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
    format: str = TEACHER_FORMAT


def criteo_scenario() -> Scenario:
    cards = [1_000, 50_000, 80_000, 20_000, 300, 24, 12_000, 600, 3, 30_000, 5_000, 70_000, 3_000,
             27, 10_000, 60_000, 10, 4_000, 2_000, 4, 70_000, 17, 15, 40_000, 100, 30_000]
    noise = {"C5", "C10", "C15", "C20", "C25", "C26"}
    cats = [
        FieldSim(name, card, 0.0 if name in noise else CRITEO_SIGNAL * (0.5 if i % 3 == 0 else 0.3),
                 blank=0.4 if name in ("C19", "C20", "C25", "C26") else (0.03 if i % 4 == 2 else 0.0))
        for i, (name, card) in enumerate(zip(CRITEO_CATEGORIES, cards))
    ]
    ints = [
        FieldSim(name, 0, 0.0 if name in ("I12", "I13") else CRITEO_SIGNAL * 0.25, render="count", blank=0.2 if i % 3 == 0 else 0.05)
        for i, name in enumerate(CRITEO_INTEGERS)
    ]
    pairs = [("C1", "C2"), ("C3", "C4"), ("C2", "C7"), ("C11", "C14"), ("C6", "C13"), ("C17", "C23")]
    return Scenario("criteo", ints + cats, pairs, pair_scale=CRITEO_SIGNAL * 0.35)


def avazu_scenario() -> Scenario:
    spec = {
        "C1": (7, 0.3, "int", 1001), "banner_pos": (7, 0.3, "int", 0), "site_id": (4_000, 0.4, "hex", 0),
        "site_domain": (5_000, 0.3, "hex", 0), "site_category": (26, 0.3, "hex", 0), "app_id": (8_000, 0.4, "hex", 0),
        "app_domain": (500, 0.2, "hex", 0), "app_category": (36, 0.3, "hex", 0), "device_id": (200_000, 0.0, "hex", 0),
        "device_ip": (300_000, 0.0, "hex", 0), "device_model": (8_000, 0.2, "hex", 0), "device_type": (5, 0.2, "int", 0),
        "device_conn_type": (4, 0.2, "int", 0), "C14": (2_500, 0.4, "int", 15_000), "C15": (8, 0.2, "int", 120),
        "C16": (9, 0.2, "int", 20), "C17": (430, 0.3, "int", 1_000), "C18": (4, 0.2, "int", 0),
        "C19": (66, 0.0, "int", 30), "C20": (170, 0.2, "int", 99_999), "C21": (60, 0.3, "int", 1),
    }
    fields = [FieldSim(n, c, w, render=r, int_offset=o) for n, (c, w, r, o) in spec.items()]
    pairs = [("site_id", "app_id"), ("C14", "device_model"), ("banner_pos", "site_category"), ("C17", "C21")]
    return Scenario("avazu", fields, pairs, pair_scale=0.35, hour_weight=0.3)


def scenario(kind: Kind) -> Scenario:
    return criteo_scenario() if kind == "criteo" else avazu_scenario()


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
        if f.render == "count":
            first[f.name] = rng.normal(0.0, f.weight, size=2)  # weight on log1p(v), and on blank
            continue
        p = 1.0 / np.arange(1, f.cardinality + 1) ** f.zipf
        cdf[f.name] = np.cumsum(p / p.sum())
        first[f.name] = rng.normal(0.0, f.weight, size=f.cardinality)
        if f.name in in_pairs:
            factors[f.name] = rng.normal(0.0, np.sqrt(sc.pair_scale / INTERACTION_RANK), size=(f.cardinality, INTERACTION_RANK))
    hour = rng.normal(0.0, sc.hour_weight, size=24)
    return Teacher(cdf, first, factors, salt, hour, bias=-1.6)


def _hex8(x: np.ndarray) -> np.ndarray:
    """uint32 -> 8 lowercase hex characters each, as a NumPy bytes array (no per-row Python)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nibbles = (x.astype(np.uint32)[:, None] >> shifts) & np.uint32(0xF)
    return np.ascontiguousarray(_HEX[nibbles]).view("S8").ravel()


def _draw_chunk(sc: Scenario, t: Teacher, rng: np.random.Generator, n: int) -> tuple[dict[str, pl.Series], np.ndarray]:
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
        idx = np.minimum(np.searchsorted(t.cdf[f.name], rng.random(n)), f.cardinality - 1)
        picked[f.name] = np.where(blank, -1, idx)
        logit += np.where(blank, 0.0, t.first[f.name][idx])
        if f.render == "hex":
            token = ((idx.astype(np.uint64) + np.uint64(0x9E37)) * np.uint64(t.salt[f.name])) & np.uint64(0xFFFFFFFF)
            series = pl.Series(f.name, _hex8(token)).cast(pl.String)
        else:
            series = pl.Series(f.name, idx + f.int_offset)
        cols[f.name] = series.set(pl.Series(blank), None)
    for a, b in sc.pairs:
        ia, ib = picked[a], picked[b]
        dot = np.einsum("ij,ij->i", t.factors[a][np.maximum(ia, 0)], t.factors[b][np.maximum(ib, 0)])
        logit += np.where((ia >= 0) & (ib >= 0), dot, 0.0)
    return cols, logit


def _avazu_frame(cols: dict[str, pl.Series], labels: np.ndarray, rng: np.random.Generator, t: Teacher,
                 logit: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
    n = labels.size
    day = rng.integers(21, 31, size=n)
    hour = rng.integers(0, 24, size=n)
    logit = logit + t.hour[hour]
    ids = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    frame = pl.DataFrame([
        pl.Series("id", ids).cast(pl.String),
        pl.Series("click", labels),
        pl.Series("hour", 14_10_00_00 + day * 100 + hour),
        *cols.values(),
    ])
    return frame, logit


def generate(kind: Kind, rows: int, out: Path, seed: int = 2024) -> GenerateReport:
    """Write ``rows`` synthetic rows to ``out`` (atomically) and a ``<out>.teacher.json`` report."""
    if rows <= 0:
        raise ConfigError(f"{COMMAND_LINE}: --rows {rows}: a generated log needs at least one row (give --rows 1 or more)")
    started = time.perf_counter()
    sc = scenario(kind)
    teacher = draw_teacher(sc, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    probs = np.empty(rows, dtype=np.float32)
    labels = np.empty(rows, dtype=np.int8)
    try:
        with tmp.open("wb") as fh:
            if kind == "avazu":
                fh.write((",".join(["id", "click", "hour", *AVAZU_CATEGORIES]) + "\n").encode())
            for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
                n = min(CHUNK_ROWS, rows - start)
                rng = np.random.default_rng([seed, 1, chunk])
                cols, logit = _draw_chunk(sc, teacher, rng, n)
                u = rng.random(n)
                if kind == "avazu":
                    frame, logit = _avazu_frame(cols, np.zeros(n, dtype=np.int8), rng, teacher, logit)
                p = 1.0 / (1.0 + np.exp(-logit))
                y = (u < p).astype(np.int8)
                if kind == "avazu":
                    frame = frame.with_columns(pl.Series("click", y))
                else:
                    frame = pl.DataFrame([pl.Series("label", y), *cols.values()])
                frame.write_csv(fh, separator="\t" if kind == "criteo" else ",", include_header=False,
                                null_value="", quote_style="never")
                probs[start:start + n], labels[start:start + n] = p, y
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report = GenerateReport(
        kind=kind, rows=rows, seed=seed, path=str(out), teacher_auc=auc(labels, probs),
        positive_rate=float(labels.mean()), seconds=time.perf_counter() - started,
        informative=[f.name for f in sc.fields if f.weight > 0], noise=[f.name for f in sc.fields if f.weight == 0],
    )
    atomic_write_text(out.with_name(out.name + ".teacher.json"), json.dumps(asdict(report), indent=2) + "\n")
    return report


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
