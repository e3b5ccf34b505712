"""The sparse arch: one TorchRec EmbeddingBagCollection table per categorical field.

Built on the meta device: the tables get their memory (and their uniform(-r, r) initial values)
when DistributedModelParallel places them into fbgemm's fused kernels, or when a plain copy is
materialised for evaluation.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ctr.capabilities import PER_FIELD_TABLES
from ctr.embedding_config import EmbeddingConfig
from ctr.modules import META
from ctr.modules.hashed import hashed_sparse_arch
from ctr.modules.pooled import ordered_values, output_keys
from ctr.modules.quantized import fake_quantize, stored_columns
from ctr.structure import Layout
from features.feature_map import FieldInfo


def table_name(prefix: str, field: str) -> str:
    return f"{prefix}_{field}"


def embedding_tables(names: list[str], widths: list[int], init_range: float, prefix: str,
                     rows: list[int]) -> list[EmbeddingBagConfig]:
    init = partial(nn.init.uniform_, a=-init_range, b=init_range)
    return [
        EmbeddingBagConfig(name=table_name(prefix, name), embedding_dim=w, num_embeddings=n,
                           feature_names=[name], pooling=PoolingType.SUM, init_fn=init)
        for name, n, w in zip(names, rows, widths)
    ]


def prefix_columns(widths: list[int], dim: int) -> torch.Tensor:
    """Positions of each field's first ``widths[f]`` values in the flattened ``[F, dim]`` layout."""
    return torch.cat([f * dim + torch.arange(w, dtype=torch.int64) for f, w in enumerate(widths)])


class SparseArch(nn.Module):
    """Looks up every field: ``[B, F, D]``, fields in feature-map order.

    With ``remapped=True`` every id first goes through a per-field remap table (old id -> table row,
    -1 -> a zero vector): that is how row selection (OptFS) removes rows, first with full-size tables
    and then with compact ones of ``rows[f]`` rows each. The remap is a buffer, saved in checkpoints.

    With ``widths`` field f's table is only ``widths[f]`` wide (OptEmbed); its rows come back
    zero-padded to ``dim``, so interactions see the same ``[B, F, dim]`` as from a masked wide table,
    and ``columns`` lists the stored (non-padding) positions for the layers that take a flat input.

    With ``bits`` field f's rows are read as ``bits[f]``-bit row-wise codes (``ctr.modules.quantized``),
    as the edge file stores them; the tables themselves stay float, for the straight-through gradient.
    """

    CAPABILITIES: ClassVar[frozenset[str]] = PER_FIELD_TABLES
    REMAP: ClassVar[str] = "remap"  # the buffer of the id -> row map, when rows were selected

    @staticmethod
    def table_weight(field: str, prefix: str = "emb") -> str:
        """Where field ``field``'s table sits in this module's state dict (TorchRec's own naming)."""
        return f"ebc.embedding_bags.{table_name(prefix, field)}.weight"

    def __init__(self, names: list[str], vocab: list[int], dim: int, init_range: float, prefix: str = "emb",
                 device: torch.device = META, rows: list[int] | None = None,
                 remapped: bool = False, widths: list[int] | None = None, bits: list[int] | None = None) -> None:
        super().__init__()
        self.num_fields = len(names)
        self.num_keys = len(names)  # one lookup key per field
        self.dim = dim
        self.keys = list(names)
        self.vocab_sizes = list(vocab)  # ids per field: the remap's segments
        self.widths = widths
        self.ebc = EmbeddingBagCollection(
            tables=embedding_tables(names, widths or [dim] * len(names), init_range, prefix, rows or vocab),
            device=device)
        self.register_buffer("columns", prefix_columns(widths, dim) if widths else None, persistent=False)
        self.output_keys = output_keys(self.ebc)
        self.quantized = bits is not None
        if bits is not None:
            stored = stored_columns(widths or [dim] * len(names), dim)
            self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64), persistent=False)
            self.register_buffer("stored", stored, persistent=False)
        self.remapped = remapped
        if remapped:
            offsets = torch.tensor([0, *vocab[:-1]], dtype=torch.int64).cumsum(0)
            self.register_buffer("remap_offsets", offsets.view(-1, 1), persistent=False)  # derived from the vocabularies
            self.register_buffer("remap", torch.cat([torch.arange(v, dtype=torch.int64) for v in vocab]))

    def _lookup(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        flat = ordered_values(self.ebc(sparse), self.output_keys)
        if self.columns is None:
            emb = flat.view(-1, self.num_fields, self.dim)
        else:
            padded = flat.new_zeros(flat.shape[0], self.num_fields * self.dim)
            emb = padded.index_copy(1, self.columns, flat).view(-1, self.num_fields, self.dim)
        return fake_quantize(emb, self.bits, self.stored) if self.quantized else emb

    def table_rows(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """The table row each id reads, ``[F, B]`` (-1: the id's row was removed)."""
        ids = sparse.values().view(self.num_fields, sparse.stride())
        return self.remap[ids + self.remap_offsets] if self.remapped else ids

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if not self.remapped:
            return self._lookup(sparse)
        batch = sparse.stride()
        rows = self.table_rows(sparse)
        kept = rows >= 0
        keyed = KeyedJaggedTensor(keys=self.keys, values=rows.clamp(min=0).reshape(-1),
                                  lengths=torch.ones(self.num_fields * batch, dtype=torch.int32), stride=batch)
        emb = self._lookup(keyed)
        return emb * kept.T.unsqueeze(-1).to(emb.dtype)


def make_sparse_arch(fields: list[FieldInfo], cfg: EmbeddingConfig, device: torch.device, layout: Layout,
                     prefix: str = "emb") -> nn.Module:
    """The sparse arch the ``model.embedding`` config names, with the tables the layout describes;
    all return ``[B, keys, dim]``."""
    if cfg.kind == "per_field":
        return SparseArch([f.name for f in fields], [int(f.num_embeddings or 0) for f in fields], cfg.dim,
                          cfg.init_range, prefix, device, rows=layout.rows, remapped=layout.remapped, widths=layout.widths,
                          bits=layout.bits)
    return hashed_sparse_arch(fields, cfg, device)
