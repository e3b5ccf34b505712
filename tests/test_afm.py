"""AFM: moments, PCA factorisation, BatchNorm folding, rank rules and budgets, the stage in models."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctr.checkpoint import load_checkpoint
from ctr.compress.afm import Moments, allocate_ranks, fold_batch_norm, pca_pair, principal_axes, rank_for
from ctr.compress.recipe import run_recipe
from ctr.compress.stage import plain_model
from ctr.config import AFMConfig, AFMStep, RankRule, TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.loader import ParquetBatches
from ctr.models import model_config
from ctr.train import Trainer, predict
from features.prepare import PrepareResult
from features.schema import DatasetConfig


def test_float64_moments_match_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(10_000, 6, generator=gen) * torch.tensor([1.0, 2, 3, 0.1, 5, 1]) + 100.0  # a large mean
    m = Moments(6)
    for chunk in y.split(999):
        m.add(chunk)
    reference = y.double().numpy()
    np.testing.assert_allclose(m.mean().numpy(), reference.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(m.covariance().numpy(), np.cov(reference, rowvar=False, bias=True), rtol=0, atol=1e-8)


def _outputs(linear: nn.Linear, x: torch.Tensor) -> tuple[Moments, torch.Tensor]:
    with torch.no_grad():
        y = linear(x)
    m = Moments(linear.out_features)
    m.add(y)
    return m, y


def test_full_rank_pair_reconstructs_the_layer_exactly() -> None:
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 5), torch.randn(500, 8)
    m, y = _outputs(linear, x)
    _, axes = principal_axes(m.covariance())
    pair = pca_pair(linear, m.mean(), axes)
    with torch.no_grad():
        assert torch.allclose(pair(x), y, atol=1e-5)


def test_the_two_linears_output_the_pca_reconstruction() -> None:
    torch.manual_seed(1)
    linear, x = nn.Linear(12, 7), torch.randn(800, 12)
    m, y = _outputs(linear, x)
    values, axes = principal_axes(m.covariance())
    assert torch.all(values[:-1] >= values[1:])  # descending
    u, mu = axes[:, :3].float(), m.mean().float()
    expected = mu + (y - mu) @ u @ u.T
    with torch.no_grad():
        assert torch.allclose(pca_pair(linear, m.mean(), axes[:, :3])(x), expected, atol=1e-5)
    pair = pca_pair(linear, m.mean(), axes[:, :3])
    assert (pair[0].weight.shape, pair[1].weight.shape) == ((3, 12), (7, 3))


def test_batch_norm_folding_is_exact_in_eval_mode() -> None:
    torch.manual_seed(2)
    linear, norm = nn.Linear(6, 4), nn.BatchNorm1d(4)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    norm.eval()
    x = torch.randn(64, 6)
    with torch.no_grad():
        assert torch.allclose(fold_batch_norm(linear, norm)(x), norm(linear(x)), atol=1e-6)


def test_rank_rules() -> None:
    values = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # shares .5 .3 .1 .05 .05
    assert rank_for(values, RankRule(fixed=2)) == 2
    assert rank_for(values, RankRule(fraction=0.5)) == 3  # ceil(2.5)
    assert rank_for(values, RankRule(energy=0.8)) == 2
    assert rank_for(values, RankRule(energy=0.81)) == 3
    assert rank_for(values, RankRule(energy=0.8), step=4) == 4
    assert rank_for(values, RankRule(fixed=9)) == 5  # capped at the width
    with pytest.raises(ValueError, match="exactly one"):
        RankRule(fixed=1, energy=0.9)


def test_budget_goes_to_the_layer_whose_variance_it_buys_most() -> None:
    # two 10x10 layers: one rank costs 21 parameters (+ 10 for the second bias); 'a' is rank 2 in
    # truth, 'b' spreads its variance evenly
    spectra = {"a": (torch.tensor([10.0, 10.0] + [0.0] * 8), 10, 10), "b": (torch.full((10,), 1.0), 10, 10)}
    assert allocate_ranks(spectra, budget=2 * (21 + 10)) == {"a": 1, "b": 1}
    assert allocate_ranks(spectra, budget=2 * 10 + 3 * 21) == {"a": 2, "b": 1}
    assert allocate_ranks(spectra, budget=2 * 10 + 4 * 21) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="below rank 1"):
        allocate_ranks(spectra, budget=40)


def experiment(prepared: PrepareResult, run_dir: Path, model: str, afm: AFMConfig) -> ExperimentConfig:
    return ExperimentConfig(
        name="t", dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared.output)),
        model=model_config(name=model, hidden=[32, 16], embedding=embedding_config(dim=8),
                           **({"cross_layers": 2} if model == "dcnv2" else {})),
        trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, progress=False, threads=1,
                              run_dir=str(run_dir), lr=3e-3),
        compress=[AFMStep(afm=afm)])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dnn", "deepfm", "dcnv2"])
def test_full_rank_embeddings_fold_or_project_without_changing_predictions(prepared_criteo: PrepareResult,
                                                                            tmp_path: Path, model: str) -> None:
    afm = AFMConfig(layers=False, embedding_rank=RankRule(fixed=8), finetune_epochs=0)
    cfg = experiment(prepared_criteo, tmp_path, model, afm)
    fmap = prepared_criteo.feature_map
    Trainer(cfg, fmap, prepared_criteo.output, tmp_path).fit()
    lines = run_recipe(cfg, fmap, prepared_criteo.output, tmp_path)
    valid = ParquetBatches(prepared_criteo.output / fmap.splits["valid"].file, fmap, 4096)
    _, before = predict(plain_model(fmap, load_checkpoint(tmp_path / "checkpoints" / "best.pt")), valid)
    payload = load_checkpoint(tmp_path / "compress" / "01_afm" / "checkpoint.pt")
    _, after = predict(plain_model(fmap, payload), valid)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert ("projection.weight" in payload["model"]) == (model != "dnn")  # DNN: folded into its first layer
    assert lines[1]["valid_auc"] == pytest.approx(lines[0]["valid_auc"], abs=1e-4)


@pytest.mark.slow
def test_afm_stage_compresses_layers_and_embeddings_then_fine_tunes_with_mimicking(prepared_criteo: PrepareResult,
                                                                                    tmp_path: Path) -> None:
    afm = AFMConfig(layer_rank=RankRule(fixed=4), embedding_rank=RankRule(fixed=4), finetune_epochs=1,
                    mimic_weight=1.0)
    cfg = experiment(prepared_criteo, tmp_path, "dcnv2", afm)
    fmap = prepared_criteo.feature_map
    Trainer(cfg, fmap, prepared_criteo.output, tmp_path).fit()
    base, stage = run_recipe(cfg, fmap, prepared_criteo.output, tmp_path)
    assert stage["factorized"] == {"arch.cross.layers.0.project": 4, "arch.cross.layers.1.project": 4,
                                   "arch.mlp.layers.0": 4, "arch.mlp.layers.2": 4}  # 32 -> 16 at rank 4: 4 x 48 < 512
    assert stage["embedding_ranks"] == [4] * len(fmap.categorical)
    assert stage["bytes"] < 0.6 * base["bytes"]
    assert stage["valid_auc"] > 0.6
    assert stage["valid_auc_after_finetune"] is not None
    payload = load_checkpoint(tmp_path / "compress" / "01_afm" / "checkpoint.pt")
    assert payload["model"]["arch.mlp.layers.0.0.weight"].shape == (4, 8 * len(fmap.categorical) + len(fmap.dense))


@pytest.mark.slow
def test_a_size_target_is_shared_out_or_refused_clearly(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    fmap = prepared_criteo.feature_map
    afm = AFMConfig(embedding_rank=RankRule(fixed=4), finetune_epochs=0)
    cfg = experiment(prepared_criteo, tmp_path, "dnn", afm)
    Trainer(cfg, fmap, prepared_criteo.output, tmp_path).fit()
    fits = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"target_mb": 0.4})})
    base, stage = run_recipe(fits, fmap, prepared_criteo.output, tmp_path)
    assert stage["bytes"] <= 0.4 * 2**20 < base["bytes"]
    tiny = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"target_mb": 0.001})})
    shutil.rmtree(tmp_path / "compress")
    with pytest.raises(ValueError, match=r"compress.target_mb 0.001: the parts AFM does not factorise already take"):
        run_recipe(tiny, fmap, prepared_criteo.output, tmp_path)
