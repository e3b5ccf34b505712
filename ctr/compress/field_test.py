"""Does a field earn its place? A held-out test of each field's whole contribution.

A value gate sees one value's evidence, which its count bounds: the head values of a pure-noise
field have hundreds of rows each, and their noisy gradients keep them as surely as a weakly useful
value of the same count. Noise is a property of the whole field, so the evidence is pooled here: on
held-out rows, replace the field's looked-up rows by their mean (the field then says nothing about
the row, yet the layers above still see an input of the usual size) and measure how much the log
loss rises. The mean of that rise over n rows, divided by its standard error, is a z statistic; a
field is kept only when its rise is significant at the one-sided level ``p``. A field left out by
chance was worth at most a small, insignificant loss; a noise field kept by chance costs bytes, not AUC.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from ctr.loader import Batch
from ctr.models.base import CTRModel

TEST_ROWS = 500_000  # held-out rows read (all of them when fewer): a gain of 1e-5 nats/row has z ~ 3 here


@dataclass(frozen=True)
class FieldGain:
    gain: float  # mean rise of the log loss per row when the field says nothing (nats)
    stderr: float

    @property
    def z(self) -> float:
        return self.gain / self.stderr if self.stderr > 0 else 0.0


def _first_rows(batches: Iterable[Batch], rows: int) -> Iterator[Batch]:
    seen = 0
    for b in batches:
        if seen >= rows:
            return
        take = min(b.size, rows - seen)
        yield b if take == b.size else b.rows(torch.arange(take))
        seen += take


def field_gains(model: CTRModel, batches: Iterable[Batch], rows: int = TEST_ROWS) -> list[FieldGain]:
    """Per field (the looked-up order), the mean and standard error of the per-row log loss rise when
    the field's rows are replaced by their mean over the same held-out rows. Two passes over
    ``batches`` (re-iterable): the means, then the paired loss differences. No rows: an empty list."""
    model.eval()
    with torch.no_grad():
        total, n = None, 0
        for b in _first_rows(batches, rows):
            emb = model.lookup(b.sparse).double().sum(0)
            total, n = (emb if total is None else total + emb), n + b.size
        if total is None:
            return []
        mean = (total / n).float()
        sums = torch.zeros(mean.shape[0], dtype=torch.float64)
        squares = torch.zeros_like(sums)
        for b in _first_rows(batches, rows):
            emb = model.lookup(b.sparse)
            base = binary_cross_entropy_with_logits(model.interact(emb, b.dense, b.sparse)[0], b.labels, reduction="none")
            for f in range(mean.shape[0]):
                plain = emb.clone()
                plain[:, f] = mean[f]
                rise = (binary_cross_entropy_with_logits(model.interact(plain, b.dense, b.sparse)[0], b.labels,
                                                         reduction="none") - base).double()
                sums[f] += rise.sum()
                squares[f] += rise.square().sum()
    gains = sums / n
    spread = (squares / n - gains.square()).clamp(min=0).sqrt()
    return [FieldGain(float(g), float(s) / n ** 0.5) for g, s in zip(gains, spread)]


def kept_fields(gains: list[FieldGain], p: float) -> list[bool]:
    """A field stays when its gain is significant at one-sided level ``p`` (p = 1 keeps every field)."""
    if p >= 1.0:
        return [True] * len(gains)
    z = NormalDist().inv_cdf(1.0 - p)
    return [g.z > z for g in gains]
