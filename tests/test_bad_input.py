"""Bad input: every error names the file and line; nothing half-written is left behind."""

import os
from pathlib import Path

import polars as pl
import pytest

import features.prepare as prepare_module
from common.errors import DataError

from conftest import run_prepare

GOOD = "0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t13\t" + "\t".join(f"{i:08x}" for i in range(26))


def corrupt_file(tmp_path: Path, n: int = 300) -> Path:
    lines = [GOOD.replace("\t13\t", f"\t{i % 50}\t", 1) for i in range(n)]
    lines[4] = lines[4].rsplit("\t", 1)[0]  # line 5: 39 fields
    lines[8] = lines[8] + "\textra"  # line 9: 41 fields
    lines[11] = lines[11].replace("\t3\t", "\tabc\t", 1)  # line 12: I3 not an integer
    lines[19] = "2" + lines[19][1:]  # line 20: label 2
    path = tmp_path / "corrupt.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_go_to_rejects_with_line_and_reason(tmp_path: Path) -> None:
    raw = corrupt_file(tmp_path)
    fmap = run_prepare(raw, tmp_path / "out", max_reject_fraction=0.05).feature_map
    assert (fmap.rows_read, fmap.rows_rejected) == (300, 4)
    assert sum(s.rows for s in fmap.splits.values()) == 296
    rejects = pl.read_csv(tmp_path / "out" / "rejects.csv")
    assert rejects["line"].to_list() == [5, 9, 12, 20]
    assert set(rejects["file"]) == {str(raw)}
    reasons = rejects["reason"].to_list()
    assert reasons[0] == "expected 40 fields separated by '\\t', found 39"
    assert reasons[1] == "expected 40 fields separated by '\\t', found 41"
    assert reasons[2] == "column 'I3': expected an integer, found 'abc'"
    assert reasons[3] == "column 'label': expected 0 or 1, found '2'"
    assert rejects["raw"][2].split("\t")[3] == "abc"


def test_reject_share_over_the_limit_fails_and_keeps_the_rejects(tmp_path: Path) -> None:
    raw = corrupt_file(tmp_path)
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out")  # default limit 1%: 4/300 is over
    msg = str(err.value)
    assert "4 of 300 rows rejected (1.33%), over the limit of 1.00%" in msg
    assert f"{raw} line 5: expected 40 fields" in msg and f"{raw} line 12: column 'I3'" in msg
    assert not (tmp_path / "out").exists()
    assert len(pl.read_csv(tmp_path / "out.rejects.csv")) == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'}: raw file not found"):
        run_prepare(tmp_path / "nope.txt", tmp_path / "out")


def test_empty_file_and_header_only_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"{empty}: file is empty"):
        run_prepare(empty, tmp_path / "out")
    header_only = tmp_path / "avazu.csv"
    header_only.write_text((Path(__file__).parent / "data" / "avazu_deepctr_sample.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=f"{header_only}: no data rows after the header line"):
        run_prepare(header_only, tmp_path / "out", layout="avazu_csv")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    raw = tmp_path / "binary.txt"
    raw.write_bytes((GOOD + "\n").encode() * 3 + b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=f"{raw} line 4: not valid UTF-8"):
        run_prepare(raw, tmp_path / "out")


def test_directory_is_not_a_raw_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path}: not a regular file"):
        run_prepare(tmp_path, tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    raw = tmp_path / "secret.txt"
    raw.write_text(GOOD + "\n")
    raw.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        run_prepare(raw, tmp_path / "out")


def test_header_mismatch_names_line_1(tmp_path: Path) -> None:
    raw = tmp_path / "avazu.csv"
    text = (Path(__file__).parent / "data" / "avazu_deepctr_sample.csv").read_text()
    raw.write_text(text.replace("id,click,hour", "id,clicked,hour", 1))
    with pytest.raises(DataError, match=f"{raw} line 1: header does not match the layout: column 2 should be 'click', found 'clicked'"):
        run_prepare(raw, tmp_path / "out", layout="avazu_csv")


def test_interrupted_prepare_keeps_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "good.txt"
    raw.write_text("\n".join([GOOD] * 50 + [GOOD.replace("0\t", "1\t", 1)] * 50) + "\n")
    out = tmp_path / "out"
    run_prepare(raw, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "fit_vocabulary", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(raw, out, min_count=3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.txt", "out"]
