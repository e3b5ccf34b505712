"""A model as ``ctr evaluate`` and ``ctr score`` see it: what it reads and how it scores a batch.

An exported edge file (checked against its manifest) scores prepared ids and, through its own
transforms and vocabulary, raw log rows; a run directory or checkpoint scores prepared ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.digest import sha256_file
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import model_size, plain_model
from ctr.loader import make_batch
from ctr.run_dir import STAGE_CHECKPOINT, RunDir
from deploy.export import manifest_path, open_edge, prepared_scorer, resolve_source
from features.feature_map import FeatureMap
from features.schema import Layout
from features.vocab import OOV_ID


@dataclass
class Scorer:
    """One model to evaluate: what it reads, how it scores a batch of columns, what it weighs."""

    name: str
    path: Path
    sha256: str
    bytes: int
    ids: list[str]
    dense: list[str]
    label: str
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (dense [B, D], ids [B, F]) -> probabilities
    raw: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # an edge file's (numbers, keys) -> probabilities
    layout: Layout | None = None  # the raw rows an edge file reads
    recipe: list[dict[str, Any]] = field(default_factory=list)  # the run's compression report, if any


def _recipe(run: RunDir) -> list[dict[str, Any]]:
    return read_json_lines(run.report)


def load_scorer(path: Path) -> Scorer:
    """An exported file (checked against its manifest), or a run directory / checkpoint file."""
    if path.is_file() and manifest_path(path).is_file():
        model, manifest = open_edge(path)
        inputs = manifest["inputs"]
        prepared = prepared_scorer(path, model, manifest)

        def edge(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return prepared(torch.from_numpy(dense), torch.from_numpy(ids)).numpy()

        def raw(numbers: np.ndarray, keys: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(numbers), torch.from_numpy(keys)).numpy()

        return Scorer(path.name, path, manifest["file_sha256"], manifest["file_bytes"], inputs["ids"], inputs["dense"],
                      inputs["label"], edge, raw=raw, layout=Layout.model_validate(
                          {k: inputs[k] for k in ("separator", "header", "columns")}),
                      recipe=_recipe(RunDir(path.parent / manifest["source"]["run_dir"])))
    run, checkpoint = resolve_source(path, None)
    fmap = FeatureMap.load(run.root)
    payload = load_checkpoint(checkpoint)
    net = plain_model(fmap, payload)
    keys = [f.name for f in fmap.categorical]
    vocab = np.array([int(f.num_embeddings or 0) for f in fmap.categorical], dtype=np.int64)

    def plain(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.where((ids >= 0) & (ids < vocab), ids, OOV_ID)  # as the exported model: unknown ids read OOV
        batch = make_batch(keys, torch.from_numpy(ids.T.copy()), torch.from_numpy(dense), torch.zeros(len(ids)))
        with torch.no_grad():
            return torch.sigmoid(net(batch.dense, batch.sparse)[0]).numpy()

    name = checkpoint.parent.name if checkpoint.name == STAGE_CHECKPOINT else f"{run.root.name}/{checkpoint.stem}"
    return Scorer(name, checkpoint, sha256_file(checkpoint), sum(model_size(fmap, run.prepared_data(), net)[1].values()), keys,
                  [f.name for f in fmap.dense], fmap.label, plain, _recipe(run))
