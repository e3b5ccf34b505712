"""OptFS gates, schedule, rewind, compaction, and the compression recipe around them."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ctr.checkpoint import load_checkpoint
from ctr.compress.optfs import FeatureGates, OptFSStage, masked_remap, temperature
from ctr.compress.recipe import run_recipe
from ctr.compress.stage import StageContext, plain_model
from ctr.compress.tables import compact_rows, id_remap
from ctr.config import OptFSConfig, OptFSStep, TrainerConfig
from ctr.distributed import local_process_group
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.loader import make_batch
from ctr.models import build_model, model_config
from ctr.modules.sparse import SparseArch
from ctr.run_dir import StageDir
from ctr.structure import SelectRows, step_to_dict
from ctr.train import Trainer
from features.feature_map import FieldInfo
from features.prepare import PrepareResult
from features.schema import DatasetConfig


def fields(*sizes: int) -> list[FieldInfo]:
    return [FieldInfo(name=f"f{i}", type="categorical", source=f"f{i}", transform="token_v1", num_embeddings=n)
            for i, n in enumerate(sizes)]


def tables(*sizes: int) -> SparseArch:
    """Plain per-field tables: ids read their own rows (what the gates index without a remap)."""
    return SparseArch([f"f{i}" for i in range(len(sizes))], list(sizes), 4, 0.05, device=torch.device("cpu"))


def test_gates_are_one_at_init_and_follow_m() -> None:
    gates = FeatureGates([3, 4])
    batch = make_batch(["f0", "f1"], torch.tensor([[0, 2], [1, 3]]), torch.zeros(2, 0), torch.zeros(2))
    emb = torch.ones(2, 2, 4)
    assert torch.allclose(gates(emb, batch.sparse, tables(3, 4)), emb)
    gates.set_temperature(200.0)  # a row still at its initial m reads as it is at every temperature
    assert torch.allclose(gates(emb, batch.sparse, tables(3, 4)), emb)
    with torch.no_grad():
        gates.m[3 + 3] = -0.2  # field 1, id 3
        gates.m[2] = 0.0  # field 0, id 2: not > 0, removed
    assert [k.tolist() for k in gates.kept()] == [[True, True, False], [True, True, True, False]]


def test_first_adam_step_moves_every_row_by_lr_against_its_gradients_sign() -> None:
    """By hand: Adam's first step is lr x sign(gradient). Row 0's small data gradient adds to the
    penalty's (down), row 1 has the penalty alone (down), row 2's data outweighs it (up)."""
    gates = FeatureGates([3], lr=0.1, penalty=0.5)
    touched = torch.tensor([0, 2])
    grad = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    grad.grad = torch.tensor([1e-3, -1.0], dtype=torch.float64)
    gates._adam_step(touched, grad)
    assert gates.m.tolist() == pytest.approx([0.4, 0.4, 0.6])
    # a second step with the penalty alone, by the textbook formula
    pen = lambda m: 0.5 / (1 + math.exp(-m)) / (1 + math.exp(m))  # noqa: E731
    g1, g2 = pen(0.5), pen(0.4)
    grad.grad = torch.zeros(2, dtype=torch.float64)
    gates._adam_step(touched, grad)
    mean = (0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.9 ** 2)
    square = (0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2) / (1 - 0.999 ** 2)
    assert gates.m[1].item() == pytest.approx(0.4 - 0.1 * mean / square ** 0.5, abs=1e-12)


def test_gate_steps_equal_adam_on_the_references_dense_loss() -> None:
    """The data gradient is taken for touched rows only and the penalty's for all; together they are
    torch's own Adam on loss + lambda * sum sigmoid(tau m) over a dense parameter, untouched rows
    (some never touched) included, across a change of temperature."""
    sizes, lr, lam, batch_size = [6, 40], 0.05, 0.02, 8
    gen = torch.Generator().manual_seed(0)
    gates = FeatureGates(sizes, lr, lam)
    dense = nn.Parameter(gates.m.clone())
    adam = torch.optim.Adam([dense], lr=lr, eps=1e-30)
    weights = torch.randn(batch_size, 2, 4, generator=gen)
    arch = tables(*sizes)
    for step in range(60):
        if step == 30:
            gates.set_temperature(4.0)
        tau = float(gates.tau)
        # field 1 draws from its first 25 ids only (15 rows are never touched), skewed to the head
        ids = torch.stack([torch.randint(0, 6, (batch_size,), generator=gen),
                           (torch.rand(batch_size, generator=gen) ** 3 * 25).long()])
        batch = make_batch(["f0", "f1"], ids, torch.zeros(batch_size, 0), torch.zeros(batch_size))
        emb = torch.randn(batch_size, 2, 4, generator=gen)
        (gates(emb, batch.sparse, arch) * weights).sum().backward()
        rows = ids + torch.tensor([[0], [6]])  # field-major, as the gates index
        g = torch.sigmoid(tau * dense[rows]) / torch.sigmoid(torch.tensor(0.5 * tau, dtype=torch.float64))
        adam.zero_grad()
        ((emb * g.T.unsqueeze(-1).float() * weights).sum() + lam * torch.sigmoid(tau * dense).sum()).backward()
        adam.step()
    assert (gates.m - dense.detach()).abs().max() < 1e-9
    assert 0 < int((gates.m > 0).sum()) < sum(sizes)  # the test table keeps some rows and removes others


def test_gate_rule_removes_a_row_no_batch_touches_halfway_through_the_search() -> None:
    """4 epochs of 10 steps (1000 rows each, batches of 100): the rule's Adam step takes a row that
    only the penalty moves from m0 = 0.5 to 0 at about step 20, under the temperature schedule."""
    stage = OptFSStage(OptFSConfig(search_epochs=4))
    rows, lr, lam = stage.gate_settings(train_rows=4000, batch_size=100)
    assert (rows, lr) == (1000, pytest.approx(0.5 / 20)) and lam == pytest.approx(1e-8 * 36_672_494 / 4000)
    gates = FeatureGates([1], lr, lam)
    nothing = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    nothing.grad = torch.zeros(0, dtype=torch.float64)
    crossed = None
    for step in range(40):
        gates.set_temperature(temperature(step // 10, 4, 200.0))
        gates._adam_step(torch.zeros(0, dtype=torch.int64), nothing)
        if crossed is None and gates.m.item() <= 0:
            crossed = step + 1
    assert crossed is not None and 16 <= crossed <= 24


def test_temperature_schedule_end_points() -> None:
    assert temperature(0, 5, 200.0) == 1.0
    assert temperature(4, 5, 200.0) == pytest.approx(200.0)
    assert temperature(2, 5, 200.0) == pytest.approx(200.0 ** 0.5)
    assert temperature(0, 1, 200.0) == 1.0


def test_compact_tables_predict_like_the_masked_model_on_every_id(prepared_criteo: PrepareResult) -> None:
    fmap = prepared_criteo.feature_map
    cfg = model_config(name="dcnv2", hidden=[16], cross_layers=1, embedding=embedding_config(dim=8))
    gen = torch.Generator().manual_seed(0)
    kept = [torch.rand(f.num_embeddings, generator=gen) < 0.3 for f in fmap.categorical]
    for removed_to in ("zero", "oov"):
        if removed_to == "oov":
            kept = [k.clone().index_fill_(0, torch.tensor([1]), True) for k in kept]
        torch.manual_seed(0)
        vocab = [f.num_embeddings for f in fmap.categorical]
        masked = build_model(fmap, cfg, device=torch.device("cpu"), steps=(SelectRows(rows=vocab),))
        state = masked.state_dict()
        state["embedding.remap"] = masked_remap(id_remap({}, fmap.categorical), kept, removed_to)
        masked.load_state_dict(state)
        small_state, rows = compact_rows(state, fmap.categorical, kept)
        small = plain_model(fmap, {"model": small_state, "model_config": cfg.model_dump(),
                                   "steps": [step_to_dict(SelectRows(rows=rows, removed_to=removed_to))]})
        assert sum(rows) < sum(f.num_embeddings for f in fmap.categorical)
        width = max(f.num_embeddings for f in fmap.categorical)  # every id of every field appears
        ids = torch.stack([torch.arange(width) % f.num_embeddings for f in fmap.categorical])
        batch = make_batch([f.name for f in fmap.categorical], ids, torch.zeros(width, 0), torch.zeros(width))
        masked.eval()
        assert torch.equal(masked(batch.dense, batch.sparse)[0], small(batch.dense, batch.sparse)[0])


def experiment(prepared: PrepareResult, run_dir: Path, **optfs: object) -> ExperimentConfig:
    return ExperimentConfig(
        name="t",
        dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared.output)),
        model=model_config(name="dnn", hidden=[32, 16], embedding=embedding_config(dim=8)),
        trainer=TrainerConfig(batch_size=1024, eval_batch_size=8192, epochs=1, progress=False, threads=1,
                              run_dir=str(run_dir), lr=3e-3),
        compress=[OptFSStep(optfs=OptFSConfig(**{"search_epochs": 2, "rewind_epoch": 1, "retrain_epochs": 1,
                                                 "final_temp": 50.0, **optfs}))],
    )


@pytest.mark.slow
def test_recipe_runs_rewinds_and_resumes(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    # lambda and the gates' step from their rules; no field test: on 20k rows the searched model has
    # learned too little for it (README), and this test is about the gates, the rewind and resuming
    cfg = experiment(prepared_criteo, tmp_path / "run", field_p=1.0)
    Trainer(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run").fit()
    lines = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run")
    assert [l["stage_id"] for l in lines] == ["00_baseline", "01_optfs"]
    optfs = lines[1]
    assert optfs["rows_after"] < optfs["rows_before"] and optfs["bytes"] < lines[0]["bytes"]
    assert optfs["valid_auc"] > 0.6  # learned (random is 0.5) on 16k rows
    assert optfs["field_test"] == {} and optfs["fields_removed"] == [] and optfs["removed_fields_gain"] is None
    stage = tmp_path / "run" / "compress" / "01_optfs"
    assert load_checkpoint(stage / "search" / "checkpoints" / "last.pt")["loop"]["epoch"] == 2  # all search epochs
    # resuming does not run the stage again
    mtime = (stage / "checkpoint.pt").stat().st_mtime
    again = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run")
    assert again == lines and (stage / "checkpoint.pt").stat().st_mtime == mtime
    report = [json.loads(l) for l in (tmp_path / "run" / "compress" / "report.jsonl").read_text().splitlines()]
    assert len(report) == 2


@pytest.mark.slow
def test_rewind_snapshot_is_the_weights_at_the_start_of_the_rewind_epoch(prepared_criteo: PrepareResult,
                                                                         tmp_path: Path) -> None:
    cfg = experiment(prepared_criteo, tmp_path / "run", rewind_epoch=0, start_from="checkpoint")
    Trainer(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run").fit()
    source = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    ctx = StageContext(cfg, prepared_criteo.feature_map, prepared_criteo.output, StageDir(tmp_path / "stage"))
    sizes = [f.num_embeddings for f in prepared_criteo.feature_map.categorical]
    with local_process_group():
        search = OptFSStage(cfg.compress.stages[0].optfs)._search(ctx, source, (), sizes)
    # no sample asked: one pass, so each of the 2 epochs reads about half the split (whole row groups of 2048)
    assert abs(search.train_rows - prepared_criteo.feature_map.splits["train"].rows / 2) < 2048
    assert search.snapshot.keys() == source["model"].keys()
    assert all(torch.equal(search.snapshot[k], source["model"][k]) for k in search.snapshot)
    assert len(search.kept) == len(search.test.gains) == len(prepared_criteo.feature_map.categorical)
    # a field the test rejects keeps no row; the others keep what their gates kept
    for k, keep in zip(search.kept, search.test.kept):
        assert keep or not bool(k.any())
    together = search.test.removed_gain  # what the removed fields cost together is not significant at 5%
    assert (together is None) == all(search.test.kept) and (together is None or together.z <= 1.645)


def test_gate_steps_are_bitwise_reproducible_on_two_threads() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        ids = torch.stack([torch.randint(0, 50, (4096,), generator=gen), torch.randint(0, 3000, (4096,), generator=gen)])
        batch = make_batch(["f0", "f1"], ids, torch.zeros(4096, 0), torch.zeros(4096))
        emb = torch.randn(4096, 2, 4, generator=gen)

        def stepped() -> torch.Tensor:
            gates = FeatureGates([50, 3000], lr=0.1, penalty=1e-3)
            for _ in range(3):
                gates(emb, batch.sparse, tables(50, 3000)).sum().backward()
            return gates.m.clone()

        first = stepped()
        assert all(torch.equal(first, stepped()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_search_on_a_sample_then_retrain_on_every_row(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    train_rows = prepared_criteo.feature_map.splits["train"].rows  # 8 row groups of 2048
    # 2 search epochs of 4 steps: the gates' lr comes from the rule for the sample's steps
    cfg = experiment(prepared_criteo, tmp_path / "run", penalty=1e-4, search_fraction=0.25)
    Trainer(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run").fit()
    optfs = run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, tmp_path / "run")[1]
    assert 0.25 * train_rows <= optfs["search_train_rows"] <= 0.25 * train_rows + 2048  # whole row groups
    stage = tmp_path / "run" / "compress" / "01_optfs"
    per_epoch = lambda rows: -(-rows // cfg.trainer.batch_size)  # noqa: E731
    search = load_checkpoint(stage / "search" / "checkpoints" / "last.pt")["loop"]
    assert search["step"] == 2 * per_epoch(optfs["search_train_rows"])
    retrain = load_checkpoint(stage / "retrain" / "checkpoints" / "last.pt")["loop"]
    assert retrain["step"] == per_epoch(train_rows)  # the retrain reads the whole split
    assert optfs["rows_after"] < optfs["rows_before"]


def test_search_sample_takes_rows_or_a_fraction_not_both() -> None:
    from ctr.config import sample_rows

    assert sample_rows(5000, None, 1000, 4) is None  # more than the split: all of it
    assert sample_rows(300, None, 1000, 4) == 300 and sample_rows(None, 0.1, 1000, 4) == 100
    # neither: half an epoch over the search's epochs, at least 1M rows per epoch
    assert sample_rows(None, None, 1000, 4) is None and sample_rows(None, None, 3_000_000, 2) == 1_000_000
    assert sample_rows(None, None, 10_000_000, 4) == 1_250_000 and sample_rows(None, None, 10_000_000, 10) == 1_000_000
    # one pass (OptFS): never more than 1/epochs of the split per epoch, so no row is read twice
    assert sample_rows(None, None, 1000, 4, one_pass=True) == 250
    assert sample_rows(None, None, 10_000_000, 4, one_pass=True) == 1_250_000
    assert sample_rows(None, None, 3_000_000, 4, one_pass=True) == 750_000
    with pytest.raises(ValueError, match="give search_rows or search_fraction, not both"):
        OptFSConfig(search_rows=10, search_fraction=0.5)
