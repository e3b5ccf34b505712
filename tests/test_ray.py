"""Ray Train: 2 CPU workers against the local loop, the sharding plan, and recovery from a killed
worker. One local Ray instance serves the module (it takes 10-30 s to start on 2 cores)."""

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from common.json_lines import read_json_lines
from ctr.config import RayConfig, TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.models import model_config
from ctr.train import Trainer
from features.prepare import PrepareResult
from features.schema import DatasetConfig
from pipelines.ray_train import run_ray_train, start_ray

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    start_ray(RayConfig())
    yield
    ray.shutdown()


def experiment(prepared: PrepareResult, run_dir: Path, workers: int) -> ExperimentConfig:
    """The same training for every run: seed, total batch size 1024, file order (no shuffle)."""
    return ExperimentConfig(
        name="t", dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared.output)),
        model=model_config(name="dnn", hidden=[32, 16], embedding=embedding_config(dim=8)),
        trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, epochs=EPOCHS, progress=False, threads=1,
                              run_dir=str(run_dir), lr=3e-3, shuffle=False, num_workers=workers))


@pytest.fixture(scope="module")
def ray_run(prepared_criteo: PrepareResult, local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("ray_run")
    cfg = experiment(prepared_criteo, run_dir, workers=2)
    return run_dir, run_ray_train(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir)


def test_two_ray_workers_match_the_local_run(prepared_criteo: PrepareResult, ray_run: tuple[Path, dict],
                                             tmp_path: Path) -> None:
    local = Trainer(experiment(prepared_criteo, tmp_path, 1), prepared_criteo.feature_map, prepared_criteo.output,
                    tmp_path).fit()
    run_dir, result = ray_run
    assert abs(result["test_auc"] - local["test_auc"]) <= 0.002
    # each worker takes half of each batch of 1024 from its equal half of the rows (no partial batch)
    assert result["steps"] == EPOCHS * (prepared_criteo.feature_map.splits["train"].rows // 2 // 512)
    # every epoch validated once over the whole split (exact AUC, all rows), then the test
    lines = read_json_lines(run_dir / "metrics.jsonl")
    assert [(line["event"], line["epoch"]) for line in lines] == [("valid", e) for e in range(1, EPOCHS + 1)] + [("test", EPOCHS)]
    valid_rows = prepared_criteo.feature_map.splits["valid"].rows
    assert all(line["rows"] == valid_rows for line in lines[:-1])


def test_the_sharding_plan_puts_tables_on_both_ranks(prepared_criteo: PrepareResult, ray_run: tuple[Path, dict]) -> None:
    plan = json.loads((ray_run[0] / "sharding.json").read_text())
    assert len(plan) == len(prepared_criteo.feature_map.categorical)
    assert {rank for table in plan.values() for rank in table["ranks"]} == {0, 1}
    assert {table["compute_kernel"] for table in plan.values()} == {"fused"}


def _train_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_worker_is_replaced_and_the_run_finishes(prepared_criteo: PrepareResult, ray_run: tuple[Path, dict],
                                                          tmp_path: Path) -> None:
    cfg = experiment(prepared_criteo, tmp_path, workers=2)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=run_ray_train(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path)))
    thread.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "ray").rglob("last.pt")):  # the first checkpoint has reached Ray
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was reported"
        time.sleep(0.2)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "result" in outcome
    lines = read_json_lines(tmp_path / "metrics.jsonl")
    assert [(line["event"], line["epoch"]) for line in lines] == [("valid", e) for e in range(1, EPOCHS + 1)] + [("test", EPOCHS)]
    assert victims[0] not in _train_workers()
    # resumed from the epoch checkpoint with the same data order: the uninterrupted run's result, within noise
    assert abs(outcome["result"]["test_auc"] - ray_run[1]["test_auc"]) <= 0.002
