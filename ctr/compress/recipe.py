"""Run a compression recipe: the stages of ``compress:`` in order, each from the previous checkpoint.

Layout under the run directory: ``compress/NN_<stage>/checkpoint.pt`` per stage and
``compress/report.jsonl`` with one line per stage (the baseline first): parameters, bytes,
validation AUC / logloss and the stage's own numbers. A stage whose checkpoint exists is not run
again, so an interrupted recipe resumes at the stage it was in.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ctr.checkpoint import load_checkpoint, save_checkpoint
from ctr.compress.afm import AFMStage
from ctr.compress.optembed import OptEmbedStage
from ctr.compress.optfs import OptFSStage
from ctr.compress.stage import Stage, StageContext, model_size, validation_metrics
from ctr.config import CompressStep, ExperimentConfig
from ctr.distributed import local_process_group
from features.feature_map import FeatureMap
from features.json_lines import append_json_line, read_json_lines

log = logging.getLogger("ctr.compress")
STAGE_CLASSES: dict[str, type] = {"optfs": OptFSStage, "optembed": OptEmbedStage, "afm": AFMStage}
REPORT = "report.jsonl"
CHECKPOINT = "checkpoint.pt"


def build_stage(step: CompressStep) -> Stage:
    (name, stage_cfg), = ((k, v) for k, v in step if v is not None)
    return STAGE_CLASSES[name](stage_cfg)


def _report_lines(path: Path) -> dict[str, dict[str, Any]]:
    return {line["stage_id"]: line for line in read_json_lines(path)}


def _line(stage_id: str, stage: str, ctx: StageContext, payload: dict[str, Any], seconds: float,
          details: dict[str, Any]) -> dict[str, Any]:
    params, size, embedding = model_size(payload["model"])
    metrics = validation_metrics(ctx, payload)
    return {"stage_id": stage_id, "stage": stage, "parameters": params, "bytes": size, "embedding_bytes": embedding,
            "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"], "seconds": seconds, **details}


def run_recipe(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path) -> list[dict[str, Any]]:
    with local_process_group():  # the stages train sharded models
        return _run(cfg, fmap, data_dir, run_dir)


def _run(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path) -> list[dict[str, Any]]:
    out = run_dir / "compress"
    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT
    done = _report_lines(report)
    source = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    if "00_baseline" not in done:
        ctx = StageContext(cfg, fmap, data_dir, out)
        append_json_line(report, _line("00_baseline", "baseline", ctx, source, 0.0, {}))
    for i, step in enumerate(cfg.compress.stages, 1):
        stage = build_stage(step)
        stage_id = f"{i:02d}_{stage.name}"
        ctx = StageContext(cfg, fmap, data_dir, out / stage_id, cfg.compress.target_mb)
        checkpoint = ctx.work_dir / CHECKPOINT
        if checkpoint.is_file():
            log.info("stage %s: checkpoint exists, not run again", stage_id)
            source = load_checkpoint(checkpoint)
            if stage_id not in _report_lines(report):
                append_json_line(report, _line(stage_id, stage.name, ctx, source, 0.0, {}))
            continue
        log.info("stage %s: running", stage_id)
        started = time.perf_counter()
        result = stage.run(ctx, source)
        save_checkpoint(checkpoint, result.payload)
        append_json_line(report, _line(stage_id, stage.name, ctx, result.payload, time.perf_counter() - started, result.details))
        source = result.payload
    lines = list(_report_lines(report).values())
    target = cfg.compress.target_mb
    if target is not None and lines[-1]["bytes"] > target * 2**20:
        raise ValueError(f"compress.target_mb {target}: the recipe's final model is {lines[-1]['bytes'] / 2**20:.3f} MB "
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
