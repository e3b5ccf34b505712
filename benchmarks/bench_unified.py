"""Unified Embedding against per-field hashing at equal size, and the full per-field tables.

DCNv2 (BARS settings, one epoch) on the built-in 1M-row synthetic dataset: per-field exact tables,
then unified (one shared table, feature multiplexing) and per-field hashing, each at 1/4, 1/16 and
1/64 of the per-field embedding parameter count. The paper's claim to check: unified beats per-field
hashing at equal size, and the gap grows as the size shrinks.

Usage: python benchmarks/bench_unified.py [--config configs/experiments/synthetic_dcnv2.yaml] [--fractions 4 16 64]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import warnings
from pathlib import Path

from ctr.distributed import embedding_collections
from ctr.experiment import load_experiment
from ctr.models import build_model
from pipelines.train_job import prepared_data, run_train

from _common import WORK, load_note


def embedding_params(config: Path, overrides: list[str]) -> int:
    cfg = load_experiment(config, overrides)
    _, fmap = prepared_data(cfg)
    model = build_model(fmap, cfg.model)
    return sum(t.num_embeddings * t.embedding_dim for ebc in embedding_collections(model) for t in ebc.embedding_bag_configs())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/experiments/synthetic_dcnv2.yaml"))
    parser.add_argument("--fractions", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    cfg = load_experiment(args.config)
    full = embedding_params(args.config, [])
    rows_full = full // cfg.model.embedding.dim
    variants = [("per-field tables", "full", [])]
    for frac in args.fractions:
        for kind in ("unified", "hashed"):
            variants.append((f"{kind} 1/{frac}", f"{kind}_{frac}",
                             [f"model.embedding.kind={kind}", f"model.embedding.num_rows={rows_full // frac}"]))
    results = []
    for label, tag, overrides in variants:
        run_dir = WORK / "unified" / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [*overrides, f"trainer.run_dir={run_dir}", "trainer.progress=false"]
        params = embedding_params(args.config, overrides)
        result = run_train(args.config, overrides)
        results.append((label, params, result["test_auc"], result["test_logloss"]))
        print(f"{label}: {params:,} params, test AUC {result['test_auc']:.5f}", flush=True)
    print(f"\n{cfg.name}: embedding size vs test AUC after one epoch; {load_note()}")
    print("| embeddings | parameters | MB (fp32) | test AUC | test logloss |")
    print("|---|---:|---:|---:|---:|")
    for label, params, auc, ll in results:
        print(f"| {label} | {params:,} | {params * 4 / 2**20:.2f} | {auc:.5f} | {ll:.5f} |")
    by = {label: auc for label, _, auc, _ in results}
    gaps = ", ".join(f"1/{f}: {by[f'unified 1/{f}'] - by[f'hashed 1/{f}']:+.5f}" for f in args.fractions)
    print(f"\nunified minus per-field hashing AUC at equal size: {gaps}")


if __name__ == "__main__":
    main()
