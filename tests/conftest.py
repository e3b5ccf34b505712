"""Shared fixtures: small generated datasets (made once per session) and a prepare helper."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from features.prepare import PrepareResult, prepare
from features.schema import DatasetConfig
from pipelines.synthetic import generate

DATA = Path(__file__).parent / "data"

# the machine has 2 cores shared with other processes: one intra-op thread is the stable choice
torch.set_num_threads(1)
os.environ.setdefault("POLARS_MAX_THREADS", "2")


def run_prepare(raw: list[Path] | Path, out: Path, layout: str = "criteo_tsv", **options: Any) -> PrepareResult:
    raw_list = raw if isinstance(raw, list) else [raw]
    cfg = DatasetConfig(name="test", layout=layout, output=str(out), **{"min_count": 1, **options})
    return prepare(cfg, raw=raw_list)


@pytest.fixture(scope="session")
def synthetic_criteo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "criteo.txt"
    generate("criteo", 20_000, path, seed=7)
    return path


@pytest.fixture(scope="session")
def prepared_criteo(synthetic_criteo: Path, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return run_prepare(synthetic_criteo, tmp_path_factory.mktemp("prepared") / "criteo", min_count=2, row_group_size=2048)
