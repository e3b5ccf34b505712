"""Compression as replayable structure steps: any stage order, content-keyed stages, the edge model
built from the training modules, bytes counted on the edge format, and FinalMLP through all of it."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from ctr.capabilities import DENSE_ARCH, PER_FIELD_TABLES
from ctr.checkpoint import load_checkpoint
from ctr.compress.recipe import run_recipe
from ctr.compress.stage import model_size, plain_model
from ctr.config import AFMConfig, AFMStep, OptFSStep, RankRule
from ctr.models import build_model, capabilities, model_config
from ctr.models.weights import ModelWeights
from ctr.run_dir import RunDir
from ctr.structure import FactorizeEmbedding, Layout, NarrowWidths, SelectRows, step_from_dict, step_to_dict
from ctr.edge.layout import edge_slots, vocabulary_bytes, vocabulary_keys
from ctr.edge.model import edge_bytes, edge_model
from ctr.edge.raw import feature_specs, raw_layout
from deploy.export import export_model
from features.prepare import PrepareResult
from pipelines.evaluate import evaluate

from conftest import STAGES, copy_run, recipe_experiment

ORDERS = [list(order) for order in itertools.permutations(STAGES)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dnn", "dcnv2"])
@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_stage_order_gives_the_model_it_claims_and_exports(baselines: dict[str, Path], prepared_criteo: PrepareResult,
                                                                 tmp_path: Path, model: str, order: list[str]) -> None:
    run_dir = copy_run(baselines, model, tmp_path)
    cfg = recipe_experiment(prepared_criteo, run_dir, model, order)
    lines = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir)
    assert [line["stage"] for line in lines] == ["baseline", *order]
    for line in lines[1:]:  # each reshaping equals the masked / factorised model it came from
        assert line["exact_max_diff"] <= 1e-6, (line["stage_id"], line["exact_max_diff"])
    final = load_checkpoint(RunDir(run_dir).stage_checkpoints()[-1])
    kinds = [s["kind"] for s in final["steps"]]
    assert {"select_rows", "narrow_widths", "factorize_embedding"} <= set(kinds)  # every stage's steps survive
    assert lines[-1]["bytes"] < lines[0]["bytes"]
    manifest = export_model(run_dir, tmp_path / "m.pt", "latest")
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    assert manifest["steps"] == final["steps"]


@pytest.mark.slow
def test_finalmlp_trains_compresses_exports_and_evaluates(baselines: dict[str, Path], prepared_criteo: PrepareResult,
                                                          tmp_path: Path) -> None:
    run_dir = copy_run(baselines, "finalmlp", tmp_path)
    cfg = recipe_experiment(prepared_criteo, run_dir, "finalmlp", ["optfs", "optembed", "afm"])
    lines = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir)
    assert lines[0]["valid_auc"] > 0.6 and all(line["exact_max_diff"] <= 1e-6 for line in lines[1:])
    assert lines[-1]["factorized"]  # AFM found the two streams' Linears to factorise
    exported = [tmp_path / "base.pt", tmp_path / "small.pt"]
    export_model(run_dir, exported[0])
    export_model(run_dir, exported[1], "latest")
    test = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    result = evaluate(exported, test, tmp_path / "evaluation")
    assert [m["auc"] > 0.6 for m in result["models"]] == [True, True]


@pytest.mark.slow
def test_a_changed_stage_reruns_with_the_later_ones_and_unchanged_stages_are_reused(
        baselines: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    run_dir = copy_run(baselines, "dnn", tmp_path)
    fmap, data = prepared_criteo.feature_map, prepared_criteo.output
    run = RunDir(run_dir)
    cfg = recipe_experiment(prepared_criteo, run_dir, "dnn", ["optfs", "afm"])
    run_recipe(cfg, fmap, data, run_dir)
    mtimes = lambda: [p.stat().st_mtime_ns for p in run.stage_checkpoints()]  # noqa: E731
    first = mtimes()
    run_recipe(cfg, fmap, data, run_dir)
    assert mtimes() == first  # nothing changed: both reused
    afm = AFMStep(afm=AFMConfig(layer_rank=RankRule(fixed=2), embedding_rank=RankRule(fixed=4), finetune_epochs=0))
    changed = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"stages": [STAGES["optfs"], afm]})})
    lines = run_recipe(changed, fmap, data, run_dir)
    second = mtimes()
    assert second[0] == first[0] and second[1] != first[1]  # optfs reused, afm ran again
    assert set(lines[2]["factorized"].values()) == {2}
    superseded = sorted(p.name for p in (run.compress / "superseded").iterdir())
    assert len(superseded) == 1 and superseded[0].startswith("02_afm-")
    assert (run.compress / "superseded" / superseded[0] / "checkpoint.pt").is_file()  # moved aside, not deleted
    optfs = OptFSStep(optfs=STAGES["optfs"].optfs.model_copy(update={"penalty": 2e-4}))
    both = changed.model_copy(update={"compress": changed.compress.model_copy(update={"stages": [optfs, afm]})})
    run_recipe(both, fmap, data, run_dir)
    third = mtimes()
    assert third[0] != second[0] and third[1] != second[1]  # the first stage changed: both ran
    report = [line["stage_id"] for line in run_recipe(both, fmap, data, run_dir)]
    assert report == ["00_baseline", "01_optfs", "02_afm"] and mtimes() == third


def test_a_stage_the_model_does_not_allow_is_refused_before_stage_1(prepared_criteo: PrepareResult,
                                                                    tmp_path: Path) -> None:
    """Capabilities are declared by the tables and the model spec; the recipe checks every stage
    against them before it touches the run (no folder, no report)."""
    cases = [
        ({"name": "dnn", "hidden": [8], "embedding": {"kind": "unified", "dim": 8, "budget_mb": 0.1}}, ["optfs"],
         "compress stage 1 (optfs): it needs row selection, which model 'dnn' with embedding kind 'unified' does not allow"),
        ({"name": "lr"}, ["afm"], "compress stage 1 (afm): it needs factorised embeddings and factorised layers, which "
                                  "model 'lr' (no embedding tables) does not allow"),
    ]
    for model, stages, message in cases:
        cfg = recipe_experiment(prepared_criteo, tmp_path, "dnn", stages).model_copy(update={"model": model_config(**model)})
        assert capabilities(cfg.model) < PER_FIELD_TABLES | DENSE_ARCH
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path)
        assert not RunDir(tmp_path).compress.exists()
    per_field = recipe_experiment(prepared_criteo, tmp_path, "dnn", [])
    assert capabilities(per_field.model) == PER_FIELD_TABLES | DENSE_ARCH
    with pytest.raises(ConfigError, match="01_optfs: its select_rows step needs row selection, which model 'lr'"):
        build_model(prepared_criteo.feature_map, model_config(name="lr"), steps=[SelectRows(rows=[5] * 26, by="01_optfs")])


def test_model_weights_find_every_part_in_a_real_models_state(prepared_criteo: PrepareResult) -> None:
    """The one place that knows state-dict keys reads them from a built model, so a change of
    TorchRec's naming or of a model's attributes fails here, not silently in a stage."""
    fmap = prepared_criteo.feature_map
    fields = [f.name for f in fmap.categorical]
    rows = [int(f.num_embeddings or 0) for f in fmap.categorical]
    steps = [SelectRows(rows=[5] * len(fields), by="01_optfs"),
             FactorizeEmbedding(ranks=[4] * len(fields), restores=[8] * len(fields), folded=False, by="02_afm")]
    model = build_model(fmap, model_config(name="dnn", hidden=[8], embedding={"dim": 8}), torch.device("cpu"), steps)
    weights = ModelWeights(model.state_dict())
    assert [tuple(weights.table(f).shape) for f in fields] == [(5, 4)] * len(fields)
    assert weights.remap.shape == (sum(rows),)
    assert weights.linear("arch.mlp.layers.0")[0].shape == (8, 8 * len(fields) + len(fmap.dense))  # restored width
    weights.set_projection(torch.ones(len(fields), 4, 8), torch.ones(len(fields), 8))
    model.load_state_dict(weights.state)
    assert bool((model.projection.weight == 1).all())
    model.gates = torch.nn.Module()
    model.gates.register_buffer("threshold", torch.zeros(len(fields)))
    gated = ModelWeights(model.state_dict())
    assert gated.gate("threshold").shape == (len(fields),) and set(gated.without_gates()) == set(weights.state)


def test_steps_round_trip_and_refuse_what_cannot_follow() -> None:
    steps = [SelectRows(rows=[5, 6], by="01_optfs"), NarrowWidths(widths=[4, 8], by="02_optembed"),
             FactorizeEmbedding(ranks=[4, 4], restores=[4, 8], folded=False, by="03_afm")]
    assert [step_from_dict(step_to_dict(s)) for s in steps] == steps
    layout = Layout.replay(steps, num_fields=2, dim=8)
    assert layout.rows == [5, 6] and layout.widths == [4, 4] and layout.flat_widths == [4, 8]
    with pytest.raises(ConfigError, match="already factorised by 03_afm"):
        layout.apply(FactorizeEmbedding(ranks=[4, 4], restores=[4, 4], folded=True, by="04_afm"))
    with pytest.raises(ConfigError, match="02_optembed.*more columns"):
        Layout.replay([NarrowWidths(widths=[4, 4], by="01_optembed"), NarrowWidths(widths=[8, 4], by="02_optembed")], 2, 8)


def test_the_edge_model_reuses_the_trained_dense_arch_and_bytes_are_what_it_stores(
        baselines: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    fmap = prepared_criteo.feature_map
    payload = load_checkpoint(RunDir(baselines["dcnv2"]).best)
    model = plain_model(fmap, payload)
    slots = edge_slots(model, fmap, vocabulary_keys(prepared_criteo.output, fmap))
    edge = edge_model(model, feature_specs(fmap), raw_layout(fmap), slots)
    assert edge.arch is model.arch  # the same modules: no second forward
    parts = edge_bytes(edge)
    assert {k: v for k, v in model_size(fmap, prepared_criteo.output, model)[1].items() if k != "format"} == parts
    values = sum(f.num_embeddings - 3 for f in fmap.categorical)  # every value shipped: no row selection
    assert parts["embedding tables"] == 4 * 8 * (values + 2 * len(fmap.categorical))  # + the OOV and blank rows
    assert parts["vocabulary"] == vocabulary_bytes(slots, hashed=False)  # the fingerprints at the widths the rule chose
    assert sum(s.keys.size for s in slots) == values
    manifest = export_model(baselines["dcnv2"], tmp_path / "m.pt")
    assert manifest["bytes_by_part"] == model_size(fmap, prepared_criteo.output, model)[1]  # the whole file, unwritten
    assert 0 < manifest["bytes_by_part"]["format"] < 200_000  # the file: these tensors plus code and zip


def test_a_key_of_another_model_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="cross_layers"):
        model_config(name="dnn", cross_layers=3)
    with pytest.raises(ValueError, match="greater than 0"):
        model_config(name="dnn", hidden=[-5])
