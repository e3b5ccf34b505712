"""The compression frontier (``make bench-frontier``): how small the DNN gets before its test AUC drops.

On Criteo-profile generated rows (default 12.5M: 10M train rows), in one run, nothing else running:
  1. the baseline: min count 2 (embeddings are 98% of its bytes), up to 5 epochs with early stopping
     (patience 2), its best-on-validation checkpoint;
  2. min-count baselines (5, 10, 20, 50; up to 5 epochs, patience 1): the tuned one is the largest
     min count whose validation AUC is within ``TUNED_SLACK`` of the best of them all;
  3. ``configs/experiments/criteo_dnn_frontier.yaml`` (AFM rank 4, then quantize) on the tuned run,
     one ``ctr compress --sweep`` budget per target ratio (the baseline's bytes / ratio), largest first,
     the AFM stage shared by all, until a budget is below what 2 bits everywhere need;
  4. Unified Embedding and per-field hashing whose fp32 tables take the 30x point's table and remap
     bytes (the dense layers stay the baseline's), on the min-count-2 data, as the Unified Embedding
     paper compares at equal embedding bytes;
  5. every model exported, and one ``ctr evaluate`` of all of them on the same test rows (each read
     in its own encoding), the baseline first: test AUC, DeLong p against it, the frontier plot;
  6. batch-1024 rows/s on one thread of the baseline and of the 30x model.
Every step is skipped when its output is there (a rerun continues; the timings are the run's that did
the step, kept in the raw numbers). Writes the "## Frontier" section of benchmarks/RESULTS.md and
_work/frontier/criteo_<rows>/results.json.

Usage: python benchmarks/bench_frontier.py [--rows 12500000] [--ratios 30 100 200 300] [--min-counts 5 10 20 50]
       [--no-references]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from bench_scale import CTR, RESULTS, Section, serve_times
from run_all import machine

from ctr.run_dir import RunDir

from _common import WORK, load_note, replace_section

CONFIG = "configs/experiments/criteo_dnn_frontier.yaml"
TITLE = "## Frontier"
TUNED_SLACK = 0.0005  # a min count is as good as the best when its validation AUC is this close
BASELINE_MIN_COUNT = 2


def run_once(sec: Section, key: str, label: str, argv: list[str], done: Path, log: Path) -> None:
    """Run a step unless its output ``done`` exists (then the raw numbers keep the earlier timing)."""
    if done.exists():
        sec.rows.append(f"| {label} | (done earlier) | | |")
        return
    sec.timed(key, label, argv, log)


def trained(folder: Path, raw: Path, min_count: int, patience: int, sec: Section, extra: list[str] = (),
            name: str | None = None) -> Path:
    run = folder / (name or f"run_mc{min_count}")
    overrides = [f"dataset.min_count={min_count}", f"dataset.output={folder / f'prepared_mc{min_count}'}",
                 f"dataset.raw=[{raw}]", "trainer.epochs=5", f"trainer.patience={patience}", f"trainer.run_dir={run}",
                 "trainer.progress=false", *extra]
    run_once(sec, f"train_{run.name}", f"`ctr train` {run.name} (up to 5 epochs, patience {patience})",
             [CTR, "train", CONFIG, *overrides], RunDir(run).result, folder / f"train_{run.name}.log")
    return run


def best_valid(run: Path) -> float:
    return json.loads(RunDir(run).result.read_text())["best_valid_auc"]


def exported(sec: Section, run: Path, out: Path, stage: str | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [CTR, "export", str(run), "--out", str(out), *(["--stage", stage] if stage else [])]
    run_once(sec, f"export_{out.stem}", f"`ctr export` {out.stem}", argv, out, out.with_suffix(".log"))
    return out


def embedding_bytes(edge: Path) -> int:
    """An edge file's table and id-remap bytes, from its manifest: the budget a hashed reference's tables get."""
    parts = json.loads(Path(f"{edge}.manifest.json").read_text())["bytes_by_part"]
    return parts["embedding tables"] + parts["vocabulary"]


def generated_baseline(sec: Section, rows: int) -> tuple[Path, Path, Path]:
    """(folder, raw log, baseline run): the generated Criteo-profile log and its early-stopped
    min-count-2 DNN (up to 5 epochs, patience 2), each made once and shared by the benchmarks on it."""
    folder = frontier_folder(rows)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "criteo_profile.txt"
    run_once(sec, "generate", f"`ctr generate --profile criteo` {rows:,} rows",
             [CTR, "generate", "--profile", "criteo", "--rows", str(rows), "--out", str(raw)], raw,
             folder / "generate.log")
    return folder, raw, trained(folder, raw, BASELINE_MIN_COUNT, 2, sec)


def frontier(args: argparse.Namespace) -> tuple[Section, dict[str, Any]]:
    sec = Section()
    folder, raw, base = generated_baseline(sec, args.rows)
    runs = {BASELINE_MIN_COUNT: base, **{mc: trained(folder, raw, mc, 1, sec) for mc in args.min_counts}}
    valid = {mc: best_valid(run) for mc, run in runs.items()}
    tuned = max(mc for mc in runs if valid[mc] >= max(valid.values()) - TUNED_SLACK)
    edge_dir = folder / "edges"
    edges = {f"min count {mc}": (exported(sec, run, edge_dir / f"min_count_{mc}.pt"), run) for mc, run in runs.items()}
    base_bytes = edges[f"min count {BASELINE_MIN_COUNT}"][0].stat().st_size
    targets = sorted({round(base_bytes / r / 2**20, 3) for r in args.ratios}, reverse=True)
    tuned_run = runs[tuned]
    for mb, ratio in zip(targets, sorted(args.ratios)):
        point = f"target_{mb:g}MB"
        try:
            run_once(sec, f"compress_{point}", f"`ctr compress --sweep target_mb={mb:g}` on min count {tuned} ({ratio}x)",
                     [CTR, "compress", CONFIG, f"dataset.min_count={tuned}",
                      f"dataset.output={folder / f'prepared_mc{tuned}'}", f"dataset.raw=[{raw}]",
                      f"trainer.run_dir={tuned_run}", "trainer.progress=false", "--sweep", f"target_mb={mb:g}"],
                     RunDir(tuned_run).point(point).report, folder / f"compress_{point}.log")
        except RuntimeError:  # a budget below 2 bits everywhere: the command says so; smaller ones fail alike
            error = next((line for line in (folder / f"compress_{point}.log").read_text().splitlines()
                          if line.startswith("error:")), "see the log")
            sec.notes.append(f"{ratio}x ({mb:g} MB): not reachable by this recipe: {error}")
            break
        edges[f"{ratio}x budget"] = (exported(sec, tuned_run, edge_dir / f"budget_{ratio}x.pt", f"{point}/latest"),
                                     tuned_run)
    first = f"{min(args.ratios)}x budget"
    if first in edges and args.references:
        mb = embedding_bytes(edges[first][0]) / 2**20
        for kind in ("unified", "hashed"):
            run = trained(folder, raw, BASELINE_MIN_COUNT, 1, sec, [f"model.embedding={{kind: {kind}, budget_mb: {mb:.4f}}}"],
                          name=f"run_{kind}")
            edges[f"{kind} at the {first}'s table bytes"] = (exported(sec, run, edge_dir / f"{kind}.pt"), run)
    names = list(edges)
    evaluation = folder / "evaluation"
    data = [str(run.parent / f"prepared_mc{mc_of(run, runs)}" / "test.parquet") for _, run in edges.values()]
    sec.timed("evaluate", f"`ctr evaluate` of {len(names)} models on the same test rows",
              [CTR, "evaluate", *(str(e) for e, _ in edges.values()), "--data", *data, "--out", str(evaluation)],
              folder / "evaluate.log")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    torch.set_num_threads(1)
    speed = {name: serve_times(edges[name][0], Path(d)) for name, d in zip(names, data)
             if name in ("min count 2", first)}
    numbers = {"valid_auc_by_min_count": valid, "tuned_min_count": tuned, "targets_mb": targets, "names": names,
               "metrics": [{k: m[k] for k in ("name", "auc", "logloss", "bytes")} for m in metrics["models"]],
               "comparisons": metrics["comparisons"], "serve": speed,
               "sweep_reports": {f"target_{mb:g}MB": [json.loads(line) for line in p.read_text().splitlines()]
                                 for mb in targets for p in [RunDir(tuned_run).sweep_point(mb).report]
                                 if p.is_file() and "quantize" in p.read_text()}}  # a budget out of reach stops before quantize
    return sec, numbers


def mc_of(run: Path, runs: dict[int, Path]) -> int:
    """The min count whose prepared data a run reads (the hashed references read min count 2's)."""
    return next((mc for mc, r in runs.items() if r == run), BASELINE_MIN_COUNT)


def section(sec: Section, numbers: dict[str, Any], args: argparse.Namespace, started: float) -> str:
    names, models = numbers["names"], numbers["metrics"]  # in the same order: the baseline first
    p_value = {c["model"]: c["p_value"] for c in numbers["comparisons"]}
    base = models[0]
    tuned_bytes = models[names.index(f"min count {numbers['tuned_min_count']}")]["bytes"]
    rows = ["| model | file bytes | vs baseline | vs tuned min count | test AUC | vs baseline | DeLong p |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in zip(names, models):
        p = p_value.get(m["name"])
        rows.append(f"| {name} | {m['bytes']:,} | {base['bytes'] / m['bytes']:.1f}x | {tuned_bytes / m['bytes']:.1f}x | "
                    f"{m['auc']:.5f} | {m['auc'] - base['auc']:+.5f} | {'' if p is None else format(p, '.2g')} |")
    notes = ["validation AUC by min count: " + ", ".join(f"{mc}: {v:.5f}" for mc, v in numbers["valid_auc_by_min_count"].items())
             + f"; tuned: min count {numbers['tuned_min_count']} (the largest within {TUNED_SLACK} of the best)."]
    for point, lines in numbers["sweep_reports"].items():
        last = lines[-1]
        mix = {b: last["bits"].count(b) for b in sorted(set(last.get("bits") or []))}
        notes.append(f"{point}: stages {', '.join(line['stage_id'] for line in lines[1:])}; bits per field {mix}; "
                     f"valid AUC {last['valid_auc']:.5f} (before quantize's fine-tune "
                     f"{last.get('valid_auc_before_finetune') or 0:.5f}); bytes {last['bytes_by_part']}.")
    notes += sec.notes  # what the run said as it went (a budget out of reach)
    for name, s in numbers["serve"].items():
        notes.append(f"{name}: batch-1024 {s['rows_per_s']:,.0f} rows/s, batch-1 p50 {s['p50_ms']:.3f} ms (1 thread).")
    when = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({(time.perf_counter() - started) / 60:.0f} min)"
    return "\n".join([
        TITLE, "", f"Written by `make bench-frontier` on {when}; machine: {machine()}. {args.rows:,} Criteo-profile rows, "
        "random 8:1:1 split; every model scored on the same test rows (each in its own encoding), DeLong against the "
        "baseline (min count 2, best of up to 5 epochs).", "", *rows, "", *(f"- {n}" for n in notes), "",
        "| step | seconds | peak memory MB | load (1 min) after it |", "|---|---:|---:|---:|", *sec.rows, "",
        f"_{load_note()} at the end._", ""])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=12_500_000)
    parser.add_argument("--ratios", type=int, nargs="+", default=[30, 100, 200, 300])
    parser.add_argument("--min-counts", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--no-references", dest="references", action="store_false",
                        help="skip the Unified Embedding and per-field hashing references (about 30 min)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    run_section(frontier, section, TITLE, "results.json", parser.parse_args())


def frontier_folder(rows: int) -> Path:
    """Where a row count's generated log, prepared data, runs and edge files live (resolved: the runs'
    saved configs hold these paths)."""
    return (WORK / "frontier" / f"criteo_{rows}").resolve()


def run_section(measure: Callable[[argparse.Namespace], tuple[Section, dict[str, Any]]],
                render: Callable[[Section, dict[str, Any], argparse.Namespace, float], str], title: str, raw_name: str,
                args: argparse.Namespace) -> None:
    """Measure, keep the raw numbers beside the runs, and replace ``title``'s section of the results."""
    started = time.perf_counter()
    sec, numbers = measure(args)
    (frontier_folder(args.rows) / raw_name).write_text(json.dumps(numbers, indent=2, default=str))
    replace_section(args.out, title, render(sec, numbers, args, started))
    print(f"wrote the {title.lstrip('# ')} section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
