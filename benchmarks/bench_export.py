"""Exported edge models: file size, batch-1 latency and batch-1024 throughput on one CPU thread.

For each experiment (its run directory must hold a trained baseline and a compression recipe; see
bench_compress.py), exports the baseline and the recipe's last stage (fp32, and the last stage with
int8 tables too) as TorchScript and as ONNX, then times each file in this process on one thread
(``torch.set_num_threads(1)``; onnxruntime with one intra-op thread): batch-1 latency percentiles
over single test rows, and rows/s at batch 1024, all in one run.

Usage: python benchmarks/bench_export.py [--config configs/experiments/synthetic_dcnv2_full.yaml ...]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

from ctr.experiment import load_experiment
from ctr.loader import ParquetBatches
from deploy.export import export_model, latency, load_edge
from features.feature_map import FeatureMap
from pipelines.train_job import prepared_data

from _common import WORK, load_note

CONFIGS = [Path("configs/experiments/synthetic_dcnv2_full.yaml"), Path("configs/experiments/synthetic_deepfm_full.yaml")]


def exported(name: str, run_dir: Path, data_dir: Path, fmap: FeatureMap) -> list[tuple]:
    """(name, model, file bytes, batch-1 p50 ms, p99 ms, batch-1024 rows/s, parity) for the baseline
    (fp32) and the recipe's last stage (fp32, int8), TorchScript first, then the same as ONNX under
    onnxruntime; each file exported, reloaded and timed here."""
    batch = next(iter(ParquetBatches(data_dir / fmap.splits["test"].file, fmap, 1024)))
    dense, ids = batch.dense, batch.ids()
    rows = []
    for runtime, suffix in (("torchscript", "pt"), ("onnx", "onnx")):
        for label, stage, tables in (("baseline", None, "fp32"), ("recipe", "latest", "fp32"), ("recipe", "latest", "int8")):
            path = WORK / "export" / name / f"{label}_{tables}.{suffix}"
            manifest = export_model(run_dir, path, stage, tables, fmt=runtime)
            t = latency(load_edge(path, threads=1), dense, ids)
            rows.append((name, f"{label} ({tables}, {runtime})", path.stat().st_size, t["p50_ms"], t["p99_ms"],
                         t["rows_per_s"], manifest["parity"]))
    return rows


def export_table(rows: list[tuple]) -> str:
    lines = ["| experiment | model | file bytes | size vs baseline | batch-1 p50 ms | batch-1 p99 ms | batch-1024 rows/s | "
             "speed vs baseline | parity: max abs diff, AUC diff |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    base: dict[str, tuple[int, float]] = {}
    for name, model, size, p50, p99, rate, parity in rows:
        base.setdefault(name, (size, rate))
        lines.append(f"| {name} | {model} | {size:,} | {base[name][0] / size:.2f}x smaller | {p50:.3f} | {p99:.3f} | "
                     f"{rate:,.0f} | {rate / base[name][1]:.2f}x | {parity['max_abs_diff']:.1e}, {parity['auc_diff']:+.5f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, nargs="+", default=CONFIGS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for config in args.config:
        cfg = load_experiment(config)
        data_dir, fmap = prepared_data(cfg)
        rows += exported(cfg.name, Path(cfg.trainer.run_dir or f"runs/{cfg.name}"), data_dir, fmap)
    print(f"\nExported models, 1 thread; {load_note()}")
    print(export_table(rows))


if __name__ == "__main__":
    main()
