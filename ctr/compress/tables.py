"""Physical reshaping of per-field tables: drop rows (keeping ids pointing at the right rows) and
narrow widths (slicing the layers that read the flat embedding input to match).

Both produce a state that predicts exactly like the masked model it came from, so a stage can
search with masks and then ship real, smaller tensors.
"""

from __future__ import annotations

import torch

from ctr.models.weights import ModelWeights
from ctr.modules.sparse import prefix_columns
from ctr.structure import Layout
from features.feature_map import FieldInfo


def id_remap(state: dict[str, torch.Tensor], fields: list[FieldInfo]) -> list[torch.Tensor]:
    """Per field, the table row of every id (-1: removed); ids map one to one without a remap."""
    vocab = [int(f.num_embeddings or 0) for f in fields]
    remap = ModelWeights(state).remap
    if remap is None:
        remap = torch.cat([torch.arange(v, dtype=torch.int64) for v in vocab])
    return list(remap.split(vocab))


def compact_rows(state: dict[str, torch.Tensor], fields: list[FieldInfo],
                 keep: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Tables cut to the rows ``keep[f]`` marks (a mask over the table's current rows), and the id
    remap renumbered to the new rows; an id whose row is dropped reads a zero vector (remap -1).
    Without a remap in ``state`` the ids map to rows one to one."""
    out = ModelWeights(state)
    remaps, rows = [], []
    for f, mask, old in zip(fields, keep, id_remap(state, fields)):
        table = out.table(f.name)
        kept = mask.nonzero().flatten()
        # a field with no row left keeps one all-zero row that nothing reads (kernels need >= 1 row)
        out.set_table(f.name, table[kept].clone() if kept.numel() else torch.zeros_like(table[:1]))
        new_row = torch.full((table.shape[0] + 1,), -1, dtype=torch.int64)  # the last slot: old -1 stays -1
        new_row[kept] = torch.arange(kept.numel())
        remaps.append(new_row[torch.where(old >= 0, old, table.shape[0])])
        rows.append(max(1, int(kept.numel())))
    out.set_remap(torch.cat(remaps))
    return out.state, rows


def flat_columns(layout: Layout, num_keys: int, num_dense: int) -> torch.Tensor:
    """Which positions of the full flat layout ``[keys x dim, dense]`` a model with ``layout`` reads."""
    wide = num_keys * layout.dim
    widths = layout.flat_widths
    if widths is None:
        return torch.arange(wide + num_dense)
    return torch.cat([prefix_columns(widths, layout.dim), wide + torch.arange(num_dense)])


def narrow_state(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], fields: list[FieldInfo],
                 before: Layout, after: Layout, num_dense: int) -> dict[str, torch.Tensor]:
    """Weights of a model with layout ``before`` -> the shapes of the same model with the narrower
    tables of ``after``: each table keeps its first ``widths[f]`` columns; every other tensor
    dimension that shrank indexes the flat input and keeps the columns ``after`` still reads (plus,
    for a layer that reads ``[flat, more]`` such as DCNv2's parallel head, everything after the
    flat part)."""
    src = flat_columns(before, len(fields), num_dense)
    dst = flat_columns(after, len(fields), num_dense)
    positions = torch.searchsorted(src, dst)
    widths = {f.name: w for f, w in zip(fields, after.stored_widths)}
    weights = ModelWeights(state)
    out = {}
    for key, value in state.items():
        target = shapes[key]
        field = weights.table_of(key, list(widths))
        if field is not None:
            value = value[:, :widths[field]]
        else:
            for d, (have, want) in enumerate(zip(value.shape, target)):
                if have != want:
                    value = value.index_select(d, torch.cat([positions, torch.arange(len(src), have)]))
        if value.shape != target:
            raise ValueError(f"cannot narrow {key}: {tuple(state[key].shape)} -> {tuple(target)}")
        out[key] = value.clone()
    return out
