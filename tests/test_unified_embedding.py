"""Unified Embedding (feature multiplexing) and per-field hashing."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ctr.embedding_config import embedding_config
from ctr.loader import make_batch
from ctr.models import build_model, model_config
from ctr.modules.hashed import hashed_keys, hashed_sparse_arch, unified_keys
from features.feature_map import FieldInfo
from features.hashing import bucket_torch, hash_numpy, hash_torch, key_torch, mix_seed


def fields(*sizes: int) -> list[FieldInfo]:
    return [FieldInfo(name=f"f{i}", type="categorical", source=f"f{i}", transform="token_v1", num_embeddings=n)
            for i, n in enumerate(sizes)]


def test_torch_hash_golden_values_and_numpy_agreement() -> None:
    assert hash_torch(torch.tensor([0]), torch.tensor(0)).item() == 0xE220A8397B1DCDAF - (1 << 64)
    key = mix_seed(2024, 7)
    ids = torch.tensor([0, 1, 2, 3, 1 << 40, (1 << 62) + 5])
    buckets = bucket_torch(hash_torch(ids, torch.tensor(key_torch(key))), 1000)
    assert buckets.tolist() == [int(v) for v in (hash_numpy(ids.numpy(), key) >> np.uint64(1)) % np.uint64(1000)]
    assert buckets.tolist() == GOLDEN_BUCKETS


GOLDEN_BUCKETS = [int(v) for v in (hash_numpy(np.array([0, 1, 2, 3, 1 << 40, (1 << 62) + 5]), mix_seed(2024, 7))
                                   >> np.uint64(1)) % np.uint64(1000)]


def test_hash_identical_in_a_fresh_process() -> None:
    code = ("import torch; from features.hashing import hash_torch; "
            "print(hash_torch(torch.arange(5), torch.tensor(12345)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(hash_torch(torch.arange(5), torch.tensor(12345)).tolist())


def test_collision_rate_matches_the_ideal_random_hash() -> None:
    m, n = 10_000, 20_000
    ids = torch.randint(0, 1 << 40, (n,), generator=torch.Generator().manual_seed(0)).unique()
    n = ids.numel()
    buckets = bucket_torch(hash_torch(ids, torch.tensor(key_torch(mix_seed(1, 1)))), m)
    collided = 1 - buckets.unique().numel() / n
    ideal = 1 - m * (1 - (1 - 1 / m) ** n) / n  # expected share of ids that land in an occupied bucket
    assert abs(collided - ideal) <= 0.1 * ideal


def test_unified_keys_chunks_and_exact_small_fields() -> None:
    cfg = embedding_config(kind="unified", num_rows=1000, chunks={"f1": 3}, collisionless_max=10)
    keys = unified_keys(fields(5, 500, 800), cfg)
    assert [k.name for k in keys] == ["f0@0", "f1@0", "f1@1", "f1@2", "f2@0"]
    assert keys[0].exact and keys[0].rows == 5 and keys[0].table == "exact_f0"
    assert {k.table for k in keys[1:]} == {"unified_0"} and keys[1].rows == 995  # budget minus the exact table


def test_chunked_field_widths(prepared_criteo) -> None:
    fmap = prepared_criteo.feature_map
    cfg = model_config(name="dnn", hidden=[8], embedding=embedding_config(kind="unified", dim=8, num_rows=4000,
                                                                         chunks={"C1": 2, "C2": 3}))
    model = build_model(fmap, cfg, device=torch.device("cpu"))
    assert model.embedding.num_keys == len(fmap.categorical) + 3
    assert model.arch.mlp.layers[0].in_features == (len(fmap.categorical) + 3) * 8
    ids = torch.ones(len(fmap.categorical), 5, dtype=torch.int64) * 3
    batch = make_batch([f.name for f in fmap.categorical], ids, torch.zeros(5, 0), torch.zeros(5))
    emb = model.embedding(batch.sparse)
    assert emb.shape == (5, len(fmap.categorical) + 3, 8)
    # the chunks of one field read different rows (different salts) of the shared table
    c1 = [i for i, name in enumerate(model.embedding.key_names) if name.startswith("C1@")]
    assert not torch.equal(emb[0, c1[0]], emb[0, c1[1]])


def test_hashed_baseline_shares_rows_by_vocabulary() -> None:
    keys = hashed_keys(fields(5, 100, 300), embedding_config(kind="hashed", num_rows=205, collisionless_max=10))
    assert [(k.rows, k.exact) for k in keys] == [(5, True), (50, False), (150, False)]  # 200 rows shared 1:3
    roomy = hashed_keys(fields(5, 100, 300), embedding_config(kind="hashed", num_rows=405, collisionless_max=10))
    assert [(k.rows, k.exact) for k in roomy] == [(5, True), (100, True), (300, True)]


def test_a_shared_row_gets_gradient_from_two_fields() -> None:
    cfg = embedding_config(kind="unified", dim=4, num_rows=50, collisionless_max=0)
    arch = hashed_sparse_arch(fields(1000, 1000), cfg, device=torch.device("cpu"))
    candidates = torch.arange(3, 1000)
    rows = arch.rows(torch.stack([candidates, candidates]))
    # an id of field 0 and an id of field 1 that hash to the same shared row
    i, j = (int(v) for v in (rows[0][:, None] == rows[1][None, :]).nonzero()[0])
    ids = torch.tensor([[int(candidates[i])], [int(candidates[j])]])
    batch = make_batch(["f0", "f1"], ids, torch.zeros(1, 0), torch.zeros(1))
    arch(batch.sparse).sum().backward()
    grad = arch.ebc.embedding_bags["unified_0"].weight.grad
    assert torch.equal(grad[rows[0, i]], torch.full((4,), 2.0))  # one unit of gradient from each field
    assert grad.abs().sum() == 8.0


def test_budget_mb_and_config_errors() -> None:
    keys = unified_keys(fields(100_000), embedding_config(kind="unified", dim=16, budget_mb=1.0))
    assert keys[0].rows == 2**20 // 64
    with pytest.raises(ValueError, match="exactly one of num_rows or budget_mb"):
        embedding_config(kind="unified")
    with pytest.raises(ValueError, match="no room for the shared table"):
        unified_keys(fields(5, 1000), embedding_config(kind="unified", num_rows=5, collisionless_max=10))
