"""A model sharded over two gloo ranks (no Ray): tables on both ranks, checkpoints gathered whole on
rank 0 and loaded back shard by shard, and collective scoring that covers every row once."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctr.distributed import fused_optimizer_state, load_plain_state_dict, plain_state_dict, shard_model
from ctr.embedding_config import embedding_config
from ctr.loader import ParquetBatches
from ctr.models import build_model, model_config
from ctr.train import predict
from features.feature_map import FeatureMap
from features.prepare import PrepareResult

MODEL = model_config(name="dcnv2", hidden=[16], cross_layers=1, embedding=embedding_config(dim=8))


def _rank(rank: int, store: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    try:
        fmap = FeatureMap.load(Path(data))
        reference = torch.load(Path(out) / "reference.pt", weights_only=True)
        model = shard_model(build_model(fmap, MODEL), "rowwise_adagrad", 0.05)
        load_plain_state_dict(model, reference)
        batches = ParquetBatches(Path(data) / fmap.splits["valid"].file, fmap, 999)  # parts of unequal sizes
        labels, probs = predict(model, batches)
        state, sparse = plain_state_dict(model), fused_optimizer_state(model)
        owned = sorted(name for name, shards in _owned(model).items() if shards)
        torch.save({"labels": labels, "probs": probs, "state": state, "sparse": sparse, "owned": owned},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _owned(model: torch.nn.Module) -> dict[str, int]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    return {k: len(v.local_shards()) for k, v in model.state_dict().items() if isinstance(v, ShardedTensor)}


@pytest.mark.slow
def test_two_ranks_shard_tables_gather_checkpoints_and_score_every_row(prepared_criteo: PrepareResult,
                                                                        tmp_path: Path) -> None:
    fmap = prepared_criteo.feature_map
    torch.manual_seed(0)
    plain = build_model(fmap, MODEL, device=torch.device("cpu")).eval()
    torch.save(plain.state_dict(), tmp_path / "reference.pt")
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(prepared_criteo.output), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # the planner put tables on both ranks, each table on exactly one
    assert ranks[0]["owned"] and ranks[1]["owned"]
    assert not set(ranks[0]["owned"]) & set(ranks[1]["owned"])
    # saving gathers every table whole on rank 0 (the others get nothing), equal to what was loaded
    assert ranks[1]["state"] == {} and ranks[1]["sparse"] == {}
    reference = plain.state_dict()
    assert ranks[0]["state"].keys() == reference.keys()
    assert all(torch.equal(ranks[0]["state"][k], reference[k]) for k in reference)
    assert len(ranks[0]["sparse"]) == len(fmap.categorical)  # one row-wise Adagrad slot per table
    # scoring: both ranks get all rows, in order, with the unsharded model's scores
    expected_labels, expected = predict(plain, ParquetBatches(prepared_criteo.output / fmap.splits["valid"].file, fmap, 999))
    for r in ranks:
        np.testing.assert_array_equal(r["labels"], expected_labels)
        np.testing.assert_allclose(r["probs"], expected, atol=1e-6)
