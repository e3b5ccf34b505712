"""Batch loader throughput against the training step it feeds (the loader must be >= 5x faster).

The training step is a representative CTR step: a TorchRec EmbeddingBagCollection over every field
(dim 16), planned by DistributedModelParallel (world size 1, gloo) so the tables train through the
fused fbgemm row-wise Adagrad kernel, a [400, 400, 400] ReLU tower and Adam on the dense part,
batch 4096, one intra-op thread (the setting that shares two cores without oversubscription).

Usage: python benchmarks/bench_loader.py [--rows 1000000] [--steps 30]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from _common import WORK, criteo_raw, load_note
from features.feature_map import FeatureMap
from features.loader import Batch, ParquetBatches
from features.prepare import prepare
from features.schema import DatasetConfig

BATCH = 4096
DIM = 16


def prepared(rows: int) -> Path:
    out = WORK / f"prepared_{rows}"
    if not (out / "feature_map.json").exists():
        prepare(DatasetConfig(name="bench", layout="criteo_tsv", output=str(out), min_count=10), raw=[criteo_raw(rows)])
    return out


class TowerModel(nn.Module):
    def __init__(self, fmap: FeatureMap) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        tables = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=DIM, num_embeddings=f.num_embeddings,
                                     feature_names=[f.name]) for f in fmap.categorical]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        width = DIM * len(tables) + len(fmap.dense)
        layers: list[nn.Module] = []
        for out in (400, 400, 400):
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.tower = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.ebc(batch.sparse).values()
        return self.tower(torch.cat([emb, batch.dense], 1)).squeeze(1)


def train_step_rate(fmap: FeatureMap, batches: list[Batch], steps: int) -> float:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    with tempfile.NamedTemporaryFile() as rendezvous:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{rendezvous.name}")
        try:
            model = TowerModel(fmap)
            apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.01})
            model = DistributedModelParallel(model, device=torch.device("cpu"))
            dense = torch.optim.Adam([p for n, p in model.named_parameters() if "ebc" not in n], lr=1e-3)
            loss_fn = nn.BCEWithLogitsLoss()

            def step(b: Batch) -> None:
                dense.zero_grad()
                loss_fn(model(b), b.labels).backward()
                dense.step()

            for b in batches[:3]:
                step(b)
            started = time.perf_counter()
            for i in range(steps):
                step(batches[i % len(batches)])
            return steps * BATCH / (time.perf_counter() - started)
        finally:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the planner and fbgemm log dozens of lines per table
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = prepared(args.rows)
    fmap = FeatureMap.load(out)
    loader = ParquetBatches(out / "train.parquet", fmap, BATCH, shuffle=True, seed=1, drop_last=True)
    started = time.perf_counter()
    batches = list(loader)
    loader_rate = len(batches) * BATCH / (time.perf_counter() - started)
    train_rate = train_step_rate(fmap, batches[:8], args.steps)
    print(f"\nbatch loader vs training step (batch {BATCH}, 1 thread, {len(fmap.categorical)} fields x dim {DIM}); {load_note()}")
    print("| stage | rows/s | ms per batch |")
    print("|---|---:|---:|")
    print(f"| loader: Parquet -> KJT + dense + labels, shuffled, one epoch | {loader_rate:,.0f} | {1000 * BATCH / loader_rate:.1f} |")
    print(f"| training step (baseline): EBC fused row-wise Adagrad + [400,400,400] MLP + Adam | {train_rate:,.0f} | {1000 * BATCH / train_rate:.1f} |")
    print(f"\nloader / training step: {loader_rate / train_rate:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
