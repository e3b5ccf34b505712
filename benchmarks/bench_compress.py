"""Compression recipe results on the built-in synthetic dataset: size against AUC, stage by stage.

Trains the experiment's baseline (if its run directory has none), runs its ``compress:`` recipe,
and prints the stage report, test AUC / logloss of the baseline and of the final stage, and, for
row selection, the share of rows kept per field with the generator's pure-noise fields marked.

Usage: python benchmarks/bench_compress.py [--config configs/experiments/synthetic_dnn_optfs.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import polars as pl
import torch

from _common import load_note
from ctr.checkpoint import load_checkpoint
from ctr.compress.recipe import format_report
from ctr.compress.stage import StageContext, plain_model
from ctr.config import load_experiment
from ctr.metrics import classification_metrics
from ctr.train import predict
from features.vocab import OOV_ID
from pipelines.compress_job import run_compress
from pipelines.train_job import prepared_data, run_train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/experiments/synthetic_dnn_optfs.yaml"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    cfg = load_experiment(args.config, ["trainer.progress=false"])
    run_dir = Path(cfg.trainer.run_dir or f"runs/{cfg.name}")
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        run_train(args.config, ["trainer.progress=false"])
    lines = run_compress(args.config, ["trainer.progress=false"])
    data_dir, fmap = prepared_data(cfg)
    ctx = StageContext(cfg, fmap, data_dir, run_dir / "compress")
    last = sorted((run_dir / "compress").glob("*/checkpoint.pt"))[-1]
    test = {name: classification_metrics(*predict(plain_model(fmap, load_checkpoint(path)), ctx.split("test")))
            for name, path in (("baseline", run_dir / "checkpoints" / "best.pt"), (last.parent.name, last))}
    print(f"\n{cfg.name}: compression recipe; {load_note()}")
    print(format_report(lines))
    print("\n| model | test AUC | test logloss | bytes |")
    print("|---|---:|---:|---:|")
    for (name, m), line in zip(test.items(), (lines[0], lines[-1])):
        print(f"| {name} | {m['auc']:.5f} | {m['logloss']:.5f} | {line['bytes']:,} |")
    teacher = Path(fmap.sources[0].path + ".teacher.json")
    noise = set(json.loads(teacher.read_text())["noise"]) if teacher.is_file() else set()
    for line in lines:
        if "kept_rows" not in line:
            continue
        vocab = {f.name: f.num_embeddings for f in fmap.categorical}
        remap = load_checkpoint(run_dir / "compress" / line["stage_id"] / "checkpoint.pt")["model"]["embedding.remap"]
        # kept: the id reads its own row (removed ids read nothing, or the field's OOV row)
        kept_ids = {name: (r >= 0) & ((r != r[OOV_ID]) | (torch.arange(len(r)) == OOV_ID))
                    for name, r in zip(vocab, remap.split(list(vocab.values())))}
        print(f"\n{line['stage_id']}: rows kept per field (* = pure-noise field of the generator); traffic = share "
              f"of the field's train lookups (values seen >= min_count times) whose row is kept")
        print("| field | rows | kept | kept share | traffic kept |")
        print("|---|---:|---:|---:|---:|")
        for name, kept in line["kept_rows"].items():
            counts = pl.read_parquet(data_dir / "vocab" / f"{name}.parquet")
            traffic = float((counts["count"] * kept_ids[name][counts["id"].to_numpy()].numpy()).sum() / counts["count"].sum())
            print(f"| {name}{' *' if name in noise else ''} | {vocab[name]:,} | {kept:,} | {kept / vocab[name]:.1%} | {traffic:.1%} |")
        noise_rows = sum(vocab[n] for n in noise if n in vocab)
        noise_kept = sum(line["kept_rows"][n] for n in noise if n in vocab)
        print(f"\nall fields: {line['rows_after']:,} of {line['rows_before']:,} rows kept "
              f"({1 - line['rows_after'] / line['rows_before']:.1%} removed); noise fields: "
              f"{1 - noise_kept / max(noise_rows, 1):.1%} of their {noise_rows:,} rows removed")


if __name__ == "__main__":
    main()
