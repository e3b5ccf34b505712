"""Each model's forward/backward through the real sharded path (fused fbgemm tables, world of one)."""


import pytest
import torch
from pydantic import ValidationError

from ctr.distributed import (
    fused_optimizer_state,
    load_plain_state_dict,
    local_process_group,
    plain_state_dict,
    shard_model,
)
from ctr.embedding_config import embedding_config
from ctr.loader import ParquetBatches
from ctr.models import build_model, model_config
from ctr.modules.interactions import CrossNetwork, factorization_machine
from features.prepare import PrepareResult


@pytest.fixture(scope="module")
def batch(prepared_criteo: PrepareResult):
    return next(iter(ParquetBatches(prepared_criteo.output / "train.parquet", prepared_criteo.feature_map, 64)))


@pytest.mark.parametrize("name,extra", [("lr", {}), ("dnn", {"hidden": [32, 16]}), ("deepfm", {"hidden": [32, 16]}),
                                        ("dcnv2", {"hidden": [32, 16]}),
                                        ("dcnv2", {"hidden": [32, 16], "structure": "stacked", "low_rank": 8}),
                                        ("finalmlp", {"stream1": [32, 16], "stream2": [16], "gate_hidden": [8], "heads": 4})])
def test_forward_backward_updates_embeddings_and_dense(name: str, extra: dict, prepared_criteo: PrepareResult, batch) -> None:
    cfg = model_config(name=name, embedding=embedding_config(dim=8), **extra)
    with local_process_group():
        torch.manual_seed(0)
        plain = build_model(prepared_criteo.feature_map, cfg)
        plain.embedding_penalty = True
        model = shard_model(plain, "rowwise_adagrad", 0.1)
        before = plain_state_dict(model)
        tables = [k for k in before if "embedding_bags" in k]
        assert all(before[k].abs().max() <= 0.05 for k in tables)  # uniform(-0.05, 0.05) init
        logits, penalty = model(batch.dense, batch.sparse)
        assert logits.shape == (64,) and penalty.item() > 0
        torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        after = plain_state_dict(model)
        # the fused optimizer already updated the looked-up rows during backward; other rows are untouched
        first = tables[0]
        touched = set(batch.sparse[first.split(".")[-2].split("_", 1)[1]].values().tolist())
        changed = set((before[first] != after[first]).any(dim=1).nonzero().flatten().tolist())
        assert changed and changed <= touched
        dense_grads = [p.grad for n, p in model.named_parameters() if "embedding_bags" not in n]
        assert dense_grads and all(g is not None for g in dense_grads)
        assert len(fused_optimizer_state(model)) == len(tables)
        load_plain_state_dict(model, before)
        assert all(torch.equal(v, before[k]) for k, v in plain_state_dict(model).items())


def test_embedding_width_must_be_a_multiple_of_4() -> None:
    with pytest.raises(ValidationError, match="embedding width 10 is not a multiple of 4"):
        embedding_config(dim=10)


def test_factorization_machine_hand_value() -> None:
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # pairs: 11 + 17 + 39 = 67
    assert factorization_machine(emb).item() == pytest.approx(67.0)


def test_cross_layer_formula() -> None:
    net = CrossNetwork(width=3, num_layers=1)
    x0 = torch.tensor([[1.0, 2.0, 3.0]])
    layer = net.layers[0].project
    expected = x0 * (x0 @ layer.weight.T + layer.bias) + x0
    assert torch.allclose(net(x0), expected)


def test_embedding_penalty_is_the_mean_squared_norm_of_the_looked_up_rows_and_zero_when_off(
        prepared_criteo: PrepareResult, batch) -> None:
    torch.manual_seed(0)
    model = build_model(prepared_criteo.feature_map, model_config(name="dnn", hidden=[8], embedding=embedding_config(dim=4)),
                        torch.device("cpu"))
    emb = model.lookup(batch.sparse)
    logits_off, off = model(batch.dense, batch.sparse)
    model.embedding_penalty = True
    logits_on, on = model(batch.dense, batch.sparse)
    assert off.item() == 0.0 and torch.equal(logits_on, logits_off)
    assert on.item() == pytest.approx(emb.pow(2).sum().item() / batch.size, rel=1e-6)
