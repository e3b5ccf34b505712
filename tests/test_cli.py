from pathlib import Path

import pytest

from pipelines.cli import main
from conftest import DATA


def test_prepare_command_with_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    config.write_text(f"dataset: {{name: cli, layout: avazu_csv, output: {tmp_path / 'out'}}}\n")
    code = main(["prepare", str(config), "dataset.min_count=1", "--raw", str(DATA / "avazu_deepctr_sample.csv")])
    assert code == 0
    assert "prepared cli: 100 rows read, 0 rejected" in capsys.readouterr().out
    assert (tmp_path / "out" / "feature_map.json").is_file()


def test_errors_exit_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    config.write_text(f"dataset: {{name: cli, layout: criteo_tsv, output: {tmp_path / 'out'}}}\n")
    assert main(["prepare", str(config), "dataset.min_cnt=1"]) == 2
    assert "did you mean 'min_count'" in capsys.readouterr().err
    assert main(["prepare", str(config), "--raw", str(tmp_path / "missing.txt")]) == 2
    assert f"{tmp_path / 'missing.txt'}: raw file not found" in capsys.readouterr().err


def test_synthetic_dataset_generates_its_raw_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    raw = tmp_path / "raw" / "gen.txt"
    config.write_text(
        f"dataset: {{name: syn, layout: criteo_tsv, raw: [{raw}], output: {tmp_path / 'out'},"
        f" synthetic: {{kind: criteo, rows: 3000, seed: 1}}}}\n")
    assert main(["prepare", str(config)]) == 0
    assert raw.is_file() and Path(f"{raw}.teacher.json").is_file()
    assert "3000 rows read" in capsys.readouterr().out
