"""Where a training step's time goes: the real step of DNN and DCNv2 under ``torch.profiler``, by category.

The step is ``Trainer._step`` itself (forward, loss, backward with the fused sparse update, gradient
clipping and the dense optimizer, each phase marked there), on batches loaded before the clock starts. Every profiled operator's
self time is put in one category, by its name or by the step phase it ran in; "Python and
dispatch" is the step's wall time that no operator accounts for. Two runs: the local path (one
process, every core) and Ray Train with ``--workers`` workers (one thread each, gloo, the dense part
data-parallel, tables sharded), where each worker profiles its own steps and rank 0's breakdown is
printed.

Usage: python benchmarks/profile_step.py [--rows 1000000] [--steps 20] [--workers 2] [--models dnn dcnv2]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from ctr.distributed import local_process_group
from ctr.experiment import ExperimentConfig, load_experiment
from ctr.loader import Batch, ParquetBatches, head
from ctr.train import PHASES, Trainer, TrainHooks, default_threads
from features.feature_map import FeatureMap

from _common import WORK, load_note, prepared

EXPERIMENTS = {"dnn": Path("configs/experiments/synthetic_dnn.yaml"), "dcnv2": Path("configs/experiments/synthetic_dcnv2_full.yaml")}
CATEGORIES = ("matmul", "embedding forward", "embedding backward + fused sparse update", "dense optimizer",
              "elementwise", "KJT and input/output distribution", "loss", "Python and dispatch")
DIST = "KJT and input/output distribution"
# operator name -> category, first match on the operator or one of its callers wins; the rest falls to
# the phase it ran in (see categorize). DDP's all-reduce and TorchRec's all-to-alls (their waits too)
# count as distribution.
BY_NAME = [
    (re.compile(r"aten::(addmm|mm|bmm|baddbmm|matmul)"), "matmul"),
    (re.compile(r"fbgemm::.*(backward|_bwd)"), "embedding backward + fused sparse update"),
    (re.compile(r"fbgemm::(split_embedding|.*_embedding_codegen_forward|.*lookup)"), "embedding forward"),
    (re.compile(r"binary_cross_entropy"), "loss"),
    (re.compile(r"fbgemm::|c10d::|gloo|All2All|Awaitable|all2all|_dist\]_|KeyedJaggedTensor|jagged"), DIST),
]
BY_PHASE = {PHASES[1]: "loss", PHASES[3]: "dense optimizer"}
# ranges whose own time is Python (the operators inside them are counted on their own)
RANGES = re.compile(r"^(step\.|Optimizer\.|autograd::engine|DistributedDataParallel\.|\[lookup\]|\w+Backward\d$)")


def categorize(event: FunctionEvent) -> str:
    """An operator's category: by its own name or its callers' names, else the phase it ran in."""
    names, phase = [], None
    node: FunctionEvent | None = event
    while node is not None:
        if node.name in PHASES:
            phase = node.name
            break
        names.append(node.name)
        node = node.cpu_parent
    for pattern, category in BY_NAME:
        if any(pattern.search(name) for name in names):
            return category
    return BY_PHASE.get(phase or "", "elementwise")


def breakdown(events: Iterable[FunctionEvent], wall_us: float, steps: int) -> dict[str, float]:
    """Milliseconds per step by category; what no operator covers is Python and dispatch."""
    ms: dict[str, float] = defaultdict(float)
    for event in events:
        if RANGES.search(event.name) or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        ms[categorize(event)] += event.self_cpu_time_total / 1000 / steps
    ms["Python and dispatch"] = max(0.0, wall_us / 1000 / steps - sum(ms.values()))
    return dict(ms)


def profile_steps(trainer: Trainer, batches: list[Batch], steps: int) -> dict[str, float]:
    """Build the trainer's model, warm up, then profile ``steps`` steps: ms per step by category."""
    trainer._build()
    for b in batches[:3]:
        trainer._step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for i in range(steps):
            trainer._step(batches[i % len(batches)])
        wall_us = (time.perf_counter() - started) * 1e6
    out = breakdown(prof.events(), wall_us, steps)
    # the same steps without the profiler: its own cost is not the step's
    started = time.perf_counter()
    for i in range(steps):
        trainer._step(batches[i % len(batches)])
    out["step (unprofiled)"] = (time.perf_counter() - started) * 1000 / steps
    return out


def local(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, steps: int) -> dict[str, float]:
    trainer = Trainer(cfg, fmap, data_dir, WORK / "profile_run", TrainHooks())
    batches = head(ParquetBatches(data_dir / "train.parquet", fmap, cfg.trainer.batch_size, shuffle=True, seed=1,
                                  drop_last=True), 8 * cfg.trainer.batch_size)
    torch.set_num_threads(default_threads())
    with local_process_group():
        return profile_steps(trainer, batches, steps)


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)
    cfg = ExperimentConfig.model_validate(config["experiment"])
    data_dir = Path(config["data_dir"])
    fmap = FeatureMap.load(data_dir)
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    loader = ParquetBatches(data_dir / "train.parquet", fmap, cfg.trainer.batch_size, shuffle=True, seed=1, drop_last=True)
    # each rank its own part of the same global batches (as the Ray Data shards give it)
    batches = [b.rows(torch.tensor_split(torch.arange(b.size), world)[rank]) for b in head(loader, 8 * cfg.trainer.batch_size)]
    trainer = Trainer(cfg, fmap, data_dir, Path(config["run_dir"]), TrainHooks())
    result = profile_steps(trainer, batches, config["steps"])
    if rank == 0:  # the driver reads it from here (one machine)
        Path(config["out"]).write_text(json.dumps(result))


def on_ray(cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, steps: int, workers: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_train import start_ray

    start_ray(cfg.trainer.ray)
    out = (WORK / "profile_ray_rank0.json").resolve()
    out.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
                           "run_dir": str((WORK / "profile_ray_run").resolve()), "steps": steps, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.trainer.ray.cpus_per_worker}),
        run_config=RunConfig(storage_path=str((WORK / "profile_ray").resolve()), name="profile"),
    )
    trainer.fit()
    return json.loads(out.read_text())


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    total = {n: sum(v for k, v in r.items() if k in CATEGORIES) for n, r in results.items()}
    for category in CATEGORIES:
        lines.append(f"| {category} | " + " | ".join(
            f"{results[n].get(category, 0.0):.1f} ms ({results[n].get(category, 0.0) / total[n]:.0%})" for n in names) + " |")
    lines.append("| step, profiled | " + " | ".join(f"{total[n]:.1f} ms" for n in names) + " |")
    lines.append("| step, unprofiled | " + " | ".join(f"{results[n]['step (unprofiled)']:.1f} ms" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: skip the Ray run)")
    parser.add_argument("--models", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    data_dir, fmap = prepared(args.rows)
    results: dict[str, dict[str, float]] = {}
    for name in args.models:
        cfg = load_experiment(EXPERIMENTS[name], ["trainer.progress=false"])
        results[f"{name}, local"] = local(cfg, fmap, data_dir, args.steps)
        if args.workers > 1:
            results[f"{name}, Ray x{args.workers}"] = on_ray(cfg, fmap, data_dir, args.steps, args.workers)
    print(f"\nms per training step (batch {cfg.trainer.batch_size} in all; Ray: rank 0, its part of each batch); "
          f"{load_note()}\n")
    print(table(results))


if __name__ == "__main__":
    main()
