"""Criteo and Avazu at full size (``make bench-scale``): the user's commands on profile-generated logs.

For each dataset, in one run, with nothing else meant to run on the machine:
  1. ``ctr generate --profile`` (reused when the file is there; its own figures are then from the run
     that wrote it), and each categorical field's distinct values against the published figure;
  2. Polars' own ``read_csv`` of the first ``--read-csv-rows`` rows of the same file (a whole-file
     eager read needs more memory than the machine has), for the prepare-to-read_csv rate;
  3. ``ctr prepare`` with min count 2: rows/s, table rows after min count;
  4. one epoch of DNN (and DCNv2 on Criteo) with ``ctr train``; the same models on the 1M-row
     default data in the same run, for samples/s at the two vocabularies;
  5. the trained run's checkpoint written and restored into a sharded model (``checkpoint`` mode below);
  6. ``ctr export``, then the file's load time and batch-1 / batch-1024 latency on one thread;
  7. ``ctr evaluate`` of the exported model over the test split;
  8. the Criteo recipe (``configs/experiments/criteo_dnn_recipe.yaml``) on ``--recipe-rows`` rows:
     each compression stage's seconds as a multiple of one baseline epoch, and both models' test AUC;
  9. FuxiCTR's preprocessing on growing heads of the Criteo file, up to the largest size it completes.
Every command is timed with the peak memory of its process tree (PSS) and the load average after it.
The section is written into benchmarks/RESULTS.md under "## Scale" (replacing an older one, or, with
``--add``, after it); the raw numbers go to _work/scale/results_<criteo rows>_<avazu rows>.json.

Usage: python benchmarks/bench_scale.py [--criteo-rows 45840617] [--avazu-rows 40428967] [--models dnn dcnv2]
           [--datasets criteo avazu] [--recipe-rows 12500000] [--skip-small] [--skip-fuxictr] [--add]
       python benchmarks/bench_scale.py --models --skip-small --recipe-rows 0 --skip-fuxictr --add
           (generate, read_csv and prepare only, added after the section's earlier runs)
       python benchmarks/bench_scale.py checkpoint RUN_DIR   (internal: prints save/restore seconds as JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from peer_env import peer_python
from run_all import PEER, SCALE_TITLE, headed_csv_splits, machine

from ctr.distributed import local_process_group
from ctr.experiment import load_experiment
from ctr.run_dir import LAST, RunDir
from ctr.train import Trainer
from deploy.export import latency, open_edge, raw_sample
from features.feature_map import FeatureMap
from features.schema import AVAZU_CATEGORIES, CRITEO_CATEGORIES, SplitConfig
from pipelines.scenarios import PROFILE_DISTINCT

from _common import WORK, load_note, run_measured

HERE = Path(__file__).parent
SCALE = WORK / "scale"
CTR = str(Path(sys.executable).parent / "ctr")
RESULTS = HERE / "RESULTS.md"
FUXICTR_SIZES = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]  # 8M peaked at 16.7 GB of 24


class Section:
    """Rows of (step, seconds, peak MB, load) and notes, with every raw number kept."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.notes: list[str] = []
        self.numbers: dict[str, Any] = {}

    def timed(self, key: str, label: str, argv: list[str], log: Path) -> str:
        seconds, peak, out = run_measured(argv, log=log)
        load = os.getloadavg()[0]
        self.numbers[key] = {"seconds": seconds, "peak_mb": peak, "load_1min": load}
        self.rows.append(f"| {label} | {seconds:,.1f} | {peak:,.0f} | {load:.2f} |")
        print(self.rows[-1], flush=True)
        return out


def distinct_values(raw: Path, kind: str) -> dict[str, int]:
    """Each categorical field's distinct values over the whole file (one streaming pass of Polars)."""
    if kind == "criteo":
        names = ["label", *(f"I{i}" for i in range(1, 14)), *CRITEO_CATEGORIES]
        scan = pl.scan_csv(raw, separator="\t", has_header=False, new_columns=names, infer_schema=False, quote_char=None)
        fields = CRITEO_CATEGORIES
    else:
        scan = pl.scan_csv(raw, infer_schema=False)
        fields = AVAZU_CATEGORIES
    counts = scan.select(pl.col(f).drop_nulls().n_unique() for f in fields).collect(engine="streaming")
    return {f: int(counts[f].item()) for f in fields}


def read_csv_rate(raw: Path, kind: str, rows: int) -> float:
    """Rows/s of Polars' eager read_csv (every column as a string, all threads) on the file's first rows."""
    started = time.perf_counter()
    if kind == "criteo":
        df = pl.read_csv(raw, separator="\t", has_header=False, infer_schema=False, quote_char=None, n_rows=rows)
    else:
        df = pl.read_csv(raw, infer_schema=False, n_rows=rows)
    return df.height / (time.perf_counter() - started)


def checkpoint_times(run_dir: Path) -> dict[str, float]:
    """Seconds to write the run's training state (whole tables + row-wise optimizer state) and to
    restore it into a freshly sharded model, as a resume does; the file's bytes."""
    run = RunDir(run_dir)
    cfg = load_experiment(run.config)
    data_dir = run.prepared_data()
    trainer = Trainer(cfg, FeatureMap.load(data_dir), data_dir, run_dir)
    with local_process_group():
        trainer._build()
        started = time.perf_counter()
        trainer._restore(LAST)
        restore = time.perf_counter() - started
        started = time.perf_counter()
        trainer._save("bench_scale.pt")
        save = time.perf_counter() - started
    path = trainer.ckpt_dir / "bench_scale.pt"
    size = path.stat().st_size
    path.unlink()
    return {"save_seconds": save, "restore_seconds": restore, "bytes": size}


def serve_times(edge: Path, test: Path) -> dict[str, float]:
    """Load time of the exported file and its latency on raw rows of the data's log, one thread
    (bench_export's measurement)."""
    numbers, keys = raw_sample(FeatureMap.load(test.parent), 1024)
    started = time.perf_counter()
    model = open_edge(edge, threads=1)[0]
    loaded = time.perf_counter() - started
    return {"load_seconds": loaded, **latency(model, numbers, keys)}


def dataset(sec: Section, kind: str, rows: int, models: list[str], args: argparse.Namespace) -> None:
    folder = SCALE / f"{kind}_{rows}"
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    raw, prepared = folder / f"{kind}_profile.txt", folder / "prepared"
    if raw.exists():
        sec.rows.append(f"| {kind}: generate {rows:,} rows | (file reused) | | |")
    else:
        sec.timed(f"{kind}_generate", f"{kind}: `ctr generate --profile` {rows:,} rows",
                  [CTR, "generate", "--profile", kind, "--rows", str(rows), "--out", str(raw)], logs / "generate.log")
        sec.notes.append(f"{kind}: generated {rows / sec.numbers[f'{kind}_generate']['seconds']:,.0f} rows/s "
                         f"({raw.stat().st_size / 1e9:.1f} GB).")
    seen = distinct_values(raw, kind)
    sec.numbers[f"{kind}_distinct"] = seen
    if rows == {"criteo": 45_840_617, "avazu": 40_428_967}[kind]:
        worst = max(seen, key=lambda f: abs(seen[f] / PROFILE_DISTINCT[kind][f] - 1))
        sec.notes.append(f"{kind}: distinct values per field against the published figures: largest gap "
                         f"{seen[worst] / PROFILE_DISTINCT[kind][worst] - 1:+.1%} ({worst}: {seen[worst]:,} vs "
                         f"{PROFILE_DISTINCT[kind][worst]:,}); total {sum(seen.values()):,} vs "
                         f"{sum(PROFILE_DISTINCT[kind].values()):,}.")
    polars_rate = read_csv_rate(raw, kind, args.read_csv_rows)
    shutil.rmtree(prepared, ignore_errors=True)
    out = sec.timed(f"{kind}_prepare", f"{kind}: `ctr prepare` (min count 2)",
                    [CTR, "prepare", f"configs/datasets/{kind}.yaml", "dataset.min_count=2", "--raw", str(raw),
                     "--output", str(prepared)], logs / "prepare.log")
    fmap = json.loads((prepared / "feature_map.json").read_text())
    table_rows = sum(f["num_embeddings"] for f in fmap["fields"] if f["type"] == "categorical")
    ours = rows / sec.numbers[f"{kind}_prepare"]["seconds"]
    sec.numbers[f"{kind}_prepare"].update(rows_per_s=ours, polars_read_csv_rows_per_s=polars_rate, table_rows=table_rows)
    sec.notes.append(f"{kind}: {rows:,} rows, {sum(seen.values()):,} distinct values, {table_rows:,} table rows after "
                     f"min count 2; prepare {ours:,.0f} rows/s = {ours / polars_rate:.2f}x Polars' read_csv "
                     f"({polars_rate:,.0f} rows/s on the first {args.read_csv_rows:,} rows); "
                     f"{out.strip().splitlines()[-1]}")
    test = prepared / "test.parquet"
    for model in models:
        run = folder / f"run_{model}"
        shutil.rmtree(run, ignore_errors=True)
        sec.timed(f"{kind}_{model}_train", f"{kind}: `ctr train` {model}, 1 epoch",
                  [CTR, "train", f"configs/experiments/{kind}_{model}.yaml", "dataset.min_count=2",
                   f"dataset.output={prepared}", f"dataset.raw=[{raw}]", "trainer.epochs=1", f"trainer.run_dir={run}",
                   "trainer.progress=false"], logs / f"train_{model}.log")
        result = json.loads(RunDir(run).result.read_text())
        sec.numbers[f"{kind}_{model}_train"]["result"] = result
        ckpt = json.loads(sec.timed(f"{kind}_{model}_checkpoint", f"{kind}: {model} checkpoint write + restore",
                                    [sys.executable, __file__, "checkpoint", str(run)], logs / f"checkpoint_{model}.log"))
        sec.numbers[f"{kind}_{model}_checkpoint"].update(ckpt)
        sec.notes.append(f"{kind} {model}: {result['train_samples_per_s']:,.0f} samples/s over the epoch, test AUC "
                         f"{result['test_auc']:.5f}; checkpoint {ckpt['bytes'] / 1e6:,.0f} MB, written in "
                         f"{ckpt['save_seconds']:.2f} s, restored into a sharded model in {ckpt['restore_seconds']:.2f} s.")
        if model != "dnn":
            continue
        edge = run / "edge.pt"
        sec.timed(f"{kind}_export", f"{kind}: `ctr export` {model}", [CTR, "export", str(run), "--out", str(edge)],
                  logs / "export.log")
        served = json.loads(run_measured([sys.executable, __file__, "serve", str(edge), str(test)])[2])
        sec.numbers[f"{kind}_serve"] = served
        sec.notes.append(f"{kind} edge file: {edge.stat().st_size / 1e6:,.0f} MB, loaded in {served['load_seconds']:.2f} s; "
                         f"batch-1 p50 {served['p50_ms']:.3f} ms, batch-1024 {served['rows_per_s']:,.0f} rows/s (1 thread).")
        sec.timed(f"{kind}_evaluate", f"{kind}: `ctr evaluate` on {fmap['splits']['test']['rows']:,} test rows",
                  [CTR, "evaluate", str(edge), "--data", str(test), "--out", str(RunDir(run).evaluation)], logs / "evaluate.log")


def small_vocabulary(sec: Section, model: str) -> None:
    """One epoch on the 1M-row default data in this run: samples/s at a small vocabulary."""
    run = SCALE / f"small_{model}"
    shutil.rmtree(run, ignore_errors=True)
    sec.timed(f"small_{model}_train", f"default 1M rows (50k table rows): `ctr train` {model}, 1 epoch",
              [CTR, "train", f"configs/experiments/synthetic_{model}.yaml", f"trainer.run_dir={run}",
               "trainer.epochs=1", "trainer.progress=false"], SCALE / f"small_{model}.log")
    sec.numbers[f"small_{model}_train"]["result"] = json.loads(RunDir(run).result.read_text())


def recipe(sec: Section, rows: int) -> None:
    """``configs/experiments/criteo_dnn_recipe.yaml`` on ``rows`` Criteo-profile rows at min count 2:
    the baseline's epoch, then each compression stage's seconds as a multiple of it, and both
    exported models' test AUC with the DeLong test."""
    folder = SCALE / f"recipe_{rows}"
    raw, prepared, run = folder / "criteo_profile.txt", folder / "prepared", folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    if not raw.exists():
        sec.timed("recipe_generate", f"recipe: `ctr generate --profile criteo` {rows:,} rows",
                  [CTR, "generate", "--profile", "criteo", "--rows", str(rows), "--out", str(raw)], folder / "generate.log")
    shutil.rmtree(prepared, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    overrides = ["dataset.min_count=2", f"dataset.output={prepared}", f"dataset.raw=[{raw}]", "trainer.epochs=1",
                 f"trainer.run_dir={run}", "trainer.progress=false"]
    config = "configs/experiments/criteo_dnn_recipe.yaml"
    sec.timed("recipe_prepare", "recipe: `ctr prepare` (min count 2)",
              [CTR, "prepare", config, *overrides[:3], "--raw", str(raw), "--output", str(prepared)], folder / "prepare.log")
    sec.timed("recipe_train", "recipe: `ctr train` dnn baseline, 1 epoch", [CTR, "train", config, *overrides],
              folder / "train.log")
    sec.timed("recipe_compress", "recipe: `ctr compress` (OptFS, then AFM)", [CTR, "compress", config, *overrides],
              folder / "compress.log")
    base, small = folder / "baseline.pt", folder / "compressed.pt"
    sec.timed("recipe_export", "recipe: `ctr export` baseline and compressed",
              ["sh", "-c", f"{CTR} export {run} --out {base} && {CTR} export {run} --stage latest --out {small}"],
              folder / "export.log")
    sec.timed("recipe_evaluate", "recipe: `ctr evaluate` both on the test split",
              [CTR, "evaluate", str(base), str(small), "--data", str(prepared / "test.parquet"), "--out",
               str(folder / "evaluation")], folder / "evaluate.log")
    epoch = json.loads(RunDir(run).result.read_text())["train_seconds"]
    stages = [json.loads(line) for line in RunDir(run).report.read_text().splitlines()]
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    (b, c), (test,) = metrics["models"], metrics["comparisons"]
    train_rows = json.loads((prepared / "feature_map.json").read_text())["splits"]["train"]["rows"]
    sec.numbers["recipe"] = {"baseline_epoch_seconds": epoch, "stages": stages, "train_rows": train_rows,
                             "baseline_test": {k: b[k] for k in ("auc", "logloss", "bytes")},
                             "compressed_test": {k: c[k] for k in ("auc", "logloss", "bytes")}, "delong": test}
    total = sum(line["seconds"] for line in stages[1:])
    command = sec.numbers["recipe_compress"]["seconds"]
    parts = "; ".join(f"{line['stage']} {line['seconds']:,.0f} s = {line['seconds'] / epoch:.2f} epochs"
                      for line in stages[1:])
    sec.notes.append(f"recipe on {rows:,} rows ({train_rows:,} train rows): one baseline epoch (loop, validation, "
                     f"checkpoints) {epoch:,.0f} s; {parts}; the stages {total / epoch:.2f} baseline epochs in all, "
                     f"the whole `ctr compress` command (start-up, each stage's validation) {command / epoch:.2f}. Test AUC "
                     f"{b['auc']:.5f} -> {c['auc']:.5f} ({c['auc'] - b['auc']:+.5f}, DeLong p {test['p_value']:.2g}); edge "
                     f"file {b['bytes'] / 1e6:,.1f} MB -> {c['bytes'] / 1e6:,.2f} MB ({b['bytes'] / c['bytes']:.0f}x).")
    optfs = next(line for line in stages if line["stage"] == "optfs")
    sec.notes.append(f"recipe OptFS: {json.dumps({k: optfs.get(k) for k in ('rows_before', 'rows_after')})}")


def fuxictr_prepare(sec: Section, raw: Path) -> None:
    """FuxiCTR's preprocessing on the first N rows of the Criteo profile file, N doubling until it fails."""
    python = peer_python()
    for rows in FUXICTR_SIZES:
        head = SCALE / f"fuxictr_{rows}"
        shutil.rmtree(head, ignore_errors=True)
        head.mkdir(parents=True)
        with raw.open("rb") as src, (head / "raw.txt").open("wb") as dst:
            for _, line in zip(range(rows), src):
                dst.write(line)
        headed_csv_splits(head / "raw.txt", head / "csv", SplitConfig(method="order"))
        try:
            sec.timed(f"fuxictr_prepare_{rows}", f"FuxiCTR `build_dataset`, first {rows:,} rows",
                      [str(python), str(PEER), "prepare", "--csv-dir", str(head / "csv"), "--out", str(head / "out"),
                       "--min-count", "2"], head / "prepare.log")
        except RuntimeError as exc:
            sec.notes.append(f"FuxiCTR's preprocessing failed at {rows:,} rows ({exc}); the largest size it completed is "
                             "the last one in the table.")
            return
        finally:
            shutil.rmtree(head / "csv", ignore_errors=True)


def scale_section(results: Path) -> tuple[str, int, int]:
    """The results file's text and where its Scale section starts and ends (-1, -1 when it has none)."""
    text = results.read_text() if results.exists() else ""
    start = text.find(SCALE_TITLE)
    if start < 0:
        return text, -1, -1
    end = text.find("\n## ", start + 1)
    return text, start, end + 1 if end >= 0 else len(text)


def write_section(sec: Section, started: float, results: Path, raw_numbers: Path, earlier: str) -> None:
    """(Re)write the Scale section. With ``earlier`` (the section as it was before this run, kept by
    ``--add``), this run becomes a dated subsection after it: a partial run fills in steps a full one left out."""
    when = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({(time.perf_counter() - started) / 60:.0f} min)"
    table = ["| step | seconds | peak memory MB | load (1 min) after it |", "|---|---:|---:|---:|", *sec.rows, "",
             *(f"- {note}" for note in sec.notes), "", f"_{load_note()} at the end._", ""]
    if earlier:
        body = "\n".join([earlier.rstrip("\n"), "", f"### Added by a partial run of `make bench-scale` on {when}", "",
                          f"Machine: {machine()}.", "", *table])
    else:
        body = "\n".join([
            SCALE_TITLE, "", f"Written by `make bench-scale` on {when}; machine: {machine()}. Profile-generated logs "
            "(`ctr generate --profile`), min count 2, random 8:1:1 split; peak memory is the largest PSS sum over each "
            "command's process tree, sampled every 0.2 s.", "", *table])
    text, start, end = scale_section(results)  # replaced where it is: the Frontier section may follow it
    text = text[:start] + body.rstrip("\n") + "\n\n" + text[end:] if start >= 0 else text.rstrip("\n") + "\n\n" + body
    results.write_text(text.rstrip("\n") + "\n")
    raw_numbers.write_text(json.dumps(sec.numbers, indent=2, default=str))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("checkpoint", "serve"):
        print(json.dumps(checkpoint_times(Path(sys.argv[2])) if sys.argv[1] == "checkpoint"
                         else serve_times(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--criteo-rows", type=int, default=45_840_617)
    parser.add_argument("--avazu-rows", type=int, default=40_428_967)
    parser.add_argument("--models", nargs="*", default=["dnn", "dcnv2"], choices=["dnn", "dcnv2"],
                        help="the models trained one epoch on Criteo (Avazu: dnn if named); none: generate and prepare only")
    parser.add_argument("--read-csv-rows", type=int, default=4_000_000)
    parser.add_argument("--skip-fuxictr", action="store_true")
    parser.add_argument("--datasets", nargs="*", default=["criteo", "avazu"], choices=["criteo", "avazu"])
    parser.add_argument("--skip-small", action="store_true", help="leave out the small-vocabulary epochs")
    parser.add_argument("--recipe-rows", type=int, default=12_500_000,
                        help="Criteo-profile rows for the compression recipe's cost (10M train rows); 0: skip it")
    parser.add_argument("--add", action="store_true",
                        help="keep the Scale section's earlier run(s) and add this one after them")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file whose Scale section is (re)written")
    args = parser.parse_args()
    started = time.perf_counter()
    SCALE.mkdir(parents=True, exist_ok=True)
    added = f"_added_{time.strftime('%Y%m%d_%H%M', time.gmtime())}" if args.add else ""  # one file per added run
    numbers = SCALE / f"results_{args.criteo_rows}_{args.avazu_rows}{added}.json"
    text, start, end = scale_section(args.out)
    earlier = text[start:end] if args.add and start >= 0 else ""
    sec = Section()
    if args.datasets:
        trained = f"{', '.join(args.models)} on Criteo" + (", dnn on Avazu" if "dnn" in args.models else "")
        sec.notes.append(f"datasets: {', '.join(args.datasets)}; models trained: {trained if args.models else 'none'}.")
    for model in [] if args.skip_small else args.models:
        small_vocabulary(sec, model)
    for kind in args.datasets:
        dataset(sec, kind, {"criteo": args.criteo_rows, "avazu": args.avazu_rows}[kind],
                args.models if kind == "criteo" else [m for m in args.models if m == "dnn"], args)
        write_section(sec, started, args.out, numbers, earlier)
    if args.recipe_rows:
        recipe(sec, args.recipe_rows)
        write_section(sec, started, args.out, numbers, earlier)
    if args.skip_fuxictr:
        sec.notes.append("FuxiCTR's preprocessing: not run in this run (--skip-fuxictr).")
    else:
        fuxictr_prepare(sec, SCALE / f"criteo_{args.criteo_rows}" / "criteo_profile.txt")
    write_section(sec, started, args.out, numbers, earlier)
    print(f"wrote the Scale section of {args.out}")


if __name__ == "__main__":
    main()
