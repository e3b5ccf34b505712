"""Does a field earn its place? A held-out test of each field's whole contribution.

A value gate sees one value's evidence, which its count bounds: the head values of a pure-noise
field have hundreds of rows each, and their noisy gradients keep them as surely as a weakly useful
value of the same count. Noise is a property of the whole field, so the evidence is pooled here: on
held-out rows, replace the field's looked-up rows by their mean (the field then says nothing about
the row, yet the layers above still see an input of the usual size) and measure how much the log
loss rises. The mean of that rise over n rows, divided by its standard error, is a z statistic.

The rule, at one-sided level ``p``: a field is removed when its own rise is not significant, and
the removed fields together must not raise the loss significantly either; while they do, the
removed field with the largest z comes back. One field at a time, a weak model would lose every
field it has not yet learned well (on 2k held-out rows nearly all of them); the joint check bounds
what the removed set costs as a whole. A noise field kept by chance costs bytes, not AUC.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist

import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from ctr.loader import Batch
from ctr.models.base import CTRModel

TEST_ROWS = 500_000  # held-out rows read (all of them when fewer): a rise of 1e-5 nats/row has z ~ 3 here


@dataclass(frozen=True)
class FieldGain:
    gain: float  # mean rise of the log loss per row when the field (or fields) say nothing (nats)
    stderr: float

    @property
    def z(self) -> float:
        return self.gain / self.stderr if self.stderr > 0 else 0.0


@dataclass(frozen=True)
class FieldTest:
    gains: list[FieldGain]  # each field's own, in the looked-up order
    kept: list[bool]
    removed_gain: FieldGain | None  # the removed fields' together (None: none removed)


def _first_rows(batches: Iterable[Batch], rows: int) -> Iterator[Batch]:
    seen = 0
    for b in batches:
        if seen >= rows:
            return
        take = min(b.size, rows - seen)
        yield b if take == b.size else b.rows(torch.arange(take))
        seen += take


class HeldOut:
    """The first ``rows`` of ``batches`` (re-iterable) and each field's mean looked-up row over them
    (read on first use, so a test that is off costs no pass)."""

    def __init__(self, model: CTRModel, batches: Iterable[Batch], rows: int = TEST_ROWS) -> None:
        self.model, self.batches, self.rows = model, batches, rows
        self.n = 0

    @cached_property
    def mean(self) -> torch.Tensor | None:
        """[fields, dim]; None when there are no rows."""
        self.model.eval()
        total = None
        with torch.no_grad():
            for b in _first_rows(self.batches, self.rows):
                emb = self.model.lookup(b.sparse).double().sum(0)
                total, self.n = (emb if total is None else total + emb), self.n + b.size
        return None if total is None else (total / self.n).float()

    def gains(self, groups: list[list[int]]) -> list[FieldGain]:
        """Per group of fields, the mean and standard error of the per-row log loss rise when the
        group's rows all read their means (one pass; a group per field is the single-field test)."""
        mean = self.mean
        assert mean is not None
        sums = torch.zeros(len(groups), dtype=torch.float64)
        squares = torch.zeros_like(sums)
        model = self.model
        with torch.no_grad():
            for b in _first_rows(self.batches, self.rows):
                emb = model.lookup(b.sparse)
                base = binary_cross_entropy_with_logits(model.interact(emb, b.dense, b.sparse)[0], b.labels,
                                                        reduction="none")
                for g, fields in enumerate(groups):
                    plain = emb.clone()
                    plain[:, fields] = mean[fields]
                    rise = (binary_cross_entropy_with_logits(model.interact(plain, b.dense, b.sparse)[0], b.labels,
                                                             reduction="none") - base).double()
                    sums[g] += rise.sum()
                    squares[g] += rise.square().sum()
        means = sums / self.n
        spread = (squares / self.n - means.square()).clamp(min=0).sqrt()
        return [FieldGain(float(m), float(s) / self.n ** 0.5) for m, s in zip(means, spread)]


def field_test(held_out: HeldOut, num_fields: int, p: float) -> FieldTest:
    """The rule of this module's docstring at one-sided level ``p``; no held-out rows, or p = 1, keep
    every field."""
    if p >= 1.0 or held_out.mean is None:
        return FieldTest([], [True] * num_fields, None)
    z = NormalDist().inv_cdf(1.0 - p)
    gains = held_out.gains([[f] for f in range(num_fields)])
    removed = sorted((f for f in range(num_fields) if gains[f].z <= z), key=lambda f: gains[f].z)
    together = None
    while removed:
        together, = held_out.gains([removed])
        if together.z <= z:
            break
        removed.pop()  # the strongest of the removed comes back
        together = None
    return FieldTest(gains, [f not in removed for f in range(num_fields)], together)
