"""Export a trained or compressed checkpoint to one TorchScript file, with a manifest and a parity check.

The file is written under a temporary name, loaded back, and compared with the in-memory model on
held-out test rows; only a file that passes is renamed into place (with ``manifest.json`` beside
it), so a failed export leaves nothing behind. ``load_edge`` checks the file against its manifest
before loading, so a truncated or altered file is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import model_size, plain_model
from ctr.config import CONFIG_FILE, load_experiment
from ctr.errors import ExportError
from ctr.metrics import auc
from deploy.edge import EMBEDDING_FORMATS, edge_model
from features.atomic import atomic_write_text
from features.feature_map import FeatureMap
from features.loader import ParquetBatches

MANIFEST_SUFFIX = ".manifest.json"
FP32_TOLERANCE = 1e-5  # max |exported - in-memory| probability
QUANTIZED_AUC_TOLERANCE = 5e-4  # |AUC difference| for fp16 / int8 tables


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + MANIFEST_SUFFIX)


def resolve_source(source: Path, stage: str | None) -> tuple[Path, Path]:
    """(run directory, checkpoint): a run's best checkpoint, one compression stage's ('latest': the
    last stage), or a checkpoint file inside a run directory."""
    if source.is_file():
        run_dir = next((p for p in source.parents if (p / "feature_map.json").is_file()), None)
        if run_dir is None:
            raise ExportError(f"{source}: not inside a run directory (no feature_map.json above it)")
        return run_dir, source
    if not (source / "feature_map.json").is_file():
        raise ExportError(f"{source}: not a run directory (no feature_map.json); give a run directory or a checkpoint")
    if stage is None:
        return source, source / "checkpoints" / "best.pt"
    stages = sorted(p.parent.name for p in (source / "compress").glob("*/checkpoint.pt"))
    if not stages:
        raise ExportError(f"{source}: no compression stage checkpoints under compress/")
    name = stages[-1] if stage == "latest" else stage
    if name not in stages:
        raise ExportError(f"{source}: no compression stage '{stage}'; there are {stages}")
    return source, source / "compress" / name / "checkpoint.pt"


def _parts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes by part, as the edge file stores the weights."""
    groups: dict[str, dict[str, torch.Tensor]] = {"embedding tables": {}, "id remap": {}, "dense layers": {}}
    for key, value in state.items():
        part = "id remap" if key.endswith(".remap") else "embedding tables" if ".ebc." in key else "dense layers"
        groups[part][key] = value
    return {part: model_size(values)[1] for part, values in groups.items()}


def export_model(source: Path, out: Path, stage: str | None = None, embeddings: str | None = None,
                 sample_rows: int = 16384) -> dict[str, Any]:
    """Write ``out`` (TorchScript) and its manifest; returns the manifest. ``embeddings`` None: the
    run config's ``export.embeddings``."""
    run_dir, checkpoint = resolve_source(source, stage)
    if embeddings is None:
        embeddings = load_experiment(run_dir / CONFIG_FILE).export.embeddings if (run_dir / CONFIG_FILE).is_file() else "fp32"
    if embeddings not in EMBEDDING_FORMATS:
        raise ExportError(f"export embeddings must be one of {EMBEDDING_FORMATS}, got '{embeddings}'")
    fmap = FeatureMap.load(run_dir)
    data_dir = Path(json.loads((run_dir / "data.json").read_text())["prepared"])
    payload = load_checkpoint(checkpoint)
    model = plain_model(fmap, payload)
    vocab = [int(f.num_embeddings or 0) for f in fmap.categorical]
    scripted = torch.jit.script(edge_model(model, vocab, embeddings))
    batch = next(iter(ParquetBatches(data_dir / fmap.splits["test"].file, fmap, sample_rows)))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch.dense, batch.sparse)[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.jit.save(scripted, str(temp))
        with torch.no_grad():
            got = torch.jit.load(str(temp))(batch.dense, batch.ids())
        parity = _parity(expected, got, batch.labels, embeddings)
        manifest = {
            "format": "ctr-edge-v1",
            "file_sha256": sha256(temp), "file_bytes": temp.stat().st_size,
            "inputs": {"dense": [f.name for f in fmap.dense], "ids": [f.name for f in fmap.categorical],
                       "id_ranges": dict(zip((f.name for f in fmap.categorical), vocab)),
                       "transforms": {f.name: f.transform for f in (*fmap.categorical, *fmap.dense)},
                       "oov_id": 1, "label": fmap.label},
            "model": payload["model_config"], "layout": payload.get("tables", {}), "embeddings": embeddings,
            "bytes_by_part": _parts(payload["model"]),
            "source": {"checkpoint": str(checkpoint), "sha256": sha256(checkpoint), "run_dir": str(run_dir)},
            "parity": parity, "torch": torch.__version__, "python": platform.python_version(),
        }
        atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
        os.replace(temp, out)
        return manifest
    finally:
        temp.unlink(missing_ok=True)


def _parity(expected: torch.Tensor, got: torch.Tensor, labels: torch.Tensor, embeddings: str) -> dict[str, Any]:
    diff = float((expected - got).abs().max())
    y = labels.numpy()
    auc_diff = auc(y, got.numpy()) - auc(y, expected.numpy()) if 0 < y.sum() < y.size else float("nan")
    result = {"rows": int(got.numel()), "max_abs_diff": diff, "auc_diff": auc_diff}
    if embeddings == "fp32" and not diff <= FP32_TOLERANCE:
        raise ExportError(f"parity check failed: exported and in-memory probabilities differ by {diff:.2e} "
                          f"(> {FP32_TOLERANCE:.0e}) on {got.numel()} test rows; nothing was written")
    if embeddings != "fp32" and not abs(auc_diff) <= QUANTIZED_AUC_TOLERANCE:
        raise ExportError(f"parity check failed: {embeddings} tables change test AUC by {auc_diff:+.5f} "
                          f"(> {QUANTIZED_AUC_TOLERANCE}) on {got.numel()} rows; nothing was written")
    return result


def load_edge(path: Path) -> torch.jit.ScriptModule:
    """Load an edge file after checking it against its manifest (size and sha256)."""
    if not path.is_file():
        raise ExportError(f"{path}: no such edge model file")
    meta = manifest_path(path)
    if not meta.is_file():
        raise ExportError(f"{path}: its manifest {meta.name} is missing; cannot verify the file")
    expected = json.loads(meta.read_text())
    size = path.stat().st_size
    if size != expected["file_bytes"]:
        raise ExportError(f"{path}: {size} bytes, its manifest says {expected['file_bytes']} (truncated or replaced)")
    if sha256(path) != expected["file_sha256"]:
        raise ExportError(f"{path}: content differs from its manifest's sha256 (altered after export)")
    return torch.jit.load(str(path))


def latency(model: torch.jit.ScriptModule, dense: torch.Tensor, ids: torch.Tensor, single: int = 300,
            rounds: int = 20) -> dict[str, float]:
    """Batch-1 latency percentiles (ms) over single rows, and rows/s at batch 1024, at the caller's
    thread count (edge devices: set torch.set_num_threads(1) first)."""
    batch = min(1024, ids.shape[0])
    with torch.no_grad():
        for i in range(min(30, ids.shape[0])):
            model(dense[i:i + 1], ids[i:i + 1])
        times = []
        for i in range(single):
            j = i % ids.shape[0]
            started = time.perf_counter()
            model(dense[j:j + 1], ids[j:j + 1])
            times.append((time.perf_counter() - started) * 1e3)
        model(dense[:batch], ids[:batch])
        started = time.perf_counter()
        for _ in range(rounds):
            model(dense[:batch], ids[:batch])
        rate = rounds * batch / (time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "rows_per_s": rate}
