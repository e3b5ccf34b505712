"""Hashed embeddings in TorchRec: Unified Embedding (feature multiplexing) and per-field hashing.

Both turn the input KJT (one key per field, feature-map ids) into a KJT of (field, chunk) keys whose
values are already row numbers, hashed inside the model with a seeded splitmix64, so an exported model
takes the same ids as the training model. Unified: every multiplexed key reads its own hash of the
id from one shared table (``num_tables`` > 1 spreads the keys over sub-tables), so the fused fbgemm
kernel serves all fields at once and one size knob M replaces one per field. Fields with a small
vocabulary keep an exact table. The salts and bucket counts are buffers: they travel in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from common.errors import ConfigError
from ctr.embedding_config import HashedEmbedding, HashedSize, UnifiedEmbedding
from ctr.modules import META
from ctr.modules.pooled import ordered_values, output_keys
from features.feature_map import FieldInfo
from features.hashing import HASH_VERSION, bucket_torch, hash_torch, key_torch, mix_seed

BYTES_PER_VALUE = 4  # fp32 tables


@dataclass(frozen=True)
class KeySpec:
    """One lookup key: chunk ``chunk`` of field ``field``, read from ``table`` (``rows`` rows)."""

    name: str
    field: int
    chunk: int
    table: str
    rows: int
    exact: bool


def _exact(f: FieldInfo, cfg: HashedSize) -> bool:
    return int(f.num_embeddings or 0) <= cfg.collisionless_max


def budget_rows(cfg: HashedSize) -> int:
    """Total table rows the config allows (``num_rows`` or ``budget_mb`` of fp32 values)."""
    if cfg.num_rows is not None:
        return cfg.num_rows
    assert cfg.budget_mb is not None
    return int(cfg.budget_mb * 2**20 // (cfg.dim * BYTES_PER_VALUE))


def unified_keys(fields: list[FieldInfo], cfg: UnifiedEmbedding) -> list[KeySpec]:
    exact = [KeySpec(f"{f.name}@0", i, 0, f"exact_{f.name}", int(f.num_embeddings or 0), True)
             for i, f in enumerate(fields) if _exact(f, cfg)]
    shared_rows = budget_rows(cfg) - sum(k.rows for k in exact)
    per_table = shared_rows // cfg.num_tables
    if per_table < 1:
        raise ConfigError(f"embedding budget of {budget_rows(cfg)} rows leaves no room for the shared table(s) after "
                         f"{sum(k.rows for k in exact)} rows of exact small-vocabulary tables (raise num_rows / budget_mb, or "
                          "lower collisionless_max)")
    multiplexed = [(i, f, j) for i, f in enumerate(fields) if not _exact(f, cfg) for j in range(cfg.chunks.get(f.name, 1))]
    unknown = sorted(set(cfg.chunks) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"embedding.chunks names unknown field(s) {unknown} (name categorical fields of the data)")
    shared = [KeySpec(f"{f.name}@{j}", i, j, f"unified_{n % cfg.num_tables}", per_table, False)
              for n, (i, f, j) in enumerate(multiplexed)]
    return exact + sorted(shared, key=lambda k: k.table)  # grouped by table: the EBC's output order


def hashed_keys(fields: list[FieldInfo], cfg: HashedEmbedding) -> list[KeySpec]:
    """Per-field hashing: after the exact small fields, the rows are shared out in proportion to
    vocabulary (a proportional share reaches a field's vocabulary only when the budget covers
    every vocabulary, in which case every field is exact)."""
    budget = budget_rows(cfg)
    vocab = [int(f.num_embeddings or 0) for f in fields]
    exact = [v <= cfg.collisionless_max or budget >= sum(vocab) for v in vocab]
    left = budget - sum(v for v, e in zip(vocab, exact) if e)
    total = sum(v for v, e in zip(vocab, exact) if not e)
    if left < sum(not e for e in exact):
        raise ConfigError(f"embedding budget of {budget} rows is too small for per-field hashing of {len(fields)} fields "
                          "(raise num_rows / budget_mb)")
    rows = [v if e else max(1, left * v // total) for v, e in zip(vocab, exact)]
    return [KeySpec(f"{f.name}@0", i, 0, f"hash_{f.name}", rows[i], exact[i]) for i, f in enumerate(fields)]


class HashedSparseArch(nn.Module):
    """Looks up every (field, chunk) key: ``[B, K, D]``, keys grouped by table. A table is shared by
    the values of several fields or chunks, so none of its rows or widths belongs to one field: no
    row selection, widths, factorised or quantised rows."""

    CAPABILITIES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, num_fields: int, keys: list[KeySpec], dim: int, init_range: float, hash_seed: int,
                 device: torch.device = META) -> None:
        super().__init__()
        self.hash_version = HASH_VERSION
        self.num_fields = num_fields
        self.num_keys = len(keys)
        self.dim = dim
        self.key_names = [k.name for k in keys]
        self.register_buffer("field_index", torch.tensor([k.field for k in keys], dtype=torch.int64))
        self.register_buffer("salts", torch.tensor(
            [[key_torch(mix_seed(hash_seed, k.field * 1024 + k.chunk))] for k in keys], dtype=torch.int64))
        self.register_buffer("buckets", torch.tensor([[k.rows] for k in keys], dtype=torch.int64))
        self.register_buffer("exact", torch.tensor([[k.exact] for k in keys], dtype=torch.bool))
        tables: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        for k in keys:
            tables.setdefault(k.table, []).append(k.name)
            rows[k.table] = k.rows
        init = partial(nn.init.uniform_, a=-init_range, b=init_range)
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows[name], feature_names=names,
                               pooling=PoolingType.SUM, init_fn=init)
            for name, names in tables.items()], device=device)
        self.output_keys = output_keys(self.ebc)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Field ids [F, B] -> table rows [K, B]: hashed (or exact) per key."""
        per_key = ids[self.field_index]
        hashed = bucket_torch(hash_torch(per_key, self.salts), self.buckets)
        return torch.where(self.exact, per_key, hashed)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        batch = sparse.stride()
        values = sparse.values()
        if values.numel() != self.num_fields * batch:
            raise ValueError(f"hashed embeddings expect exactly one id per field and row; got {values.numel()} "
                             f"values for {self.num_fields} fields x {batch} rows")
        rows = self.rows(values.view(self.num_fields, batch))
        keyed = KeyedJaggedTensor(keys=self.key_names, values=rows.reshape(-1),
                                  lengths=torch.ones(self.num_keys * batch, dtype=torch.int32), stride=batch)
        return ordered_values(self.ebc(keyed), self.output_keys).view(-1, self.num_keys, self.dim)


def hashed_sparse_arch(fields: list[FieldInfo], cfg: HashedEmbedding | UnifiedEmbedding,
                       device: torch.device = META) -> HashedSparseArch:
    """The config-to-constructor mapping of the two hashed kinds."""
    keys = unified_keys(fields, cfg) if cfg.kind == "unified" else hashed_keys(fields, cfg)
    return HashedSparseArch(len(fields), keys, cfg.dim, cfg.init_range, cfg.hash_seed, device)
