"""The compress job: the experiment's trained run directory -> the stages of its ``compress:`` recipe.

The stages run on the trained run's own saved config (its data, model and trainer), with the
recipe (``compress:``, ``export:``) and the runtime settings (threads, progress bars) from today's
YAML. A YAML whose data or model differs from the trained run is refused, naming the keys: the
recipe would otherwise describe a model that was never trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from common.errors import ConfigError
from common.yaml_config import differing_keys
from ctr.compress.recipe import run_recipe, run_sweep
from ctr.experiment import ExperimentConfig, load_experiment
from ctr.run_dir import RunDir
from ctr.train import default_threads
from features.feature_map import FeatureMap
from pipelines.train_job import run_dir_of

COMPARED = ("dataset", "model")
T = TypeVar("T")


def recipe_config(config: Path, overrides: list[str]) -> tuple[ExperimentConfig, RunDir]:
    """Today's recipe on the trained run's saved config; refuses a YAML whose data or model differ."""
    cfg = load_experiment(config, overrides)
    run = RunDir(run_dir_of(cfg))
    if not run.best.is_file():
        raise ConfigError(f"{run.best}: no trained checkpoint; run 'ctr train {config}' first")
    saved = load_experiment(run.config)
    today, trained = cfg.model_dump(mode="json"), saved.model_dump(mode="json")
    changed = [k for section in COMPARED for k in differing_keys(today[section], trained[section], f"{section}.")]
    if changed:
        raise ConfigError(f"{config}: {', '.join(changed)} differ(s) from the trained run {run.root} "
                          f"(restore the trained values, or train a new run with another trainer.run_dir)")
    runtime = {"threads": cfg.trainer.threads, "progress": cfg.trainer.progress}
    merged = saved.model_copy(update={"compress": cfg.compress, "export": cfg.export,
                                      "trainer": saved.trainer.model_copy(update=runtime)})
    return merged, run


def _ready(config: Path, overrides: list[str]) -> tuple[ExperimentConfig, RunDir, Path]:
    cfg, run = recipe_config(config, overrides)
    if not cfg.compress.stages:
        raise ConfigError(f"{config}: no 'compress:' stages to run")
    data_dir = run.prepared_data()
    torch.set_num_threads(cfg.trainer.threads or default_threads())
    return cfg, run, data_dir


def _naming(config: Path, run: Callable[[], T]) -> T:
    """A stage's refusal (a budget out of reach, a step that cannot follow another) names the config."""
    try:
        return run()
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(config)) else f"{config}: {message}") from None


def run_compress(config: Path, overrides: list[str]) -> list[dict[str, Any]]:
    cfg, run, data_dir = _ready(config, overrides)
    return _naming(config, lambda: run_recipe(cfg, FeatureMap.load(data_dir), data_dir, run.root))


def sweep_targets(config: Path, spec: str) -> list[float]:
    """``target_mb=A,B,C`` -> [A, B, C] (positive, each once)."""
    key, _, values = spec.partition("=")
    try:
        if key.strip() != "target_mb":
            raise ValueError(f"the sweep varies target_mb, not '{key.strip()}'")
        targets = [float(v) for v in values.split(",")]
        if not targets or min(targets) <= 0 or len(set(targets)) != len(targets):
            raise ValueError("give distinct positive sizes in MB")
    except ValueError as exc:
        raise ConfigError(f"{config}: --sweep '{spec}': {exc} (write --sweep target_mb=1,2,4)") from None
    return targets


def run_compress_sweep(config: Path, overrides: list[str], spec: str) -> dict[float, list[dict[str, Any]]]:
    targets = sweep_targets(config, spec)
    cfg, run, data_dir = _ready(config, overrides)
    return _naming(config, lambda: run_sweep(cfg, FeatureMap.load(data_dir), data_dir, run.root, targets))
