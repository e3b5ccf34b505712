"""Reading pooled embeddings in a fixed key order, sharded or not."""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate

import torch
from torchrec import EmbeddingBagCollection, KeyedTensor


def output_keys(ebc: EmbeddingBagCollection) -> tuple[str, ...]:
    """The order of the collection's pooled outputs before sharding (its tables' features in order)."""
    return tuple(name for table in ebc.embedding_bag_configs() for name in table.feature_names)


@lru_cache(maxsize=64)
def _column_order(have: tuple[str, ...], widths: tuple[int, ...], want: tuple[str, ...]) -> torch.Tensor | None:
    if have == want:
        return None
    start = dict(zip(have, accumulate((0, *widths))))
    width = dict(zip(have, widths))
    return torch.cat([torch.arange(start[k], start[k] + width[k]) for k in want])


def ordered_values(pooled: KeyedTensor, keys: tuple[str, ...]) -> torch.Tensor:
    """The pooled embeddings ``[B, sum of widths]`` in the order ``keys``. A sharded collection
    returns its keys grouped by the rank that computed them, not in the order they were declared."""
    order = _column_order(tuple(pooled.keys()), tuple(pooled.length_per_key()), keys)
    values = pooled.values()
    return values if order is None else values.index_select(1, order.to(values.device))
