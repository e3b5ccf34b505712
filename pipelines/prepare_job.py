"""The prepare job: make the raw file of a synthetic dataset if needed, then run the feature pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

from common.yaml_config import read_config, validate_tree
from features.prepare import PrepareResult, prepare
from features.schema import DatasetConfig, DatasetFile
from pipelines.synthetic import generate

log = logging.getLogger("ctr.prepare")


def ensure_synthetic_raw(cfg: DatasetConfig) -> None:
    """Write the generated raw file of a ``synthetic:`` dataset unless it is already there."""
    if cfg.synthetic is None:
        return
    path = Path(cfg.raw[0])  # exactly one: the config's validator checked it
    if path.exists():
        return
    s = cfg.synthetic
    report = generate(s.kind, s.rows, path, seed=s.seed, profile=s.profile, noise=s.noise)
    log.info("generated %d %s rows -> %s in %.1fs (teacher AUC %.4f)", s.rows, s.kind, path, report.seconds, report.teacher_auc)


def load_dataset(config: Path, overrides: list[str]) -> DatasetConfig:
    """The ``dataset:`` section of a dataset file or of a whole experiment file. An experiment is
    validated whole but for ``model:``, which ``ctr train`` checks: its config classes live with the
    models, behind a torch import that prepare does without (about 2.5 s of start-up)."""
    tree, origins = read_config(config, overrides)
    if "model" not in tree:
        return validate_tree(DatasetFile, tree, origins, str(config)).dataset
    from ctr.config import ExperimentSections  # the experiment's sections: only for an experiment file

    sections = {k: v for k, v in tree.items() if k != "model"}
    return validate_tree(ExperimentSections, sections, origins, str(config)).dataset


def run_prepare(config: Path, overrides: list[str], raw: list[Path] | None, output: Path | None,
                extend: Path | None = None) -> PrepareResult:
    cfg = load_dataset(config, overrides)
    if not raw:
        ensure_synthetic_raw(cfg)
    return prepare(cfg, raw=raw, output=output, extend=extend)
