"""``feature_map.json``: the contract between a prepared dataset and every model trained on it.

It records what the model's inputs mean (fields, order, id ranges, transforms and their versions) and
how the data was made (sources, seeds, split rule, row counts), so a checkpoint or an exported model
can check that the data in front of it is the data it was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from common.atomic import atomic_write_text
from common.digest import sha256_file
from common.errors import DataError
from features.schema import Layout, SplitConfig

FORMAT_VERSION = 1
FILE_NAME = "feature_map.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldInfo(_Frozen):
    name: str
    type: Literal["categorical", "dense"]
    source: str
    transform: str
    # categorical only: ids are 0..num_embeddings-1 (padding, oov, blank, then values)
    num_embeddings: int | None = None
    min_count: int | None = None
    vocab_file: str | None = None


class SplitInfo(_Frozen):
    file: str
    rows: int


class SourceInfo(_Frozen):
    path: str
    bytes: int
    rows: int


class DayFile(_Frozen):
    path: str
    sha256: str


class Lineage(_Frozen):
    """Where an extended dataset comes from (``ctr prepare --extend``): its parent, every earlier
    feature map by digest (oldest first, the parent last: what a warm start checks its run against),
    the rows all of them read (where this day's row positions start) and the day's files."""

    parent: str
    parent_sha256: str
    ancestors: list[str]
    rows_before: int
    files: list[DayFile]


class FeatureMap(_Frozen):
    format_version: int = FORMAT_VERSION
    dataset: str
    layout: str
    label: str
    label_source: str
    fields: list[FieldInfo]
    special_ids: dict[str, int]
    splits: dict[str, SplitInfo]
    split_rule: SplitConfig
    hash_version: str
    rows_read: int
    rows_rejected: int
    sources: list[SourceInfo]
    config_fingerprint: str  # of the dataset config that made it: a changed config means stale data
    raw_layout: Layout | None = None  # the raw rows' columns and separator (None: a map written before it was recorded)
    extends: Lineage | None = None  # an extended dataset's parent (None: prepared from scratch)

    @property
    def categorical(self) -> list[FieldInfo]:
        return [f for f in self.fields if f.type == "categorical"]

    @property
    def dense(self) -> list[FieldInfo]:
        return [f for f in self.fields if f.type == "dense"]

    @property
    def rows_through(self) -> int:
        """Rows read by this dataset and every one it extends: where the next day's row positions start."""
        return self.rows_read + (self.extends.rows_before if self.extends else 0)

    @property
    def ancestry(self) -> list[str]:
        """The digests of the feature maps this one grew from, oldest first."""
        return list(self.extends.ancestors) if self.extends else []

    def save(self, directory: Path) -> Path:
        path = directory / FILE_NAME
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "FeatureMap":
        """Load from a prepared directory or a ``feature_map.json`` path."""
        path = path / FILE_NAME if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"{path}: feature map not found (run 'ctr prepare' first)")
        try:
            fmap = cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise DataError(f"{path}: not a valid feature map: {exc} (prepare the data again with ctr prepare)") from None
        if fmap.format_version != FORMAT_VERSION:
            raise DataError(f"{path}: feature map format {fmap.format_version}, this code reads {FORMAT_VERSION} "
                            "(prepare the data again with this version's ctr prepare)")
        return fmap


def feature_map_sha256(directory: Path) -> str:
    """The digest by which a feature map is named in its children's lineage and in warm starts."""
    return sha256_file(directory / FILE_NAME if directory.is_dir() else directory)
