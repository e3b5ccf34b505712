"""The edge model: raw values in, click probability out, in one TorchScript (or ONNX) file.

Inside, in order: the raw transforms (``ctr.edge.raw``: dense log1p, Criteo buckets, Avazu hours),
each field's vocabulary as sorted fingerprints of token keys (``EdgeVocabulary``), the tables in
slot order (``ctr.edge.layout``: a shipped value's row is its position in the fingerprints; values
removed by min count, OptFS or OptEmbed are not shipped and read the OOV id's row), unified-embedding
hashing, and then the trained model's own projection and dense arch, the very modules it trained
with, so no model's forward is written twice. No TorchRec, fbgemm or project code is needed to run it.

Entry points: ``forward(numbers, keys)`` (raw numbers float64 [B, N], token keys int64 [B, T]),
``score_lines(lines)`` (raw log lines, TorchScript only) and ``score_features(dense, field_keys)``
(a prepared split's dense features and each field's token key: how ``ctr score`` reads Parquet).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List

import numpy as np
import torch
from torch import nn

from ctr.capabilities import EDGE_FORM
from ctr.edge.layout import (
    FORMAT_CODES,
    FieldSlots,
    edge_slots,
    embedding_rows,
    field_codes,
    first_order_code,
    fingerprints,
    tensor_bytes,
    vocabulary_keys,
)
from ctr.edge.raw import RawLines, RawTransforms, feature_specs, raw_layout
from ctr.models.base import CTRModel, flat_input
from ctr.modules.hashed import HashedSparseArch
from ctr.modules.quantized import QUANTIZED_BITS, levels_of, pack_codes, row_codes, unpack_codes
from ctr.modules.sparse import SparseArch
from features.feature_map import FeatureMap
from features.hashing import BLANK_KEY, mix_torch
from features.schema import Layout
from features.transforms import FeatureSpec

EMBEDDING_FORMATS = ("fp32", "fp16", "int8")
FINGERPRINT_DTYPES = {16: torch.int16, 32: torch.int32, 64: torch.int64}


class EdgeVocabulary(nn.Module):
    """Field keys [B, F] -> slots [B, F]: 1 for a blank, 2 + position for a shipped value (found by a
    branchless binary search in the field's sorted fingerprints), 0 for anything else. Fields with
    fingerprints of one width share one sorted-per-field array."""

    def __init__(self, slots: list[FieldSlots]) -> None:
        super().__init__()
        self.blank_key = BLANK_KEY
        self.group_fields: list[torch.Tensor] = []
        self.group_shifts: list[int] = []
        self.group_steps = []
        self.fingerprints: list[torch.Tensor] = []
        self.starts: list[torch.Tensor] = []
        self.ends: list[torch.Tensor] = []
        for bits in sorted({s.bits for s in slots}):
            fields = [f for f, s in enumerate(slots) if s.bits == bits]
            sizes = [slots[f].keys.size for f in fields]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self.group_fields.append(torch.tensor(fields, dtype=torch.int64))
            self.group_shifts.append(64 - bits)
            self.group_steps.append([1 << k for k in reversed(range(max(sizes).bit_length()))])
            values = np.concatenate([fingerprints(slots[f].keys, bits) for f in fields] + [np.zeros(1, np.int64)])
            self.fingerprints.append(torch.from_numpy(values).to(FINGERPRINT_DTYPES[bits]))
            self.starts.append(torch.from_numpy(starts[:-1]).view(1, -1))
            self.ends.append(torch.from_numpy(starts[1:]).view(1, -1))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        slots = torch.zeros_like(keys)
        for g in range(len(self.fingerprints)):
            fields = self.group_fields[g]
            k = keys.index_select(1, fields)
            wanted = k >> self.group_shifts[g]
            table = self.fingerprints[g]
            last = table.numel() - 1  # one padding value at the end, so an empty group still indexes
            below = self.starts[g].expand(k.shape[0], -1)
            for step in self.group_steps[g]:
                probe = below + step
                ok = (probe <= self.ends[g]) & (table[(probe - 1).clamp(min=0, max=last)].to(torch.int64) < wanted)
                below = torch.where(ok, probe, below)
            found = (below < self.ends[g]) & (table[below.clamp(max=last)].to(torch.int64) == wanted)
            slot = torch.where(found, below - self.starts[g] + 2, torch.zeros_like(below))
            slots = slots.index_copy(1, fields, torch.where(k == self.blank_key, torch.ones_like(slot), slot))
        return slots


class EdgeEmbedding(nn.Module):
    """Slots [B, F] -> rows of grouped tables -> [B, K, dim], K lookup keys (a field, or a field's chunk).

    Per-field tables are stored in slot order, so a slot is its row. Hashed tables (unified
    embedding, per-field hashing) keep their rows: a slot gives its feature id (``slot_ids``), which
    is hashed with the training salts. Keys of the same width and storage code share one storage
    tensor (their tables stacked, each at a row offset), so a lookup is one gather per group. A code
    is 32 or 16 (float rows) or 8, 4, 2: row-wise integer codes packed into bytes with an fp16 scale
    and bias per row (``ctr.modules.quantized``, the arithmetic training used)."""

    def __init__(self, field_index: torch.Tensor, slot_ids: list[np.ndarray] | None, exact: torch.Tensor,
                 salts: torch.Tensor, buckets: torch.Tensor, tables: list[torch.Tensor], key_table: list[int],
                 widths: list[int], dim: int, codes: list[int]) -> None:
        super().__init__()
        self.dim, self.num_keys = dim, len(key_table)
        self.register_buffer("field_index", field_index)
        self.hashed = slot_ids is not None
        sizes = [len(ids) for ids in slot_ids or []]
        self.register_buffer("slot_ids", torch.from_numpy(np.concatenate(slot_ids)).to(torch.int32) if slot_ids
                             else torch.zeros(0, dtype=torch.int32))
        self.register_buffer("slot_offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).view(1, -1))
        self.register_buffer("exact", exact.view(1, -1))
        self.register_buffer("salts", salts.view(1, -1))
        self.register_buffer("buckets", buckets.view(1, -1).clamp(min=1))
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

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots [B, F] -> table rows [B, K]."""
        if not self.hashed:
            return slots.index_select(1, self.field_index)
        ids = self.slot_ids[slots + self.slot_offsets].to(torch.int64)
        per_key = ids.index_select(1, self.field_index)
        hashed = ((mix_torch(per_key ^ self.salts) >> 1) & 9223372036854775807) % self.buckets
        return torch.where(self.exact, per_key, hashed)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        rows = self.rows(slots)
        out = torch.zeros(slots.shape[0], self.num_keys, self.dim)
        for g in range(len(self.storage)):
            keys = self.group_keys[g]
            at = rows.index_select(1, keys) + self.group_offsets[g]
            width, code = self.group_widths[g], self.group_codes[g]
            if code <= 8:
                vec = unpack_codes(self.storage[g][at], code, width) * self.scales[g][at].to(torch.float32).unsqueeze(-1) \
                    + self.biases[g][at].to(torch.float32).unsqueeze(-1)
            else:
                vec = self.storage[g][at].to(torch.float32)
            if width < self.dim:
                vec = torch.cat([vec, torch.zeros(vec.shape[0], vec.shape[1], self.dim - width)], dim=2)
            out.index_copy_(1, keys, vec)
        return out

    def table_bytes(self) -> int:
        return tensor_bytes([*self.storage, *self.scales, *self.biases])

    def vocabulary_bytes(self) -> int:
        """The slot ids of hashed tables: what their lookup needs of the vocabulary beyond the fingerprints."""
        return tensor_bytes([self.slot_ids])


def slot_table(table: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """A field's table in slot order: the row each slot reads (zeros for -1, a removed row)."""
    at = torch.from_numpy(rows)
    return torch.where((at >= 0).unsqueeze(1), table[at.clamp(min=0)], torch.zeros(()))


def _per_field(arch: SparseArch, slots: list[FieldSlots], fmt: str) -> EdgeEmbedding:
    n = arch.num_fields
    rows = embedding_rows(arch)
    tables = [slot_table(t.weight.detach(), s.ids if rows is None else rows[f][s.ids])
              for f, (t, s) in enumerate(zip(arch.ebc.embedding_bags.values(), slots))]
    return EdgeEmbedding(torch.arange(n), None, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64),
                         torch.ones(n, dtype=torch.int64), tables, list(range(n)), arch.widths or [arch.dim] * n,
                         arch.dim, field_codes(arch, fmt))


def _hashed(arch: HashedSparseArch, slots: list[FieldSlots], fmt: str) -> EdgeEmbedding:
    names = list(arch.ebc.embedding_bags)
    tables = [arch.ebc.embedding_bags[name].weight.detach() for name in names]
    table_of = {feature: names.index(cfg.name) for cfg in arch.ebc.embedding_bag_configs() for feature in cfg.feature_names}
    key_table = [table_of[k] for k in arch.key_names]
    return EdgeEmbedding(arch.field_index, [s.ids for s in slots], arch.exact.flatten(), arch.salts.flatten(),
                         arch.buckets.flatten(), tables, key_table, [arch.dim] * arch.num_keys, arch.dim,
                         [FORMAT_CODES[fmt]] * arch.num_keys)


def _first_order(model: CTRModel, slots: list[FieldSlots], fmt: str) -> EdgeEmbedding | None:
    """One weight per slot (fbgemm's four values summed); None for a model without."""
    if model.first_order is None:
        return None
    tables = [slot_table(t.weight.detach().sum(1, keepdim=True), s.ids)
              for t, s in zip(model.first_order.ebc.embedding_bags.values(), slots)]
    n = len(tables)
    return EdgeEmbedding(torch.arange(n), None, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64),
                         torch.ones(n, dtype=torch.int64), tables, list(range(n)), [1] * n, 1,
                         [first_order_code(fmt)] * n)


class EdgeModel(nn.Module):
    """Raw values -> transforms -> vocabulary -> tables -> the trained projection -> the trained dense arch."""

    def __init__(self, model: CTRModel, specs: list[FeatureSpec], layout: Layout, slots: list[FieldSlots],
                 fmt: str) -> None:
        super().__init__()
        if EDGE_FORM not in model.capabilities:
            raise ValueError("this model has no edge form (no embedding tables); the edge export covers models with them")
        self.transforms = RawTransforms(specs, layout)
        self.lines = RawLines(layout)
        self.vocabulary = EdgeVocabulary(slots)
        arch = model.embedding
        self.embedding = _per_field(arch, slots, fmt) if isinstance(arch, SparseArch) else _hashed(arch, slots, fmt)
        self.first_order = _first_order(model, slots, fmt)
        self.projection = model.projection if model.projection is not None else nn.Identity()
        self.register_buffer("columns", model.columns if model.columns is not None else
                             torch.arange(model.embedding.num_keys * model.dim + model.num_dense))
        self.arch = model.arch

    def forward(self, numbers: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        dense, field_keys = self.transforms(numbers, keys)
        return self.score_features(dense, field_keys)

    @torch.jit.export
    def score_features(self, dense: torch.Tensor, field_keys: torch.Tensor) -> torch.Tensor:
        slots = self.vocabulary(field_keys)
        emb = self.projection(self.embedding(slots))
        linear = torch.zeros(slots.shape[0])
        if self.first_order is not None:
            linear = self.first_order(slots).sum(dim=(1, 2))
        return torch.sigmoid(self.arch(emb, flat_input(emb, dense, self.columns), dense, linear))

    @torch.jit.export
    def score_lines(self, lines: List[str]) -> torch.Tensor:
        numbers, keys = self.lines(lines)
        return self.forward(numbers, keys)


def edge_model(model: CTRModel, specs: list[FeatureSpec], layout: Layout, slots: list[FieldSlots],
               fmt: str = "fp32") -> EdgeModel:
    """The edge form of a plain (unsharded, CPU) trained model, in evaluation mode."""
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"export.embeddings must be one of {EMBEDDING_FORMATS}, got '{fmt}'")
    return EdgeModel(model, specs, layout, slots, fmt).eval()


def edge_bytes(edge: EdgeModel) -> dict[str, int]:
    """The edge model's tensors by part: its tables, its vocabulary (fingerprints, and a hashed
    table's slot ids), its transforms' column indices and its dense layers."""
    lookups = [edge.embedding] if edge.first_order is None else [edge.embedding, edge.first_order]
    return {"embedding tables": sum(t.table_bytes() for t in lookups),
            "vocabulary": tensor_bytes(edge.vocabulary.fingerprints) + sum(t.vocabulary_bytes() for t in lookups),
            "transforms": tensor_bytes(list(edge.transforms.buffers())),
            "dense layers": tensor_bytes([*edge.projection.parameters(), *edge.arch.parameters(), *edge.arch.buffers()])}


def file_parts(edge: EdgeModel, file_bytes: int) -> dict[str, int]:
    """``edge_bytes`` plus ``format``: what the file adds (TorchScript's code, the lookups' small index
    tensors, zip framing), so that the parts add up to the whole file."""
    parts = edge_bytes(edge)
    return parts | {"format": file_bytes - sum(parts.values())}


def scripted_file(edge: EdgeModel) -> bytes:
    """The TorchScript file of ``edge``, written in memory (so its records are named the same
    whatever path the bytes land at, and a size measured here is the size ``ctr export`` writes)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(edge), buffer)
    return buffer.getvalue()


def edge_of(model: CTRModel, fmap: FeatureMap, data_dir: Path, fmt: str = "fp32") -> EdgeModel:
    """The edge form of a model trained on the data in ``data_dir`` (its vocabulary)."""
    slots = edge_slots(model, fmap, vocabulary_keys(data_dir, fmap))
    return edge_model(model, feature_specs(fmap), raw_layout(fmap), slots, fmt)
