"""The edge model: the trained model's own dense arch (and AFM projection) behind a torch-only
sparse side, compiled by TorchScript.

No TorchRec, fbgemm or project code is needed to run the result: the tables are ordinary tensors
(fp32, fp16, or 8/4/2-bit codes packed into bytes with a scale and bias per row), the id remap is
dense or sorted per field (``deploy.remap``), lookups are index arithmetic, unified-embedding
hashing is the same splitmix64 written in scriptable torch ops. Only the sparse side is written
here; the layers after the embeddings are the very modules the model trained with, so no model's
forward is written twice.

Input: dense float [B, n_dense] and ids int64 [B, n_fields] in the feature map's id space; output:
click probability [B]. An id outside a field's range reads that field's OOV row.
"""

from __future__ import annotations

import torch
from torch import nn

from ctr.models.base import CTRModel, flat_input
from ctr.modules.hashed import HashedSparseArch
from ctr.modules.quantized import QUANTIZED_BITS, levels_of, pack_codes, row_codes, unpack_codes
from ctr.modules.sparse import SparseArch
from deploy.remap import IdRemap
from features.vocab import OOV_ID

EMBEDDING_FORMATS = ("fp32", "fp16", "int8")


def splitmix64(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """features.hashing.hash_torch in ops TorchScript compiles: the constants are its int64 bit
    patterns written out (TorchScript reads no globals), the logical shifts are shift-and-mask."""
    z = (values ^ keys) + -7046029254386353131  # 0x9E3779B97F4A7C15
    z = (z ^ ((z >> 30) & 17179869183)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & 137438953471)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & 8589934591)


FORMAT_CODES = {"fp32": 32, "fp16": 16, "int8": 8}  # how a table without its own code bits is stored


class EdgeEmbedding(nn.Module):
    """Lookup keys (a field, or a field's chunk) -> rows of grouped tables -> [B, K, dim].

    Keys of the same width and storage code share one storage tensor (their tables stacked, each at
    a row offset), so a lookup is one gather per group, however many fields there are. A code is
    32 or 16 (float rows) or 8, 4, 2: row-wise integer codes packed into bytes with an fp16 scale
    and bias per row (``ctr.modules.quantized``, the arithmetic training used)."""

    def __init__(self, field_index: torch.Tensor, vocab: torch.Tensor, exact: torch.Tensor, salts: torch.Tensor,
                 buckets: torch.Tensor, remap: torch.Tensor | None, tables: list[torch.Tensor], key_table: list[int],
                 widths: list[int], dim: int, codes: list[int]) -> None:
        super().__init__()
        self.dim, self.num_keys, self.oov = dim, len(key_table), OOV_ID
        self.register_buffer("field_index", field_index)
        self.register_buffer("vocab", vocab.view(1, -1))
        self.register_buffer("exact", exact.view(1, -1))
        self.register_buffer("salts", salts.view(1, -1))
        self.register_buffer("buckets", buckets.view(1, -1).clamp(min=1))
        self.remapped = remap is not None
        self.remap = IdRemap(remap if remap is not None else torch.zeros(0, dtype=torch.int64),
                             vocab.tolist() if remap is not None else [])
        self.group_keys: list[torch.Tensor] = []
        self.group_offsets: list[torch.Tensor] = []
        self.group_widths: list[int] = []
        self.group_codes: list[int] = []
        self.storage: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        for width, code in sorted(set(zip(widths, codes))):
            keys = [k for k in range(len(key_table)) if widths[k] == width and codes[k] == code]
            used = sorted({key_table[k] for k in keys})
            starts, rows = {}, 0
            for t in used:
                starts[t] = rows
                rows += tables[t].shape[0]
            stacked = torch.cat([tables[t] for t in used])
            self.group_keys.append(torch.tensor(keys, dtype=torch.int64))
            self.group_offsets.append(torch.tensor([starts[key_table[k]] for k in keys], dtype=torch.int64).view(1, -1))
            self.group_widths.append(width)
            self.group_codes.append(code)
            if code in QUANTIZED_BITS:
                q, scale, low = row_codes(stacked, float(levels_of(code)))
                self.storage.append(pack_codes(q, code))
                self.scales.append(scale.flatten().half())
                self.biases.append(low.flatten().half())
            else:
                self.storage.append(stacked.to(torch.float16 if code == 16 else torch.float32).contiguous())
                self.scales.append(torch.zeros(0))
                self.biases.append(torch.zeros(0))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Field ids [B, F] -> table rows [B, K] (-1: the row was removed, read zeros)."""
        ids = torch.where((ids >= 0) & (ids < self.vocab), ids, torch.full_like(ids, self.oov))
        if self.remapped:
            return self.remap(ids)
        per_key = ids.index_select(1, self.field_index)
        hashed = ((splitmix64(per_key, self.salts) >> 1) & 9223372036854775807) % self.buckets
        return torch.where(self.exact, per_key, hashed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids)
        out = torch.zeros(ids.shape[0], self.num_keys, self.dim)
        for g in range(len(self.storage)):
            keys = self.group_keys[g]
            r = rows.index_select(1, keys)
            kept = (r >= 0).unsqueeze(-1)
            at = r.clamp(min=0) + self.group_offsets[g]
            width, code = self.group_widths[g], self.group_codes[g]
            if code <= 8:
                vec = unpack_codes(self.storage[g][at], code, width) * self.scales[g][at].to(torch.float32).unsqueeze(-1) \
                    + self.biases[g][at].to(torch.float32).unsqueeze(-1)
            else:
                vec = self.storage[g][at].to(torch.float32)
            vec = vec * kept.to(torch.float32)
            if width < self.dim:
                vec = torch.cat([vec, torch.zeros(vec.shape[0], vec.shape[1], self.dim - width)], dim=2)
            out.index_copy_(1, keys, vec)
        return out


def _per_field(arch: SparseArch, vocab: list[int], fmt: str) -> EdgeEmbedding:
    n = arch.num_fields
    tables = [t.weight.detach() for t in arch.ebc.embedding_bags.values()]
    return EdgeEmbedding(torch.arange(n), torch.tensor(vocab, dtype=torch.int64), torch.ones(n, dtype=torch.bool),
                         torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64),
                         arch.remap if arch.remapped else None, tables, list(range(n)), arch.widths or [arch.dim] * n,
                         arch.dim, field_codes(arch, fmt))


def field_codes(arch: SparseArch, fmt: str) -> list[int]:
    """Each field's storage code: its quantize stage's bits, else the export format's."""
    bits = arch.bits.tolist() if arch.quantized else [0] * arch.num_fields
    return [b if b > 0 else FORMAT_CODES[fmt] for b in bits]


def _hashed(arch: HashedSparseArch, vocab: list[int], fmt: str) -> EdgeEmbedding:
    names = list(arch.ebc.embedding_bags)
    tables = [arch.ebc.embedding_bags[name].weight.detach() for name in names]
    table_of = {feature: names.index(cfg.name) for cfg in arch.ebc.embedding_bag_configs() for feature in cfg.feature_names}
    key_table = [table_of[k] for k in arch.key_names]
    return EdgeEmbedding(arch.field_index, torch.tensor(vocab, dtype=torch.int64), arch.exact.flatten(),
                         arch.salts.flatten(), arch.buckets.flatten(), None, tables, key_table,
                         [arch.dim] * arch.num_keys, arch.dim, [FORMAT_CODES[fmt]] * arch.num_keys)


def edge_embedding(arch: nn.Module, vocab: list[int], fmt: str) -> EdgeEmbedding:
    return _per_field(arch, vocab, fmt) if isinstance(arch, SparseArch) else _hashed(arch, vocab, fmt)


def _first_order(model: CTRModel, vocab: list[int], fmt: str) -> EdgeEmbedding | None:
    """One weight per feature value (fbgemm's four values summed); None for a model without."""
    if model.first_order is None:
        return None
    tables = [t.weight.detach().sum(1, keepdim=True) for t in model.first_order.ebc.embedding_bags.values()]
    n = len(tables)
    return EdgeEmbedding(torch.arange(n), torch.tensor(vocab[:n], dtype=torch.int64), torch.ones(n, dtype=torch.bool),
                         torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64), None,
                         tables, list(range(n)), [1] * n, 1, [32 if fmt == "int8" else FORMAT_CODES[fmt]] * n)


class EdgeModel(nn.Module):
    """Torch-only tables -> the trained projection -> flat input -> the trained dense arch."""

    def __init__(self, model: CTRModel, vocab: list[int], fmt: str) -> None:
        super().__init__()
        if model.embedding is None:
            raise ValueError("model 'lr' has no embedding tables; the edge export covers models with embeddings")
        self.embedding = edge_embedding(model.embedding, vocab, fmt)
        self.first_order = _first_order(model, vocab, fmt)
        self.projection = model.projection if model.projection is not None else nn.Identity()
        self.register_buffer("columns", model.columns if model.columns is not None else
                             torch.arange(model.embedding.num_keys * model.dim + model.num_dense))
        self.arch = model.arch

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        emb = self.projection(self.embedding(ids))
        linear = torch.zeros(ids.shape[0])
        if self.first_order is not None:
            linear = self.first_order(ids).sum(dim=(1, 2))
        return torch.sigmoid(self.arch(emb, flat_input(emb, dense, self.columns), dense, linear))


def edge_model(model: CTRModel, vocab: list[int], fmt: str = "fp32") -> EdgeModel:
    """The edge form of a plain (unsharded, CPU) trained model, in evaluation mode."""
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"export.embeddings must be one of {EMBEDDING_FORMATS}, got '{fmt}'")
    return EdgeModel(model, vocab, fmt).eval()


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def edge_bytes(edge: EdgeModel) -> dict[str, int]:
    """What the edge file stores, by part: the tables of both lookups (with their scales and biases
    and per-key bookkeeping), the id remap, and everything else (dense layers, projection, columns)."""
    tables, remap = 0, 0
    for lookup in (edge.embedding, edge.first_order) if edge.first_order is not None else (edge.embedding,):
        remap += lookup.remap.stored_bytes()
        tables += _tensor_bytes([*lookup.storage, *lookup.scales, *lookup.biases, *lookup.group_keys,
                                 *lookup.group_offsets])
        tables += _tensor_bytes([b for name, b in lookup.named_buffers() if not name.startswith("remap.")])
    dense = _tensor_bytes([*edge.projection.parameters(), *edge.arch.parameters(), *edge.arch.buffers(), edge.columns])
    return {"embedding tables": tables, "id remap": remap, "dense layers": dense}
