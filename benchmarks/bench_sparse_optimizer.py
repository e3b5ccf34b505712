"""Which fused sparse optimizer (and learning rate) matches the AUC of Adam-trained peers?

On CPU, fbgemm's fused embedding kernels only offer SGD / Adagrad / row-wise Adagrad, while BARS and
FuxiCTR train the embeddings with Adam (lr 1e-3, dense gradients over whole tables). This runs one
epoch of the same model on the same prepared split with (a) the peers' practice: an unsharded model,
Adam on every parameter, and (b) our fused row-wise Adagrad at several learning rates, Adam on the
dense part, and prints test AUC / logloss and samples/s side by side.

Usage: python benchmarks/bench_sparse_optimizer.py [--data data/prepared/synthetic] [--model dnn]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ctr.distributed import local_process_group, shard_model
from ctr.loader import ParquetBatches
from ctr.metrics import classification_metrics
from ctr.models import build_model, model_config
from ctr.train import default_threads, predict
from features.feature_map import FeatureMap

from _common import load_note

BATCH = 4096


def one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: ParquetBatches) -> float:
    started, seen = time.perf_counter(), 0
    for b in train:
        logits, _ = model(b.dense, b.sparse)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(logits, b.labels).backward()
        optimizer.step()
        seen += b.size
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("data/prepared/synthetic"))
    parser.add_argument("--model", default="dnn")
    parser.add_argument("--sparse-lr", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(default_threads())
    fmap = FeatureMap.load(args.data)
    train = ParquetBatches(args.data / fmap.splits["train"].file, fmap, BATCH, shuffle=True, seed=1)
    test = ParquetBatches(args.data / fmap.splits["test"].file, fmap, 16384)
    cfg = model_config(name=args.model)
    rows = []
    torch.manual_seed(0)
    peer = build_model(fmap, cfg, device=torch.device("cpu"))
    rate = one_epoch(peer, torch.optim.Adam(peer.parameters(), lr=1e-3), train)
    rows.append(("peers' practice: Adam lr 1e-3 on everything (dense table gradients)", rate,
                 classification_metrics(*predict(peer, test))))
    with local_process_group():
        for lr in args.sparse_lr:
            torch.manual_seed(0)
            model = shard_model(build_model(fmap, cfg), "rowwise_adagrad", lr)
            dense = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(model.named_parameters())], lr=1e-3)
            rate = one_epoch(model, dense, train)
            rows.append((f"fused row-wise Adagrad lr {lr} + Adam 1e-3 on the dense part", rate,
                         classification_metrics(*predict(model, test))))
    print(f"\n{args.model}, one epoch on {args.data} ({train.num_rows:,} train rows, batch {BATCH}); {load_note()}")
    print("| sparse side | samples/s | test AUC | test logloss |")
    print("|---|---:|---:|---:|")
    for name, rate, m in rows:
        print(f"| {name} | {rate:,.0f} | {m['auc']:.5f} | {m['logloss']:.5f} |")


if __name__ == "__main__":
    main()
