"""Shared fixtures: small generated datasets (made once per session) and a prepare helper."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from ctr.compress.recipe import run_recipe
from ctr.config import AFMConfig, AFMStep, OptEmbedConfig, OptEmbedStep, OptFSConfig, OptFSStep, RankRule, TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.loader import ParquetBatches
from ctr.models import model_config
from ctr.run_dir import RunDir
from ctr.train import Trainer
from features.prepare import PrepareResult, prepare
from features.parse import ROW
from features.schema import DatasetConfig
from features.split import SPLIT_COLUMN, split_expr
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


@pytest.fixture(scope="session")
def runs(prepared_criteo: PrepareResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained DCNv2 with an AFM stage (projection + factorised layers), and a unified-embedding DNN."""
    out = {}
    for name, model in (("dcnv2", model_config(name="dcnv2", hidden=[32, 16], cross_layers=2, embedding=embedding_config(dim=8))),
                        ("unified", model_config(name="dnn", hidden=[16], embedding=embedding_config(dim=8, kind="unified", num_rows=3000)))):
        run_dir = tmp_path_factory.mktemp(name)
        cfg = ExperimentConfig(
            name=name, dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared_criteo.output)),
            model=model, trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, progress=False, threads=1,
                                               run_dir=str(run_dir), lr=3e-3),
            compress=[AFMStep(afm=AFMConfig(layer_rank=RankRule(fixed=4), embedding_rank=RankRule(fixed=4),
                                            embeddings=model.embedding.kind == "per_field", finetune_epochs=0))])
        fmap = prepared_criteo.feature_map
        Trainer(cfg, fmap, prepared_criteo.output, run_dir).fit()
        RunDir(run_dir).link_data(prepared_criteo.output)
        run_recipe(cfg, fmap, prepared_criteo.output, run_dir)
        out[name] = run_dir
    return out


# Small recipes on the session's prepared set: one trained baseline per model, copied by each test
# that compresses it (tests/test_structure.py, tests/test_onnx.py).
STAGES = {
    "optfs": OptFSStep(optfs=OptFSConfig(search_epochs=2, rewind_epoch=1, retrain_epochs=1, final_temp=50.0,
                                         penalty=1e-4)),
    "optembed": OptEmbedStep(optembed=OptEmbedConfig(rows=False, search_rows=2000, population=4, parents=2,
                                                      generations=2, retrain_epochs=1)),
    "afm": AFMStep(afm=AFMConfig(layer_rank=RankRule(fixed=4), embedding_rank=RankRule(fixed=4), finetune_epochs=0)),
}
MODELS = {
    "dnn": {"name": "dnn", "hidden": [32, 16]},
    "deepfm": {"name": "deepfm", "hidden": [16]},
    "dcnv2": {"name": "dcnv2", "hidden": [16], "cross_layers": 2},
    "finalmlp": {"name": "finalmlp", "stream1": [32, 16], "stream2": [16], "gate_hidden": [8], "heads": 4},
}


def recipe_experiment(prepared: PrepareResult, run_dir: Path, model: str, stages: list[str]) -> ExperimentConfig:
    return ExperimentConfig(
        name="t", dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared.output)),
        model=model_config(embedding=embedding_config(dim=8), **MODELS[model]),
        trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, progress=False, threads=1,
                              run_dir=str(run_dir), lr=3e-3),
        compress=[STAGES[s] for s in stages])


@pytest.fixture(scope="session")
def baselines(prepared_criteo: PrepareResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained baseline per model, copied by each test that compresses it."""
    out = {}
    for model in MODELS:
        run_dir = tmp_path_factory.mktemp(f"base_{model}")
        cfg = recipe_experiment(prepared_criteo, run_dir, model, [])
        Trainer(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir).fit()
        RunDir(run_dir).link_data(prepared_criteo.output)
        out[model] = run_dir
    return out


def copy_run(baselines: dict[str, Path], model: str, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(baselines[model], run_dir)
    return run_dir


FRESH_LINES = """
import sys, torch
model = torch.jit.load(sys.argv[1])
lines = open(sys.argv[2], encoding="utf-8").read().split("\\n")
with torch.no_grad():
    got = torch.cat([model.score_lines(lines[:1]), model.score_lines(lines[1:8]), model.score_lines(lines[8:])])
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu', 'ctr', 'features', 'deploy',
                                                              'polars', 'pyarrow'))
assert not leaked, leaked
torch.save(got, sys.argv[3])
"""  # argv: edge file, lines file, where the scores go; the process imports torch alone


def raw_test_rows(raw: Path, prepared: PrepareResult, rows: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The raw lines of the first ``rows`` test-split rows, with their prepared dense features and ids."""
    fmap = prepared.feature_map
    lines = raw.read_text(encoding="utf-8").splitlines()
    lines = lines[1:] if fmap.raw_layout is not None and fmap.raw_layout.header else lines
    first = fmap.extends.rows_before if fmap.extends else 0  # an extended day's positions continue its parent's
    split = pl.DataFrame({ROW: np.arange(first, first + len(lines), dtype=np.uint64)}).select(
        split_expr(fmap.split_rule, len(lines), first_row=first))
    test_lines = [lines[i] for i in np.flatnonzero(split[SPLIT_COLUMN].to_numpy() == 2)[:rows]]
    batch = next(iter(ParquetBatches(prepared.output / fmap.splits["test"].file, fmap, rows)))
    return test_lines, batch.dense, batch.ids()
