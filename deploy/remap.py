"""The edge file's id remap (feature id -> table row), stored per field in whichever form is smaller.

After row selection a field may keep a few hundred of its million ids. One entry per original id
(the dense form) then costs more than the rows it points at; the sparse form stores only the ids
whose row differs from the field's most common one (removed ids all read -1, or all read the OOV
row), as sorted global ids found by binary search, and their rows. Each field takes the
form with fewer bytes; both give the same row for every id, kept, removed or out of range.
"""

from typing import List

import torch
from torch import nn

KEY_BYTES = 4  # sparse keys are int32 global ids (the feature map's id space is below 2^31)


def _row_dtype(remap: torch.Tensor) -> torch.dtype:
    """int16 when every row number fits (selected tables are small), else int32."""
    return torch.int16 if remap.numel() == 0 or int(remap.abs().max()) < 2**15 else torch.int32


def _most_common(values: torch.Tensor) -> int:
    found, counts = torch.unique(values, return_counts=True)
    return int(found[counts.argmax()])


class IdRemap(nn.Module):
    """Ids [B, F] (already within each field's range) -> table rows [B, F] (-1: a removed row)."""

    steps: List[int]  # the binary search's halvings, largest first (declared here: TorchScript types an empty list so)

    def __init__(self, remap: torch.Tensor, vocab: list[int]) -> None:
        super().__init__()
        rows = _row_dtype(remap)
        size = torch.tensor([], dtype=rows).element_size()
        starts = [0]
        for v in vocab:
            starts.append(starts[-1] + v)
        dense_parts, keys, values = [], [], []
        is_dense, dense_offsets, defaults = [], [], []
        held = 0
        for f, v in enumerate(vocab):
            segment = remap[starts[f]:starts[f + 1]]
            default = _most_common(segment)
            differ = (segment != default).nonzero().flatten()
            dense = v * size <= differ.numel() * (KEY_BYTES + size)
            is_dense.append(dense)
            defaults.append(default)
            dense_offsets.append(held)
            if dense:
                dense_parts.append(segment)
                held += v
            else:
                keys.append(differ + starts[f])
                values.append(segment[differ])
        self.register_buffer("is_dense", torch.tensor(is_dense, dtype=torch.bool).view(1, -1))
        self.register_buffer("dense_offsets", torch.tensor(dense_offsets, dtype=torch.int64).view(1, -1))
        self.register_buffer("key_offsets", torch.tensor(starts[:-1], dtype=torch.int64).view(1, -1))
        self.register_buffer("defaults", torch.tensor(defaults, dtype=torch.int64).view(1, -1))
        self.register_buffer("dense", torch.cat(dense_parts).to(rows) if dense_parts else torch.zeros(0, dtype=rows))
        self.register_buffer("keys", torch.cat(keys).to(torch.int32) if keys else torch.zeros(0, dtype=torch.int32))
        self.register_buffer("values", torch.cat(values).to(rows) if values else torch.zeros(0, dtype=rows))
        self.steps = [1 << k for k in reversed(range(self.keys.numel().bit_length()))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.defaults.expand(ids.shape[0], -1)
        if self.keys.numel() > 0:
            wanted = (ids + self.key_offsets).to(torch.int32)
            at = self.lower_bound(wanted).clamp(max=self.keys.numel() - 1)
            found = self.keys[at] == wanted
            rows = torch.where(found, self.values[at].to(torch.int64), rows)
        if self.dense.numel() > 0:
            at = torch.where(self.is_dense, ids + self.dense_offsets, torch.zeros_like(ids))
            rows = torch.where(self.is_dense, self.dense[at].to(torch.int64), rows)
        return rows

    def lower_bound(self, wanted: torch.Tensor) -> torch.Tensor:
        """How many keys are below each wanted key: ``searchsorted`` written as a branchless binary
        search (one gather per halving), since ONNX has no searchsorted and TorchScript needs none."""
        n = self.keys.numel()
        below = torch.zeros_like(wanted, dtype=torch.int64)
        for step in self.steps:
            probe = below + step
            ok = (probe <= n) & (self.keys[(probe - 1).clamp(max=n - 1)] < wanted)
            below = torch.where(ok, probe, below)
        return below

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
