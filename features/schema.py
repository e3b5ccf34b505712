"""Dataset configs: which raw layout to read, how each column becomes a feature, how rows are split.

Criteo and Avazu layouts are built in (their column lists are fixed by the public releases); any
other table is declared with ``layout: generic`` and an explicit column list. Every model forbids
unknown keys so that a misspelt option fails before a multi-hour prepare starts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from common.strict import Strict

ColumnKind = Literal["label", "categorical", "integer", "numeric", "yymmddhh", "drop"]


class ColumnSpec(Strict):
    """One raw column, in file order.

    kinds: ``label`` (0/1), ``categorical`` (any token; blank is its own value), ``integer``
    (Criteo-style counts: bucketised or log1p, see ``integer_mode``), ``numeric`` (float, log1p),
    ``yymmddhh`` (Avazu hour, expanded to hour-of-day, weekday, weekend), ``drop`` (read, then ignored).
    """

    name: str
    kind: ColumnKind


class SplitConfig(Strict):
    """``random``: seeded hash of the row position; ``order``: first/middle/last rows;
    ``time``: by quantiles of ``time_column`` (ties stay in one split)."""

    method: Literal["random", "order", "time"] = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2024
    time_column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"ratios must be >= 0 and sum to 1, got {list(self.ratios)}")
        if self.method == "time" and not self.time_column:
            raise ValueError("method 'time' needs time_column")
        return self


class SyntheticConfig(Strict):
    """Generate the raw file with the built-in teacher when it does not exist yet."""

    kind: Literal["criteo", "avazu"] = "criteo"
    rows: int = Field(default=1_000_000, ge=1)
    seed: int = 2024
    profile: bool = False  # the real dataset's per-field distinct values and long tails (ctr generate --profile)
    noise: list[str] | None = None  # the pure-noise categorical fields; None: the scenario's own (ctr generate --noise)

    @model_validator(mode="after")
    def _noise_fields_exist(self) -> "SyntheticConfig":
        unknown = unknown_categories(self.kind, self.noise or [])
        if unknown:
            raise ValueError(f"noise fields {unknown} are not categorical fields of the {self.kind} layout")
        return self


def unknown_categories(kind: str, names: list[str]) -> list[str]:
    """The ``names`` that are not categorical fields of the ``kind`` layout, sorted (e.g. a noise choice)."""
    return sorted(set(names) - set(CRITEO_CATEGORIES if kind == "criteo" else AVAZU_CATEGORIES))


class DatasetConfig(Strict):
    name: str
    layout: Literal["criteo_tsv", "criteo_kaggle_csv", "criteo_x4_csv", "avazu_csv", "generic"]
    format: Literal["delimited", "parquet"] = "delimited"
    raw: list[str] = Field(default_factory=list)
    output: str
    # generic layout only (the built-in layouts fix these)
    columns: list[ColumnSpec] | None = None
    separator: str | None = None
    header: bool | None = None
    # transforms
    integer_mode: Literal["bucket", "numeric"] = "bucket"
    min_count: int = Field(default=10, ge=1)
    min_count_per_field: dict[str, PositiveInt] = Field(default_factory=dict)
    split: SplitConfig = SplitConfig()
    # bad input policy
    max_reject_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    synthetic: SyntheticConfig | None = None
    row_group_size: int = Field(default=65536, ge=1024)

    @model_validator(mode="after")
    def _check(self) -> "DatasetConfig":
        generic_keys = {"columns": self.columns, "separator": self.separator, "header": self.header}
        if self.layout == "generic":
            missing = [k for k in ("columns", "header") if generic_keys[k] is None]
            if self.format == "delimited" and self.separator is None:
                missing.append("separator")
            if missing:
                raise ValueError(f"layout 'generic' needs {', '.join(missing)}")
            labels = [c.name for c in self.columns or [] if c.kind == "label"]
            if len(labels) != 1:
                raise ValueError(f"a generic layout needs exactly one column of kind 'label', found {labels or 'none'}")
        else:
            given = [k for k, v in generic_keys.items() if v is not None]
            if given:
                raise ValueError(f"layout '{self.layout}' fixes {', '.join(given)}; use layout 'generic' to set them")
        if self.synthetic is not None and len(self.raw) != 1:
            raise ValueError(f"a synthetic dataset is generated into exactly one raw file; raw lists {len(self.raw)}")
        return self


def config_fingerprint(cfg: DatasetConfig, raw: list[str]) -> str:
    """sha256 of everything that shapes the prepared data (the config with the raw files actually read)."""
    data = cfg.model_dump(mode="json", exclude={"output"}) | {"raw": raw}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class DatasetFile(Strict):
    """A dataset YAML file: its ``dataset:`` section is shared with full experiment files."""

    dataset: DatasetConfig


CRITEO_INTEGERS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORIES = [f"C{i}" for i in range(1, 27)]
AVAZU_CATEGORIES = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]


def _criteo_columns(label: str, leading: list[ColumnSpec]) -> list[ColumnSpec]:
    return [
        *leading,
        ColumnSpec(name=label, kind="label"),
        *(ColumnSpec(name=c, kind="integer") for c in CRITEO_INTEGERS),
        *(ColumnSpec(name=c, kind="categorical") for c in CRITEO_CATEGORIES),
    ]


class Layout(Strict):
    """The resolved physical layout of the raw files."""

    separator: str
    header: bool
    columns: list[ColumnSpec]

    @property
    def label(self) -> str:
        return next(c.name for c in self.columns if c.kind == "label")


def resolve_layout(cfg: DatasetConfig) -> Layout:
    """Column list, separator and header flag for a dataset config (built-in or generic)."""
    if cfg.layout == "criteo_tsv":  # raw Kaggle train.txt: label, I1..I13, C1..C26, no header
        return Layout(separator="\t", header=False, columns=_criteo_columns("label", []))
    if cfg.layout == "criteo_kaggle_csv":  # Kaggle CSV: Id,Label,I1..C26 with header
        return Layout(separator=",", header=True, columns=_criteo_columns("Label", [ColumnSpec(name="Id", kind="drop")]))
    if cfg.layout == "criteo_x4_csv":  # BARS/FuxiCTR criteo_x4: Label,I1..C26 with header
        return Layout(separator=",", header=True, columns=_criteo_columns("Label", []))
    if cfg.layout == "avazu_csv":  # raw Kaggle train.csv; id exceeds int64, so it is dropped unparsed
        return Layout(
            separator=",",
            header=True,
            columns=[
                ColumnSpec(name="id", kind="drop"),
                ColumnSpec(name="click", kind="label"),
                ColumnSpec(name="hour", kind="yymmddhh"),
                *(ColumnSpec(name=c, kind="categorical") for c in AVAZU_CATEGORIES),
            ],
        )
    assert cfg.columns is not None and cfg.header is not None  # the config's validator checked them
    return Layout(separator=cfg.separator or ",", header=cfg.header, columns=list(cfg.columns))
