"""Atomic checkpoints of plain tensors and Python scalars, loaded with ``weights_only=True``.

A checkpoint is written to a temporary name in the same directory, synced, then renamed over the
old one: a kill at any moment leaves either the previous checkpoint or the new one, never half.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write
from common.errors import CheckpointError, one_line


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (check the path, or train the run first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the safe loader met objects it will not build: never suggest turning it off
        raise CheckpointError(f"{path}: not a checkpoint this project wrote, and it may be unsafe to load: it holds "
                              "objects other than tensors and plain values (use a checkpoint written by ctr)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupted ({one_line(exc)}) "
                              "(use the run's other checkpoint, or train again)") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not a ctr checkpoint, it has no 'model' entry (use a checkpoint written by ctr)")
    return payload
