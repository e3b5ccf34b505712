"""``ctr tune CONFIG --trials N``: the recipe's sensitive knobs and the learning rates on Ray Tune.

Each trial trains the experiment's baseline with its learning rates and then runs the recipe one
stage at a time (the stages are keyed by content, so each call runs only the new stage), reporting
validation AUC and edge bytes after the baseline and after every stage. ASHA stops the trials whose
AUC at the same point trails the others. The objective is either the best validation AUC within
``--budget-mb`` (a trial over the budget scores its AUC minus 1), or, without a budget, the
size/AUC Pareto front of the finished trials. Everything lives under ``<run_dir>/tune/``: Ray Tune's
own state (a killed tune resumes where it stopped: ``ctr tune`` again), each trial's run directory,
and ``results.json``, ``results.md`` and ``frontier.png`` at the end.

The knobs, each searched around its configured (or rule) value: ``trainer.lr`` and
``trainer.sparse_lr`` (x1/3 to x3, log-uniform), OptFS ``penalty`` (x1/10 to x10), OptEmbed
``max_embedding_share`` (0.2 to 0.8) and AFM's ``embedding_rank`` (4 or 8, at most the width) and
``layer_rank`` energy (0.9 to 0.999).
"""

from __future__ import annotations

import json
import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from common.atomic import atomic_write, atomic_write_text
from common.errors import ConfigError
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint
from ctr.compress.optfs import OptFSStage
from ctr.compress.recipe import run_recipe
from ctr.compress.stage import model_size, plain_model
from ctr.config import RayConfig
from ctr.experiment import ExperimentConfig, load_experiment
from ctr.run_dir import RunDir
from ctr.train import Trainer
from features.feature_map import FeatureMap
from pipelines.ray_train import start_ray
from pipelines.train_job import prepared_data, run_dir_of

log = logging.getLogger("ctr.tune")
OVER_BUDGET = 1.0  # subtracted from a trial's AUC while its model is over the size budget


def search_space(cfg: ExperimentConfig, fmap: FeatureMap) -> dict[str, Any]:
    """Dotted config keys -> Ray Tune distributions, centred on the configured values."""
    t = cfg.trainer
    space: dict[str, Any] = {"trainer.lr": tune.loguniform(t.lr / 3, t.lr * 3),
                             "trainer.sparse_lr": tune.loguniform(t.sparse_lr / 3, t.sparse_lr * 3)}
    for i, step in enumerate(cfg.compress.stages):
        name, settings = step.stage
        if name == "optfs":
            penalty = OptFSStage(settings).gate_settings(fmap.splits["train"].rows, t.batch_size)[2]  # configured, or the rule's
            space[f"compress.stages.{i}.optfs.penalty"] = tune.loguniform(penalty / 10, penalty * 10)
        elif name == "optembed":
            space[f"compress.stages.{i}.optembed.max_embedding_share"] = tune.uniform(0.2, 0.8)
        elif name == "afm":
            ranks = [r for r in (4, 8) if r <= cfg.model.embedding.dim]
            space[f"compress.stages.{i}.afm.embedding_rank"] = tune.choice([{"fixed": r} for r in ranks])
            space[f"compress.stages.{i}.afm.layer_rank"] = tune.choice([{"energy": e} for e in (0.9, 0.95, 0.99, 0.999)])
    return space


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The config tree with each dotted key (list positions as numbers) set to its value."""
    out = deepcopy(tree)
    for dotted, value in values.items():
        node: Any = out
        *path, last = dotted.split(".")
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return out


def objective(auc: float, size: int, budget_mb: float | None) -> float:
    return auc - (OVER_BUDGET if budget_mb is not None and size > budget_mb * 2**20 else 0.0)


def run_trial(config: dict[str, Any], tree: dict[str, Any], data_dir: str, budget_mb: float | None) -> None:
    """One trial: the baseline with the trial's settings (``config['values']``), then the recipe
    stage by stage."""
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    cfg = ExperimentConfig.model_validate(with_values(tree, config["values"]))
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={
        "run_dir": str(run_dir), "threads": 1, "progress": False, "num_workers": 1})})
    fmap = FeatureMap.load(Path(data_dir))
    run = RunDir(run_dir)
    torch.set_num_threads(1)
    if not run.best.is_file():  # a resumed trial keeps what it finished
        Trainer(cfg, fmap, Path(data_dir), run_dir).fit(resume=run.last.is_file())
        run.link_data(Path(data_dir))
    _, parts = model_size(fmap, run.prepared_data(), plain_model(fmap, load_checkpoint(run.best)))
    base_auc = json.loads(run.result.read_text())["best_valid_auc"]
    tune.report({"objective": objective(base_auc, sum(parts.values()), budget_mb), "valid_auc": base_auc,
                 "bytes": sum(parts.values()), "stage": "baseline"})
    stages = cfg.compress.stages
    for k in range(1, len(stages) + 1):
        partial = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"stages": stages[:k]})})
        try:
            run_recipe(partial, fmap, Path(data_dir), run_dir)
        except ConfigError:  # over the recipe's target_mb: a data point of the frontier all the same
            pass
        line = read_json_lines(run.report)[-1]
        tune.report({"objective": objective(line["valid_auc"], line["bytes"], budget_mb),
                     "valid_auc": line["valid_auc"], "bytes": line["bytes"], "stage": line["stage_id"]})


def pareto(points: list[tuple[int, float]]) -> list[bool]:
    """Which (bytes, AUC) points no other point beats on both (smaller or equal and better AUC)."""
    return [not any((b2 <= b and a2 > a) or (b2 < b and a2 >= a) for b2, a2 in points) for b, a in points]


def run_tune(config: Path, overrides: list[str], trials: int, budget_mb: float | None) -> list[dict[str, Any]]:
    cfg = load_experiment(config, overrides)
    if trials < 1:
        raise ConfigError(f"<command line>: --trials {trials}: a tune needs at least one trial (give --trials 1 or more)")
    data_dir, fmap = prepared_data(cfg)
    folder = RunDir(run_dir_of(cfg)).tune.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    start_ray(RayConfig())
    trainable = tune.with_resources(tune.with_parameters(
        run_trial, tree=cfg.model_dump(mode="json"), data_dir=str(data_dir.resolve()), budget_mb=budget_mb), {"cpu": 1})
    experiment = folder / "trials"
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the tune in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        space = search_space(cfg, fmap)
        tuner = tune.Tuner(
            trainable, param_space={"values": space},
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=trials,
                search_alg=BasicVariantGenerator(random_state=cfg.trainer.seed),
                scheduler=ASHAScheduler(max_t=len(cfg.compress.stages) + 1, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="trials", storage_path=str(folder), verbose=0))
    grid = tuner.fit()
    if grid.errors and len(grid.errors) == len(grid):
        raise grid.errors[0]  # every trial failed: say why (a config mistake is one line at the CLI)
    rows = []
    for result in grid:
        if result.metrics is None or "valid_auc" not in result.metrics:
            continue
        m = result.metrics
        rows.append({"trial": m.get("trial_id"), "values": result.config["values"], "stage": m["stage"],
                     "valid_auc": m["valid_auc"], "bytes": m["bytes"], "objective": m["objective"]})
    rows.sort(key=lambda r: (r["bytes"], -r["valid_auc"]))
    for row, front in zip(rows, pareto([(r["bytes"], r["valid_auc"]) for r in rows])):
        row["pareto"] = front
    write_results(folder, rows, budget_mb)
    return rows


def results_table(rows: list[dict[str, Any]], budget_mb: float | None) -> str:
    best = max((r for r in rows if budget_mb is None or r["bytes"] <= budget_mb * 2**20),
               key=lambda r: r["valid_auc"], default=None)
    lines = ["| trial | last stage | bytes | valid AUC | on the Pareto front | best within budget | settings |",
             "|---|---|---:|---:|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={_short(v)}" for k, v in r["values"].items())
        lines.append(f"| {r['trial']} | {r['stage']} | {r['bytes']:,} | {r['valid_auc']:.5f} | "
                     f"{'yes' if r['pareto'] else ''} | {'yes' if budget_mb is not None and r is best else ''} | {settings} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{_short(v)}" for k, v in value.items())
    return str(value)


def write_results(folder: Path, rows: list[dict[str, Any]], budget_mb: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(folder / "results.json", json.dumps({"budget_mb": budget_mb, "trials": rows}, indent=2) + "\n")
    atomic_write_text(folder / "results.md", results_table(rows, budget_mb) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes, aucs = np.array([r["bytes"] for r in rows]), np.array([r["valid_auc"] for r in rows])
    front = np.array([r["pareto"] for r in rows], dtype=bool)
    ax.scatter(sizes[~front], aucs[~front], color="grey", label="trials")
    ax.plot(sizes[front], aucs[front], marker="o", color="C0", label="Pareto front")
    if budget_mb is not None:
        ax.axvline(budget_mb * 2**20, color="C3", linestyle=":", label="budget")
    ax.set(xscale="log", xlabel="edge model bytes", ylabel="validation AUC", title="Tune: size vs AUC")
    ax.legend(fontsize=7)
    atomic_write(folder / "frontier.png", lambda fh: fig.savefig(fh, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)
