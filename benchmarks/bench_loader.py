"""Batch loader throughput against the training step it feeds (the loader must be >= 5x faster).

The training step is the project's real one for DNN (embedding 16, MLP [400, 400, 400], batch 4096):
every table in fbgemm's fused row-wise Adagrad kernel under DistributedModelParallel, Adam on the
dense part, at the trainer's default thread count.

Usage: python benchmarks/bench_loader.py [--rows 1000000] [--steps 30]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

from ctr.distributed import local_process_group
from ctr.loader import ParquetBatches
from ctr.models import model_config
from ctr.train import default_threads

from _common import load_note, prepared
from bench_train import BATCH, train_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the planner and fbgemm log dozens of lines per table
    warnings.filterwarnings("ignore")
    torch.set_num_threads(default_threads())
    out, fmap = prepared(args.rows)
    loader = ParquetBatches(out / "train.parquet", fmap, BATCH, shuffle=True, seed=1, drop_last=True)
    started = time.perf_counter()
    batches = list(loader)
    loader_rate = len(batches) * BATCH / (time.perf_counter() - started)
    with local_process_group():
        step_rate, _ = train_rate(fmap, model_config(name="dnn"), batches[:8], args.steps)
    print(f"\nbatch loader vs training step (batch {BATCH}, {len(fmap.categorical)} fields x dim 16); {load_note()}")
    print("| stage | rows/s | ms per batch |")
    print("|---|---:|---:|")
    print(f"| loader: Parquet -> KJT + dense + labels, shuffled, one epoch | {loader_rate:,.0f} | {1000 * BATCH / loader_rate:.1f} |")
    print(f"| training step (baseline): DNN, fused row-wise Adagrad + Adam | {step_rate:,.0f} | {1000 * BATCH / step_rate:.1f} |")
    print(f"\nloader / training step: {loader_rate / step_rate:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
