"""The edge model: plain-torch modules that TorchScript compiles, rebuilt from a trained checkpoint.

No TorchRec, fbgemm or project code is needed to run the result: the tables are ordinary tensors
(fp32, fp16, or int8 with a scale and bias per row), lookups are index arithmetic, unified-embedding
hashing is the same splitmix64 written in scriptable torch ops, and the layers after the embeddings
are the trained model's own modules (MLP, cross network, factorised layers, projection).

Input: dense float [B, n_dense] and ids int64 [B, n_fields] in the feature map's id space; output:
click probability [B]. An id outside a field's range reads that field's OOV row.
"""

from __future__ import annotations

import torch
from torch import nn

from ctr.models import DNN, DCNv2, DeepFM, FirstOrder
from ctr.modules.hashed import HashedSparseArch
from ctr.modules.interactions import factorization_machine
from ctr.modules.sparse import SparseArch
from features.vocab import OOV_ID

EMBEDDING_FORMATS = ("fp32", "fp16", "int8")


def splitmix64(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """features.hashing.hash_torch in ops TorchScript compiles: the constants are its int64 bit
    patterns written out (TorchScript reads no globals), the logical shifts are shift-and-mask."""
    z = (values ^ keys) + -7046029254386353131  # 0x9E3779B97F4A7C15
    z = (z ^ ((z >> 30) & 17179869183)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & 137438953471)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & 8589934591)


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8: q in [0, 255] with x ~ q * scale + bias per row (bias = the row's minimum);
    scale and bias in fp16, so a 4-wide row takes 8 bytes instead of 16."""
    low, high = table.min(dim=1).values.half().float(), table.max(dim=1).values
    scale = ((high - low) / 255.0).clamp(min=1e-6).half().float()
    q = torch.round((table - low.unsqueeze(1)) / scale.unsqueeze(1)).clamp(0, 255).to(torch.uint8)
    return q, scale.half(), low.half()


class EdgeEmbedding(nn.Module):
    """Lookup keys (a field, or a field's chunk) -> rows of width-grouped tables -> [B, K, dim].

    Keys of the same width share one storage tensor (their tables stacked, each at a row offset),
    so a lookup is one gather per distinct width, however many fields there are."""

    def __init__(self, field_index: torch.Tensor, vocab: torch.Tensor, exact: torch.Tensor, salts: torch.Tensor,
                 buckets: torch.Tensor, remap: torch.Tensor | None, tables: list[torch.Tensor], key_table: list[int],
                 widths: list[int], dim: int, fmt: str) -> None:
        super().__init__()
        self.dim, self.num_keys, self.fmt, self.oov = dim, len(key_table), fmt, OOV_ID
        self.register_buffer("field_index", field_index)
        self.register_buffer("vocab", vocab.view(1, -1))
        self.register_buffer("exact", exact.view(1, -1))
        self.register_buffer("salts", salts.view(1, -1))
        self.register_buffer("buckets", buckets.view(1, -1).clamp(min=1))
        self.remapped = remap is not None
        # int16 when every table row number fits (OptFS/OptEmbed tables are small): half the bytes
        small = remap is not None and int(remap.max()) < 2**15
        self.register_buffer("remap", remap.to(torch.int16 if small else torch.int32) if remap is not None
                             else torch.zeros(0, dtype=torch.int32))
        self.register_buffer("remap_offsets", torch.cat([torch.zeros(1, dtype=torch.int64), vocab.cumsum(0)[:-1]]).view(1, -1))
        # group keys by width; stack each group's distinct tables into one storage
        self.group_keys: list[torch.Tensor] = []
        self.group_offsets: list[torch.Tensor] = []
        self.group_widths: list[int] = []
        self.storage: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        for width in sorted(set(widths)):
            keys = [k for k in range(len(key_table)) if widths[k] == width]
            used = sorted({key_table[k] for k in keys})
            starts, rows = {}, 0
            for t in used:
                starts[t] = rows
                rows += tables[t].shape[0]
            stacked = torch.cat([tables[t] for t in used]) if used else torch.zeros(0, width)
            self.group_keys.append(torch.tensor(keys, dtype=torch.int64))
            self.group_offsets.append(torch.tensor([starts[key_table[k]] for k in keys], dtype=torch.int64).view(1, -1))
            self.group_widths.append(width)
            if fmt == "int8":
                q, scale, bias = quantize_rows(stacked)
                self.storage.append(q)
                self.scales.append(scale)
                self.biases.append(bias)
            else:
                self.storage.append(stacked.to(torch.float16 if fmt == "fp16" else torch.float32).contiguous())
                self.scales.append(torch.zeros(0))
                self.biases.append(torch.zeros(0))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Field ids [B, F] -> table rows [B, K] (-1: the row was removed, read zeros)."""
        ids = torch.where((ids >= 0) & (ids < self.vocab), ids, torch.full_like(ids, self.oov))
        if self.remapped:
            return self.remap[ids + self.remap_offsets].to(torch.int64)
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
            if self.fmt == "int8":
                vec = self.storage[g][at].to(torch.float32) * self.scales[g][at].to(torch.float32).unsqueeze(-1) + \
                    self.biases[g][at].to(torch.float32).unsqueeze(-1)
            else:
                vec = self.storage[g][at].to(torch.float32)
            vec = vec * kept.to(torch.float32)
            width = self.group_widths[g]
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
                         arch.dim, fmt)


def _hashed(arch: HashedSparseArch, vocab: list[int], fmt: str) -> EdgeEmbedding:
    names = list(arch.ebc.embedding_bags)
    tables = [arch.ebc.embedding_bags[name].weight.detach() for name in names]
    table_of = {feature: names.index(cfg.name) for cfg in arch.ebc.embedding_bag_configs() for feature in cfg.feature_names}
    key_table = [table_of[k] for k in arch.key_names]
    return EdgeEmbedding(arch.field_index, torch.tensor(vocab, dtype=torch.int64), arch.exact.flatten(),
                         arch.salts.flatten(), arch.buckets.flatten(), None, tables, key_table,
                         [arch.dim] * arch.num_keys, arch.dim, fmt)


def edge_embedding(arch: nn.Module, vocab: list[int], fmt: str) -> EdgeEmbedding:
    return _per_field(arch, vocab, fmt) if isinstance(arch, SparseArch) else _hashed(arch, vocab, fmt)


class EdgeFirstOrder(nn.Module):
    """One weight per feature value (the four fbgemm-width values summed), plus the dense term."""

    def __init__(self, first: FirstOrder, vocab: list[int], fmt: str) -> None:
        super().__init__()
        summed = [t.weight.detach().sum(1, keepdim=True) for t in first.weights.ebc.embedding_bags.values()]
        n = len(summed)
        self.weights = EdgeEmbedding(torch.arange(n), torch.tensor(vocab, dtype=torch.int64), torch.ones(n, dtype=torch.bool),
                                     torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64), None,
                                     summed, list(range(n)), [1] * n, 1, "fp32" if fmt == "int8" else fmt)
        self.dense = first.dense if first.dense is not None else nn.Linear(0, 1, bias=False)
        self.bias = first.bias

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.weights(ids).sum(dim=(1, 2)) + self.bias + self.dense(dense).squeeze(1)


class EdgeFront(nn.Module):
    """Embeddings -> optional AFM projection -> the flat input's stored columns."""

    def __init__(self, model: nn.Module, vocab: list[int], fmt: str) -> None:
        super().__init__()
        self.embedding = edge_embedding(model.embedding, vocab, fmt)
        self.projection = model.projection if model.projection is not None else nn.Identity()
        self.register_buffer("columns", model.columns if model.columns is not None else torch.arange(model.flat_width))

    def emb(self, ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embedding(ids))

    def flat(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([emb.flatten(1), dense], dim=1).index_select(1, self.columns)


class EdgeDNN(nn.Module):
    def __init__(self, model: DNN, vocab: list[int], fmt: str) -> None:
        super().__init__()
        self.front, self.mlp, self.head = EdgeFront(model, vocab, fmt), model.mlp, model.head

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.front.flat(self.front.emb(ids), dense)
        return torch.sigmoid(self.head(self.mlp(x)).squeeze(1))


class EdgeDeepFM(nn.Module):
    def __init__(self, model: DeepFM, vocab: list[int], fmt: str) -> None:
        super().__init__()
        self.front, self.mlp, self.head = EdgeFront(model, vocab, fmt), model.mlp, model.head
        self.first_order = EdgeFirstOrder(model.first_order, vocab, fmt)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        emb = self.front.emb(ids)
        logit = self.first_order(dense, ids) + factorization_machine(emb) + \
            self.head(self.mlp(self.front.flat(emb, dense))).squeeze(1)
        return torch.sigmoid(logit)


class EdgeDCNv2(nn.Module):
    def __init__(self, model: DCNv2, vocab: list[int], fmt: str) -> None:
        super().__init__()
        self.front, self.mlp, self.head, self.cross = EdgeFront(model, vocab, fmt), model.mlp, model.head, model.cross
        self.stacked = model.structure == "stacked"

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x0 = self.front.flat(self.front.emb(ids), dense)
        out = self.mlp(self.cross(x0)) if self.stacked else torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        return torch.sigmoid(self.head(out).squeeze(1))


EDGE_MODELS: dict[type, type] = {DNN: EdgeDNN, DeepFM: EdgeDeepFM, DCNv2: EdgeDCNv2}


def edge_model(model: nn.Module, vocab: list[int], fmt: str = "fp32") -> nn.Module:
    """The edge form of a plain (unsharded, CPU) trained model, in evaluation mode."""
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"export.embeddings must be one of {EMBEDDING_FORMATS}, got '{fmt}'")
    kind = EDGE_MODELS.get(type(model))
    if kind is None:
        raise ValueError(f"no edge export for {type(model).__name__} (DNN, DeepFM and DCNv2 export)")
    return kind(model, vocab, fmt).eval()
