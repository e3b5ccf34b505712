"""Training on Ray: the local training loop, unchanged, inside every Ray Train worker.

Each worker builds the model on the meta device and shards it with TorchRec's planner over the
process group Ray made (gloo on CPU, NCCL on GPU), with the world and node sizes from
``ray.train.get_context()``; the dense part is data-parallel. Training rows come from Ray Data:
``read_parquet`` of the prepared train split, split equally among the workers (so every worker runs
the same number of steps), batched by ``iter_torch_batches`` with a collate function that turns
column arrays into the KJT batch in a few vectorised calls. Validation and test read the whole
split on every worker and score one part of each batch each, so AUC is exact over all rows.

Rank 0 writes the checkpoints into the run directory and hands a copy to Ray Train with every
report; when a worker dies, Ray restarts the group (``max_failures``) and the workers resume from
the last reported checkpoint. Ray stays here: ``ctr/`` does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from common.atomic import atomic_write
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint
from ctr.config import RayConfig
from ctr.distributed import CPU
from ctr.experiment import ExperimentConfig
from ctr.loader import Batch, make_batch, stack_columns
from ctr.run_dir import BEST, LAST, RunDir
from ctr.train import Runtime, Trainer
from features.feature_map import FeatureMap

log = logging.getLogger("ctr.train")
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "1"}
SHUFFLE_BUFFER_BATCHES = 4  # local shuffle buffer of each worker, in batches


def start_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a quiet local instance sized for a small machine."""
    if ray.is_initialized():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, object_store_memory=cfg.object_store_mb * 2**20,
                 logging_level=logging.WARNING, log_to_driver=False)


class ColumnsToBatch(NumpyBatchCollateFn):
    """Ray Data column arrays -> ``Batch``: one stack per kind of column, no per-row Python."""

    def __init__(self, fmap: FeatureMap) -> None:
        self.keys = [f.name for f in fmap.categorical]
        self.dense = [f.name for f in fmap.dense]
        self.label = fmap.label

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        labels = torch.from_numpy(batch[self.label].astype(np.float32))
        dense, ids = stack_columns(batch.__getitem__, self.keys, self.dense, len(labels))
        return make_batch(self.keys, torch.from_numpy(ids.T), torch.from_numpy(dense), labels)


class ShardBatches:
    """One worker's equal share of the train split, as the loop's batch source."""

    def __init__(self, shard: Any, fmap: FeatureMap, batch_size: int, rows: int, seed: int, shuffle: bool) -> None:
        self.shard, self.batch_size, self.rows, self.seed, self.shuffle = shard, batch_size, rows, seed, shuffle
        self.collate = ColumnsToBatch(fmap)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows // self.batch_size

    def __iter__(self) -> Any:
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * self.batch_size if self.shuffle else None,
            local_shuffle_seed=self.seed + self.epoch if self.shuffle else None))


def _report(folder: Path, metrics: dict[str, float]) -> None:
    """Every rank reports; rank 0 attaches a copy of the checkpoint files it has just written."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ctr-ray-ckpt-") as staging:
        for name in (LAST, BEST):
            if (folder / name).is_file():
                shutil.copy2(folder / name, Path(staging) / name)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging))


def _worker(config: dict[str, Any]) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)  # fbgemm and the planner log every table at INFO
    cfg = ExperimentConfig.model_validate(config["experiment"])
    data_dir, run_dir = Path(config["data_dir"]), Path(config["run_dir"])
    fmap = FeatureMap.load(data_dir)
    context = ray.train.get_context()
    world = context.get_world_size()
    device = CPU
    if cfg.trainer.ray.use_gpu:
        device = torch.device("cuda", context.get_local_rank())
        torch.cuda.set_device(device)
    data = ShardBatches(ray.train.get_dataset_shard("train"), fmap, cfg.trainer.batch_size // world,
                        fmap.splits["train"].rows // world, cfg.trainer.seed, cfg.trainer.shuffle)
    runtime = Runtime(train_data=data, device=device, local_world_size=context.get_local_world_size(),
                      on_checkpoint=_report)
    trainer = Trainer(cfg, fmap, data_dir, run_dir, runtime=runtime)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # a restart before the first checkpoint reached Ray: start over, dropping metric lines already written
        trainer.fit(resume=config["resume"] or RunDir(run_dir).metrics.is_file())
        return
    with checkpoint.as_directory() as folder:  # a restart after a failure: Ray's last checkpoint wins
        if context.get_world_rank() == 0 and (Path(folder) / BEST).is_file():
            best = load_checkpoint(Path(folder) / BEST)
            atomic_write(trainer.ckpt_dir / BEST, lambda fh: torch.save(best, fh))
        trainer.fit(resume=True, resume_from=Path(folder))


def run_ray_train(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path,
                  resume: bool = False) -> dict[str, Any]:
    """Train with ``cfg.trainer.num_workers`` Ray Train workers; returns the test result."""
    t, r = cfg.trainer, cfg.trainer.ray
    start_ray(r)
    run_dir = run_dir.resolve()
    train_file = (data_dir / fmap.splits["train"].file).resolve()
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
                           "run_dir": str(run_dir), "resume": resume},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=r.max_failures)),
        datasets={"train": ray.data.read_parquet(str(train_file))},
    )
    log.info("training on Ray: %d workers (%s), run directory %s", t.num_workers,
             "GPU, NCCL" if r.use_gpu else f"{r.cpus_per_worker} CPU each, gloo", run_dir)
    stop = threading.Event()
    watcher = threading.Thread(target=_echo_metrics, args=(RunDir(run_dir).metrics, stop), daemon=True)
    watcher.start()
    try:
        trainer.fit()
    finally:
        stop.set()
        watcher.join()
    return json.loads(RunDir(run_dir).result.read_text())


def _echo_metrics(path: Path, stop: threading.Event) -> None:
    """The workers' output stays in Ray's logs; the driver shows each validation as rank 0 records it."""
    shown = len(read_json_lines(path))
    while not stop.wait(2.0):
        try:
            lines = read_json_lines(path)
        except json.JSONDecodeError:  # caught a line half-written: read it next time
            continue
        for line in lines[shown:]:
            log.info("%s epoch %d step %d: auc %.5f logloss %.5f", line["event"], line["epoch"], line["step"],
                     line["auc"], line["logloss"])
        shown = len(lines)
