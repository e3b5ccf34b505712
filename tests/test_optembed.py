"""OptEmbed: straight-through gradient, prefix masks, evolution operators, exact narrowing, the stage."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ctr.checkpoint import load_checkpoint
from ctr.compress.optembed import BinaryStep, OptEmbedMask, WidthSearch, crossover, mutate, prefix_mask, step_gradient
from ctr.compress.recipe import run_recipe
from ctr.compress.stage import plain_model
from ctr.compress.tables import compact_rows, narrow_state
from ctr.config import OptEmbedConfig, OptEmbedStep, TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.loader import Batch, ParquetBatches
from ctr.models import build_model, model_config, model_layout
from ctr.models.weights import ModelWeights
from ctr.structure import NarrowWidths, step_to_dict
from ctr.train import Trainer
from features.feature_map import FieldInfo
from features.prepare import PrepareResult
from features.schema import DatasetConfig


@pytest.mark.parametrize(("x", "grad"), [(0.0, 2.0), (0.2, 1.2), (-0.2, 1.2), (0.4, 0.4), (-0.4, 0.4), (0.41, 0.4),
                                         (0.7, 0.4), (1.0, 0.4), (-1.0, 0.4), (1.01, 0.0), (-3.0, 0.0)])
def test_straight_through_gradient_at_the_break_points(x: float, grad: float) -> None:
    t = torch.tensor([x], requires_grad=True)
    out = BinaryStep.apply(t)
    out.sum().backward()
    assert out.item() == (1.0 if x > 0 else 0.0)
    assert t.grad.item() == pytest.approx(grad)
    assert step_gradient(torch.tensor([x])).item() == pytest.approx(grad)


def test_prefix_masks() -> None:
    mask = prefix_mask(torch.tensor([4, 8, 0]), 8)
    assert mask.tolist() == [[True] * 4 + [False] * 4, [True] * 8, [False] * 8]


def test_mask_samples_widths_in_training_and_applies_the_candidate_in_evaluation() -> None:
    masks = OptEmbedMask(limits=[8, 8, 4], dim=8, rows=False)
    emb = torch.ones(1000, 3, 8)
    kept = masks(emb, None, None).sum(-1)  # training: a random prefix of 4 or 8 per sample and field
    assert set(kept[:, :2].unique().tolist()) == {4.0, 8.0}
    assert set(kept[:, 2].unique().tolist()) == {4.0}  # never wider than the field's stored width
    masks.eval()
    assert torch.equal(masks(emb, None, None), emb)  # no candidate: full width
    masks.widths = torch.tensor([4, 8, 4])
    assert masks(emb, None, None).sum(-1)[0].tolist() == [4.0, 8.0, 4.0]


def test_row_mask_drops_rows_whose_l1_norm_is_under_the_threshold() -> None:
    masks = OptEmbedMask(limits=[4, 4], dim=4, rows=True).eval()
    with torch.no_grad():
        masks.threshold.copy_(torch.tensor([1.0, 0.5]))
    emb = torch.tensor([[[0.5, -0.5, 0.25, 0.0], [0.1, 0.1, 0.1, 0.1]]])  # norms 1.25 and 0.4
    out = masks(emb, None, None)
    assert torch.equal(out[0, 0], emb[0, 0]) and torch.equal(out[0, 1], torch.zeros(4))


def test_crossover_cuts_between_fields_never_copying_a_parent() -> None:
    rng = np.random.default_rng(0)
    a, b = np.full(5, 4), np.full(5, 16)
    cuts = set()
    for _ in range(200):
        child = crossover(a, b, rng)
        cut = int((child == 4).sum())
        assert child.tolist() == [4] * cut + [16] * (5 - cut)
        cuts.add(cut)
    assert cuts == {1, 2, 3, 4}  # every boundary between fields, and only those


def test_mutation_redraws_fields_from_the_choices_on_a_copy() -> None:
    rng = np.random.default_rng(0)
    parent = np.full(1000, 8)
    child = mutate(parent, 0.1, np.array([4, 8, 12, 16]), rng)
    assert (parent == 8).all()
    changed = (child != 8).mean()
    assert 0.05 < changed < 0.1  # 0.1 redrawn, a quarter of them back to 8
    assert set(child.tolist()) <= {4, 8, 12, 16}


def fields(*sizes: int) -> list[FieldInfo]:
    return [FieldInfo(name=f"f{i}", type="categorical", source=f"f{i}", transform="token_v1", num_embeddings=n)
            for i, n in enumerate(sizes)]


def test_compact_rows_follows_an_existing_remap() -> None:
    fs = fields(4)
    table = torch.arange(12, dtype=torch.float32).view(3, 4)  # 3 rows
    state = ModelWeights({})
    state.set_table("f0", table)
    state.set_remap(torch.tensor([2, -1, 0, 1]))
    out, rows = compact_rows(state.state, fs, [torch.tensor([True, False, True])])
    assert rows == [2]
    assert torch.equal(ModelWeights(out).table("f0"), table[[0, 2]])
    assert ModelWeights(out).remap.tolist() == [1, -1, 0, -1]  # id 0 -> old row 2 -> new row 1; old row 1 dropped


@pytest.mark.parametrize("model", [
    model_config(name="dnn", hidden=[16, 8]),
    model_config(name="deepfm", hidden=[16]),
    model_config(name="dcnv2", hidden=[16], cross_layers=2, structure="parallel"),
    model_config(name="dcnv2", hidden=[16], cross_layers=2, structure="stacked", low_rank=4),
], ids=["dnn", "deepfm", "dcnv2-parallel", "dcnv2-stacked-lowrank"])
def test_narrowed_tables_and_sliced_layers_equal_the_masked_wide_model(prepared_criteo: PrepareResult,
                                                                       model: Any) -> None:
    fmap = prepared_criteo.feature_map
    cfg = model.model_copy(update={"embedding": embedding_config(dim=12)})
    torch.manual_seed(0)
    wide = build_model(fmap, cfg, device=torch.device("cpu"))
    wide.gates = OptEmbedMask([12] * len(fmap.categorical), 12, rows=False)
    widths = [4, 8, 12] * (len(fmap.categorical) // 3) + [4] * (len(fmap.categorical) % 3)
    wide.gates.widths = torch.tensor(widths)
    wide.eval()
    state = {k: v for k, v in wide.state_dict().items() if not k.startswith("gates.")}
    steps = (NarrowWidths(widths=widths),)
    shapes = {k: v.shape for k, v in build_model(fmap, cfg, steps=steps).state_dict().items()}
    narrowed = narrow_state(state, shapes, fmap.categorical, model_layout(fmap, cfg), model_layout(fmap, cfg, steps),
                            len(fmap.dense))
    narrow = plain_model(fmap, {"model": narrowed, "model_config": cfg.model_dump(),
                                "steps": [step_to_dict(s) for s in steps]})
    assert sum(v.numel() for v in narrow.state_dict().values()) < sum(v.numel() for v in state.values())
    batch = next(iter(ParquetBatches(prepared_criteo.output / fmap.splits["valid"].file, fmap, 512)))
    with torch.no_grad():
        expected, got = wide(batch.dense, batch.sparse)[0], narrow(batch.dense, batch.sparse)[0]
    assert torch.allclose(expected, got, atol=1e-6, rtol=0)


def search_for(prepared: PrepareResult, **cfg: object) -> WidthSearch:
    """A search over a small untrained DNN; fitness is real AUC on 2k cached validation rows."""
    fmap = prepared.feature_map
    torch.manual_seed(0)
    model = build_model(fmap, model_config(name="dnn", hidden=[8], embedding=embedding_config(dim=8)),
                        device=torch.device("cpu"))
    model.gates = OptEmbedMask([8] * len(fmap.categorical), 8, rows=False)
    model.eval()
    batch: Batch = next(iter(ParquetBatches(prepared.output / fmap.splits["valid"].file, fmap, 2000)))
    with torch.no_grad():
        cache = [(model.lookup(batch.sparse), batch)]
    rows = np.array([int(f.num_embeddings) for f in fmap.categorical])
    options = {"population": 6, "parents": 3, "generations": 4, **cfg}
    return WidthSearch(OptEmbedConfig(**options), model, cache, rows, int(rows.sum()) * 8, seed=3)


def test_search_resumes_from_its_last_generation(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    straight = search_for(prepared_criteo).run(tmp_path / "a.jsonl")
    search_for(prepared_criteo, generations=2).run(tmp_path / "b.jsonl")
    resumed = search_for(prepared_criteo).run(tmp_path / "b.jsonl")
    assert {**resumed, "scored_here": 0} == {**straight, "scored_here": 0}
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_search_respects_the_parameter_budget(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    found = search_for(prepared_criteo, max_embedding_share=0.6).run(tmp_path / "s.jsonl")
    rows = np.array([int(f.num_embeddings) for f in prepared_criteo.feature_map.categorical])
    assert found["params"] == int((rows * np.array(found["widths"])).sum()) <= 0.6 * rows.sum() * 8
    with pytest.raises(ValueError, match="max_embedding_share 0.4 is below"):
        search_for(prepared_criteo, max_embedding_share=0.4)


@pytest.mark.slow
def test_optembed_stage_prunes_rows_narrows_tables_and_resumes(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    fmap = prepared_criteo.feature_map
    optembed = OptEmbedConfig(supernet_epochs=1, threshold_lr=0.5, threshold_penalty=0.5, search_rows=2000,
                              population=4, parents=2, generations=2, retrain_epochs=1, max_embedding_share=0.5)
    cfg = ExperimentConfig(
        name="t", dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared_criteo.output)),
        model=model_config(name="dnn", hidden=[32, 16], embedding=embedding_config(dim=8)),
        trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, progress=False, threads=1,
                              run_dir=str(tmp_path), lr=3e-3),
        compress=[OptEmbedStep(optembed=optembed)])
    Trainer(cfg, fmap, prepared_criteo.output, tmp_path).fit()
    lines = run_recipe(cfg, fmap, prepared_criteo.output, tmp_path)
    base, stage = lines
    assert stage["rows_after"] < stage["rows_before"]  # the thresholds rose and cut rows
    assert all(w in (4, 8) for w in stage["widths"].values())
    assert stage["embedding_bytes"] < 0.5 * base["embedding_bytes"] + 4 * stage["rows_before"]  # + the int32 remap
    assert stage["valid_auc"] > 0.6
    payload = load_checkpoint(tmp_path / "compress" / "01_optembed" / "checkpoint.pt")
    assert payload["steps"][-1] == {"kind": "narrow_widths", "widths": list(stage["widths"].values()),
                                    "by": "01_optembed"}
    assert stage["exact_max_diff"] <= 1e-6
    for f in fmap.categorical:
        assert ModelWeights(payload["model"]).table(f.name).shape == (
            stage["kept_rows"][f.name] or 1, stage["widths"][f.name])
    # the phases are done: a second run of the stage finds them all (search included) and redoes nothing
    (tmp_path / "compress" / "01_optembed" / "checkpoint.pt").unlink()
    search_log = (tmp_path / "compress" / "01_optembed" / "search.jsonl").read_text()
    again = run_recipe(cfg, fmap, prepared_criteo.output, tmp_path)
    assert (tmp_path / "compress" / "01_optembed" / "search.jsonl").read_text() == search_log
    assert again[1]["valid_auc"] == stage["valid_auc"]
