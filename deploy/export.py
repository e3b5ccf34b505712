"""Export a trained or compressed checkpoint to one TorchScript file, with a manifest and a parity check.

The file is written under a temporary name, loaded back, and compared with the in-memory model on
held-out test rows; only a file that passes is renamed into place (with ``manifest.json`` beside
it), so a failed export leaves nothing behind. ``load_edge`` checks the file against its manifest
before loading, so a truncated or altered file is refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.atomic import atomic_write_text, ensure_writable, remove_stale, scratch_path
from common.digest import sha256_file
from common.errors import ExportError, one_line
from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import plain_model
from ctr.edge.layout import edge_slots, id_keys, keys_of_ids, miss_key, vocabulary_keys
from ctr.edge.model import EMBEDDING_FORMATS, EdgeModel, edge_model, file_parts, scripted_file
from ctr.edge.raw import feature_specs, raw_columns, raw_layout
from ctr.experiment import load_experiment
from ctr.loader import ParquetBatches
from ctr.metrics import auc
from ctr.run_dir import RunDir
from deploy.onnx_format import OnnxModel, require_onnx, write_onnx
from deploy.raw_rows import raw_batches
from features.feature_map import FeatureMap
from features.hashing import BLANK_KEY, TOKEN_KEY_VERSION

log = logging.getLogger("ctr.export")
MANIFEST_SUFFIX = ".manifest.json"
FORMATS = ("torchscript", "onnx")
FP32_TOLERANCE = 1e-5  # max |exported - in-memory| probability
QUANTIZED_AUC_TOLERANCE = 5e-4  # |AUC difference| for fp16 / int8 tables


def manifest_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + MANIFEST_SUFFIX)


def pending_manifest_path(model_file: Path) -> Path:
    """The new manifest while a new model is being published (see ``export_model``)."""
    return model_file.with_name(f".{model_file.name}.pending{MANIFEST_SUFFIX}")


def resolve_source(source: Path, stage: str | None) -> tuple[RunDir, Path]:
    """(run directory, checkpoint): a run's best checkpoint, one compression stage's ('latest': the
    last stage; ``target_<MB>MB/<stage>``: a sweep point's), or a checkpoint file inside a run directory."""
    if source.is_file():
        run = next((RunDir(p) for p in source.parents if RunDir(p).is_run()), None)
        if run is None:
            raise ExportError(f"{source}: not inside a run directory (no feature_map.json above it)")
        return run, source
    run = RunDir(source)
    if not run.is_run():
        raise ExportError(f"{source}: not a run directory (no feature_map.json); give a run directory or a checkpoint")
    if stage is None:
        return run, run.best
    point, _, stage = stage.rpartition("/")  # a sweep point's stage: target_2MB/03_quantize
    recipe = run.point(point) if point else run
    stages = {d.name: d.checkpoint for d in recipe.stage_dirs() if d.checkpoint.is_file()}
    if not stages:
        raise ExportError(f"{source}: no compression stage checkpoints under {recipe.compress_dir}/")
    name = sorted(stages)[-1] if stage == "latest" else stage
    if name not in stages:
        raise ExportError(f"{source}: no compression stage '{stage}'; there are {sorted(stages)}")
    return run, stages[name]


def parent_file(run: RunDir) -> dict[str, Any] | None:
    """What a warm-started run's edge file grew from: the parent run, and the edge file last exported
    from it (None where it never was); None for a run trained from scratch."""
    if not run.parent.is_file():
        return None
    parent = RunDir(Path(json.loads(run.parent.read_text(encoding="utf-8"))["run"]))
    exported = json.loads(parent.exported.read_text(encoding="utf-8")) if parent.exported.is_file() else None
    return {"run": str(parent.root), "file": exported}


def record_export(run: RunDir, out: Path, manifest: dict[str, Any]) -> None:
    """Note in the run which edge file it last exported (a child's manifest names it as its parent's).
    A run folder that cannot be written loses only that note: the file itself is in place."""
    try:
        atomic_write_text(run.exported, json.dumps({"file": str(out.resolve()), "sha256": manifest["file_sha256"],
                                                    "bytes": manifest["file_bytes"]}, indent=2) + "\n")
    except OSError as exc:
        log.warning("%s: not written (%s); a warm-started child's manifest will not name %s", run.exported, exc, out)


def manifest_relative(path: Path, manifest_dir: Path) -> str:
    """A path as a manifest stores it: relative to the manifest's folder, so both can move together."""
    return os.path.relpath(path.resolve(), manifest_dir.resolve())


def export_model(source: Path, out: Path, stage: str | None = None, embeddings: str | None = None,
                 sample_rows: int = 16384, fmt: str = "torchscript") -> dict[str, Any]:
    """Write ``out`` (TorchScript, or ONNX with ``fmt='onnx'``) and its manifest; returns the
    manifest. ``embeddings`` None: the run config's ``export.embeddings``."""
    if fmt not in FORMATS:
        raise ExportError(f"{out}: unknown export format '{fmt}' (use one of {', '.join(FORMATS)})")
    if fmt == "onnx":
        require_onnx()  # before any work, with the command that installs it
    ensure_writable(out.parent)  # before any work
    run, checkpoint = resolve_source(source, stage)
    payload = load_checkpoint(checkpoint)
    if embeddings is None:
        embeddings = load_experiment(run.config).export.embeddings if run.config.is_file() else "fp32"
    if embeddings not in EMBEDDING_FORMATS:
        raise ExportError(f"export embeddings must be one of {EMBEDDING_FORMATS}, got '{embeddings}'")
    fmap = FeatureMap.load(run.root)
    data_dir = run.prepared_data()
    model = plain_model(fmap, payload)
    layout = raw_layout(fmap)
    value_keys = vocabulary_keys(data_dir, fmap)
    slots = edge_slots(model, fmap, value_keys)
    try:
        edge = edge_model(model, feature_specs(fmap), layout, slots, embeddings)
    except ValueError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None
    misses = [miss_key(s) for s in slots]
    batch = next(iter(ParquetBatches(data_dir / fmap.splits["test"].file, fmap, sample_rows)))
    field_keys = torch.from_numpy(keys_of_ids(batch.ids().numpy(), id_keys(value_keys, misses)))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch.dense, batch.sparse)[0])
    remove_stale(out, ("tmp",))
    temp = scratch_path(out)
    try:
        if fmt == "onnx":
            numbers, keys = raw_example(edge, field_keys)
            write_onnx(edge, numbers, keys, temp)
            with torch.no_grad():
                _raw_parity(edge(numbers, keys), load_model_file(temp, fmt)(numbers, keys))
                got = edge.score_features(batch.dense, field_keys)
        else:
            temp.write_bytes(scripted_file(edge))
            with torch.no_grad():
                got = load_model_file(temp, fmt).score_features(batch.dense, field_keys)
        parity = _parity(expected, got, batch.labels, embeddings)
        numbers_in, tokens_in = raw_columns(layout)
        manifest = {
            "format": "ctr-edge-v3", "runtime": fmt,
            "file_sha256": sha256_file(temp), "file_bytes": temp.stat().st_size,
            "inputs": {"numbers": numbers_in, "keys": tokens_in, "token_key": TOKEN_KEY_VERSION,
                       "blank_key": BLANK_KEY, "separator": layout.separator, "header": layout.header,
                       "columns": [c.model_dump() for c in layout.columns], "layout": fmap.layout,
                       "dense": [f.name for f in fmap.dense], "ids": [f.name for f in fmap.categorical],
                       "id_ranges": {f.name: int(f.num_embeddings or 0) for f in fmap.categorical},
                       "miss_keys": dict(zip((f.name for f in fmap.categorical), misses)),
                       "fingerprint_bits": {f.name: s.bits for f, s in zip(fmap.categorical, slots)},
                       "shipped_values": {f.name: int(s.keys.size) for f, s in zip(fmap.categorical, slots)},
                       "transforms": {f.name: f.transform for f in (*fmap.categorical, *fmap.dense)},
                       "label": fmap.label},
            "model": payload["model_config"], "steps": payload.get("steps", []), "embeddings": embeddings,
            "bytes_by_part": file_parts(edge, temp.stat().st_size),
            "source": {"checkpoint": manifest_relative(checkpoint, out.parent), "sha256": sha256_file(checkpoint),
                       "run_dir": manifest_relative(run.root, out.parent)},
            "parity": parity, "torch": torch.__version__, "python": platform.python_version(),
            "parent": parent_file(run),
        }
        publish(temp, out, manifest)
        record_export(run, out, manifest)
        return manifest
    finally:
        temp.unlink(missing_ok=True)


def raw_example(edge: EdgeModel, field_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw inputs for tracing and checking the ONNX graph: the test rows' token keys, and seeded
    numbers over many magnitudes, signs and blanks (any numbers do: both sides read the same)."""
    rows = field_keys.shape[0]
    gen = torch.Generator().manual_seed(0)
    numbers = torch.randn(rows, edge.lines.num_numbers, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        0, 7, (rows, edge.lines.num_numbers), generator=gen)
    numbers = torch.where(torch.rand(numbers.shape, generator=gen) < 0.1, float("nan"), numbers.round())
    keys = torch.zeros(rows, edge.lines.num_tokens, dtype=torch.int64)
    src, dst = edge.transforms.token_src, edge.transforms.token_dst
    return numbers, keys.index_copy(1, src, field_keys.index_select(1, dst))


def _raw_parity(expected: torch.Tensor, got: torch.Tensor) -> None:
    diff = float((expected - got).abs().max())
    if not diff <= FP32_TOLERANCE:
        raise ExportError(f"parity check failed: the ONNX graph and the edge model differ by {diff:.2e} on raw rows "
                          f"(> {FP32_TOLERANCE:.0e}); nothing was written")


def publish(temp: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Put the model and its manifest in place so that a reader always finds a matching pair: the new
    manifest is written beside as pending, then the model is renamed over the old one, then the
    pending manifest over the old manifest. Killed after the first rename, the new model is matched
    by the pending manifest (``open_edge`` accepts either); killed before it, the old pair stands."""
    pending = pending_manifest_path(out)
    atomic_write_text(pending, json.dumps(manifest, indent=2) + "\n")
    os.replace(temp, out)
    os.replace(pending, manifest_path(out))


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


def _read_manifest(meta: Path) -> dict[str, Any] | None:
    if not meta.is_file():
        return None
    try:
        manifest = json.loads(meta.read_text(encoding="utf-8"))
        int(manifest["file_bytes"]), str(manifest["file_sha256"]), dict(manifest["inputs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{meta}: not a manifest written by ctr export ({type(exc).__name__}: {exc}) "
                          "(export the model again)") from None
    return manifest


def open_edge(path: Path, threads: int | None = None) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                                               dict[str, Any]]:
    """An edge file and its manifest, after checking the file against it (size and sha256). The
    sha256 catches a truncated or corrupted file; it does not authenticate: whoever can replace the
    file can replace the manifest too."""
    if not path.is_file():
        raise ExportError(f"{path}: no such edge model file (check the path, or run ctr export)")
    official = _read_manifest(manifest_path(path))
    if official is None:
        raise ExportError(f"{path}: its manifest {manifest_path(path).name} is missing, so the file cannot be "
                          "verified (export the model again)")
    size, digest = path.stat().st_size, sha256_file(path)
    pending = _read_manifest(pending_manifest_path(path)) if official["file_sha256"] != digest else None
    manifest = pending if pending is not None and pending["file_sha256"] == digest else official
    if size != manifest["file_bytes"]:
        raise ExportError(f"{path}: {size} bytes, its manifest says {manifest['file_bytes']} (truncated or replaced; "
                          "export the model again)")
    if digest != manifest["file_sha256"]:
        raise ExportError(f"{path}: content differs from its manifest's sha256 (altered after export; "
                          "export the model again)")
    return load_model_file(path, manifest.get("runtime", "torchscript"), threads), manifest


def load_model_file(path: Path, fmt: str, threads: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The edge file as a callable (dense, ids) -> probabilities, by its runtime (``threads``: for
    onnxruntime, which does not follow torch's thread setting)."""
    if fmt == "onnx":
        return OnnxModel(path, threads)
    try:
        return torch.jit.load(str(path))
    except RuntimeError as exc:
        raise ExportError(f"{path}: matches its manifest but torch cannot load it ({one_line(exc)}) "
                          "(export it again with this torch version)") from None


def load_edge(path: Path, threads: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An edge file (checked against its manifest) as a scorer of prepared rows: (dense, ids) -> probabilities."""
    model, manifest = open_edge(path, threads)
    return prepared_scorer(path, model, manifest)


def prepared_scorer(path: Path, model: Any, manifest: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Prepared ids reach the edge file as the token keys of their values, from the vocabulary of the
    data the model was trained on (its run's prepared data); an out-of-vocabulary id as the field's
    miss key. A raw log needs none of this: ``score_raw``."""
    if manifest.get("runtime") == "onnx":
        def refuse(dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            raise ExportError(f"{path}: an ONNX edge file takes raw rows, not prepared ids (score the raw log file, "
                              "or export the TorchScript format)")
        return refuse
    run = RunDir(path.parent / manifest["source"]["run_dir"])
    if not run.is_run():
        raise ExportError(f"{path}: scoring prepared ids needs the vocabulary of its run {run.root}, which is gone "
                          "(score the raw log file instead)")
    fmap = FeatureMap.load(run.root)
    misses = manifest["inputs"]["miss_keys"]
    tables = id_keys(vocabulary_keys(run.prepared_data(), fmap), [int(misses[f.name]) for f in fmap.categorical])

    def score(dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model.score_features(dense, torch.from_numpy(keys_of_ids(ids.numpy(), tables)))

    return score


def raw_sample(fmap: FeatureMap, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` rows of the data's raw log (its first source) as an edge file's raw inputs:
    what a device hands it, for timing."""
    source = Path(fmap.sources[0].path)
    batch = next(raw_batches(source, raw_layout(fmap), rows))
    return torch.from_numpy(batch.numbers), torch.from_numpy(batch.keys)


def latency(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dense: torch.Tensor, ids: torch.Tensor, single: int = 300,
            rounds: int = 20) -> dict[str, float]:
    """Batch-1 latency percentiles (ms) over single rows, and rows/s at batch 1024, at the caller's
    thread count (edge devices: set torch.set_num_threads(1) first). ``model`` takes two row-aligned
    tensors: an edge file's raw (numbers, keys), or its (dense, field keys)."""
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
