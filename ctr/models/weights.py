"""A checkpoint's plain weights seen through the model's parts, so a compression stage reads and
writes tables, the id remap, linear layers and the AFM projection by what they are, never by a
state-dict key.

Stages work on weights, not on built modules, because what they write has a new shape (fewer rows,
narrower tables, a factorised layer) that only the model built from the next structure steps has.
The key of each part is taken from the module that owns it (``CTRModel``'s attribute names,
``SparseArch``'s table naming), so a change of TorchRec's internal path or of a model's attribute
changes here and nowhere else.
"""

from __future__ import annotations

import torch

from ctr.models.base import EMBEDDING, GATES, PROJECTION
from ctr.modules.sparse import SparseArch

Weights = dict[str, torch.Tensor]


class ModelWeights:
    """A mutable view of one model's plain state dict (``ctr.distributed.plain_state_dict``)."""

    def __init__(self, state: Weights) -> None:
        self.state = dict(state)

    @staticmethod
    def _table(field: str) -> str:
        return f"{EMBEDDING}.{SparseArch.table_weight(field)}"

    def table(self, field: str) -> torch.Tensor:
        """Field ``field``'s embedding table, [rows, stored width]."""
        return self.state[self._table(field)]

    def set_table(self, field: str, weight: torch.Tensor) -> None:
        self.state[self._table(field)] = weight

    def table_of(self, key: str, fields: list[str]) -> str | None:
        """The field whose table ``key`` is (None for any other tensor)."""
        return next((f for f in fields if self._table(f) == key), None)

    @property
    def remap(self) -> torch.Tensor | None:
        """Every field's id -> table row map, concatenated in field order (None: ids are rows)."""
        return self.state.get(f"{EMBEDDING}.{SparseArch.REMAP}")

    def set_remap(self, remap: torch.Tensor) -> None:
        self.state[f"{EMBEDDING}.{SparseArch.REMAP}"] = remap

    def only_remap(self) -> Weights:
        """Just the id remap of an earlier row selection (data, not a weight): what a search that
        starts from fresh weights keeps."""
        remap = self.remap
        return {} if remap is None else {f"{EMBEDDING}.{SparseArch.REMAP}": remap}

    def without_gates(self) -> Weights:
        """The model's weights without a search's gates or masks."""
        return {k: v for k, v in self.state.items() if not k.startswith(f"{GATES}.")}

    def gate(self, name: str) -> torch.Tensor:
        """A search gate's tensor, e.g. OptEmbed's per-field ``threshold``."""
        return self.state[f"{GATES}.{name}"]

    def linear(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the Linear at ``path`` of the model (e.g. ``arch.mlp.layers.0``)."""
        return self.state[f"{path}.weight"], self.state[f"{path}.bias"]

    def set_linear(self, path: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.state[f"{path}.weight"], self.state[f"{path}.bias"] = weight, bias

    def set_projection(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """AFM's per-field projection back to the full width (``FieldProjection``)."""
        self.set_linear(PROJECTION, weight, bias)
