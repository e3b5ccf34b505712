"""Raw rows of every kind of layout, scored by the edge file alone in a torch-only process, equal
``ctr score`` on the same rows prepared: Avazu's CSV with its hour field, a declared generic table
with a dense numeric column, and a Criteo model after OptFS -> AFM -> quantize."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.compress.recipe import run_recipe
from ctr.config import QuantizeConfig, QuantizeStep, TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.models import model_config
from ctr.run_dir import RunDir
from ctr.train import Trainer
from deploy.export import export_model, load_edge
from features.prepare import PrepareResult
from features.schema import ColumnSpec, DatasetConfig
from pipelines.synthetic import generate

from conftest import FRESH_LINES, copy_run, raw_test_rows, recipe_experiment, run_prepare

pytestmark = pytest.mark.slow


def lines_match_prepared(edge: Path, raw: Path, prepared: PrepareResult, tmp_path: Path) -> None:
    """The first 300 test rows as raw lines, scored in a fresh process, against the prepared rows."""
    lines, dense, ids = raw_test_rows(raw, prepared, 300)
    (tmp_path / "lines.txt").write_text("\n".join(lines), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", FRESH_LINES, str(edge), str(tmp_path / "lines.txt"),
                           str(tmp_path / "got.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    with torch.no_grad():
        expected = load_edge(edge)(dense, ids)
    assert got.shape == expected.shape == (len(lines),) and len(lines) > 100
    assert float((got - expected).abs().max()) <= 1e-6


def trained_dnn(prepared: PrepareResult, layout: str, run_dir: Path, **dataset: object) -> Path:
    cfg = ExperimentConfig(
        name="raw", dataset=DatasetConfig(name="test", layout=layout, output=str(prepared.output), **dataset),
        model=model_config(name="dnn", hidden=[16], embedding=embedding_config(dim=8)),
        trainer=TrainerConfig(batch_size=512, eval_batch_size=8192, epochs=1, progress=False, threads=1,
                              run_dir=str(run_dir), lr=3e-3))
    Trainer(cfg, prepared.feature_map, prepared.output, run_dir).fit()
    RunDir(run_dir).link_data(prepared.output)
    return run_dir


def generic_table(path: Path, rows: int) -> list[ColumnSpec]:
    """A ';'-separated table: label, a token, a float with blanks and negatives, a count, a dropped note."""
    gen = np.random.default_rng(5)
    tokens = np.array([f"tok{k}" for k in range(40)] + ["", "ünïcode", "with space"])
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            t = tokens[min(int(gen.zipf(1.3)) - 1, tokens.size - 1)]
            x = "" if gen.random() < 0.1 else f"{gen.normal() * 10 ** gen.integers(0, 4):.6g}"
            n = "" if gen.random() < 0.1 else str(int(gen.integers(-3, 5000)))
            y = int(gen.random() < (0.7 if t in ("tok0", "tok3") else 0.2))
            fh.write(f"{y};{t};{x};{n};note\n")
    return [ColumnSpec(name="y", kind="label"), ColumnSpec(name="t", kind="categorical"),
            ColumnSpec(name="x", kind="numeric"), ColumnSpec(name="n", kind="integer"), ColumnSpec(name="z", kind="drop")]


def test_avazu_csv_rows_with_their_hour_fields(tmp_path: Path) -> None:
    raw = tmp_path / "avazu.csv"
    generate("avazu", 6000, raw, seed=3)
    prepared = run_prepare(raw, tmp_path / "prepared", layout="avazu_csv", min_count=2)
    run = trained_dnn(prepared, "avazu_csv", tmp_path / "run")
    export_model(run, tmp_path / "m.pt")
    lines_match_prepared(tmp_path / "m.pt", raw, prepared, tmp_path)


def test_a_generic_table_with_dense_and_integer_columns(tmp_path: Path) -> None:
    raw = tmp_path / "table.txt"
    columns = generic_table(raw, 6000)
    options = {"columns": columns, "separator": ";", "header": False}
    prepared = run_prepare(raw, tmp_path / "prepared", layout="generic", min_count=2, **options)
    assert [f.name for f in prepared.feature_map.dense] == ["x"]
    run = trained_dnn(prepared, "generic", tmp_path / "run", **options)
    export_model(run, tmp_path / "m.pt")
    lines_match_prepared(tmp_path / "m.pt", raw, prepared, tmp_path)


def test_criteo_rows_after_optfs_afm_and_quantize(baselines: dict[str, Path], synthetic_criteo: Path,
                                                  prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    run_dir = copy_run(baselines, "dnn", tmp_path)
    cfg = recipe_experiment(prepared_criteo, run_dir, "dnn", ["optfs", "afm"])
    cfg = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={
        "stages": [*cfg.compress.stages, QuantizeStep(quantize=QuantizeConfig(bits=4, finetune_epochs=0))]})})
    lines = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir)
    manifest = export_model(run_dir, tmp_path / "m.pt", "latest")
    assert manifest["file_bytes"] == lines[-1]["bytes"]  # the recipe counted the whole file
    shipped, values = sum(manifest["inputs"]["shipped_values"].values()), sum(
        f.num_embeddings - 3 for f in prepared_criteo.feature_map.categorical)
    assert shipped < values  # the values OptFS removed are not in the file
    lines_match_prepared(tmp_path / "m.pt", synthetic_criteo, prepared_criteo, tmp_path)
