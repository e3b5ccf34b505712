import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from common.errors import ConfigError
from pipelines.scenarios import scenario
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


def test_profile_supports_reach_the_published_distinct_values_at_full_size() -> None:
    from pipelines.scenarios import PROFILE_DISTINCT, PROFILE_ROWS, expected_distinct

    for kind in ("criteo", "avazu"):
        for f in scenario(kind, profile=True).fields:
            if f.support:
                published = PROFILE_DISTINCT[kind][f.name]
                assert expected_distinct(PROFILE_ROWS[kind], f.support, f.zipf) == pytest.approx(published, rel=0.01), f.name


def test_power_law_sampler_follows_its_masses() -> None:
    from pipelines.scenarios import power_law_index, value_masses

    rng = np.random.default_rng(0)
    n, support = 400_000, 1_000_000
    idx = power_law_index(rng.random(n), support, 1.05)
    assert idx.min() >= 0 and idx.max() < support
    counts = np.bincount(idx, minlength=support)
    masses = value_masses(support, 1.05, np.arange(support))
    assert masses.sum() == pytest.approx(1.0, abs=1e-9)
    head = np.arange(5)  # the head, value by value: within 4 binomial standard deviations
    assert np.all(np.abs(counts[head] - n * masses[head]) < 4 * np.sqrt(n * masses[head]))
    assert counts[1000:].sum() == pytest.approx(n * masses[1000:].sum(), rel=0.02)  # the tail as a whole


def test_hashed_weights_have_unit_variance_and_repeat() -> None:
    from pipelines.synthetic import hashed_uniforms

    w = hashed_uniforms(np.arange(200_000), salt=12345, parts=4)
    assert w.shape == (200_000, 4) and np.all(np.abs(w) < np.sqrt(3.0))
    assert np.all(np.abs(w.mean(0)) < 0.01) and np.allclose(w.std(0), 1.0, atol=0.01)
    assert abs(np.corrcoef(w.T)[0, 1]) < 0.01  # the four parts of one hash are independent
    assert np.array_equal(w[:10], hashed_uniforms(np.arange(10), salt=12345, parts=4))
    assert not np.array_equal(w[:10], hashed_uniforms(np.arange(10), salt=54321, parts=4))


def test_criteo_profile_distinct_values_follow_the_documented_distribution(tmp_path: Path) -> None:
    """At 100k rows each field's distinct values match the expectation under its sampler (the same
    rule that reaches the published figures at 45.8M rows), and the big fields are mostly rare values."""
    from pipelines.scenarios import expected_distinct

    rows = 100_000
    report = generate("criteo", rows, tmp_path / "p.txt", seed=3, profile=True)
    assert report.profile and 0.7 < report.teacher_auc < 0.95
    names = ["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]
    df = pl.read_csv(tmp_path / "p.txt", separator="\t", has_header=False, new_columns=names, infer_schema=False)
    for f in scenario("criteo", profile=True).fields:
        if f.support:
            present = df[f.name].drop_nulls()
            expected = expected_distinct(present.len(), f.support, f.zipf)
            assert present.n_unique() == pytest.approx(expected, rel=0.03, abs=3), f.name
    counts = df["C3"].drop_nulls().value_counts()["count"]
    assert (counts == 1).mean() > 0.5  # most of C3's values are seen once


def test_noise_choice_zeroes_exactly_the_named_fields(tmp_path: Path) -> None:
    """--noise: the named fields carry no weight and leave every pair; the scenario's own noise
    fields that are not named become informative; an unknown field is one user error."""
    sc = scenario("criteo", noise=["C1", "C9"])
    weights = {f.name: f.weight for f in sc.fields if f.render != "count"}
    assert [n for n, w in weights.items() if w == 0] == ["C1", "C9"]
    assert all(w > 0 for n, w in weights.items() if n not in ("C1", "C9"))
    assert all("C1" not in pair for pair in sc.pairs) and ("C3", "C4") in sc.pairs
    report = generate("criteo", 2_000, tmp_path / "n.txt", seed=5, noise=["C1", "C9"])
    assert {"C1", "C9"} <= set(report.noise) and "C5" in report.informative
    with pytest.raises(ConfigError, match="I1"):
        scenario("criteo", noise=["I1"])


def test_drift_moves_the_stated_share_of_ranks_to_new_values_each_day(tmp_path: Path) -> None:
    """Day d shows rank k's value k + support * floor(d * drift + phase_k): a share ``drift`` of the
    ranks get a value never drawn before from one day to the next; without drift the days share values."""
    from pipelines.synthetic import Day, draw_teacher, generate_days

    sc = scenario("avazu", profile=True)
    f = next(x for x in sc.fields if x.name == "site_id")
    teacher = draw_teacher(sc, 4)
    ranks = np.arange(20_000)
    one, two = Day(1, 0.25).values(f, teacher, ranks), Day(2, 0.25).values(f, teacher, ranks)
    moved = one != two
    assert moved.mean() == pytest.approx(0.25, abs=0.015)
    assert np.array_equal(two[moved] - one[moved], np.full(moved.sum(), f.support))  # the next generation
    assert np.array_equal(Day(2, 0.0).values(f, teacher, ranks), ranks)
    reports = generate_days("avazu", 3000, tmp_path / "days", 3, 0.2, seed=4, profile=True)
    assert [r.day for r in reports] == [1, 2, 3] and all(0.6 < r.teacher_auc < 0.95 for r in reports)
    frames = [pl.read_csv(tmp_path / "days" / f"day{d:02d}.csv", infer_schema=False) for d in (1, 2, 3)]
    assert [sorted(set(df["hour"].str.slice(0, 6))) for df in frames] == [["141021"], ["141022"], ["141023"]]
    assert frames[1]["hour"].to_list() == sorted(frames[1]["hour"].to_list())  # hours in order within a day
    with pytest.raises(ConfigError, match="--profile"):
        generate_days("criteo", 10, tmp_path / "x", 2, 0.1)
