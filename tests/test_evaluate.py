"""ctr evaluate: metrics against scikit-learn, the report in headless Chromium, Ray = local, bad input."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from common.errors import DataError
from deploy.export import export_model
from features.prepare import PrepareResult
from pipelines.evaluate import evaluate
from pipelines.scorers import load_scorer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The baseline run directory and the exported AFM-compressed file of the same run."""
    out = tmp_path_factory.mktemp("edge") / "afm.pt"
    export_model(runs["dcnv2"], out, "latest")
    return [runs["dcnv2"], out]


def test_metrics_match_scikit_learn_and_hand_computation(models: list[Path], prepared_criteo: PrepareResult,
                                                         tmp_path: Path) -> None:
    data = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    result = evaluate(models, data, tmp_path, slices=["C1"], top_values=3, batch_size=500, progress=False)
    table = pq.read_table(data)
    y = table[prepared_criteo.feature_map.label].to_numpy()
    for m, path in zip(result["models"], models):
        s = load_scorer(path)
        ids = np.stack([table[c].to_numpy() for c in s.ids], 1).astype(np.int64)
        dense = np.stack([table[c].to_numpy() for c in s.dense], 1).astype(np.float32) if s.dense \
            else np.zeros((len(y), 0), np.float32)
        p = s.score(dense, ids)
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert m["logloss"] == pytest.approx(log_loss(y, p.astype(np.float64)), abs=1e-6)
        assert m["ne"] == pytest.approx(m["logloss"] / log_loss(y, np.full(len(y), y.mean())), abs=1e-6)
        assert m["calibration"] == pytest.approx(p.mean() / y.mean(), rel=1e-5)
        assert sum(b["rows"] for b in m["reliability"]) == len(y) and m["auc_ci"][0] < m["auc"] < m["auc_ci"][1]
        top = m["slices"]["C1"]
        assert [t["rows"] for t in top] == sorted((t["rows"] for t in top), reverse=True) and len(top) == 3
    assert result["comparisons"][0]["against"] == result["models"][0]["name"]
    assert 0.0 <= result["comparisons"][0]["p_value"] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["data"]["rows"] == len(y) and len(saved["models"][1]["sha256"]) == 64


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_its_plots_in_headless_chromium(models: list[Path], prepared_criteo: PrepareResult,
                                                           tmp_path: Path) -> None:
    data = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    evaluate(models, data, tmp_path, progress=False)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = dom.count("<img")
    assert images == 5  # ROC, reliability, histograms, the models' size-vs-AUC frontier, the recipe's size vs AUC
    assert f'data-plots-rendered="{images}"' in dom  # every plot decoded and laid out


def test_ray_scoring_equals_the_local_stream(models: list[Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    import ray

    from pipelines.ray_evaluate import ray_scores

    table = pq.read_table(prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file)
    data = tmp_path / "parts"  # a directory of files: both paths read them in name order
    data.mkdir()
    for i, start in enumerate(range(0, table.num_rows, 700)):
        pq.write_table(table.slice(start, 700), data / f"part-{i:03d}.parquet")
    local = evaluate(models, data, tmp_path / "local", slices=["C1"], groups=["C2"], progress=False)
    try:
        remote = evaluate(models, data, tmp_path / "ray", slices=["C1"], groups=["C2"],
                          scores_from=lambda scorers, fields: ray_scores(data, scorers, fields))
    finally:
        ray.shutdown()
    assert remote["models"] == local["models"]  # exactly: the same scores, row for row
    assert remote["comparisons"] == local["comparisons"]
    assert local["data"]["files"] == 3 and local["data"]["rows"] == table.num_rows


def test_bad_input_is_named(models: list[Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    data = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    table = pq.read_table(data)
    pq.write_table(table.drop_columns(["C3"]), tmp_path / "missing.parquet")
    with pytest.raises(DataError, match=r"missing.parquet: model .* reads columns \['C3'\] that the file lacks"):
        evaluate(models, tmp_path / "missing.parquet", tmp_path / "out", progress=False)
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet: the file has no rows"):
        evaluate(models, tmp_path / "empty.parquet", tmp_path / "out", progress=False)
    label = prepared_criteo.feature_map.label
    labels = table[label].to_numpy().copy()
    labels[5] = 2
    bad = table.set_column(table.schema.get_field_index(label), label, pa.array(labels))
    pq.write_table(bad, tmp_path / "labels.parquet")
    with pytest.raises(DataError, match=r"labels.parquet: row 5: label 2.0 is not 0 or 1"):
        evaluate(models, tmp_path / "labels.parquet", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="slice or group field"):
        evaluate(models, data, tmp_path / "out", slices=["nope"], progress=False)


def test_group_auc_by_a_field_in_the_table_the_json_and_the_report(models: list[Path], prepared_criteo: PrepareResult,
                                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    data = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    assert main(["evaluate", *map(str, models), "--data", str(data), "--out", str(tmp_path), "--group", "C2",
                 "--group", "C6"]) == 0
    printed = capsys.readouterr().out
    assert "| C2 |" in printed and "| C6 |" in printed and "groups skipped (one class)" in printed
    saved = json.loads((tmp_path / "metrics.json").read_text())["models"][0]["groups"]
    assert set(saved) == {"C2", "C6"}
    table = pq.read_table(data)
    labels = table["label"].to_numpy()
    c6 = table["C6"].to_numpy()
    expected_groups = len(np.unique(c6))
    assert saved["C6"]["groups"] == expected_groups
    assert saved["C6"]["groups_scored"] + saved["C6"]["groups_skipped_one_class"] == expected_groups
    assert sum(b["impressions"] for b in saved["C6"]["by_size"]) == len(labels)
    assert 0.5 < saved["C6"]["group_auc"] < 1.0
    assert "Group AUC" in (tmp_path / "report.html").read_text()


def test_the_frontier_keeps_the_models_nothing_beats() -> None:
    from pipelines.report import pareto

    # (bytes, AUC): 1 and 3 are beaten (bigger and no better than 0 / 2), the rest form the frontier
    points = [(100, 0.70), (200, 0.69), (300, 0.75), (400, 0.75), (50, 0.60), (1000, 0.78)]
    assert pareto(points) == [4, 0, 2, 5]


def test_the_frontier_plot_draws_each_models_delong_interval() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.report import frontier_figure

    results = [{"bytes": 1000, "auc": 0.78, "auc_ci": [0.77, 0.79]}, {"bytes": 100, "auc": 0.70, "auc_ci": [0.68, 0.71]}]
    ax = frontier_figure(plt, ["base", "small"], results).axes[0]
    bars = next(c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer))
    segments = sorted(tuple(seg[:, 1]) for seg in bars.lines[2][0].get_segments())
    assert np.allclose(segments, [(0.68, 0.71), (0.77, 0.79)])
    plt.close("all")


def test_each_model_may_read_its_own_encoding_of_the_same_rows(models: list[Path], prepared_criteo: PrepareResult,
                                                               tmp_path: Path) -> None:
    data = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    copy = tmp_path / "copy.parquet"
    shutil.copy(data, copy)
    one = evaluate(models, data, tmp_path / "one", progress=False)
    two = evaluate(models, [data, copy], tmp_path / "two", progress=False)
    assert [m["auc"] for m in two["models"]] == [m["auc"] for m in one["models"]]
    assert two["comparisons"] == one["comparisons"]
    table = pq.read_table(data)
    label = prepared_criteo.feature_map.label
    flipped = table.set_column(table.schema.get_field_index(label), label, pa.array(1 - table[label].to_numpy()))
    pq.write_table(flipped, copy)
    with pytest.raises(DataError, match="labels differ"):
        evaluate(models, [data, copy], tmp_path / "three", progress=False)
