"""The generator's scenarios: which columns a synthetic log has, how each is drawn, how much each
matters to the teacher, and the full-size profiles whose fields follow the real datasets' distinct
counts (a power law over a solved support; see ``pipelines.synthetic``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from common.errors import ConfigError
from common.yaml_config import COMMAND_LINE
from features.schema import AVAZU_CATEGORIES, CRITEO_CATEGORIES, CRITEO_INTEGERS, unknown_categories

Kind = Literal["criteo", "avazu"]
# scales the Criteo teacher's weights: 0.65 puts its AUC near 0.80, like the best models on real Criteo
CRITEO_SIGNAL = 0.65


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
    support: int = 0  # > 0 (profiles): a power law over this many values, exponent ``zipf``, weights hashed


@dataclass(frozen=True)
class Scenario:
    kind: Kind
    fields: list[FieldSim]
    pairs: list[tuple[str, str]]
    pair_scale: float
    hour_weight: float = 0.0



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


def scenario(kind: Kind, profile: bool = False, noise: list[str] | None = None) -> Scenario:
    base = criteo_scenario() if kind == "criteo" else avazu_scenario()
    base = base if noise is None else with_noise(base, noise)
    return profile_scenario(base) if profile else base


def with_noise(base: Scenario, noise: list[str]) -> Scenario:
    """``base`` with exactly the categorical fields ``noise`` pure noise: they get weight 0 and leave
    every interaction pair, and a default noise field not named becomes informative at the median
    weight of the informative categorical fields. Why: selection methods are checked on noise they
    were not tuned on (other fields, other cardinalities)."""
    cats = [f for f in base.fields if f.render != "count"]
    unknown = unknown_categories(base.kind, noise)
    if unknown:
        raise ConfigError(f"{COMMAND_LINE}: noise fields {unknown} are not categorical fields of the {base.kind} "
                          f"layout (choose from {', '.join(f.name for f in cats)})")
    usual = float(np.median([f.weight for f in cats if f.weight > 0]))
    fields = [f if f.render == "count" else replace(f, weight=0.0 if f.name in noise else (f.weight or usual))
              for f in base.fields]
    pairs = [pair for pair in base.pairs if not set(pair) & set(noise)]
    return replace(base, fields=fields, pairs=pairs)


# The real datasets' row counts and published distinct values per categorical field: Criteo's Kaggle
# display-advertising log (the table sizes DLRM uses for it) and Avazu's 10-day log.
PROFILE_ROWS: dict[str, int] = {"criteo": 45_840_617, "avazu": 40_428_967}
PROFILE_DISTINCT: dict[str, dict[str, int]] = {
    "criteo": dict(zip(CRITEO_CATEGORIES, [
        1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3, 93_145, 5683, 8_351_593, 3194, 27, 14_992,
        5_461_306, 10, 5652, 2173, 4, 7_046_547, 18, 15, 286_181, 105, 142_572])),
    "avazu": dict(zip(AVAZU_CATEGORIES, [
        7, 7, 4737, 7745, 26, 8552, 559, 36, 2_686_408, 6_729_486, 8251, 5, 4, 2626, 8, 9, 435, 4, 68, 172, 60])),
}
# One exponent for every field: at 1.05 the largest Criteo field (C3) still reaches its published
# count with a finite support, and the expected vocabulary at full size is about 1.4M values after min
# count 10 and 7.6M after min count 2 (the real log keeps about 1.1M after min count 10).
TAIL_EXPONENT = 1.05


def value_masses(support: int, exponent: float, index: np.ndarray) -> np.ndarray:
    """P(value k) for k in ``index`` under the profile sampler: ``floor(x) - 1`` with x drawn from the
    density proportional to x**-exponent on [1, support + 1)."""
    a = 1.0 - exponent
    k = index.astype(np.float64)
    return ((k + 2.0) ** a - (k + 1.0) ** a) / ((support + 1.0) ** a - 1.0)


def expected_distinct(rows: int, support: int, exponent: float) -> float:
    """Expected number of distinct values in ``rows`` draws: sum over k of 1 - (1 - p_k)^rows, exact for
    the first 10,000 values and by the trapezoid rule on a geometric grid beyond (within 0.1%)."""
    head = np.arange(min(support, 10_000))
    total = float(-np.expm1(rows * np.log1p(-value_masses(support, exponent, head))).sum())
    if support > head.size:
        grid = np.unique(np.geomspace(head.size, support - 1, 20_000).astype(np.int64))
        seen = -np.expm1(rows * np.log1p(-value_masses(support, exponent, grid)))
        total += float(np.trapezoid(seen, grid)) + 0.5 * (seen[0] + seen[-1])
    return total


@functools.lru_cache(maxsize=None)
def profile_support(distinct: int, rows: int, exponent: float = TAIL_EXPONENT) -> int:
    """The support whose expected distinct values in ``rows`` draws is ``distinct`` (bisection: 0.6 s
    for Criteo's 26 fields, so each answer is kept for the process)."""
    if distinct <= 64:  # so few values all show up in millions of rows
        return distinct
    low, high = distinct, distinct * 4096
    while high - low > max(1, low // 10_000):
        mid = (low + high) // 2
        if expected_distinct(rows, mid, exponent) < distinct:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda k: abs(expected_distinct(rows, k, exponent) - distinct))


def profile_scenario(base: Scenario) -> Scenario:
    """``base`` with every categorical field following the real dataset (see the module docstring);
    the teacher's weights, noise fields, pairs and the integer fields stay as in ``base``."""
    rows, distinct = PROFILE_ROWS[base.kind], PROFILE_DISTINCT[base.kind]
    fields = [f if f.name not in distinct else
              replace(f, cardinality=distinct[f.name], zipf=TAIL_EXPONENT, support=profile_support(distinct[f.name], rows))
              for f in base.fields]
    return replace(base, fields=fields)


def power_law_index(u: np.ndarray, support: int, exponent: float) -> np.ndarray:
    """Uniforms -> values 0..support-1 with P(k) = ``value_masses`` (inverse CDF, no table)."""
    a = 1.0 - exponent
    x = (u * ((support + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, support - 1)
