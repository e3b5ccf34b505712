"""Compression recipes on the built-in synthetic dataset: size against test AUC, stage by stage.

For each experiment: trains its baseline (if the run directory has none), runs its ``compress:``
recipe (stages already done are reused), scores the baseline and every stage on the test split, and
prints one table over all of them, each row against the per-field baseline of the same model; then,
per stage, what it did: rows kept (OptFS), widths chosen (OptEmbed), ranks (AFM), with the
generator's pure-noise fields marked. An experiment without stages (e.g. Unified Embedding) is one
trained row.

Usage: python benchmarks/bench_compress.py [--suite optembed|afm|all] [--config A.yaml ...]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import StageContext, model_size, plain_model
from ctr.experiment import load_experiment
from ctr.metrics import classification_metrics, delong_test
from ctr.run_dir import RunDir, StageDir
from ctr.train import predict
from features.feature_map import FeatureMap
from features.vocab import OOV_ID
from pipelines.compress_job import run_compress
from pipelines.synthetic import read_teacher
from pipelines.train_job import prepared_data, run_dir_of, run_train

from _common import load_note

EXPERIMENTS = Path("configs/experiments")
SUITES = {
    # OptEmbed alone, and OptFS -> OptEmbed (which shares its run directory and OptFS stage with synthetic_dnn_optfs)
    "optembed": ["synthetic_dnn_optembed", "synthetic_dnn_optfs_optembed"],
    # per model: the full recipe (its stages give the OptFS and OptEmbed rows), AFM alone, Unified Embedding
    "afm": [f"synthetic_{m}_{kind}" for m in ("dcnv2", "deepfm") for kind in ("full", "afm", "unified")],
}
QUIET = ["trainer.progress=false"]


def kept_rows_table(line: dict[str, Any], stage_dir: Path, fmap: FeatureMap, data_dir: Path, noise: set[str]) -> None:
    vocab = {f.name: f.num_embeddings for f in fmap.categorical}
    remap = load_checkpoint(stage_dir / "checkpoint.pt")["model"]["embedding.remap"]
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
    print(f"\nall fields: {line['rows_after']:,} of {line['rows_before']:,} rows kept "
          f"({1 - line['rows_after'] / line['rows_before']:.1%} removed); noise fields: "
          f"{noise_share_removed(line, noise, vocab):.1%} of their {sum(vocab[n] for n in noise if n in vocab):,} rows removed")


def noise_share_removed(line: dict[str, Any], noise: set[str], vocab: dict[str, int]) -> float:
    """The share of the pure-noise fields' rows (``vocab``: rows per field) that an OptFS stage removed."""
    fields = [n for n in noise if n in vocab]
    return 1 - sum(line["kept_rows"][n] for n in fields) / max(sum(vocab[n] for n in fields), 1)


def widths_table(line: dict[str, Any], noise: set[str]) -> None:
    widths = line["widths"]
    print(f"\n{line['stage_id']}: widths found (* = pure-noise field); search {line['search_seconds']:.0f} s on "
          f"{line['search_rows']:,} cached validation rows, search AUC {line['search_auc']:.5f}; rows kept "
          f"{line['rows_after']:,} of {line['rows_before']:,}")
    print("| field | width | rows kept |")
    print("|---|---:|---:|")
    for name, w in widths.items():
        print(f"| {name}{' *' if name in noise else ''} | {w} | {line['kept_rows'][name]:,} |")
    rows = line["kept_rows"]
    noisy, informative = [n for n in widths if n in noise], [n for n in widths if n not in noise]
    mean = lambda names: sum(widths[n] for n in names) / max(len(names), 1)  # noqa: E731
    weighted = lambda names: sum(widths[n] * rows[n] for n in names) / max(sum(rows[n] for n in names), 1)  # noqa: E731
    print(f"\nmean width per field: noise fields {mean(noisy):.2f}, other fields {mean(informative):.2f}; "
          f"per row kept (what the widths cost): noise fields {weighted(noisy):.2f}, other fields {weighted(informative):.2f}")


def afm_table(line: dict[str, Any]) -> None:
    after = line.get("valid_auc_after_finetune")
    print(f"\n{line['stage_id']}: factorised layers (path: rank) {line['factorized']}; embedding ranks "
          f"{line['embedding_ranks']}; valid AUC {line['valid_auc_before_finetune']:.5f} before fine-tuning"
          + (f", {after:.5f} after ({'kept' if line['finetuned_kept'] else 'not kept'})" if after is not None else ""))


def trained_line(fmap: FeatureMap, data: Path, path: Path) -> dict[str, Any]:
    params, parts = model_size(fmap, data, plain_model(fmap, load_checkpoint(path)))
    return {"stage_id": "trained", "stage": "baseline", "parameters": params, "bytes": sum(parts.values()),
            "embedding_bytes": parts["embedding tables"] + parts["vocabulary"]}


def measure(config: Path, overrides: list[str]) -> tuple[list[tuple], list]:
    """Train (if needed) and compress one experiment; (cfg, stage line, test metrics) per stage, and
    the per-stage detail printers."""
    cfg = load_experiment(config, overrides)
    run = RunDir(run_dir_of(cfg))
    if not run.best.is_file():
        run_train(config, overrides)
    data_dir, fmap = prepared_data(cfg)
    ctx = StageContext(cfg, fmap, data_dir, StageDir(run.compress))
    best = run.best
    lines = run_compress(config, overrides) if cfg.compress.stages else [trained_line(fmap, data_dir, best)]
    teacher = read_teacher(Path(fmap.sources[0].path))
    noise = set(teacher["noise"]) if teacher is not None else set()
    rows, details = [], []
    for line in lines:
        path = best if line["stage"] == "baseline" else StageDir(run.compress / line["stage_id"]).checkpoint
        labels, probs = predict(plain_model(fmap, load_checkpoint(path)), ctx.split("test"))
        rows.append((cfg, line, {**classification_metrics(labels, probs), "scores": (labels, probs)}))
        if line["stage"] == "optfs" and "kept_rows" in line:
            details.append(lambda line=line, fmap=fmap, d=data_dir, n=noise, p=path.parent:
                           kept_rows_table(line, p, fmap, d, n))
        elif line["stage"] == "optembed" and "widths" in line:
            details.append(lambda line=line, n=noise: widths_table(line, n))
        elif line["stage"] == "afm" and "factorized" in line:
            details.append(lambda line=line: afm_table(line))
    return rows, details


def size_auc_table(rows: list[tuple]) -> str:
    """Every stage's size and test AUC against the per-field baseline of the same model, with the
    DeLong test of the two on the same test rows."""
    lines = ["| model | experiment | stage | embedding bytes | total bytes | total vs baseline | "
             "test AUC | AUC - baseline | DeLong p | test logloss |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    reference: dict[str, tuple[int, dict[str, Any]]] = {}
    for cfg, line, test in rows:
        if line["stage"] == "baseline" and cfg.model.embedding.kind == "per_field":
            reference.setdefault(cfg.model.name, (line["bytes"], test))
    for cfg, line, test in rows:
        base_bytes, base = reference.get(cfg.model.name, (line["bytes"], test))
        labels, probs = test["scores"]
        p = "" if test is base else f"{delong_test(labels, probs, base['scores'][1])['p_value']:.2g}"
        stage = line["stage_id"] if cfg.model.embedding.kind == "per_field" else f"trained ({cfg.model.embedding.kind})"
        lines.append(f"| {cfg.model.name} | {cfg.name} | {stage} | {line['embedding_bytes']:,} | {line['bytes']:,} | "
                     f"{base_bytes / line['bytes']:.2f}x smaller | {test['auc']:.5f} | {test['auc'] - base['auc']:+.5f} | "
                     f"{p} | {test['logloss']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--config", type=Path, nargs="+", help="experiment files instead of a suite")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    names = [n for suite, ns in SUITES.items() if args.suite in (suite, "all") for n in ns]
    rows, details = [], []
    for config in args.config or [EXPERIMENTS / f"{n}.yaml" for n in names]:
        more_rows, more_details = measure(config, QUIET)
        rows += more_rows
        details += more_details
    print(f"\nTest split, every stage, against the per-field baseline of the same model; {load_note()}")
    print(size_auc_table(rows))
    for show in details:
        show()


if __name__ == "__main__":
    main()
