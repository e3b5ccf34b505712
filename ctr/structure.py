"""What compression did to a model's structure: an ordered list of typed steps, replayed on the base
architecture that the model config describes.

Each stage reads its source's steps and appends its own, so stages compose in any order; a
checkpoint, a stage folder and an edge manifest all carry the list. ``Layout.replay`` folds the
list into the few facts that constructors need (table rows, remap, stored widths, projection,
replaced Linears) and refuses, before any work, a step that cannot follow an earlier one, naming
both. The kept ids themselves are not in a step: they are the ``remap`` tensor of the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Union

from common.errors import ConfigError
from ctr.capabilities import (
    FACTORIZE_EMBEDDINGS,
    FACTORIZE_LAYERS,
    NARROW_WIDTHS,
    QUANTIZE_ROWS,
    SELECT_ROWS,
)


@dataclass(frozen=True)
class SelectRows:
    """Per field, the table keeps ``rows[f]`` rows; ids are looked up through a remap (a removed
    id reads a zero vector, or its field's OOV row when ``removed_to`` is 'oov')."""

    rows: list[int]
    removed_to: str = "zero"
    by: str = ""
    kind: ClassVar[str] = "select_rows"
    needs: ClassVar[str] = SELECT_ROWS


@dataclass(frozen=True)
class NarrowWidths:
    """Field f's table keeps the first ``widths[f]`` columns (at most what it had)."""

    widths: list[int]
    by: str = ""
    kind: ClassVar[str] = "narrow_widths"
    needs: ClassVar[str] = NARROW_WIDTHS


@dataclass(frozen=True)
class FactorizeEmbedding:
    """Field f's table becomes ``ranks[f]`` wide (PCA coordinates). ``folded``: the projection back
    was folded into the first layer that reads the embeddings; otherwise a per-field projection of
    ``rank`` (the widest rank) inputs restores the ``restores[f]`` values the interactions read."""

    ranks: list[int]
    restores: list[int]
    folded: bool
    by: str = ""
    kind: ClassVar[str] = "factorize_embedding"
    needs: ClassVar[str] = FACTORIZE_EMBEDDINGS


@dataclass(frozen=True)
class FactorizeLinear:
    """The Linear at ``path`` becomes two (in -> rank -> out)."""

    path: str
    rank: int
    by: str = ""
    kind: ClassVar[str] = "factorize_linear"
    needs: ClassVar[str] = FACTORIZE_LAYERS


@dataclass(frozen=True)
class FoldNorm:
    """The BatchNorm at ``path`` was folded into the Linear before it and became an identity."""

    path: str
    by: str = ""
    kind: ClassVar[str] = "fold_norm"
    needs: ClassVar[str] = FACTORIZE_LAYERS


@dataclass(frozen=True)
class QuantizeRows:
    """Field f's stored rows are read as ``bits[f]``-bit row-wise codes (0: left in float)."""

    bits: list[int]
    by: str = ""
    kind: ClassVar[str] = "quantize_rows"
    needs: ClassVar[str] = QUANTIZE_ROWS


Step = Union[SelectRows, NarrowWidths, FactorizeEmbedding, FactorizeLinear, FoldNorm, QuantizeRows]
STEP_KINDS: dict[str, type] = {s.kind: s for s in (SelectRows, NarrowWidths, FactorizeEmbedding, FactorizeLinear, FoldNorm,
                                                   QuantizeRows)}


def step_to_dict(step: Step) -> dict[str, Any]:
    return {"kind": step.kind, **asdict(step)}


def step_from_dict(data: dict[str, Any]) -> Step:
    values = dict(data)
    kind = values.pop("kind", None)
    if kind not in STEP_KINDS:
        raise ConfigError(f"unknown structure step kind {kind!r}; known: {sorted(STEP_KINDS)} (use a checkpoint "
                          "written by this version of ctr)")
    return STEP_KINDS[kind](**values)


def steps_from_payload(payload: dict[str, Any]) -> tuple[Step, ...]:
    return tuple(step_from_dict(s) for s in payload.get("steps", []))


@dataclass(frozen=True)
class Layout:
    """The facts the constructors need, after replaying the steps on the base architecture."""

    num_fields: int
    dim: int
    rows: list[int] | None = None  # per-field table rows (None: the feature map's vocabularies)
    remapped: bool = False
    widths: list[int] | None = None  # stored table widths (None: every field ``dim`` wide)
    projection_rank: int | None = None  # AFM's per-field projection: inputs per field
    restores: list[int] | None = None  # ... and the values it restores per field
    factorized: dict[str, int] = field(default_factory=dict)
    folded_norms: tuple[str, ...] = ()
    bits: list[int] | None = None  # per-field code bits of the stored rows (None: float rows)
    by: dict[str, str] = field(default_factory=dict)  # which stage set what (for refusals)

    @property
    def stored_widths(self) -> list[int]:
        return self.widths or [self.dim] * self.num_fields

    @property
    def flat_widths(self) -> list[int] | None:
        """Per field, the values the flat input holds (None: all of them)."""
        return self.restores or self.widths

    def reshapes_tables(self) -> bool:
        return self.rows is not None or self.remapped or self.widths is not None or self.bits is not None

    def apply(self, step: Step) -> "Layout":
        by = {**self.by, step.kind: step.by}
        if self.bits is not None and isinstance(step, (NarrowWidths, FactorizeEmbedding)):
            raise ConfigError(f"{step.by}: {step.kind} would change rows that {self.by['quantize_rows']} already "
                              "quantized (put the quantize stage after every stage that reshapes the tables)")
        if isinstance(step, SelectRows):
            if len(step.rows) != self.num_fields:
                raise ConfigError(f"{step.by}: select_rows lists {len(step.rows)} fields, the model has {self.num_fields} "
                                  "(the checkpoint belongs to other data)")
            return replace(self, rows=list(step.rows), remapped=True, by=by)
        if isinstance(step, NarrowWidths):
            wider = [f for f, (w, have) in enumerate(zip(step.widths, self.stored_widths)) if w > have]
            if wider:
                raise ConfigError(f"{step.by}: narrow_widths asks field(s) {wider} for more columns than the tables "
                                  f"kept after {self.by.get('narrow_widths') or self.by.get('factorize_embedding')} "
                                  "(keep widths within what an earlier stage left)")
            return replace(self, widths=list(step.widths), by=by)
        if isinstance(step, FactorizeEmbedding):
            if self.projection_rank is not None or "factorize_embedding" in self.by:
                raise ConfigError(f"{step.by}: the embeddings were already factorised by {self.by['factorize_embedding']}; "
                                  "a second factorisation of the same tables is not supported (drop one of the two)")
            return replace(self, widths=list(step.ranks), by=by,
                           projection_rank=None if step.folded else max(step.ranks),
                           restores=None if step.folded else list(step.restores))
        if isinstance(step, FactorizeLinear):
            if step.path in self.factorized:
                raise ConfigError(f"{step.by}: layer {step.path} was already factorised by {self.by['factorize_linear']} "
                                  "(drop one of the two)")
            return replace(self, factorized={**self.factorized, step.path: step.rank}, by=by)
        if isinstance(step, FoldNorm):
            return replace(self, folded_norms=(*self.folded_norms, step.path), by=by)
        if isinstance(step, QuantizeRows):
            if self.bits is not None:
                raise ConfigError(f"{step.by}: the rows were already quantized by {self.by['quantize_rows']} "
                                  "(drop one of the two quantize stages)")
            if len(step.bits) != self.num_fields:
                raise ConfigError(f"{step.by}: quantize_rows lists {len(step.bits)} fields, the model has "
                                  f"{self.num_fields} (the checkpoint belongs to other data)")
            return replace(self, bits=list(step.bits), by=by)
        raise TypeError(f"not a structure step: {step!r}")

    @classmethod
    def replay(cls, steps: tuple[Step, ...] | list[Step], num_fields: int, dim: int) -> "Layout":
        layout = cls(num_fields=num_fields, dim=dim)
        for step in steps:
            layout = layout.apply(step)
        return layout
