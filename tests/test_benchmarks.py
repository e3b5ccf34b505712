"""The benchmark runner's own measuring pieces: process-tree peak memory and the peer's input splits."""

import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from _common import run_measured  # noqa: E402
from run_all import headed_csv_splits  # noqa: E402
from features.schema import SplitConfig  # noqa: E402
from pipelines.synthetic import generate  # noqa: E402

# A child that starts a grandchild holding 300 MB of touched memory for a second, then prints.
GRANDCHILD = "import time; block = bytearray(300 * 2**20); time.sleep(1.0)"
CHILD = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}], check=True); print('done')"


def test_peak_memory_counts_the_whole_process_tree() -> None:
    seconds, peak_mb, out = run_measured([sys.executable, "-c", CHILD], interval=0.05)
    assert out.strip() == "done"
    assert seconds >= 1.0
    # the grandchild's 300 MB are counted although the measured process itself holds ~10 MB
    assert 300 <= peak_mb < 600


def test_failed_command_names_its_log(tmp_path: Path) -> None:
    log = tmp_path / "err.log"
    with pytest.raises(RuntimeError, match="err.log"):
        run_measured([sys.executable, "-c", "import sys; sys.exit('broken input')"], log=log)
    assert "broken input" in log.read_text()


def test_peer_splits_are_our_order_split_with_a_header(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    generate("criteo", 1000, raw, seed=3)
    headed_csv_splits(raw, tmp_path / "csv", SplitConfig(method="order", ratios=(0.8, 0.1, 0.1)))
    lines = raw.read_text().splitlines()
    frames = {s: pl.read_csv(tmp_path / "csv" / f"{s}.csv", infer_schema=False) for s in ("train", "valid", "test")}
    assert [f.height for f in frames.values()] == [800, 100, 100]
    assert frames["train"].columns == ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    # row 801 of the raw file opens the validation split, with empty fields kept empty
    first = ["" if v is None else v for v in frames["valid"].row(0)]
    assert "\t".join(first) == lines[800]
