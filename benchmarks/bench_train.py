"""Training throughput against this CPU's own matmul rate, and the cost of a large vocabulary.

For DNN and DCNv2 (embedding 16, batch 4096, MLP [400, 400, 400], 3 cross layers) it measures, in one
run: training samples/s of the real training step (sharded model, fused row-wise Adagrad, Adam), the
batch loader's batches/s alone, and the fp32 matmul rate of exactly the model's Linear shapes
(forward + both backward products) at the same thread count. Achieved fraction = model FLOPs per
sample x samples/s / matmul FLOP/s. Then the same DCNv2 step with every table grown to >= 20M rows
in total: a fused sparse update touches only the batch's rows, so samples/s should barely move.

Usage: python benchmarks/bench_train.py [--rows 1000000] [--steps 40] [--threads N] [--big-rows 20000000]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import torch
from torch import nn

from ctr.config import TrainerConfig
from ctr.distributed import local_process_group, shard_model
from ctr.loader import Batch, ParquetBatches
from ctr.models import build_model, model_config
from ctr.train import default_threads
from features.feature_map import FeatureMap

from _common import load_note, prepared

BATCH = 4096


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def model_flops_per_sample(shapes: list[tuple[int, int]]) -> float:
    """Training FLOPs of the Linear layers: forward 2*in*out, backward twice that (input and weight grads)."""
    return sum(6.0 * i * o for i, o in shapes)


def matmul_rate(shapes: list[tuple[int, int]], repeats: int = 10, trials: int = 3) -> float:
    """FLOP/s of the forward and both backward matmuls of these Linear shapes at batch BATCH: the best
    of ``trials`` timings of ``repeats`` passes each (the machine's attainable rate; a single timing
    moved by 15% between runs)."""
    mats = [(torch.randn(BATCH, i), torch.randn(o, i), torch.randn(BATCH, o)) for i, o in shapes]

    def run() -> None:
        for x, w, g in mats:
            x @ w.T  # forward
            g @ w  # grad wrt input
            g.T @ x  # grad wrt weight

    run()
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, time.perf_counter() - started)
    return repeats * BATCH * model_flops_per_sample(shapes) / best


def step_rate(model: nn.Module, batches: list[Batch], steps: int) -> float:
    """Samples/s of the real training step (fused sparse update, Adam on the dense part) of a built model."""
    t = TrainerConfig()
    torch.manual_seed(0)
    model = shard_model(model, t.sparse_optimizer, t.sparse_lr)
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(model.named_parameters())], lr=t.lr)

    def step(b: Batch) -> None:
        logits, _ = model(b.dense, b.sparse)
        dense.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(logits, b.labels).backward()
        dense.step()

    for b in batches[:3]:
        step(b)
    started = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps * BATCH / (time.perf_counter() - started)


def train_rate(fmap: FeatureMap, model_cfg: Any, batches: list[Batch], steps: int) -> tuple[float, list[tuple[int, int]]]:
    model = build_model(fmap, model_cfg)
    return step_rate(model, batches, steps), linear_shapes(model)


def grown(fmap: FeatureMap, total_rows: int) -> FeatureMap:
    extra = -(-total_rows // len(fmap.categorical))
    fields = [f.model_copy(update={"num_embeddings": f.num_embeddings + extra}) if f.type == "categorical" else f
              for f in fmap.fields]
    return fmap.model_copy(update={"fields": fields})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--big-rows", type=int, default=20_000_000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    out, fmap = prepared(args.rows)
    loader = ParquetBatches(out / "train.parquet", fmap, BATCH, shuffle=True, seed=1, drop_last=True)
    started = time.perf_counter()
    batches = list(loader)
    loader_bps = len(batches) / (time.perf_counter() - started)
    batches = batches[:8]
    rows = []
    with local_process_group():
        for name in ("dnn", "dcnv2"):
            rate, shapes = train_rate(fmap, model_config(name=name), batches, args.steps)
            peak = matmul_rate(shapes)
            flops = model_flops_per_sample(shapes)
            rows.append((name, sum(f.num_embeddings for f in fmap.categorical), rate, flops, peak))
        big = grown(fmap, args.big_rows)
        rate, shapes = train_rate(big, model_config(name="dcnv2"), batches, args.steps)
        rows.append(("dcnv2, large vocabulary", sum(f.num_embeddings for f in big.categorical), rate,
                     model_flops_per_sample(shapes), matmul_rate(shapes)))
    print(f"\ntraining throughput (batch {BATCH}, emb 16, {args.threads} thread(s)); {load_note()}")
    print(f"batch loader alone: {loader_bps:,.1f} batches/s = {loader_bps * BATCH:,.0f} samples/s")
    print("| model | embedding rows | samples/s | MFLOP/sample | model GFLOP/s | matmul GFLOP/s (same shapes) | fraction |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, emb_rows, rate, flops, peak in rows:
        print(f"| {name} | {emb_rows:,} | {rate:,.0f} | {flops / 1e6:.2f} | {rate * flops / 1e9:.1f} | {peak / 1e9:.1f} | {rate * flops / peak:.0%} |")
    small, big_rate = rows[1][2], rows[2][2]
    print(f"\nloader / DCNv2 step: {loader_bps * BATCH / small:.1f}x; large vocabulary / small: {big_rate / small:.2f}x samples/s")


if __name__ == "__main__":
    main()
