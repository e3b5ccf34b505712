"""``trainer.init_from``: a new run that starts from a trained run's final model, on a dataset
extended from that run's data (``ctr prepare --extend``).

Why: a day's new values get ids after the old ones, so a model's tables only grow. The parent's
rows and their sparse optimizer state are copied; the rows of the new ids keep the values the
fresh model was initialised with, exactly as at the start of training; the dense weights and
their optimizer state are the parent's. A compressed parent (its last recipe stage) brings its
structure steps, which the new model replays: a selected table keeps its rows, and a new id reads
what the out-of-vocabulary id reads until a later recipe selects again; factorised and quantized
tables grow by fresh rows of their own width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_write_text
from common.errors import ConfigError
from ctr.checkpoint import load_checkpoint
from ctr.distributed import fused_optimizer_state, load_fused_optimizer_state, load_plain_state_dict, plain_state_dict
from ctr.modules.sparse import SparseArch
from ctr.run_dir import RunDir
from ctr.structure import Step, steps_from_payload
from features.feature_map import FeatureMap, feature_map_sha256
from features.vocab import OOV_ID

State = dict[str, torch.Tensor]


def _grow_remap(old: torch.Tensor, old_vocab: list[int], new_vocab: list[int]) -> torch.Tensor:
    """Each field's id -> row map with the new ids appended, reading what the OOV id reads."""
    parts, start = [], 0
    for was, now in zip(old_vocab, new_vocab):
        segment = old[start:start + was]
        parts += [segment, segment[OOV_ID].repeat(now - was)]
        start += was
    return torch.cat(parts)


def grown(old: State, fresh: State, old_vocab: list[int], new_vocab: list[int], where: Path) -> State:
    """``old`` onto the shapes of ``fresh``: a tensor that grew along its rows keeps its old rows and
    takes the fresh ones after them; the remap grows field by field; an entry ``old`` lacks keeps the
    fresh value."""
    out = {}
    for key, now in fresh.items():
        was = old.get(key)
        if was is None or was.shape == now.shape:
            out[key] = now if was is None else was
        elif key.rsplit(".", 1)[-1] == SparseArch.REMAP:
            out[key] = _grow_remap(was, old_vocab, new_vocab)
        elif was.dim() == now.dim() and was.shape[1:] == now.shape[1:] and was.shape[0] < now.shape[0]:
            out[key] = torch.cat([was, now[was.shape[0]:]])
        else:
            raise ConfigError(f"{where}: {key} has shape {tuple(was.shape)} in the parent and {tuple(now.shape)} in the "
                              "new model; only tables grow with a day's values (warm-start a run of the same model)")
    return out


@dataclass(frozen=True)
class WarmStart:
    """A parent run's final model, to be grown onto the tables of an extended feature map."""

    run: Path
    checkpoint: Path
    payload: dict[str, Any]
    old_vocab: list[int]
    new_vocab: list[int]

    @property
    def steps(self) -> tuple[Step, ...]:
        return steps_from_payload(self.payload)

    def load_into(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective, like the state-dict helpers it uses: every rank takes its shards."""
        load_plain_state_dict(model, grown(self.payload["model"], plain_state_dict(model), self.old_vocab,
                                           self.new_vocab, self.checkpoint))
        if "sparse_optimizer" in self.payload:  # a recipe stage keeps no optimizer state: it starts fresh
            load_fused_optimizer_state(model, grown(self.payload["sparse_optimizer"], fused_optimizer_state(model),
                                                    self.old_vocab, self.new_vocab, self.checkpoint))
            optimizer.load_state_dict(self.payload["dense_optimizer"])

    def record(self, run: RunDir) -> None:
        """``parent.json``: which run and checkpoint the new run grew from."""
        atomic_write_text(run.parent, json.dumps({"run": str(self.run.resolve()), "checkpoint": str(self.checkpoint.resolve()),
                                                  "feature_map_sha256": feature_map_sha256(RunDir(self.run).feature_map)},
                                                 indent=2) + "\n")


def final_checkpoint(parent: RunDir) -> Path:
    """The parent's final model: its recipe's last stage when it was compressed, else its best checkpoint."""
    stages = parent.stage_checkpoints()
    return stages[-1] if stages else parent.best


def check_parent_run(init_from: Path, fmap: FeatureMap, data_dir: Path) -> RunDir:
    """The parent run, if ``data_dir`` is its data or grown from it (before any work is done)."""
    parent = RunDir(init_from)
    if not parent.is_run() or not final_checkpoint(parent).is_file():
        raise ConfigError(f"{init_from}: trainer.init_from is not a trained run directory, with feature_map.json and "
                          "checkpoints/best.pt (give the run directory of yesterday's model)")
    digest = feature_map_sha256(parent.feature_map)
    if digest not in [*fmap.ancestry, feature_map_sha256(data_dir)]:
        raise ConfigError(f"{parent.feature_map}: the run was trained on data that {data_dir} does not extend (prepare the "
                          f"new day with: ctr prepare CONFIG --raw DAY --extend {parent.prepared_data()})")
    return parent


def warm_start(init_from: Path, fmap: FeatureMap, data_dir: Path, model_config: dict[str, Any]) -> WarmStart:
    """The warm start of a run on ``data_dir`` from the run ``init_from``, checked: the data must be the
    parent's or grown from it, and the model the same."""
    parent = check_parent_run(init_from, fmap, data_dir)
    checkpoint = final_checkpoint(parent)
    payload = load_checkpoint(checkpoint)
    if payload["model_config"] != model_config:
        raise ConfigError(f"{checkpoint}: the parent's model config differs from this run's model: section (warm-start "
                          "the same model; a new architecture trains from scratch)")
    if model_config.get("embedding", {}).get("kind", "per_field") != "per_field":
        raise ConfigError(f"{checkpoint}: hashed and unified embeddings size their shared tables from the vocabularies, "
                          "so they cannot grow row by row (warm-start a model with per-field tables)")
    old = FeatureMap.load(parent.feature_map)
    return WarmStart(init_from, checkpoint, payload, [int(f.num_embeddings or 0) for f in old.categorical],
                     [int(f.num_embeddings or 0) for f in fmap.categorical])
