"""Warm start on an extended day: the parent's rows, optimizer state and scores carry over, new ids
read fresh rows, a compressed run grows and exports, and a killed warm start resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from ctr.checkpoint import load_checkpoint
from ctr.config import TrainerConfig
from ctr.distributed import fused_optimizer_state, local_process_group, plain_state_dict
from ctr.experiment import ExperimentConfig
from ctr.loader import ParquetBatches
from ctr.models import model_config
from ctr.models.weights import ModelWeights
from ctr.run_dir import RunDir
from ctr.train import Trainer, predict
from ctr.warm_start import grown
from deploy.export import export_model
from features.prepare import PrepareResult, prepare
from features.schema import DatasetConfig
from pipelines.synthetic import Day, generate

from conftest import copy_run, recipe_experiment, run_prepare
from test_raw_rows import lines_match_prepared

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def next_day(prepared_criteo: PrepareResult, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrepareResult]:
    """6,000 new rows of the session set's teacher (with values the first day never had), extended from it."""
    raw = tmp_path_factory.mktemp("day2") / "day2.txt"
    generate("criteo", 6000, raw, seed=7, day=Day(2))
    cfg = DatasetConfig(name="test", layout="criteo_tsv", output=str(raw.parent / "prepared"), min_count=2,
                        row_group_size=2048)
    return raw, prepare(cfg, raw=[raw], extend=prepared_criteo.output)


def child(prepared: PrepareResult, parent: Path, run_dir: Path, model: str = "dnn", **trainer: object) -> Trainer:
    cfg = recipe_experiment(prepared, run_dir, model, [])
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": str(parent), **trainer})})
    return Trainer(cfg, prepared.feature_map, prepared.output, run_dir)


def test_a_remap_grows_field_by_field_with_the_oov_row() -> None:
    old = {"embedding.remap": torch.tensor([-1, 5, -1, 0, 1,  -1, 0, 2]), "arch.w": torch.ones(2)}
    fresh = {"embedding.remap": torch.zeros(11, dtype=torch.int64), "arch.w": torch.zeros(2)}
    out = grown(old, fresh, [5, 3], [7, 4], Path("x"))
    # field 0 (OOV reads row 5) gains two ids, field 1 (OOV removed: -1) gains one
    assert out["embedding.remap"].tolist() == [-1, 5, -1, 0, 1, 5, 5, -1, 0, 2, 0]
    assert out["arch.w"].tolist() == [1, 1]
    tables = grown({"t": torch.ones(3, 2)}, {"t": torch.zeros(5, 2)}, [3], [5], Path("x"))["t"]
    assert tables.tolist() == [[1, 1]] * 3 + [[0, 0]] * 2
    with pytest.raises(ConfigError, match="only tables grow"):
        grown({"t": torch.ones(3, 2)}, {"t": torch.zeros(3, 4)}, [3], [3], Path("x"))


def test_warm_start_scores_old_rows_as_its_parent_and_new_ids_read_fresh_rows(
        baselines: dict[str, Path], prepared_criteo: PrepareResult, next_day: tuple[Path, PrepareResult],
        tmp_path: Path) -> None:
    _, day2 = next_day
    parent_dir = copy_run(baselines, "dnn", tmp_path)
    field = "C3"
    old_rows = next(f.num_embeddings for f in prepared_criteo.feature_map.categorical if f.name == field)
    assert next(f.num_embeddings for f in day2.feature_map.categorical if f.name == field) > old_rows  # new values
    parent = Trainer(recipe_experiment(prepared_criteo, parent_dir, "dnn", []), prepared_criteo.feature_map,
                     prepared_criteo.output, parent_dir)
    warm = child(day2, parent_dir, tmp_path / "child")
    cold = Trainer(recipe_experiment(day2, tmp_path / "cold", "dnn", []), day2.feature_map, day2.output, tmp_path / "cold")
    old_valid = ParquetBatches(prepared_criteo.output / "valid.parquet", prepared_criteo.feature_map, 4096)
    with local_process_group():
        parent._build()
        parent.load_best_weights()
        warm._build()
        cold._build()
        assert np.array_equal(predict(parent.model, old_valid)[1], predict(warm.model, old_valid)[1])
        was, now, fresh = (ModelWeights(plain_state_dict(t.model)).table(field) for t in (parent, warm, cold))
        assert torch.equal(now[:old_rows], was) and torch.equal(now[old_rows:], fresh[old_rows:])
        saved = load_checkpoint(parent_dir / "checkpoints" / "best.pt")
        state = fused_optimizer_state(warm.model)
        for key, value in saved["sparse_optimizer"].items():  # row-wise Adagrad sums: old kept, new rows at zero
            assert torch.equal(state[key][:value.shape[0]], value) and not state[key][value.shape[0]:].any()
        assert warm.optimizer.state_dict()["state"][0]["exp_avg"].equal(saved["dense_optimizer"]["state"][0]["exp_avg"])
    assert json.loads((tmp_path / "child" / "parent.json").read_text())["run"] == str(parent_dir.resolve())


def test_a_compressed_run_warm_starts_exports_and_scores_the_new_days_raw_lines(
        runs: dict[str, Path], next_day: tuple[Path, PrepareResult], tmp_path: Path) -> None:
    raw, day2 = next_day
    parent_dir = tmp_path / "parent"
    shutil.copytree(runs["dcnv2"], parent_dir)
    export_model(parent_dir, tmp_path / "day1.pt", stage="latest")
    cfg = load_checkpoint(RunDir(parent_dir).stage_checkpoints()[-1])["model_config"]
    run_dir = tmp_path / "day2"
    exp = ExperimentConfig(name="t", dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(day2.output)),
                           model=model_config(**cfg),
                           trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, progress=False, threads=1,
                                                 run_dir=str(run_dir), lr=3e-3, init_from=str(parent_dir)))
    result = Trainer(exp, day2.feature_map, day2.output, run_dir).fit()
    assert result["test_auc"] > 0.6
    RunDir(run_dir).link_data(day2.output)
    manifest = export_model(run_dir, tmp_path / "day2.pt")
    assert {s["kind"] for s in manifest["steps"]} >= {"factorize_embedding", "factorize_linear"}
    assert manifest["parent"]["run"] == str(parent_dir.resolve())
    assert manifest["parent"]["file"]["file"] == str((tmp_path / "day1.pt").resolve())
    assert manifest["inputs"]["id_ranges"] == {f.name: f.num_embeddings for f in day2.feature_map.categorical}
    lines_match_prepared(tmp_path / "day2.pt", raw, day2, tmp_path)


def test_a_killed_warm_start_resumes_to_the_same_metrics(baselines: dict[str, Path], next_day: tuple[Path, PrepareResult],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, day2 = next_day
    parent_dir = copy_run(baselines, "dnn", tmp_path)
    options = {"batch_size": 256, "eval_every_steps": 6, "epochs": 1}
    straight = child(day2, parent_dir, tmp_path / "straight", **options).fit()
    real_step, calls = Trainer._step, {"n": 0}

    def dies_after_8_steps(self: Trainer, batch: object) -> float:
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_step", dies_after_8_steps)
    with pytest.raises(KeyboardInterrupt):
        child(day2, parent_dir, tmp_path / "killed", **options).fit()
    monkeypatch.setattr(Trainer, "_step", real_step)
    resumed = child(day2, parent_dir, tmp_path / "killed", **options).fit(resume=True)
    for key in ("test_auc", "test_logloss", "best_valid_auc", "best_step", "steps"):
        assert resumed[key] == straight[key], key


def test_warm_start_refuses_data_that_does_not_extend_the_parents(baselines: dict[str, Path], tmp_path: Path,
                                                                  synthetic_criteo: Path) -> None:
    other = run_prepare(synthetic_criteo, tmp_path / "other", min_count=2)
    with pytest.raises(ConfigError, match="does not extend"):
        child(other, copy_run(baselines, "dnn", tmp_path), tmp_path / "c")
