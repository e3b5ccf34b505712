"""ctr tune on Ray Tune: 4 trials on a small prepared set, killed part-way (SIGKILL to the whole
process group) and resumed to the end, with the results table, Pareto flags and frontier plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.prepare import PrepareResult
from pipelines.tune import pareto, with_values

ROOT = Path(__file__).parents[1]


def test_pareto_front_by_hand() -> None:
    points = [(100, 0.70), (50, 0.69), (100, 0.71), (200, 0.71), (40, 0.60)]
    assert pareto(points) == [False, True, True, False, True]


def test_dotted_values_reach_lists_and_sections() -> None:
    tree = {"trainer": {"lr": 1.0}, "compress": {"stages": [{"optfs": {"penalty": 1.0}}]}}
    out = with_values(tree, {"trainer.lr": 2.0, "compress.stages.0.optfs.penalty": 3.0})
    assert out == {"trainer": {"lr": 2.0}, "compress": {"stages": [{"optfs": {"penalty": 3.0}}]}}
    assert tree["trainer"]["lr"] == 1.0  # the original is left alone


@pytest.mark.slow
def test_a_four_trial_tune_is_killed_and_resumed(prepared_criteo: PrepareResult, synthetic_criteo: Path,
                                                 tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
name: tuned
dataset: {{name: test, layout: criteo_tsv, raw: [{synthetic_criteo}], output: {prepared_criteo.output}, min_count: 2,
          row_group_size: 2048}}
model: {{name: dnn, hidden: [16], embedding: {{dim: 8}}}}
trainer: {{batch_size: 2048, eval_batch_size: 8192, progress: false, run_dir: {tmp_path / 'run'}, lr: 0.003}}
compress:
  - optfs: {{search_epochs: 2, rewind_epoch: 1, retrain_epochs: 1, final_temp: 50, penalty: 1.0e-4}}
  - afm: {{finetune_epochs: 0}}
""")
    command = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))",
               "tune", str(exp), "--trials", "4", "--budget-mb", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trials = tmp_path / "run" / "tune" / "trials"
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if sum(1 for _ in trials.glob("*/result.json") if _.stat().st_size) >= 1:  # a trial has reported
            break
        time.sleep(0.2)
    assert first.poll() is None, "the tune ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGKILL)  # the driver, Ray and its workers: a real kill, nothing cleans up
    first.wait()
    assert not (tmp_path / "run" / "tune" / "results.json").exists()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "tune" / "results.json").read_text())
    assert len(results["trials"]) == 4 and results["budget_mb"] == 0.3
    assert any(t["pareto"] for t in results["trials"])
    assert {"trainer.lr", "trainer.sparse_lr", "compress.stages.0.optfs.penalty"} <= set(results["trials"][0]["values"])
    assert "| trial | last stage | bytes |" in second.stdout
    assert (tmp_path / "run" / "tune" / "frontier.png").stat().st_size > 1000
