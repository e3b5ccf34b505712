"""``ctr run CONFIG`` and ``ctr demo``: the whole chain for one experiment, end to end on one machine.

Prepare the data (generating the synthetic log if it is missing), train the baseline, run the
experiment's compression recipe, export the baseline and the final stage, evaluate both on the test
split (exact AUC with DeLong intervals, the paired DeLong test, an HTML report), time both exported
files on one thread, and print the comparison. Steps already done in the run directory (a trained
baseline, finished stages) are reused, so an interrupted run continues.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ctr.experiment import load_experiment
from ctr.run_dir import RunDir
from deploy.export import export_model, latency, open_edge, raw_sample
from pipelines.compress_job import run_compress
from pipelines.evaluate import evaluate
from pipelines.synthetic import read_teacher
from pipelines.train_job import prepared_data, run_dir_of, run_train

log = logging.getLogger("ctr.run")
DEFAULT_EXPERIMENT = Path("configs/experiments/synthetic_dnn_recipe.yaml")


def run_chain(config: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    overrides = list(overrides or [])
    cfg = load_experiment(config, overrides)
    run = RunDir(run_dir_of(cfg))
    run_dir = run.root
    started = time.perf_counter()
    data_dir, fmap = prepared_data(cfg)
    if not run.best.is_file():
        log.info("training the baseline into %s", run_dir)
        run_train(config, overrides)
    stage = None
    if cfg.compress.stages:
        log.info("compression recipe: %s", ", ".join(s.stage[0] for s in cfg.compress.stages))
        run_compress(config, overrides)
        stage = "latest"
    exported = {"baseline": run.export / "baseline.pt"}
    if stage:
        exported["compressed"] = run.export / "compressed.pt"
    for name, path in exported.items():
        log.info("exporting the %s model to %s", name, path)
        export_model(run_dir, path, None if name == "baseline" else stage)
    test = data_dir / fmap.splits["test"].file
    log.info("evaluating on %s", test)
    result = evaluate(list(exported.values()), test, run.evaluation)
    numbers, keys = raw_sample(fmap, 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = {name: latency(open_edge(path, threads=1)[0], numbers, keys) for name, path in exported.items()}
    finally:
        torch.set_num_threads(threads)
    summary = {"experiment": cfg.name, "run_dir": str(run_dir), "report": str(run.evaluation / "report.html"),
               "seconds": round(time.perf_counter() - started, 1), "models": {}}
    p_values = {c["model"]: c["p_value"] for c in result["comparisons"]}
    for (name, path), m in zip(exported.items(), result["models"]):
        summary["models"][name] = {"bytes": m["bytes"], "auc": m["auc"], "auc_ci": m["auc_ci"], "logloss": m["logloss"],
                                   "delong_p_vs_baseline": p_values.get(m["name"]), **timing[name]}
    teacher = read_teacher(Path(fmap.sources[0].path))
    if teacher is not None and isinstance(teacher.get("teacher_auc"), float):
        summary["teacher_auc_best_possible"] = teacher["teacher_auc"]
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    rows = ["| model | bytes | test AUC [95% CI] | logloss | DeLong p vs baseline | raw row batch-1 p50 ms (1 thread) | "
            "raw rows/s at batch 1024 (1 thread) |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, m in summary["models"].items():
        p = m["delong_p_vs_baseline"]
        rows.append(f"| {name} | {m['bytes']:,} | {m['auc']:.5f} [{m['auc_ci'][0]:.5f}, {m['auc_ci'][1]:.5f}] | "
                    f"{m['logloss']:.5f} | {'' if p is None else f'{p:.3g}'} | {m['p50_ms']:.3f} | {m['rows_per_s']:,.0f} |")
    lines = "\n".join(rows)
    teacher = summary.get("teacher_auc_best_possible")
    extra = f"\nthe generator's teacher reaches AUC {teacher:.5f} on this data (the best possible)" if teacher else ""
    return f"{lines}{extra}\nreport: {summary['report']} ({summary['seconds']:.0f} s in all)"
