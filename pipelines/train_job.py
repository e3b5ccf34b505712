"""The train job: resolve the experiment, make sure its data is prepared, set up the run directory, train.

Run directory layout: ``config.yaml`` (the resolved experiment, all defaults filled in),
``feature_map.json`` (a copy of the data's contract, plus ``data.json`` naming where the data is),
``checkpoints/{last,best}.pt``, ``metrics.jsonl`` (one JSON line per validation and the test) and
``result.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write_text
from common.errors import ConfigError
from ctr.experiment import ExperimentConfig, load_experiment
from ctr.run_dir import RunDir
from ctr.train import Trainer
from ctr.warm_start import WarmStart, warm_start
from features.feature_map import FILE_NAME, FeatureMap
from features.prepare import prepare
from features.schema import config_fingerprint
from pipelines.prepare_job import ensure_synthetic_raw

log = logging.getLogger("ctr.train")


def prepared_data(cfg: ExperimentConfig) -> tuple[Path, FeatureMap]:
    """The prepared splits of the experiment's dataset, preparing them first if they do not exist."""
    out = Path(cfg.dataset.output)
    wanted = config_fingerprint(cfg.dataset, [str(Path(p)) for p in cfg.dataset.raw])
    if (out / FILE_NAME).is_file():
        fmap = FeatureMap.load(out)
        if fmap.config_fingerprint == wanted:
            return out, fmap
        if fmap.extends is not None:  # preparing it again from the config would drop the ids it kept
            raise ConfigError(f"{out / FILE_NAME}: this day was prepared with --extend from other raw files or settings "
                              f"than the experiment's dataset section (give the day's files: dataset.raw=[...], "
                              "and the settings it was prepared with)")
    log.info("preparing dataset '%s' into %s (none there, or made by another dataset config)", cfg.dataset.name, out)
    ensure_synthetic_raw(cfg.dataset)
    return out, prepare(cfg.dataset).feature_map


def run_dir_of(cfg: ExperimentConfig) -> Path:
    """Where an experiment's run lives: ``trainer.run_dir``, or ``runs/<name>``."""
    return RunDir.of(cfg.trainer.run_dir, cfg.name).root


def run_train(config: Path | None, overrides: list[str], resume: Path | None = None,
              use_ray: bool = False, init_from: Path | None = None) -> dict[str, Any]:
    """Train locally, or on Ray Train when ``trainer.num_workers > 1`` or ``use_ray``; ``init_from``
    (or ``trainer.init_from``): start from that run's final model (``ctr.warm_start``)."""
    if resume is not None:
        if config is not None or overrides or init_from is not None:
            raise ConfigError("--resume continues a run with its saved config: give no config file, overrides or --init-from")
        cfg = load_experiment(RunDir(resume).config)
        run_dir = resume
    else:
        if config is None:
            raise ConfigError("ctr train needs an experiment config (or --resume RUN_DIR)")
        cfg = load_experiment(config, overrides)
        start = init_from or (Path(cfg.trainer.init_from) if cfg.trainer.init_from else None)
        if start is not None:  # absolute, as Ray workers and a later --resume read it from config.yaml
            cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": str(start.resolve())})})
        run_dir = run_dir_of(cfg)
        if RunDir(run_dir).metrics.exists():
            raise ConfigError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                              f"or set trainer.run_dir to a new directory")
    if (use_ray or cfg.trainer.num_workers > 1) and cfg.trainer.init_from:
        raise ConfigError(f"{cfg.trainer.init_from}: a warm start runs in one process (set trainer.num_workers=1 "
                          "and leave out --ray)")
    if resume is not None:  # the data the run was trained on, wherever the command runs from
        data_dir = RunDir(resume).prepared_data()
        fmap = FeatureMap.load(data_dir)
    else:
        data_dir, fmap = prepared_data(cfg)
    warm: WarmStart | None = None
    if cfg.trainer.init_from:  # checked once, before the run directory is made
        warm = warm_start(Path(cfg.trainer.init_from), fmap, data_dir, cfg.model.model_dump(mode="json"))
    if resume is None:
        run = RunDir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        run.link_data(data_dir)
    if use_ray or cfg.trainer.num_workers > 1:
        from pipelines.ray_train import run_ray_train  # Ray starts only when asked for

        return run_ray_train(cfg, fmap, data_dir, run_dir, resume=resume is not None)
    return Trainer(cfg, fmap, data_dir, run_dir, warm=warm).fit(resume=resume is not None)
