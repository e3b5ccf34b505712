"""Low-bit rows and the edge vocabulary: packing, the bit allocation, the export's equality with the
quantized training model, the fingerprint search and its width rule, and a budget sweep's reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from ctr.checkpoint import load_checkpoint
from ctr.compress.quantize import allocate_bits
from ctr.compress.recipe import run_recipe, run_sweep
from ctr.compress.stage import model_size, plain_model
from ctr.config import QuantizeConfig, QuantizeStep
from ctr.modules.quantized import fake_quantize, pack_codes, row_codes, unpack_codes
from ctr.run_dir import RunDir
from ctr.structure import FactorizeEmbedding, Layout, QuantizeRows, SelectRows
from ctr.edge.layout import field_slots, fingerprint_bits, row_bytes
from ctr.edge.model import EdgeVocabulary
from deploy.export import export_model
from features.hashing import BLANK_KEY
from features.prepare import PrepareResult
from features.vocab import FIRST_VALUE_ID

from conftest import STAGES, copy_run, recipe_experiment


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_exactly(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (9, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (9, -(-13 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 13), codes.to(torch.float32))
    assert torch.equal(unpack_codes(packed[[4, 1]], bits, 13), codes[[4, 1]].to(torch.float32))  # any row, alone


def test_codes_read_back_the_row_within_half_a_step() -> None:
    rows = torch.tensor([[0.0, 1.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    codes, scale, low = row_codes(rows, 3.0)  # 2 bits
    assert low.flatten().tolist() == [-1.0, 2.0] and scale[0].item() == pytest.approx(4 / 3, rel=1e-3)
    assert codes[0].tolist() == [1.0, 2.0, 3.0, 0.0] and codes[1].tolist() == [0.0] * 4
    assert ((codes * scale + low) - rows).abs().max() <= scale.max() / 2
    emb = torch.stack([rows, rows])  # [B=2, F=2, 4]; field 1 keeps floats, field 0 reads its 2-bit codes
    out = fake_quantize(emb, torch.tensor([2, 0]), torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(out[:, 1], emb[:, 1]) and torch.allclose(out[0, 0], (codes * scale + low)[0])


def test_bit_allocation_on_a_hand_example() -> None:
    # rows of width 4: 5 bytes at 2 bits, 6 at 4, 8 at 8 (codes + an fp16 scale and bias)
    assert [row_bytes(4, b) for b in (2, 4, 8)] == [5, 6, 8]
    damage = [{2: 10.0, 4: 2.0, 8: 1.0}, {2: 1.0, 4: 0.5, 8: 0.1}]
    # start at 550 bytes; field 0 to 4 bits (+100 bytes, 0.08 per byte) beats field 1 (+10, 0.05); then field 1
    # to 4 and to 8 (+10, +20); field 0 to 8 (+200) no longer fits in 700
    assert allocate_bits([100, 10], [4, 4], damage, 700, [2, 4, 8]) == [4, 8]
    assert allocate_bits([100, 10], [4, 4], damage, 10_000, [2, 4, 8]) == [8, 8]
    assert allocate_bits([100, 10], [4, 4], damage, 560, [4, 2]) == [2, 4]
    with pytest.raises(ConfigError, match="550 bytes at 2 bits"):
        allocate_bits([100, 10], [4, 4], damage, 549, [2, 4, 8])


def test_the_vocabulary_finds_each_shipped_key_and_nothing_else() -> None:
    """Fields of 16-, 32- and 64-bit fingerprints (and one that ships nothing): a shipped key finds
    its slot (2 + its position in fingerprint order), the blank key slot 1, any other key slot 0."""
    gen = np.random.default_rng(3)
    shipped = [gen.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64) for n in (5, 300, 2_000_000, 0)]
    slots = [field_slots(keys, np.arange(FIRST_VALUE_ID, FIRST_VALUE_ID + keys.size)) for keys in shipped]
    assert [s.bits for s in slots] == [16, 32, 64, 16]
    vocab = torch.jit.script(EdgeVocabulary(slots))
    for f, s in enumerate(slots):
        expected = {int(k): 2 + p for p, k in enumerate(s.keys)}
        probe = np.concatenate([s.keys[:50], gen.integers(-2**63, 2**63 - 1, size=50, dtype=np.int64), [BLANK_KEY]])
        keys = torch.zeros(probe.size, len(slots), dtype=torch.int64)
        keys[:, f] = torch.from_numpy(probe)
        got = vocab(keys)[:, f].tolist()
        assert got == [expected.get(int(k), 1 if k == BLANK_KEY else 0) for k in probe]
        assert sorted(s.ids[2:].tolist()) == list(range(FIRST_VALUE_ID, FIRST_VALUE_ID + s.keys.size))


def test_the_fingerprint_width_rule() -> None:
    """n / 2^bits <= 2^-12 for an unseen value, and no two shipped values share a fingerprint."""
    assert fingerprint_bits(np.arange(16, dtype=np.int64) << 48) == 16
    assert fingerprint_bits(np.arange(17, dtype=np.int64) << 48) == 32  # 17 / 2^16 is over 2^-12
    assert fingerprint_bits(np.array([1 << 48, (1 << 48) + (1 << 32)], dtype=np.int64)) == 32  # the same top 16 bits
    assert fingerprint_bits(np.array([1 << 32, (1 << 32) + 1], dtype=np.int64)) == 64
    assert fingerprint_bits(np.arange(2**20 + 1, dtype=np.int64) << 32) == 64


def _afm_then_quantize(prepared: PrepareResult, run_dir: Path, quantize: QuantizeConfig):
    cfg = recipe_experiment(prepared, run_dir, "dnn", ["afm"])
    return cfg.model_copy(update={"compress": cfg.compress.model_copy(update={
        "stages": [STAGES["afm"], QuantizeStep(quantize=quantize)]})})


@pytest.mark.slow
def test_the_packed_export_equals_the_quantized_training_model(baselines: dict[str, Path], prepared_criteo: PrepareResult,
                                                               tmp_path: Path) -> None:
    run_dir = copy_run(baselines, "dnn", tmp_path)
    fmap = prepared_criteo.feature_map
    cfg = _afm_then_quantize(prepared_criteo, run_dir, QuantizeConfig(bits=4, finetune_epochs=1))
    lines = run_recipe(cfg, fmap, prepared_criteo.output, run_dir)
    assert lines[-1]["bits"] == [4] * len(fmap.categorical) and lines[-1]["valid_auc"] > 0.6
    payload = load_checkpoint(RunDir(run_dir).stage_checkpoints()[-1])
    model = plain_model(fmap, payload)
    manifest = export_model(run_dir, tmp_path / "q.pt", "latest")
    assert manifest["parity"]["max_abs_diff"] <= 1e-6  # the packed file against the quantized training model
    rows = [f.num_embeddings - 1 for f in fmap.categorical]  # AFM keeps every row (in slots: padding id gone)
    packed = sum(r * row_bytes(4, 4) for r in rows)  # narrowed to 4 wide, 4 bits, with fp16 scale and bias
    assert manifest["bytes_by_part"]["embedding tables"] == packed
    assert model_size(fmap, prepared_criteo.output, model)[1]["embedding tables"] == packed  # the rule, unbuilt
    onnx = export_model(run_dir, tmp_path / "q.onnx", "latest", fmt="onnx")  # packed codes and shifts in ONNX too
    assert onnx["parity"]["max_abs_diff"] <= 1e-5


def test_quantize_refuses_a_later_reshaping_step() -> None:
    layout = Layout.replay([QuantizeRows(bits=[4, 2], by="02_quantize")], 2, 8)
    assert layout.bits == [4, 2] and layout.apply(SelectRows(rows=[3, 3], by="03_optfs")).bits == [4, 2]
    with pytest.raises(ConfigError, match="02_quantize already quantized"):
        layout.apply(FactorizeEmbedding(ranks=[4, 4], restores=[8, 8], folded=True, by="03_afm"))


@pytest.mark.slow
def test_a_budget_sweep_reuses_the_stages_before_the_sizing_one(baselines: dict[str, Path], prepared_criteo: PrepareResult,
                                                               tmp_path: Path) -> None:
    run_dir = copy_run(baselines, "dnn", tmp_path)
    fmap, data = prepared_criteo.feature_map, prepared_criteo.output
    cfg = _afm_then_quantize(prepared_criteo, run_dir, QuantizeConfig(finetune_epochs=0))
    afm = run_recipe(cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"stages": [STAGES["afm"]]})}),
                     fmap, data, run_dir)[-1]
    tables = sum(f.num_embeddings * 4 * 4 for f in fmap.categorical)  # AFM keeps every row, 4 wide, in fp32
    others = afm["bytes"] - tables
    small, large = ((others + share * tables) / 2**20 for share in (0.34, 0.6))
    points = run_sweep(cfg, fmap, data, run_dir, [small, large])
    run = RunDir(run_dir)
    first = [run.sweep_point(mb).stage(1, "afm").checkpoint for mb in (small, large)]
    assert first[0].stat().st_ino == first[1].stat().st_ino == run.stage(1, "afm").checkpoint.stat().st_ino
    bits = [points[mb][-1]["bits"] for mb in (small, large)]
    assert 2 in bits[0] and bits[1] == [8] * len(bits[1])  # the small budget leaves big fields at 2 bits
    assert all(points[mb][-1]["bytes"] <= mb * 2**20 for mb in (small, large))
    mtimes = [p.stat().st_mtime_ns for mb in (small, large) for p in run.sweep_point(mb).stage_checkpoints()]
    again = run_sweep(cfg, fmap, data, run_dir, [small, large])
    assert [p.stat().st_mtime_ns for mb in (small, large) for p in run.sweep_point(mb).stage_checkpoints()] == mtimes
    assert again[small][-1]["bits"] == bits[0]
    exported = [export_model(run_dir, tmp_path / f"{i}.pt", f"{run.sweep_point(mb).compress.name}/latest")
                for i, mb in enumerate((small, large))]
    assert exported[0]["file_bytes"] < exported[1]["file_bytes"]
    for manifest, mb in zip(exported, (small, large)):  # the stage counted the whole file it exports
        assert manifest["file_bytes"] == points[mb][-1]["bytes"] <= mb * 2**20



def test_a_removed_value_never_reads_a_shipped_row() -> None:
    """A value the vocabulary knows but does not ship (row selection removed it) widens the
    fingerprints until it matches no shipped one: unlike an unseen value, it may be frequent."""
    shipped = np.array([5 << 48], dtype=np.int64)
    removed = np.array([(5 << 48) + (1 << 40)], dtype=np.int64)  # the same top 16 bits
    assert fingerprint_bits(shipped) == 16 and fingerprint_bits(shipped, removed) == 32
    slots = field_slots(np.concatenate([shipped, removed]), np.array([FIRST_VALUE_ID]))
    vocab = EdgeVocabulary([slots])
    assert vocab(torch.tensor([[int(shipped[0])], [int(removed[0])]])).flatten().tolist() == [2, 0]
