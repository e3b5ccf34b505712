"""The compress job: the experiment's trained run directory -> the stages of its ``compress:`` recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctr.compress.recipe import run_recipe
from ctr.config import load_experiment
from ctr.train import BEST, default_threads
from features.yaml_config import ConfigError
from pipelines.train_job import prepared_data


def run_compress(config: Path, overrides: list[str]) -> list[dict[str, Any]]:
    cfg = load_experiment(config, overrides)
    if not cfg.compress.stages:
        raise ConfigError(f"{config}: no 'compress:' stages to run")
    run_dir = Path(cfg.trainer.run_dir or f"runs/{cfg.name}")
    if not (run_dir / "checkpoints" / BEST).is_file():
        raise ConfigError(f"{run_dir / 'checkpoints' / BEST}: no trained checkpoint; run 'ctr train {config}' first")
    data_dir, fmap = prepared_data(cfg)
    torch.set_num_threads(cfg.trainer.threads or default_threads())
    return run_recipe(cfg, fmap, data_dir, run_dir)
