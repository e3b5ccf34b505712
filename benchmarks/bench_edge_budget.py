"""Whole-file budgets at Criteo's size (``make bench-edge``): does OptFS -> AFM -> quantize reach a
budget that counts everything the device holds?

On the Frontier's Criteo-profile rows (default 12.5M, the same folder, so the generated log and the
early-stopped min-count-2 baseline are shared with ``make bench-frontier``), in one run, nothing else
running: the baseline exported (its file bytes, vocabulary included, are the reference), then
``configs/experiments/criteo_dnn_edge.yaml`` on that baseline, one ``ctr compress --sweep`` budget per
ratio, largest first, each exported; one ``ctr evaluate`` of all on the test split (DeLong against the
baseline); raw-row speed of the baseline and the first budget. Writes the "## Edge budget" section of
benchmarks/RESULTS.md.

Usage: python benchmarks/bench_edge_budget.py [--rows 12500000] [--ratios 30 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_frontier import BASELINE_MIN_COUNT, exported, generated_baseline, run_once, run_section
from bench_scale import CTR, RESULTS, Section, serve_times
from run_all import machine

from ctr.run_dir import RunDir

from _common import load_note

CONFIG = "configs/experiments/criteo_dnn_edge.yaml"
TITLE = "## Edge budget"


def budgets(args: argparse.Namespace) -> tuple[Section, dict[str, Any]]:
    sec = Section()
    folder, raw, base = generated_baseline(sec, args.rows)
    edge_dir = folder / "edges"
    edges = {"min count 2": exported(sec, base, edge_dir / "min_count_2.pt")}
    base_bytes = edges["min count 2"].stat().st_size
    data = [f"dataset.min_count={BASELINE_MIN_COUNT}", f"dataset.output={folder / f'prepared_mc{BASELINE_MIN_COUNT}'}",
            f"dataset.raw=[{raw}]", f"trainer.run_dir={base}", "trainer.progress=false"]
    reports = {}
    for ratio in sorted(args.ratios):
        mb = round(base_bytes / ratio / 2**20, 3)
        point = f"target_{mb:g}MB"
        try:
            run_once(sec, f"compress_{point}", f"`ctr compress {Path(CONFIG).name} --sweep target_mb={mb:g}` ({ratio}x)",
                     [CTR, "compress", CONFIG, *data, "--sweep", f"target_mb={mb:g}"],
                     RunDir(base).point(point).report, folder / f"edge_{point}.log")
        except RuntimeError:
            error = next((line for line in (folder / f"edge_{point}.log").read_text().splitlines()
                          if line.startswith("error:")), "see the log")
            sec.notes.append(f"{ratio}x ({mb:g} MB): not reached: {error}")
            break
        edges[f"{ratio}x whole-file budget"] = exported(sec, base, edge_dir / f"edge_{ratio}x.pt", f"{point}/latest")
        reports[point] = [json.loads(line) for line in RunDir(base).point(point).report.read_text().splitlines()]
    test = folder / f"prepared_mc{BASELINE_MIN_COUNT}" / "test.parquet"
    evaluation = folder / "evaluation_edge"
    sec.timed("evaluate", f"`ctr evaluate` of {len(edges)} models on the test split",
              [CTR, "evaluate", *(str(e) for e in edges.values()), "--data", str(test), "--out", str(evaluation)],
              folder / "evaluate_edge.log")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    torch.set_num_threads(1)
    speed = {name: serve_times(path, test) for name, path in list(edges.items())[:2]}
    manifests = {name: json.loads(Path(f"{path}.manifest.json").read_text()) for name, path in edges.items()}
    return sec, {"names": list(edges), "base_bytes": base_bytes, "reports": reports, "serve": speed,
                 "metrics": [{k: m[k] for k in ("name", "auc", "logloss", "bytes")} for m in metrics["models"]],
                 "comparisons": metrics["comparisons"],
                 "parts": {name: m["bytes_by_part"] for name, m in manifests.items()},
                 "shipped": {name: sum(m["inputs"]["shipped_values"].values()) for name, m in manifests.items()},
                 "bits": {name: m["inputs"]["fingerprint_bits"] for name, m in manifests.items()}}


def section(sec: Section, numbers: dict[str, Any], args: argparse.Namespace, started: float) -> str:
    names, models = numbers["names"], numbers["metrics"]
    p_value = {c["model"]: c["p_value"] for c in numbers["comparisons"]}
    base = models[0]
    rows = ["| model | file bytes | vs baseline | vocabulary bytes | values shipped | test AUC | vs baseline | DeLong p |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in zip(names, models):
        p = p_value.get(m["name"])
        rows.append(f"| {name} | {m['bytes']:,} | {base['bytes'] / m['bytes']:.1f}x | "
                    f"{numbers['parts'][name]['vocabulary']:,} | {numbers['shipped'][name]:,} | {m['auc']:.5f} | "
                    f"{m['auc'] - base['auc']:+.5f} | {'' if p is None else format(p, '.2g')} |")
    notes = []
    for name in names:
        widths = numbers["bits"][name]
        notes.append(f"{name}: bytes by part {numbers['parts'][name]}; fingerprint widths "
                     f"{ {b: list(widths.values()).count(b) for b in sorted(set(widths.values()))} } (bits: fields).")
    for point, lines in numbers["reports"].items():
        last = lines[-1]
        mix = {b: last["bits"].count(b) for b in sorted(set(last.get("bits") or []))}
        notes.append(f"{point}: stages {', '.join(line['stage_id'] for line in lines[1:])}; bits per field {mix}; "
                     f"valid AUC by stage {[round(line['valid_auc'], 5) for line in lines]}; "
                     f"minutes by stage {[round(line['seconds'] / 60, 1) for line in lines[1:]]}.")
    notes += sec.notes
    for name, s in numbers["serve"].items():
        notes.append(f"{name}: raw rows, batch-1024 {s['rows_per_s']:,.0f} rows/s, batch-1 p50 {s['p50_ms']:.3f} ms "
                     f"(1 thread), loaded in {s['load_seconds']:.2f} s.")
    when = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({(time.perf_counter() - started) / 60:.0f} min)"
    return "\n".join([
        TITLE, "", f"Written by `make bench-edge` on {when}; machine: {machine()}. {args.rows:,} Criteo-profile rows "
        "(the Frontier's), random 8:1:1 split, min count 2; budgets are the baseline's whole file (vocabulary and "
        "transforms included) over the ratio; DeLong against the early-stopped baseline on the test split.", "",
        *rows, "", *(f"- {n}" for n in notes), "",
        "| step | seconds | peak memory MB | load (1 min) after it |", "|---|---:|---:|---:|", *sec.rows, "",
        f"_{load_note()} at the end._", ""])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=12_500_000)
    parser.add_argument("--ratios", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--out", type=Path, default=RESULTS)
    run_section(budgets, section, TITLE, "results_edge.json", parser.parse_args())


if __name__ == "__main__":
    main()
