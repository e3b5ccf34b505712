"""``ctr prepare --extend``: a new day keeps the parent's ids and appends values that reach min count
over the summed counts; the same values as a one-go prepare of both days."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from common.errors import DataError
from features.feature_map import FeatureMap, feature_map_sha256
from features.prepare import PrepareResult, prepare
from features.schema import DatasetConfig
from conftest import run_prepare

ALL_TRAIN = {"method": "order", "ratios": [1.0, 0.0, 0.0]}


def _day(path: Path, c1: list[str]) -> Path:
    """Criteo TSV rows whose C1 takes the given values; every other field is constant."""
    path.write_text("".join(f"{i % 2}\t" + "\t".join(["1"] * 13 + [v] + ["x"] * 25) + "\n" for i, v in enumerate(c1)))
    return path


def _extend(raw: Path, parent: Path, out: Path, **options: object) -> PrepareResult:
    cfg = DatasetConfig(name="test", layout="criteo_tsv", output=str(out), **{"min_count": 2, "split": ALL_TRAIN, **options})
    return prepare(cfg, raw=[raw], extend=parent)


def _vocab(result: PrepareResult, field: str = "C1") -> dict[str, tuple[int, int]]:
    frame = pl.read_parquet(result.output / "vocab" / f"{field}.parquet")
    return {t: (c, i) for t, c, i in frame.select("token", "count", "id").iter_rows()}


def _rows(result: PrepareResult, file: str, field: str = "C3") -> pl.DataFrame:
    """A split's labels and one field's values (ids named by the vocabulary; OOV and blank as such)."""
    names = pl.read_parquet(result.output / "vocab" / f"{field}.parquet").select(pl.col("id"), pl.col("token"))
    rows = pl.read_parquet(result.output / file, columns=["label", field])
    return rows.join(names, left_on=field, right_on="id", how="left", maintain_order="left").select(
        "label", pl.col("token").fill_null(pl.col(field).cast(pl.String)))


def test_old_ids_stay_and_new_values_append_once_their_summed_count_reaches_min_count(tmp_path: Path) -> None:
    day1 = run_prepare(_day(tmp_path / "d1.txt", ["a", "a", "a", "b", "z"]), tmp_path / "p1", min_count=2, split=ALL_TRAIN)
    assert _vocab(day1) == {"a": (3, 3)}  # b and z are under min count 2: kept as pending counts
    day2 = _extend(_day(tmp_path / "d2.txt", ["c", "b", "c", "a", "y"]), day1.output, tmp_path / "p2")
    # a keeps id 3 (count 3 + 1); b reaches 2 over both days, c has 2 today: ids 4, 5 (count, then token)
    assert _vocab(day2) == {"a": (4, 3), "b": (2, 4), "c": (2, 5)}
    assert day2.feature_map.categorical[13].num_embeddings == 6
    assert pl.read_parquet(day2.output / "train.parquet")["C1"].to_list() == [5, 4, 5, 3, 1]  # y: OOV
    pending = pl.read_parquet(day2.output / "pending" / "C1.parquet")
    assert pending.height == 2 and pending["count"].to_list() == [1, 1]  # y and z
    lineage = day2.feature_map.extends
    assert lineage is not None and lineage.parent_sha256 == feature_map_sha256(day1.output)
    assert lineage.ancestors == [lineage.parent_sha256] and lineage.rows_before == 5
    assert Path(lineage.files[0].path).name == "d2.txt" and len(lineage.files[0].sha256) == 64
    day3 = _extend(_day(tmp_path / "d3.txt", ["z", "d"]), day2.output, tmp_path / "p3")
    assert _vocab(day3)["z"] == (2, 6) and "d" not in _vocab(day3)  # z: one on day 1, one on day 3
    assert day3.feature_map.extends.ancestors == [lineage.parent_sha256, feature_map_sha256(day2.output)]
    assert day3.feature_map.rows_through == 12


def test_extended_days_keep_the_values_and_counts_of_a_one_go_prepare(synthetic_criteo: Path, tmp_path: Path) -> None:
    lines = synthetic_criteo.read_text().splitlines(keepends=True)
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    first.write_text("".join(lines[:6000]))
    second.write_text("".join(lines[6000:10000]))
    split = {"method": "random", "seed": 5}
    day1 = run_prepare(first, tmp_path / "d1", min_count=3, split=split)
    day2 = _extend(second, day1.output, tmp_path / "d2", min_count=3, split=split)
    whole = run_prepare([first, second], tmp_path / "whole", min_count=3, split=split)
    for field in ("C1", "C3", "C12", "I5"):
        extended, once = _vocab(day2, field), _vocab(whole, field)
        assert {t: c for t, (c, _) in extended.items()} == {t: c for t, (c, _) in once.items()}
        old = _vocab(day1, field)
        assert all(extended[t][1] == i for t, (_, i) in old.items())  # ids of day 1 unchanged
    # the random split continues the row positions: each split of the one-go prepare is day 1's rows
    # of it, then day 2's, row for row (told apart by label and C3's value, named through each vocabulary)
    for name, split in whole.feature_map.splits.items():
        once = _rows(whole, split.file).slice(day1.feature_map.splits[name].rows)
        assert once.height == day2.feature_map.splits[name].rows > 0
        assert once.equals(_rows(day2, split.file))


def test_a_parent_of_other_fields_or_min_count_is_refused(tmp_path: Path) -> None:
    day1 = run_prepare(_day(tmp_path / "d1.txt", ["a", "a"]), tmp_path / "p1", min_count=2, split=ALL_TRAIN)
    raw = _day(tmp_path / "d2.txt", ["a"])
    with pytest.raises(DataError, match="min count"):
        _extend(raw, day1.output, tmp_path / "p2", min_count=3)
    with pytest.raises(DataError, match="fields"):
        _extend(raw, day1.output, tmp_path / "p2", integer_mode="numeric")
    with pytest.raises(DataError, match="not over it"):
        _extend(raw, day1.output, day1.output)
    assert not (tmp_path / "p2").exists()
    assert FeatureMap.load(day1.output).extends is None


def test_day_after_day_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main
    from test_user_errors import fails

    raw = _day(tmp_path / "d1.txt", ["a", "a", "b"])
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: t\ndataset: {{name: t, layout: criteo_tsv, raw: [{raw}], output: {tmp_path / 'p1'}, "
                      "min_count: 2, split: {method: order, ratios: [0.5, 0.25, 0.25]}}\nmodel: {name: lr}\n")
    assert main(["prepare", str(config)]) == 0
    out = ["--output", str(tmp_path / "p2")]
    fails(["prepare", str(config), "--extend", str(tmp_path / "nowhere"), *out], capsys, "feature map not found")
    fails(["prepare", str(config), "dataset.min_count=3", "--extend", str(tmp_path / "p1"), *out], capsys, "min count")
    fails(["train", str(config), f"trainer.run_dir={tmp_path / 'run'}", "--init-from", str(tmp_path / "p1")], capsys,
          "not a trained run directory")
    fails(["generate", "--profile", "avazu", "--rows", "10", "--days", "0", "--out", str(tmp_path / "g")], capsys, "--days 0")
    assert not (tmp_path / "p2").exists() and not (tmp_path / "run").exists()


def test_a_day_with_longer_tokens_merges_with_counts_named_by_length() -> None:
    """Yesterday's pending counts name short tokens by byte length; a day whose field has tokens over 8
    bytes names them by text: both are compared as text, and the kept values keep their ids."""
    import numpy as np
    import pyarrow as pa

    from features.extend import extend_vocabulary
    from features.hashing import token_keys

    def keys(*tokens: str) -> list[int]:
        return token_keys(pa.array(list(tokens))).tolist()

    old = pl.DataFrame({"token": ["a"], "key": keys("a"), "count": [5], "id": [3]},
                       schema_overrides={"id": pl.Int32})
    pending = pl.DataFrame({"key": keys("bb"), "count": [1], "length": np.array([2], np.uint32)})
    day = pl.DataFrame({"key": keys("bb", "a-very-long-token", "a"), "count": [1, 2, 1],
                        "token": ["bb", "a-very-long-token", "a"]})
    vocab, rest = extend_vocabulary(old, pending, day, min_count=2)
    assert vocab.select("token", "count", "id").rows() == [("a", 6, 3), ("a-very-long-token", 2, 4), ("bb", 2, 5)]
    assert vocab["key"].to_list() == keys("a", "a-very-long-token", "bb") and rest.height == 0
