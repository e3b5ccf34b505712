"""Every benchmark, ours beside FuxiCTR 2.3.10, on one generated dataset; writes benchmarks/RESULTS.md.

One command (``make bench``): generates (once) N Criteo-format rows, then in this order, with
nothing else meant to run on the machine:
  1. prepare: our streaming prepare vs FuxiCTR's preprocessing, wall time and peak memory of each
     process tree, from the same raw rows (FuxiCTR reads them as headed CSV splits, written first);
  2. training: DNN and DCNv2 (emb 16, batch 4096, MLP [400, 400, 400], 3 cross layers, Adam 1e-3 on
     the dense part, 1 epoch), samples/s of the training loop and test AUC, each side's own loop;
     then both again validating every 20 steps: time to FuxiCTR's 1-epoch validation AUC;
  3. large vocabulary: the same DCNv2 with every table grown to >= 20M rows in total;
  4. the machine limit: fp32 matmul FLOP/s for the models' Linear shapes, and each side's fraction;
  5. compression: the DCNv2 full recipe (OptFS -> OptEmbed -> AFM) from step 2's baseline, and
     Unified Embedding, size against test AUC;
  6. the recipe's model against its baseline: training step rate, and exported size and latency.
Every number in RESULTS.md comes from this run; _work/results_N/results.json keeps them all.

Usage: python benchmarks/run_all.py [--rows 1000000] [--big-rows 20000000] [--peer-steps 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import Any

import polars as pl
import torch
from peer_env import peer_python

from common.atomic import atomic_write_text
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import plain_model
from ctr.distributed import local_process_group
from ctr.experiment import load_experiment
from ctr.loader import ParquetBatches
from ctr.models import build_model
from ctr.run_dir import RunDir
from ctr.train import Trainer, default_threads
from features.feature_map import FeatureMap
from features.parse import ROW
from features.schema import SplitConfig
from features.split import SPLITS, split_expr
from pipelines.train_job import prepared_data, run_train

from _common import WORK, criteo_raw, load_note, run_measured
from bench_compress import measure, size_auc_table
from bench_export import export_table, exported
from bench_train import BATCH, grown, linear_shapes, matmul_rate, model_flops_per_sample, step_rate

HERE = Path(__file__).parent
PEER = HERE / "peer_fuxictr.py"
EXPERIMENTS = Path("configs/experiments")
MODELS = {"dnn": "synthetic_dnn", "dcnv2": "synthetic_dcnv2_full"}  # the DCNv2 run is the recipe's baseline
AUC_TOLERANCE = 0.0005  # "equal" test AUC: within this of the peer's (seed-to-seed spread is about 0.001)
LOOP_TARGET = 1.3  # our training loop's samples/s against FuxiCTR's
MATMUL_TARGET = 0.85  # achieved model FLOP/s against the matmul rate of the same shapes
EVAL_EVERY = 20  # steps between validations in the time-to-AUC runs (about 10 per epoch at 1M rows)
TIME_TARGET = 0.5  # our time to FuxiCTR's 1-epoch validation AUC, in FuxiCTR epochs
SCALE_TITLE = "## Scale"  # bench_scale.py's section; it and what follows it (bench_frontier.py's) end RESULTS.md


@dataclass
class Report:
    """Markdown sections and the raw numbers behind them, written as they come (a crash keeps what was done)."""

    out: Path
    raw_numbers: Path
    sections: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    targets: list[tuple[str, str, bool]] = field(default_factory=list)

    def add(self, title: str, body: str) -> None:
        self.sections.append(f"## {title}\n\n{body}\n\n_{load_note()} after this section._")
        print(f"\n## {title}\n\n{body}", flush=True)

    def target(self, what: str, measured: str, met: bool) -> None:
        self.targets.append((what, measured, met))

    def splice(self, note: str) -> None:
        """Put this run's sections and targets in place of their namesakes in the results file,
        keeping every other section and target as it was (a run of some sections: ``--only``)."""
        text = self.out.read_text()
        for section in self.sections:
            title = section.split("\n", 1)[0]
            body = section.replace("\n\n", f"\n\n{note}\n\n", 1) + "\n"
            start = text.find(title + "\n")
            if start < 0:  # a section the last full run did not reach: before the Scale section
                at = text.find(SCALE_TITLE)
                text = text[:at] + body + "\n" + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + body
                continue
            end = text.find("\n## ", start + 1)
            text = text[:start] + body + (text[end:] if end >= 0 else "")
        kinds = {what.split(":", 1)[0] for what, _, _ in self.targets}
        lines = text.split("\n")
        stale = [i for i, line in enumerate(lines) if any(line.startswith(f"| {k}:") for k in kinds)]
        fresh = [f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in self.targets]
        at = stale[0] if stale else lines.index("|---|---|---|") + 1
        lines = [line for i, line in enumerate(lines) if i not in stale]
        text = "\n".join(lines[:at] + fresh + lines[at:])
        atomic_write_text(self.out, text)

    def write(self, header: str) -> None:
        table = ["| target | measured | met |", "|---|---|---|"] + [
            f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in self.targets]
        text = "\n\n".join([header, "## Targets\n\n" + "\n".join(table), *self.sections]) + "\n"
        previous = self.out.read_text() if self.out.exists() else ""
        if SCALE_TITLE in previous:  # the Scale and Frontier sections (the file's last) are kept as they were
            text += "\n" + previous[previous.index(SCALE_TITLE):]
        atomic_write_text(self.out, text)
        atomic_write_text(self.raw_numbers, json.dumps(self.numbers, indent=2, default=str))


def peer(python: Path, log: Path, *args: str) -> tuple[float, float, dict[str, Any]]:
    seconds, peak, out = run_measured([str(python), str(PEER), *args], log=log)
    # the result is the last JSON line: Ray may print to stdout too
    result = next((line for line in reversed(out.splitlines()) if line.startswith("{")), None)
    if result is None:
        raise RuntimeError(f"FuxiCTR {args[0]} printed no result; stdout:\n{out[-2000:]}\nstderr: {log}")
    return seconds, peak, json.loads(result)


def headed_csv_splits(raw: Path, out: Path, split: SplitConfig) -> None:
    """The raw rows as FuxiCTR reads them (CSV with a header), each in the split our prepare gives it."""
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    df = pl.read_csv(raw, separator="\t", has_header=False, new_columns=names, infer_schema=False, quote_char=None)
    which = df.with_row_index(ROW).select(split_expr(split, df.height)).to_series()
    out.mkdir(parents=True, exist_ok=True)
    for s_id, name in enumerate(SPLITS):
        df.filter(which == s_id).write_csv(out / f"{name}.csv")


def machine() -> str:
    """CPU model and the vector flags the ratios depend on (AVX2, AVX-512, AMX), cores, memory, kernel."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f in flags]
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return (f"{cpu} (flags: {', '.join(vector) or 'no AVX2'}; {'with' if 'avx512f' in flags else 'without'} AVX-512), "
            f"{os.cpu_count()} CPUs, {mem / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}")


def versions(python: Path) -> str:
    ours = ", ".join(f"{m} {import_module(m).__version__}" for m in ("torch", "torchrec", "fbgemm_gpu", "polars", "pyarrow", "ray"))
    code = ("from importlib import import_module as i; "
            "print(', '.join(f'{m} {i(m).__version__}' for m in ('fuxictr', 'torch', 'polars', 'pyarrow', 'ray')))")
    _, _, theirs = run_measured([str(python), "-c", code])
    return f"- ours: Python {platform.python_version()}, {ours}\n- peer venv: {theirs.strip()}"


def prepare_section(rep: Report, args: argparse.Namespace, raw: Path, dirs: dict[str, Path], python: Path) -> None:
    cfg = load_experiment(EXPERIMENTS / "synthetic_dnn.yaml", args.overrides)
    ctr = Path(sys.executable).parent / "ctr"  # the user's command, process start included
    dataset = [o for o in args.overrides if o.startswith("dataset.")]
    ours_s, ours_mb, printed = run_measured([str(ctr), "prepare", str(EXPERIMENTS / "synthetic_dnn.yaml"), *dataset],
                                      log=dirs["logs"] / "prepare_ours.log")
    headed_csv_splits(raw, dirs["csv"], cfg.dataset.split)
    peer_s, peer_mb, _ = peer(python, dirs["logs"] / "prepare_fuxictr.log", "prepare", "--csv-dir", str(dirs["csv"]),
                              "--out", str(dirs["fuxictr"]), "--min-count", str(cfg.dataset.min_count))
    rows = args.rows
    rep.numbers["prepare"] = {"ours": {"seconds": ours_s, "peak_mb": ours_mb}, "fuxictr": {"seconds": peer_s, "peak_mb": peer_mb}}
    speed, memory = peer_s / ours_s, ours_mb / peer_mb
    rep.target("prepare: >= 20x FuxiCTR's rows/s", f"{speed:.1f}x", speed >= 20)
    rep.target("prepare: <= 1/8 of FuxiCTR's peak memory", f"{memory:.3f} of it (1/{1 / memory:.1f})", memory <= 0.125)
    rep.add("Prepare", "\n".join([
        f"Raw Criteo TSV, {rows:,} rows ({raw.stat().st_size / 1e6:.0f} MB), min count {cfg.dataset.min_count}, "
        "I1-I13 log-squared buckets, order split 8:1:1, to Parquet splits + vocabularies. Peak memory: the "
        "largest sum of PSS over the process tree (Ray's processes and object store included), sampled every 0.2 s.",
        "", "| system | seconds | rows/s | peak memory MB |", "|---|---:|---:|---:|",
        f"| ours (`ctr prepare`) | {ours_s:.1f} | {rows / ours_s:,.0f} | {ours_mb:,.0f} |",
        f"| FuxiCTR `build_dataset` | {peer_s:.1f} | {rows / peer_s:,.0f} | {peer_mb:,.0f} |",
        "", f"Ours: {speed:.1f}x the rows/s at {memory:.3f} of the peak memory. FuxiCTR's time excludes writing its "
        "headed CSV input (done before the clock starts); each side's time includes its process start. "
        f"Where our time went (`ctr prepare` prints it): {printed.strip().splitlines()[-1]}; the rest is "
        "process start and imports."]))


def bench_data(args: argparse.Namespace) -> tuple[Path, FeatureMap]:
    """The prepared splits of the benchmark's dataset (written by the prepare section)."""
    return prepared_data(load_experiment(EXPERIMENTS / "synthetic_dnn.yaml", args.overrides))


def dense_parameters(rep: Report, args: argparse.Namespace) -> None:
    _, fmap = bench_data(args)
    args.train_rows = fmap.splits["train"].rows
    rep.numbers["dense_params"] = {}
    for model, name in MODELS.items():
        net = build_model(fmap, load_experiment(EXPERIMENTS / f"{name}.yaml").model)
        rep.numbers["dense_params"][model] = sum(p.numel() for k, p in net.named_parameters() if not k.startswith("embedding."))


def train_ours(args: argparse.Namespace, name: str) -> dict[str, Any]:
    return run_train(EXPERIMENTS / f"{name}.yaml", [*args.overrides, f"trainer.run_dir={args.runs / name}"])


def training_section(rep: Report, args: argparse.Namespace, dirs: dict[str, Path], python: Path) -> None:
    lines = ["| model | system | dense parameters | samples/s | test AUC | test logloss | loop seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, name in MODELS.items():
        ours = train_ours(args, name)
        _, _, theirs = peer(python, dirs["logs"] / f"train_{model}_fuxictr.log", "train", "--data",
                            str(dirs["fuxictr"]), "--model", model, "--batch", str(BATCH))
        rep.numbers[f"train_{model}"] = {"ours": ours, "fuxictr": theirs}
        dense = rep.numbers["dense_params"][model]
        lines += [f"| {model} | ours | {dense:,} | {ours['train_samples_per_s']:,.0f} | {ours['test_auc']:.5f} | "
                  f"{ours['test_logloss']:.5f} | {args.train_rows / ours['train_samples_per_s']:.1f} |",
                  f"| {model} | FuxiCTR | {theirs['dense_params']:,} | {theirs['samples_per_s']:,.0f} | "
                  f"{theirs['test_auc']:.5f} | {theirs['test_logloss']:.5f} | {theirs['loop_seconds']:.1f} |"]
        ratio = ours["train_samples_per_s"] / theirs["samples_per_s"]
        delta = ours["test_auc"] - theirs["test_auc"]
        rep.target(f"training {model}: >= {LOOP_TARGET}x FuxiCTR's loop samples/s at equal or better test AUC",
                   f"{ratio:.2f}x, AUC {delta:+.5f}", ratio >= LOOP_TARGET and delta >= -AUC_TOLERANCE)
    rep.add("Training, small vocabulary", "\n".join([
        f"1 epoch over {args.train_rows:,} train rows, batch {BATCH}, embedding 16, MLP [400, 400, 400] (DCNv2: 3 full-rank "
        f"cross layers beside it), Adam lr 1e-3 on the dense part, gradient clipping 10, {default_threads()} threads, "
        "best-on-validation weights scored on the test split. Embeddings: ours fbgemm's fused row-wise Adagrad "
        "(lr 0.05, the only fused optimizer on CPU), FuxiCTR dense `nn.Embedding` under the same Adam as the rest. "
        "samples/s: the training loop alone (data loading and steps; validation and checkpoints excluded), each "
        "side with its own loader (ours: Parquet batches read between steps; FuxiCTR: Ray Data).",
        "", *lines, "", f"Equal AUC means within {AUC_TOLERANCE} of the peer's (one seed each)."]))


def first_reaching(points: list[dict[str, float]], auc: float) -> float | None:
    """Loop seconds at the first validation with AUC >= ``auc`` (None if none)."""
    return next((p["loop_seconds"] for p in points if p["auc"] >= auc), None)


def auc_at(points: list[dict[str, float]], seconds: float) -> float | None:
    """The AUC of the last validation at or before ``seconds`` of loop time (None if none yet)."""
    return next((p["auc"] for p in reversed(points) if p["loop_seconds"] <= seconds), None)


def time_to_auc_section(rep: Report, args: argparse.Namespace, dirs: dict[str, Path], python: Path) -> None:
    lines, curves = [], []
    for model, name in MODELS.items():
        done = rep.numbers[f"train_{model}"]["fuxictr"]
        goal, epoch = done["valid_auc"], done["loop_seconds"]
        run_dir = args.runs / f"{name}_every_{EVAL_EVERY}"
        run_train(EXPERIMENTS / f"{name}.yaml", [*args.overrides, f"trainer.run_dir={run_dir}",
                                                  f"trainer.eval_every_steps={EVAL_EVERY}"])
        ours = [p for p in read_json_lines(RunDir(run_dir).metrics) if p["event"] == "valid"]
        _, _, theirs = peer(python, dirs["logs"] / f"time_to_auc_{model}_fuxictr.log", "train", "--data",
                            str(dirs["fuxictr"]), "--model", model, "--batch", str(BATCH), "--eval-steps", str(EVAL_EVERY))
        theirs = theirs["timeline"]
        rep.numbers[f"time_to_auc_{model}"] = {"goal_auc": goal, "fuxictr_epoch_seconds": epoch, "ours": ours, "fuxictr": theirs}
        ours_s, theirs_s = first_reaching(ours, goal), first_reaching(theirs, goal)
        fraction = None if ours_s is None else ours_s / epoch
        rep.target(f"training {model}: time to FuxiCTR's 1-epoch validation AUC <= {TIME_TARGET}x its epoch time",
                   "not reached in 1 epoch" if fraction is None else f"{fraction:.2f}x", fraction is not None and fraction <= TIME_TARGET)
        show = lambda x: "not by its last validation" if x is None else f"{x:.1f} s ({x / epoch:.2f} of its epoch)"  # noqa: E731
        lines.append(f"| {model} | {goal:.5f} | {epoch:.1f} | {show(ours_s)} | {show(theirs_s)} |")
        for p in theirs:
            at = auc_at(ours, p["loop_seconds"])
            curves.append(f"| {model} | {p['loop_seconds']:.1f} | {p['auc']:.5f} | {'-' if at is None else f'{at:.5f}'} |")
    rep.add("Time to AUC", "\n".join([
        f"Both sides validate every {EVAL_EVERY} steps (each with its own early stopping and learning-rate decay on "
        "plateau, as a user would run it); times are loop seconds (training steps and data loading, validations "
        "excluded) on the same data and batch size as above. The goal is FuxiCTR's validation AUC after its 1-epoch "
        "run above; FuxiCTR's epoch is that run's loop time. FuxiCTR validates only at multiples of the interval, so "
        "its last validation comes before the epoch's last steps.", "",
        "| model | goal: FuxiCTR's 1-epoch validation AUC | FuxiCTR epoch, s | ours reach it at | FuxiCTR (validating "
        f"every {EVAL_EVERY} steps) reaches it at |", "|---|---:|---:|---:|---:|", *lines, "",
        "Validation AUC at equal loop time: at each of FuxiCTR's validations, ours is our last validation at or "
        "before that time.", "", "| model | loop seconds | FuxiCTR | ours |", "|---|---:|---:|---:|", *curves]))


def large_vocab_section(rep: Report, args: argparse.Namespace, dirs: dict[str, Path], python: Path) -> None:
    cfg = load_experiment(EXPERIMENTS / f"{MODELS['dcnv2']}.yaml", [*args.overrides, f"trainer.run_dir={args.runs / 'dcnv2_large'}"])
    data_dir, fmap = prepared_data(cfg)
    big = grown(fmap, args.big_rows)
    torch.set_num_threads(default_threads())
    ours = Trainer(cfg, big, data_dir, args.runs / "dcnv2_large").fit()
    shutil.rmtree(RunDir(args.runs / "dcnv2_large").checkpoints, ignore_errors=True)  # 2 x 1.3 GB of grown tables
    _, _, theirs = peer(python, dirs["logs"] / "train_dcnv2_large_fuxictr.log", "train", "--data", str(dirs["fuxictr"]),
                        "--model", "dcnv2", "--grow-rows", str(args.big_rows), "--steps", str(args.peer_steps))
    rows = sum(f.num_embeddings for f in big.categorical)
    small = rep.numbers["train_dcnv2"]
    rep.numbers["train_dcnv2_large"] = {"ours": ours, "fuxictr": theirs, "embedding_rows": rows}
    ratio = ours["train_samples_per_s"] / theirs["samples_per_s"]
    rep.target(f"training DCNv2, {rows / 1e6:.0f}M embedding rows: >= 2x FuxiCTR's samples/s", f"{ratio:.1f}x", ratio >= 2)
    rep.add("Training, large vocabulary", "\n".join([
        f"The same DCNv2 with every table grown to {rows:,} rows in total (the data's ids stay in the original rows). "
        f"Ours: the full epoch, as in the table above. FuxiCTR: {args.peer_steps} steps of its training loop after 3 "
        "warm-up steps (its dense Adam reads and writes all rows every step, so an epoch would take "
        f"about {args.train_rows / theirs['samples_per_s'] / 60:.0f} min).",
        "", "| system | embedding rows | samples/s | vs the small vocabulary |", "|---|---:|---:|---:|",
        f"| ours | {rows:,} | {ours['train_samples_per_s']:,.0f} | "
        f"{ours['train_samples_per_s'] / small['ours']['train_samples_per_s']:.2f}x |",
        f"| FuxiCTR | {theirs['embedding_rows']:,} | {theirs['samples_per_s']:,.0f} | "
        f"{theirs['samples_per_s'] / small['fuxictr']['samples_per_s']:.2f}x |",
        "", f"Ours: {ratio:.1f}x FuxiCTR's samples/s; our test AUC with the grown tables {ours['test_auc']:.5f}."]))


def limit_section(rep: Report, args: argparse.Namespace) -> None:
    data_dir, fmap = bench_data(args)
    started = time.perf_counter()
    loaded = sum(b.size for b in ParquetBatches(data_dir / fmap.splits["train"].file, fmap, BATCH, shuffle=True, seed=1))
    loader_rate = loaded / (time.perf_counter() - started)
    rep.numbers["loader_samples_per_s"] = loader_rate
    lines = ["| model | MFLOP/sample (Linear, fwd + bwd) | matmul GFLOP/s, same shapes | system | samples/s | "
             "achieved GFLOP/s | fraction |", "|---|---:|---:|---|---:|---:|---:|"]
    torch.set_num_threads(default_threads())
    for model, name in MODELS.items():
        shapes = linear_shapes(build_model(fmap, load_experiment(EXPERIMENTS / f"{name}.yaml").model))
        flops, peak = model_flops_per_sample(shapes), matmul_rate(shapes)
        rep.numbers[f"matmul_{model}"] = {"flops_per_sample": flops, "matmul_flops_per_s": peak}
        for system, key in (("ours", "train_samples_per_s"), ("FuxiCTR", "samples_per_s")):
            side = rep.numbers[f"train_{model}"]["ours" if system == "ours" else "fuxictr"]
            rate = side[key]
            lines.append(f"| {model} | {flops / 1e6:.2f} | {peak / 1e9:.1f} | {system} | {rate:,.0f} | "
                         f"{rate * flops / 1e9:.1f} | {rate * flops / peak:.0%} |")
        fraction = rep.numbers[f"train_{model}"]["ours"]["train_samples_per_s"] * flops / peak
        rep.target(f"training {model}: >= {MATMUL_TARGET:.0%} of the matmul rate of its Linear shapes", f"{fraction:.0%}",
                   fraction >= MATMUL_TARGET)
    rep.add("The machine limit", "\n".join([
        f"fp32 matmul rate of exactly the models' Linear shapes at batch {BATCH} (forward, input and weight "
        f"gradients) on {default_threads()} threads, against the training samples/s above. Embedding lookups, "
        "activations, the loss and the optimizers are outside the FLOP count, so 100% is out of reach.",
        "", *lines, "", f"Our batch loader alone (one shuffled pass over the train split, same batch size): "
        f"{loader_rate:,.0f} samples/s, {loader_rate / rep.numbers['train_dcnv2']['ours']['train_samples_per_s']:.0f}x "
        "the DCNv2 training loop, which reads its batches between steps."]))


def recipe_target(args: argparse.Namespace) -> float | None:
    return load_experiment(EXPERIMENTS / f"{MODELS['dcnv2']}.yaml", args.overrides).compress.target_mb


def recipe_section(rep: Report, args: argparse.Namespace) -> None:
    rows: list[tuple] = []
    for name in (MODELS["dcnv2"], "synthetic_dcnv2_unified"):
        more, _ = measure(EXPERIMENTS / f"{name}.yaml", [*args.overrides, f"trainer.run_dir={args.runs / name}"])
        rows += more
    rep.numbers["compression"] = [{"experiment": cfg.name, "line": line,
                                   "test": {k: v for k, v in test.items() if k != "scores"}} for cfg, line, test in rows]
    rep.add("Compression", "\n".join([
        f"The DCNv2 full recipe (its config: OptFS -> OptEmbed -> AFM, target {recipe_target(args)} MB) from the baseline trained "
        "above, and DCNv2 with Unified Embedding trained from scratch; test split, bytes as the edge file stores them.",
        "", size_auc_table(rows)]))


def recipe_speed_section(rep: Report, args: argparse.Namespace) -> None:
    name = MODELS["dcnv2"]
    data_dir, fmap = bench_data(args)
    run_dir = args.runs / name
    last = RunDir(run_dir).stage_checkpoints()[-1]
    loader = ParquetBatches(data_dir / fmap.splits["train"].file, fmap, BATCH, shuffle=True, seed=1, drop_last=True)
    batches = [b for _, b in zip(range(8), loader)]
    torch.set_num_threads(default_threads())
    rates = {}
    with local_process_group():
        for label, path in (("baseline", RunDir(run_dir).best), ("full recipe", last)):
            rates[label] = step_rate(plain_model(fmap, load_checkpoint(path)).train(), batches, args.steps)
    torch.set_num_threads(1)
    served = exported(name, run_dir, data_dir, fmap)
    torch.set_num_threads(default_threads())
    rep.numbers["recipe_speed"] = {"train_samples_per_s": rates, "export": served}
    train_x = rates["full recipe"] / rates["baseline"]
    serve_x = served[1][3]["rows_per_s"] / served[0][3]["rows_per_s"]  # raw rows at batch 1024, recipe over baseline (fp32)
    rep.target("full recipe's model trains faster than its baseline", f"{train_x:.2f}x samples/s", train_x > 1)
    rep.target("full recipe's model serves faster than its baseline", f"{serve_x:.2f}x rows/s (fp32 export, batch 1024)",
               serve_x > 1)
    rep.add("The recipe's model against its baseline", "\n".join([
        f"Training: the real step (fused sparse update + Adam) over the same {len(batches)} train batches, "
        f"{args.steps} steps after 3 warm-up steps, {default_threads()} threads.", "",
        "| model | train samples/s | vs baseline |", "|---|---:|---:|",
        *(f"| {k} | {v:,.0f} | {v / rates['baseline']:.2f}x |" for k, v in rates.items()), "",
        "Serving: the exported files, TorchScript (torch only) and ONNX (onnxruntime, one intra-op thread), 1 thread, "
        "reloaded and timed in this process; "
        "parity against the checkpoint on the test split.", "", export_table(served)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=20_000_000)
    parser.add_argument("--peer-steps", type=int, default=30, help="FuxiCTR steps timed at the large vocabulary")
    parser.add_argument("--steps", type=int, default=40, help="steps timed for the recipe's training rate")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--only", choices=["prepare", "compression"],
                        help="measure these sections alone and put them in place of their namesakes in --out: "
                             "prepare; or compression (and the recipe's speed) from the baselines of the last full run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    root = WORK / f"results_{args.rows}"
    if args.only != "compression":
        shutil.rmtree(root, ignore_errors=True)  # every number from this run
    dirs = {"logs": root / "logs", "csv": root / "fuxictr_csv", "fuxictr": root / "fuxictr"}
    dirs["logs"].mkdir(parents=True, exist_ok=True)
    args.runs = root / "runs"
    raw = criteo_raw(args.rows)
    args.overrides = [f"dataset.raw=[{raw}]", f"dataset.synthetic.rows={args.rows}", f"dataset.output={root / 'prepared'}",
                      "trainer.progress=false"]
    python = peer_python()
    header = "\n".join([
        "# Benchmarks: ours beside FuxiCTR 2.3.10", "",
        f"Written by `make bench` (`python benchmarks/run_all.py --rows {args.rows}`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; every number below was measured in that run.", "",
        f"- machine: {machine()}", versions(python),
        f"- data: {args.rows:,} generated Criteo-format rows (pipelines/synthetic.py, seed 2024), min count 10, "
        "split by order 8:1:1", ""])
    rep = Report(args.out, root / "results.json")
    if args.only:
        if args.only == "prepare":
            prepare_section(rep, args, raw, dirs, python)
        else:
            dense_parameters(rep, args)
            recipe_section(rep, args)
            recipe_speed_section(rep, args)
        when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        rep.splice(f"_Measured alone by `python benchmarks/run_all.py --only {args.only}` on {when} ({machine()}); the "
                   "other sections are from the run named at the top._")
        print(f"\nwrote the {args.only} sections of {args.out}")
        return
    sections = [lambda: prepare_section(rep, args, raw, dirs, python), lambda: dense_parameters(rep, args),
                lambda: training_section(rep, args, dirs, python), lambda: time_to_auc_section(rep, args, dirs, python),
                lambda: large_vocab_section(rep, args, dirs, python),
                lambda: limit_section(rep, args), lambda: recipe_section(rep, args), lambda: recipe_speed_section(rep, args)]
    for section in sections:
        section()
        rep.write(header)
    rep.write(header + f"- whole run: {(time.perf_counter() - started) / 60:.1f} min\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
