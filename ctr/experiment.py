"""The whole experiment file: the torch-free sections of ``ctr.config`` plus ``model:``, whose config
class the model registry picks by ``model.name``."""

from __future__ import annotations

from pathlib import Path

from common.yaml_config import load_config
from ctr.config import ExperimentSections
from ctr.models import ModelConfig


class ExperimentConfig(ExperimentSections):
    model: ModelConfig


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)
