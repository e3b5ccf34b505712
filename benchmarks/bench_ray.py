"""One local process against Ray Train workers: samples/s, start-up overhead and test AUC.

The same experiment (the built-in synthetic DNN, 1 epoch, total batch 4096) is trained twice on the
same prepared data in one run: locally (one process, every core) and with ``--workers`` Ray Train
workers (gloo, tables sharded across them, Ray Data ingestion). On a 2-core machine no speedup is
expected: the point is that the distributed path is correct (same AUC) and what it costs.
Loop samples/s counts the training loop only; wall time includes Ray's start-up and validation.

Usage: python benchmarks/bench_ray.py [--rows 1000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from pathlib import Path

from ctr.experiment import load_experiment
from ctr.train import Trainer
from pipelines.ray_train import run_ray_train

from _common import WORK, load_note, prepared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", type=Path, default=Path("configs/experiments/synthetic_dnn.yaml"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    data_dir, fmap = prepared(args.rows)
    train_rows = fmap.splits["train"].rows
    rows = []
    for name, workers in (("local, 1 process", 1), (f"Ray Train, {args.workers} workers", args.workers)):
        run_dir = WORK / f"ray_bench_{workers}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_experiment(args.config, ["trainer.progress=false", "trainer.epochs=1", f"trainer.run_dir={run_dir}",
                                            f"trainer.num_workers={workers}"])
        started = time.perf_counter()
        if workers == 1:
            result = Trainer(cfg, fmap, data_dir, run_dir).fit()
        else:
            result = run_ray_train(cfg, fmap, data_dir, run_dir)
        wall = time.perf_counter() - started
        rows.append((name, result["steps"], result["train_seconds"], wall, result["test_auc"]))
    print(f"\n{args.config.stem}, {train_rows:,} training rows, 1 epoch, total batch 4096; {load_note()}")
    print("| run | steps | loop seconds | loop samples/s | wall seconds (incl. start-up, validation, test) | test AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, steps, loop, wall, test_auc in rows:
        print(f"| {name} | {steps} | {loop:.1f} | {steps * 4096 / loop:,.0f} | {wall:.1f} | {test_auc:.5f} |")
    local, distributed = rows
    print(f"\nRay / local: loop samples/s {local[2] / distributed[2] * distributed[1] / local[1]:.2f}x, "
          f"wall time {distributed[3] / local[3]:.2f}x; test AUC difference {distributed[4] - local[4]:+.5f}")


if __name__ == "__main__":
    main()
