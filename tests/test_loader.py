from pathlib import Path

import polars as pl
import pytest
import torch

from common.errors import DataError
from ctr.loader import ParquetBatches, make_batch
from features.prepare import PrepareResult


def loader(prepared: PrepareResult, **kwargs: object) -> ParquetBatches:
    kwargs = {"batch_size": 1000, **kwargs}
    return ParquetBatches(prepared.output / "train.parquet", prepared.feature_map, **kwargs)  # type: ignore[arg-type]


def test_make_batch_is_field_major() -> None:
    ids = torch.tensor([[1, 2, 3], [7, 8, 9]], dtype=torch.int32)  # 2 fields x 3 rows
    b = make_batch(["a", "b"], ids, torch.zeros(3, 0), torch.tensor([0.0, 1.0, 0.0]))
    assert b.sparse.keys() == ["a", "b"] and b.size == 3
    assert b.sparse["b"].values().tolist() == [7, 8, 9] and b.sparse["a"].lengths().tolist() == [1, 1, 1]
    assert b.sparse.values().dtype == torch.int64


def test_batches_cover_the_split_in_file_order(prepared_criteo: PrepareResult) -> None:
    batches = list(loader(prepared_criteo))
    table = pl.read_parquet(prepared_criteo.output / "train.parquet")
    assert len(batches) == len(loader(prepared_criteo)) == -(-len(table) // 1000)
    assert [b.size for b in batches[:-1]] == [1000] * (len(batches) - 1)
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == table["label"].to_list()
    c5 = torch.cat([b.sparse["C5"].values() for b in batches])
    assert c5.tolist() == table["C5"].to_list()


def test_shuffle_is_a_seeded_permutation_that_changes_per_epoch(prepared_criteo: PrepareResult) -> None:
    def rows(epoch: int, seed: int = 1) -> list[tuple[int, ...]]:
        it = loader(prepared_criteo, shuffle=True, seed=seed, window_rows=4096)
        it.set_epoch(epoch)
        out = []
        for b in it:
            cols = [b.sparse[k].values() for k in ("C1", "C2", "C3", "C4")] + [b.labels.long()]
            out.extend(zip(*[c.tolist() for c in cols]))
        return out

    e0, e0_again, e1 = rows(0), rows(0), rows(1)
    table = pl.read_parquet(prepared_criteo.output / "train.parquet")
    plain = list(table.select("C1", "C2", "C3", "C4", pl.col("label").cast(pl.Int64)).iter_rows())
    assert e0 == e0_again and e0 != e1 and e0 != plain
    assert sorted(e0) == sorted(plain) == sorted(e1)  # every row exactly once
    assert rows(0, seed=2) != e0


def test_drop_last(prepared_criteo: PrepareResult) -> None:
    it = loader(prepared_criteo, batch_size=3000, drop_last=True, shuffle=True)
    sizes = [b.size for b in it]
    assert sizes == [3000] * (it.num_rows // 3000) == [3000] * len(it)


def test_dense_columns(synthetic_criteo: Path, tmp_path: Path) -> None:
    from conftest import run_prepare

    prepared = run_prepare(synthetic_criteo, tmp_path / "numeric", integer_mode="numeric")
    b = next(iter(loader(prepared, batch_size=64)))
    assert b.dense.shape == (64, 13) and b.dense.dtype == torch.float32
    assert b.sparse.keys() == [f"C{i}" for i in range(1, 27)]


def test_missing_split(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split file not found"):
        ParquetBatches(tmp_path / "nope.parquet", prepared_criteo.feature_map, 10)


def test_each_shuffled_batch_is_gathered_as_if_whole_windows_were_shuffled_then_cut(prepared_criteo: PrepareResult) -> None:
    """The loader gathers each batch straight from its window; the order must be the documented one:
    windows of row groups in a seeded order, each window's rows in a seeded order, leftovers opening
    the next window's first batch (batch 700 divides neither the 4096-row windows nor the split)."""
    it = loader(prepared_criteo, batch_size=700, shuffle=True, seed=3, window_rows=4096)
    it.set_epoch(2)
    got = torch.cat([b.sparse["C7"].values() for b in it])
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    expected = []
    for window in it._windows(gen):  # same generator draws, in the same order: groups, then rows
        expected.append(torch.from_numpy(window.ids[it.keys.index("C7")])[torch.randperm(len(window), generator=gen)])
    assert got.tolist() == torch.cat(expected).tolist()


def test_a_sample_is_whole_seeded_row_groups(prepared_criteo: PrepareResult) -> None:
    full = loader(prepared_criteo)
    sample = loader(prepared_criteo, sample_rows=5000, seed=4)
    meta = sample.file.metadata
    sizes = [meta.row_group(g).num_rows for g in sample.groups]
    # as few whole row groups (of up to 2048 rows) as hold 5000 rows; the last one drawn tipped it over
    assert sample.num_rows == sum(sizes) and 5000 <= sample.num_rows < 5000 + 2048 < full.num_rows
    assert len(sample) == -(-sample.num_rows // 1000)
    assert loader(prepared_criteo, sample_rows=5000, seed=4).groups == sample.groups != \
        loader(prepared_criteo, sample_rows=5000, seed=5).groups
    every = {tuple(r) for b in full for r in b.ids().tolist()}
    got = [tuple(r) for b in sample for r in b.ids().tolist()]
    assert len(got) == sample.num_rows and set(got) <= every


def test_disjoint_samples_read_each_row_once_while_the_split_lasts(prepared_criteo: PrepareResult) -> None:
    """A search phase with disjoint epochs: each epoch takes the next groups of the seeded order, so
    the epochs that fit in the split share no row and the last of them ends where the split does."""
    total = loader(prepared_criteo).file.metadata.num_row_groups
    sample = loader(prepared_criteo, sample_rows=5000, seed=4, disjoint=True)
    same = loader(prepared_criteo, sample_rows=5000, seed=4)
    seen: list[int] = []
    for epoch in range(3):
        sample.set_epoch(epoch)
        same.set_epoch(epoch)
        assert sample.groups and not set(sample.groups) & set(seen)
        assert 5000 * (epoch + 1) <= sample.num_rows + sum(sample.file.metadata.row_group(g).num_rows for g in seen)
        seen += sample.groups
    assert same.groups == loader(prepared_criteo, sample_rows=5000, seed=4).groups  # not disjoint: one sample
    everything = loader(prepared_criteo, sample_rows=sample.file.metadata.num_rows // 2, seed=4, disjoint=True)
    everything.set_epoch(1)
    first_half = loader(prepared_criteo, sample_rows=sample.file.metadata.num_rows // 2, seed=4, disjoint=True).groups
    assert sorted(first_half + everything.groups) == list(range(total))
