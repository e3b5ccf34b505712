import json
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.synthetic import _hex8, generate


def test_hex_rendering() -> None:
    assert _hex8(np.array([0, 0xDEADBEEF, 0x1F], dtype=np.uint32)).tolist() == [b"00000000", b"deadbeef", b"0000001f"]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    generate("criteo", 3_000, tmp_path / "a.txt", seed=5)
    generate("criteo", 3_000, tmp_path / "b.txt", seed=5)
    generate("criteo", 3_000, tmp_path / "c.txt", seed=6)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes() != (tmp_path / "c.txt").read_bytes()


def test_criteo_layout_and_teacher_report(tmp_path: Path) -> None:
    report = generate("criteo", 5_000, tmp_path / "c.txt", seed=1)
    lines = (tmp_path / "c.txt").read_text().splitlines()
    assert len(lines) == 5_000 and all(line.count("\t") == 39 for line in lines)
    saved = json.loads((tmp_path / "c.txt.teacher.json").read_text())
    assert saved["teacher_auc"] == report.teacher_auc and 0.7 < report.teacher_auc < 0.95
    assert 0.1 < report.positive_rate < 0.4
    assert "C5" in report.noise and "C1" in report.informative


def test_avazu_layout(tmp_path: Path) -> None:
    generate("avazu", 2_000, tmp_path / "a.csv", seed=1)
    df = pl.read_csv(tmp_path / "a.csv", schema_overrides={"id": pl.String})
    assert df.columns[:3] == ["id", "click", "hour"] and df.width == 24
    assert df["hour"].min() >= 14102100 and df["hour"].max() <= 14103023
    assert df["id"].str.len_chars().max() == 20


def test_noise_fields_carry_no_signal_and_informative_ones_do(tmp_path: Path) -> None:
    generate("criteo", 200_000, tmp_path / "c.txt", seed=2)
    names = ["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]
    df = pl.read_csv(tmp_path / "c.txt", separator="\t", has_header=False, new_columns=names, infer_schema=False)
    df = df.with_columns(pl.col("label").cast(pl.Float64))

    def signal_variance(field: str) -> float:
        """Between-value variance of CTR (values seen >= 100 times) minus the binomial-noise share."""
        per = df.group_by(field).agg(pl.col("label").mean().alias("ctr"), pl.len().alias("n")).filter(pl.col("n") >= 100)
        n = per["n"].sum()
        ctr = float((per["ctr"] * per["n"]).sum()) / n
        between = float((per["n"] * (per["ctr"] - ctr) ** 2).sum()) / n
        return between - ctr * (1 - ctr) * (len(per) - 1) / n

    informative = min(signal_variance(f) for f in ("C1", "C4"))
    assert informative > 4e-4
    for noise in ("C5", "C10", "C15", "C25", "C26"):
        assert abs(signal_variance(noise)) < 0.1 * informative, noise
