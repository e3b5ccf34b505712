"""The readers accept the real public layouts (fixtures in tests/data, see its README)."""

from pathlib import Path

import polars as pl
import pytest

from common.errors import DataError
from features.vocab import BLANK_ID

from conftest import DATA, run_prepare


def raw_column(path: Path, sep: str, index: int, skip_header: bool) -> list[str]:
    lines = path.read_bytes().decode().splitlines()[1 if skip_header else 0:]
    return [line.split(sep)[index] for line in lines]


def all_rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / f"{s}.parquet") for s in ("train", "valid", "test")])


def test_raw_criteo_tsv_without_trailing_newline(tmp_path: Path) -> None:
    raw = DATA / "criteo_paddlerec_sample_train.txt"
    assert not raw.read_bytes().endswith(b"\n")
    fmap = run_prepare(raw, tmp_path / "out").feature_map
    assert fmap.rows_read == 100 and fmap.rows_rejected == 0
    assert [f.name for f in fmap.fields] == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    # every blank I1 cell (the 2nd raw column) becomes I1's blank id
    blanks = sum(v == "" for v in raw_column(raw, "\t", 1, False))
    assert blanks > 0
    assert (all_rows(tmp_path / "out")["I1"] == BLANK_ID).sum() == blanks


def test_negative_integers_are_their_own_bucket(tmp_path: Path) -> None:
    raw = DATA / "criteo_kaggle_train.head200.tsv"
    out = tmp_path / "out"
    run_prepare(raw, out, split={"ratios": (1.0, 0.0, 0.0)})
    negatives = sum(v.startswith("-") for v in raw_column(raw, "\t", 2, False))
    assert negatives == 26
    vocab = pl.read_parquet(out / "vocab" / "I2.parquet")
    assert vocab.filter(pl.col("token") < 0)["count"].sum() == negatives


def test_kaggle_csv_with_crlf_equals_the_tsv_layout(tmp_path: Path) -> None:
    csv = DATA / "criteo_kaggle_train.head200.csv"
    assert b"\r\n" in csv.read_bytes()
    from_csv = run_prepare(csv, tmp_path / "csv", layout="criteo_kaggle_csv")
    run_prepare(DATA / "criteo_kaggle_train.head200.tsv", tmp_path / "tsv")
    assert from_csv.feature_map.rows_read == 200 and from_csv.feature_map.label_source == "Label"
    for split in ("train", "valid", "test"):
        assert pl.read_parquet(tmp_path / "csv" / f"{split}.parquet").equals(pl.read_parquet(tmp_path / "tsv" / f"{split}.parquet"))


def test_raw_avazu_with_20_digit_ids(tmp_path: Path) -> None:
    raw = DATA / "avazu_deepctr_sample.csv"
    ids = raw_column(raw, ",", 0, True)
    assert max(int(i) for i in ids) > 2**63  # beyond int64: must never be parsed as one
    fmap = run_prepare(raw, tmp_path / "out", layout="avazu_csv", split={"ratios": (1.0, 0.0, 0.0)}).feature_map
    assert fmap.rows_read == 100 and fmap.label_source == "click"
    names = [f.name for f in fmap.fields]
    assert len(names) == 24 and "id" not in names and names[:3] == ["hour", "hour_weekday", "hour_is_weekend"]
    # every sample row is from 2014-10-21 00h, a Tuesday: one value each, id 3 (the first value id)
    train = pl.read_parquet(tmp_path / "out" / "train.parquet")
    assert train["hour"].unique().to_list() == [3]
    hour_vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "hour_weekday.parquet").select("token", "count", "id")
    assert hour_vocab.rows() == [(2, 100, 3)]
    # C20 is -1 in about half of the rows: a categorical token like any other
    c20 = pl.read_parquet(tmp_path / "out" / "vocab" / "C20.parquet")
    assert c20.filter(pl.col("token") == "-1")["count"].item() == sum(v == "-1" for v in raw_column(raw, ",", 22, True))


def test_float_written_criteo_csv_is_rejected_clearly(tmp_path: Path) -> None:
    raw = DATA / "criteo_deepctr_sample.head40.csv"
    spec = "label:label," + ",".join(f"I{i}:integer" for i in range(1, 14)) + "," + ",".join(f"C{i}:categorical" for i in range(1, 27))
    columns = [dict(zip(("name", "kind"), c.split(":"))) for c in spec.split(",")]
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", layout="generic", columns=columns, separator=",", header=True)
    msg = str(err.value)
    assert f"{raw} line 2: column 'I3': expected an integer, found '260.0'" in msg
    assert not (tmp_path / "out").exists()
