"""Run a compression recipe: the stages of ``compress:`` in order, each from the previous checkpoint.

Layout under the run directory: ``compress/NN_<stage>/`` per stage (its ``checkpoint.pt`` and
``stage.json``) and ``compress/report.jsonl`` with one line per stage (the baseline first):
parameters, bytes, validation AUC / logloss and the stage's own numbers.

Stages are keyed by content: ``stage.json`` records the sha256 of the checkpoint the stage started
from, its resolved settings (the stage's section, the recipe's size target, the trainer settings
that change results) and the stage format. A stage is reused only when all three match; otherwise
it runs again, and so does every stage after it. A folder that no longer matches is moved to
``compress/superseded/`` (never deleted), and so is a folder of a stage the recipe no longer has.
An interrupted stage whose inputs did not change resumes in its own folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.digest import sha256_file
from common.errors import ConfigError
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint, save_checkpoint
from ctr.compress.afm import AFMStage
from ctr.compress.optembed import OptEmbedStage
from ctr.compress.optfs import OptFSStage
from ctr.compress.quantize import QuantizeStage
from ctr.compress.stage import Stage, StageContext, model_size, plain_model, validation_metrics
from ctr.config import CompressStep
from ctr.distributed import local_process_group
from ctr.experiment import ExperimentConfig
from ctr.models import capabilities, described
from ctr.run_dir import RunDir, StageDir
from features.feature_map import FeatureMap

log = logging.getLogger("ctr.compress")
STAGE_CLASSES: dict[str, type] = {"optfs": OptFSStage, "optembed": OptEmbedStage, "afm": AFMStage,
                                  "quantize": QuantizeStage}
STAGE_FORMAT = 5  # bump when a stage's output changes for the same inputs: every stage then reruns
# trainer settings that do not change what a stage computes
RUNTIME_ONLY = {"threads", "progress", "run_dir", "ray"}


def build_stage(step: CompressStep) -> tuple[str, Stage]:
    name, settings = step.stage
    return name, STAGE_CLASSES[name](settings)


def sizing_stage(stages: list[Stage]) -> int | None:
    """The index of the stage the recipe's ``target_mb`` goes to: the last one that sizes itself
    (quantize's bits, AFM's ranks); the stages before it run as if there were no target, so a sweep
    over targets reuses them."""
    return max((i for i, stage in enumerate(stages) if stage.sizes_to_target), default=None)


def stage_fingerprint(cfg: ExperimentConfig, step: CompressStep, source_sha256: str,
                      target_mb: float | None) -> dict[str, Any]:
    trainer = {k: v for k, v in cfg.trainer.model_dump(mode="json").items() if k not in RUNTIME_ONLY}
    return {"format": STAGE_FORMAT, "source_sha256": source_sha256,
            "settings": {"stage": step.model_dump(mode="json", exclude_none=True),
                         "target_mb": target_mb, "trainer": trainer}}


def _recorded(folder: StageDir) -> dict[str, Any] | None:
    try:
        return json.loads(folder.fingerprint.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _why(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if recorded is None:
        return "it has no stage.json"
    changed = [k for k in ("format", "source_sha256", "settings") if recorded.get(k) != wanted[k]]
    names = {"format": "the stage format", "source_sha256": "its source checkpoint", "settings": "its settings"}
    return " and ".join(names[k] for k in changed) + " changed"


def move_aside(folder: StageDir, run: RunDir) -> Path:
    """Keep a superseded stage folder under ``compress/superseded/`` with the time it was replaced."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target = run.superseded / f"{folder.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder.root, target)
    return target


def _line(stage_id: str, stage: str, ctx: StageContext, payload: dict[str, Any], seconds: float,
          details: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    model = plain_model(ctx.fmap, payload)  # built once for both the size and the metrics
    params, parts = model_size(ctx.fmap, ctx.data_dir, model)
    metrics = validation_metrics(ctx, model)
    return {"stage_id": stage_id, "stage": stage, "parameters": params, "bytes": sum(parts.values()),
            "embedding_bytes": parts["embedding tables"] + parts["vocabulary"], "bytes_by_part": parts,
            "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"], "seconds": seconds,
            "fingerprint": fingerprint, **details}


def run_recipe(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path) -> list[dict[str, Any]]:
    with local_process_group():  # the stages train sharded models
        return _run(cfg, fmap, data_dir, RunDir(run_dir))


def run_sweep(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path,
              targets: list[float]) -> dict[float, list[dict[str, Any]]]:
    """The recipe once per ``target_mb``, each in its own folder (``RunDir.sweep_point``). The stages
    before the sizing one do not see the target, so every budget after the first reuses them."""
    with local_process_group():
        return {mb: _run(cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"target_mb": mb})}),
                         fmap, data_dir, RunDir(run_dir).sweep_point(mb)) for mb in targets}


def adopt(folder: StageDir, wanted: dict[str, Any], run: RunDir) -> dict[str, Any] | None:
    """Link in a finished stage with the same fingerprint from another budget of the run (hard links,
    under a temporary name renamed into place, so a killed copy leaves nothing that looks finished);
    returns that budget's report line for it (None: nothing to adopt)."""
    for other in run.stage_folders(folder.name):
        if other != folder and _recorded(other) == wanted and other.checkpoint.is_file():
            temp = folder.adopting
            shutil.rmtree(temp, ignore_errors=True)
            shutil.copytree(other.root, temp, copy_function=os.link, ignore=shutil.ignore_patterns(run.superseded.name))
            os.replace(temp, folder.root)
            log.info("stage %s: the same stage of %s reused", folder.name, other.root.parent.name)
            lines = read_json_lines(other.recipe_report)
            return next((line for line in lines if line["stage_id"] == folder.name), {})
    return None


def check_capabilities(cfg: ExperimentConfig, planned: list[tuple[str, Stage]]) -> None:
    """Refuse, before any stage runs, a stage that needs what the model does not allow."""
    allowed = capabilities(cfg.model)
    for i, (name, stage) in enumerate(planned, 1):
        missing = sorted(stage.needs() - allowed)
        if missing:
            raise ConfigError(f"compress stage {i} ({name}): it needs {' and '.join(missing)}, which "
                              f"{described(cfg.model)} does not allow (drop the stage or change its settings, or "
                              "train a model that allows it: per-field tables for rows, widths and quantised rows)")


def _run(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run: RunDir) -> list[dict[str, Any]]:
    planned = [build_stage(step) for step in cfg.compress.stages]
    check_capabilities(cfg, planned)
    run.compress.mkdir(parents=True, exist_ok=True)
    previous = {line["stage_id"]: line for line in read_json_lines(run.report)}
    source_path = run.best
    source, source_sha = load_checkpoint(source_path), sha256_file(source_path)
    lines: list[dict[str, Any]] = []

    def keep(line: dict[str, Any]) -> None:
        lines.append(line)
        atomic_write_text(run.report, "".join(json.dumps(x) + "\n" for x in lines))

    base = previous.get("00_baseline")
    if base is not None and base.get("fingerprint") == source_sha:
        keep(base)
    else:
        keep(_line("00_baseline", "baseline", StageContext(cfg, fmap, data_dir, StageDir(run.compress)), source, 0.0, {},
                   source_sha))
    wanted_ids = {run.stage(i, name).name for i, (name, _) in enumerate(planned, 1)}
    for folder in (d for d in run.stage_dirs() if d.name not in wanted_ids):
        log.info("stage folder %s is not in the recipe any more: moved to %s", folder.name, move_aside(folder, run))
    rerun = False
    sizer = sizing_stage([stage for _, stage in planned])
    for i, ((name, stage), step) in enumerate(zip(planned, cfg.compress.stages), 1):
        folder = run.stage(i, name)
        target = cfg.compress.target_mb if i - 1 == sizer else None
        ctx = StageContext(cfg, fmap, data_dir, folder, folder.name, target)
        wanted = stage_fingerprint(cfg, step, source_sha, target)
        recorded = _recorded(folder)
        checkpoint = folder.checkpoint
        if folder.exists() and (rerun or recorded != wanted):
            reason = "an earlier stage ran again" if rerun and recorded == wanted else _why(recorded, wanted)
            log.info("stage %s: %s; the old folder moved to %s", folder.name, reason, move_aside(folder, run))
            rerun = True
        adopted = adopt(folder, wanted, run) if not folder.exists() else None
        if adopted is not None:
            previous[folder.name] = adopted
        if checkpoint.is_file():
            log.info("stage %s: inputs unchanged, reused", folder.name)
            source = load_checkpoint(checkpoint)
            source_sha = sha256_file(checkpoint)
            old = previous.get(folder.name)
            keep(old if old is not None and old.get("fingerprint") == source_sha else
                 _line(folder.name, name, ctx, source, 0.0, {}, source_sha))
            continue
        rerun = True
        log.info("stage %s: running", folder.name)
        folder.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder.fingerprint, json.dumps(wanted, indent=2) + "\n")
        started = time.perf_counter()
        result = stage.run(ctx, source)
        save_checkpoint(checkpoint, result.payload)
        source, source_sha = result.payload, sha256_file(checkpoint)
        keep(_line(folder.name, name, ctx, source, time.perf_counter() - started, result.details, source_sha))
    target = cfg.compress.target_mb
    if target is not None and lines[-1]["bytes"] > target * 2**20:
        raise ConfigError(f"compress.target_mb {target}: the recipe's final model is {lines[-1]['bytes'] / 2**20:.3f} MB "
                         f"({lines[-1]['stage_id']}); add or tighten stages (OptFS, OptEmbed, AFM ranks)")
    return lines


def format_report(lines: list[dict[str, Any]]) -> str:
    base, base_emb = lines[0]["bytes"], lines[0]["embedding_bytes"]
    rows = ["| stage | parameters | bytes | embedding bytes | valid AUC | valid logloss | size vs baseline | "
            "embedding size vs baseline |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for line in lines:
        rows.append(f"| {line['stage_id']} | {line['parameters']:,} | {line['bytes']:,} | {line['embedding_bytes']:,} | "
                    f"{line['valid_auc']:.5f} | {line['valid_logloss']:.5f} | {line['bytes'] / base:.3f} | "
                    f"{line['embedding_bytes'] / base_emb:.3f} |")
    return "\n".join(rows)


def format_sweep(points: dict[float, list[dict[str, Any]]]) -> str:
    """Each budget's final model beside the baseline: the recipe's size-vs-validation-AUC frontier."""
    rows = ["| target MB | final stage | bytes | size vs baseline | valid AUC | vs baseline |", "|---:|---|---:|---:|---:|---:|"]
    for mb, lines in points.items():
        base, last = lines[0], lines[-1]
        rows.append(f"| {mb:g} | {last['stage_id']} | {last['bytes']:,} | {last['bytes'] / base['bytes']:.4f} | "
                    f"{last['valid_auc']:.5f} | {last['valid_auc'] - base['valid_auc']:+.5f} |")
    return "\n".join(rows)
