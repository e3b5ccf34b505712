"""Prepared Parquet split -> training batches (TorchRec ``KeyedJaggedTensor`` + dense + labels).

Rows travel Parquet row groups -> Arrow -> NumPy (zero copy) -> torch in whole windows of row groups;
the per-batch work is one gather and one dtype cast per tensor, so there is no per-row Python.
Shuffling is two-level and seeded per epoch: the order of row groups, then the rows inside a window
of several row groups. Batches are read in the consumer's thread, between training steps (see
``ParquetBatches.__iter__`` for why not in a thread beside them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from common.errors import DataError
from features.feature_map import FeatureMap


@dataclass
class Batch:
    dense: torch.Tensor  # [B, n_dense] float32
    sparse: KeyedJaggedTensor  # one key per categorical field, one id per row and key
    labels: torch.Tensor  # [B] float32

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def field_ids(self) -> torch.Tensor:
        """The ids as [n_fields, B] (a view: the KJT holds them field-major)."""
        return self.sparse.values().view(len(self.sparse.keys()), -1)

    def ids(self) -> torch.Tensor:
        """The ids as [B, n_fields], the edge model's input layout."""
        return self.field_ids().T.contiguous()

    def rows(self, index: torch.Tensor) -> "Batch":
        """The batch restricted to rows ``index`` (one rank's part of a batch)."""
        return make_batch(self.sparse.keys(), self.field_ids()[:, index], self.dense[index], self.labels[index])

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device))


def make_batch(keys: list[str], ids: torch.Tensor, dense: torch.Tensor, labels: torch.Tensor) -> Batch:
    """Build a batch from field-major ids [n_fields, B] (any int dtype), dense [B, D] and labels [B]."""
    n_fields, size = ids.shape
    values = ids.to(torch.int64).reshape(-1)  # field-major: all rows of field 0, then field 1, ...
    lengths = torch.ones(n_fields * size, dtype=torch.int32)
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=size)
    return Batch(dense=dense.to(torch.float32), sparse=kjt, labels=labels.to(torch.float32))


def head(batches: Iterable[Batch], rows: int) -> list[Batch]:
    """The first batches, enough of them to hold at least ``rows`` rows (fewer if the split ends)."""
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += batch.size
        if seen >= rows:
            break
    return out


def stack_columns(column: Callable[[str], np.ndarray], ids: list[str], dense: list[str],
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs from a batch of named columns (Arrow or NumPy): dense float32 [B, n_dense] and
    ids int64 [B, n_fields], each in one stack."""
    id_block = np.stack([column(c) for c in ids], 1).astype(np.int64)
    dense_block = (np.stack([column(c) for c in dense], 1).astype(np.float32) if dense
                   else np.zeros((size, 0), np.float32))
    return dense_block, id_block


@dataclass
class _Window:
    """Rows of several row groups as NumPy arrays (NumPy gathers on the calling thread alone, leaving
    the intra-op threads to the training step)."""

    ids: np.ndarray  # [F, N] int
    dense: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray | slice) -> "_Window":
        return _Window(self.ids[:, index], self.dense[index], self.labels[index])

    @staticmethod
    def cat(a: "_Window", b: "_Window") -> "_Window":
        return _Window(np.concatenate([a.ids, b.ids], 1), np.concatenate([a.dense, b.dense]),
                       np.concatenate([a.labels, b.labels]))

    def batch(self, keys: list[str]) -> Batch:
        return make_batch(keys, torch.from_numpy(np.ascontiguousarray(self.ids)), torch.from_numpy(self.dense),
                          torch.from_numpy(self.labels))


class ParquetBatches:
    """Iterable of :class:`Batch` over one split; call :meth:`set_epoch` to reshuffle reproducibly."""

    def __init__(self, path: Path, feature_map: FeatureMap, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, window_rows: int = 262_144, sample_rows: int | None = None,
                 disjoint: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: split file not found (prepare the data again with ctr prepare)")
        self.file = pq.ParquetFile(self.path)
        self.keys = [f.name for f in feature_map.categorical]
        self.dense_names = [f.name for f in feature_map.dense]
        self.label = feature_map.label
        have = set(self.file.schema_arrow.names)
        missing = [c for c in [self.label, *self.dense_names, *self.keys] if c not in have]
        if missing:
            raise DataError(f"{self.path}: columns {missing} of the feature map are missing from the file")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.window_rows = max(window_rows, batch_size)
        self.epoch = 0
        self.sample_rows, self.disjoint = sample_rows, disjoint
        self.groups = self._sample_groups(sample_rows, 0) if sample_rows else list(range(self.file.metadata.num_row_groups))

    def _sample_groups(self, rows: int, epoch: int) -> list[int]:
        """Whole row groups drawn in a seeded order until they hold at least ``rows`` rows, kept in file
        order: a sample of the split that costs no read of the rest (e.g. a search phase's rows). The
        same sample every epoch, or (``disjoint``) each epoch the groups after the previous epoch's in
        that order, wrapping around only when the split runs out: a phase that must not read a row
        twice (a row seen again is partly memorised, and looks more useful than it is)."""
        meta = self.file.metadata
        order = torch.randperm(meta.num_row_groups, generator=torch.Generator().manual_seed(self.seed)).tolist()
        first, held = 0, 0  # epoch e ends where the groups drawn so far hold (e + 1) * rows
        for e in range(epoch + 1 if self.disjoint else 1):
            chosen: list[int] = []
            while (held < (e + 1) * rows or not chosen) and len(chosen) < len(order):
                g = order[(first + len(chosen)) % len(order)]
                chosen.append(g)
                held += meta.row_group(g).num_rows
            first += len(chosen)
        return sorted(chosen)

    @property
    def num_rows(self) -> int:
        meta = self.file.metadata
        return sum(meta.row_group(g).num_rows for g in self.groups)

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sample_rows and self.disjoint:
            self.groups = self._sample_groups(self.sample_rows, epoch)

    def _read(self, groups: list[int]) -> _Window:
        # one thread: Arrow's pool would contend with the training step's threads for the cores
        table = self.file.read_row_groups(groups, columns=[self.label, *self.dense_names, *self.keys], use_threads=False)
        col = lambda name: table.column(name).combine_chunks().to_numpy(zero_copy_only=False)  # noqa: E731
        ids = np.stack([col(k) for k in self.keys]) if self.keys else np.zeros((0, table.num_rows), np.int32)
        dense = np.stack([col(d) for d in self.dense_names], 1) if self.dense_names else np.zeros((table.num_rows, 0), np.float32)
        labels = np.array(col(self.label), dtype=np.float32)  # owned copy: Arrow buffers are read-only
        return _Window(ids, dense, labels)

    def _windows(self, gen: torch.Generator | None) -> Iterator[_Window]:
        order = [self.groups[i] for i in torch.randperm(len(self.groups), generator=gen).tolist()] if gen is not None \
            else self.groups
        pending: list[int] = []
        rows = 0
        for g in order:
            pending.append(g)
            rows += self.file.metadata.row_group(g).num_rows
            if rows >= self.window_rows:
                yield self._read(pending)
                pending, rows = [], 0
        if pending:
            yield self._read(pending)

    def _batches(self) -> Iterator[Batch]:
        """Each window's rows in a seeded random order (kept in order without shuffling), cut into
        batches; the rows left over at a window's end open the next window's first batch. Each batch
        is gathered straight from the window, so a row is copied once."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch) if self.shuffle else None
        size = self.batch_size
        carry: _Window | None = None
        for window in self._windows(gen):
            order = torch.randperm(len(window), generator=gen).numpy() if gen is not None else None
            pick = (lambda a, b: slice(a, b)) if order is None else (lambda a, b: order[a:b])  # noqa: E731
            start = 0
            if carry is not None:
                start = min(size - len(carry), len(window))
                carry = _Window.cat(carry, window.take(pick(0, start)))
                if len(carry) < size:
                    continue
                yield carry.batch(self.keys)
                carry = None
            full = start + (len(window) - start) // size * size
            for begin in range(start, full, size):
                yield window.take(pick(begin, begin + size)).batch(self.keys)
            carry = window.take(pick(full, len(window))) if full < len(window) else None
        if carry is not None and not self.drop_last:
            yield carry.batch(self.keys)

    def __iter__(self) -> Iterator[Batch]:
        """Batches assembled in the consumer's thread, between its steps. A CPU training step keeps
        every core busy: a prefetch thread beside it made the DNN training loop 12-16% slower on 2
        cores (the threads contend for the cores), where loading in line costs the loader's own
        work, about 2% of the loop."""
        return self._batches()
