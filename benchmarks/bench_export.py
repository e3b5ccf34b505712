"""Exported edge models: file size, batch-1 latency and batch-1024 throughput on one CPU thread.

For each experiment (its run directory must hold a trained baseline and a compression recipe; see
bench_compress.py), exports the baseline and the recipe's last stage (fp32, and the last stage with
int8 tables too) as TorchScript and as ONNX, then times each file in this process on one thread
(``torch.set_num_threads(1)``; onnxruntime with one intra-op thread): batch-1 latency percentiles
over single test rows, and rows/s at batch 1024, all in one run.

Raw rows (what a device hands the file) are timed for both runtimes, and for TorchScript also the
path after the transforms (prepared features and field keys), to show what the transforms cost.

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
from ctr.edge.layout import id_keys, keys_of_ids, vocabulary_keys
from deploy.export import export_model, latency, open_edge, raw_sample
from features.feature_map import FeatureMap
from pipelines.train_job import prepared_data

from _common import WORK, load_note

CONFIGS = [Path("configs/experiments/synthetic_dcnv2_full.yaml"), Path("configs/experiments/synthetic_deepfm_full.yaml")]


def exported(name: str, run_dir: Path, data_dir: Path, fmap: FeatureMap) -> list[tuple]:
    """(name, model, file bytes, raw-row timings, feature timings or None, parity) for the baseline
    (fp32) and the recipe's last stage (fp32, int8), TorchScript first, then the same as ONNX under
    onnxruntime; each file exported, reloaded and timed here. Raw rows: the first 1024 of the raw log,
    as a device hands them (numbers, token keys); features: the test split's dense features and
    field keys, the transforms skipped (TorchScript only: the ONNX graph takes raw rows)."""
    batch = next(iter(ParquetBatches(data_dir / fmap.splits["test"].file, fmap, 1024)))
    numbers, keys = raw_sample(fmap, 1024)
    rows = []
    for runtime, suffix in (("torchscript", "pt"), ("onnx", "onnx")):
        for label, stage, tables in (("baseline", None, "fp32"), ("recipe", "latest", "fp32"), ("recipe", "latest", "int8")):
            path = WORK / "export" / name / f"{label}_{tables}.{suffix}"
            manifest = export_model(run_dir, path, stage, tables, fmt=runtime)
            model, _ = open_edge(path, threads=1)
            features = None
            if runtime == "torchscript":
                misses = [int(manifest["inputs"]["miss_keys"][f.name]) for f in fmap.categorical]
                field_keys = keys_of_ids(batch.ids().numpy(), id_keys(vocabulary_keys(data_dir, fmap), misses))
                features = latency(model.score_features, batch.dense, torch.from_numpy(field_keys))
            rows.append((name, f"{label} ({tables}, {runtime})", path.stat().st_size, latency(model, numbers, keys),
                         features, manifest["parity"]))
    return rows


def export_table(rows: list[tuple]) -> str:
    lines = ["| experiment | model | file bytes | size vs baseline | raw row batch-1 p50 ms | p99 ms | raw rows/s at 1024 | "
             "speed vs baseline | features batch-1 p50 ms | features rows/s at 1024 | parity: max abs diff, AUC diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base: dict[str, tuple[int, float]] = {}
    for name, model, size, raw, features, parity in rows:
        base.setdefault(name, (size, raw["rows_per_s"]))
        feat = f"{features['p50_ms']:.3f} | {features['rows_per_s']:,.0f}" if features else "- | -"
        lines.append(f"| {name} | {model} | {size:,} | {base[name][0] / size:.2f}x smaller | {raw['p50_ms']:.3f} | "
                     f"{raw['p99_ms']:.3f} | {raw['rows_per_s']:,.0f} | {raw['rows_per_s'] / base[name][1]:.2f}x | {feat} | "
                     f"{parity['max_abs_diff']:.1e}, {parity['auc_diff']:+.5f} |")
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
