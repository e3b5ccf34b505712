"""The training loop: one loop for every model, local (a world of one) or inside a Ray worker.

Sparse side: TorchRec's fused in-backward optimizer (fbgemm TBE) updates only the rows a batch
touched, during ``backward()``. Dense side: Adam or Adagrad, with gradient clipping. Validation on
the whole split (exact AUC) every epoch or every N steps drives early stopping and learning-rate
decay; each validation writes an atomic checkpoint holding everything a resumed run needs to end
with the same metrics as an uninterrupted one: weights, both optimizers' states, the loop position
(epoch, batch within the epoch), the RNG state and the early-stopping state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.profiler import record_function
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from common.atomic import atomic_write_text
from common.errors import TrainingDiverged
from common.json_lines import append_json_line, read_json_lines
from ctr.checkpoint import load_checkpoint, save_checkpoint
from ctr.distributed import (
    CPU,
    fused_optimizer_state,
    load_fused_optimizer_state,
    load_plain_state_dict,
    local_process_group,
    plain_state_dict,
    set_sparse_lr,
    shard_model,
    sharding_summary,
)
from ctr.experiment import ExperimentConfig
from ctr.loader import Batch, ParquetBatches
from ctr.metrics import classification_metrics
from ctr.models import build_model
from ctr.run_dir import BEST, LAST, RunDir
from ctr.structure import Step, step_to_dict
from ctr.warm_start import WarmStart, warm_start
from features.feature_map import FeatureMap

log = logging.getLogger("ctr.train")
MIN_IMPROVEMENT = 1e-6
# the step's phases, as marked for the profiler
PHASES = ("step.forward", "step.loss", "step.backward", "step.dense_update")


@dataclass
class LoopState:
    """Where the loop is and what early stopping knows; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    lr: float = 0.0
    sparse_lr: float = 0.0
    best_auc: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def default_threads() -> int:
    """Every core, unless OMP_NUM_THREADS says otherwise (Ray workers set it to 1).

    The loader thread needs about 2% of a core (it is 50x faster than the step), so it does not
    warrant a core of its own: DCNv2 ran 1.8x faster with 2 threads than with 1 on a 2-core machine.
    Where another process shares the cores, set trainer.threads: oversubscribed, the same loop ran
    25x slower (see the feasibility notes).
    """
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def predict(model: nn.Module, batches: Iterable[Batch], device: torch.device = CPU) -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) over a whole split; the model's train/eval mode is restored.

    Inside a process group of several ranks (a sharded model) it is collective: every rank reads
    the same batches, scores its own contiguous part of each (so all ranks run the same number of
    steps), and every rank gets every row's score, so metrics and early stopping agree everywhere.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    was_training = model.training
    model.eval()
    labels, probs = [], []
    with torch.no_grad():
        for b in batches:
            keep = b.size
            if world > 1:
                part = torch.tensor_split(torch.arange(b.size), world)[rank]
                keep = part.numel()
                # a batch smaller than the world: a rank left without rows scores row 0 and drops it
                b = b.rows(part if keep else torch.zeros(1, dtype=torch.int64))
            logits, _ = model(b.dense.to(device), b.sparse.to(device))
            labels.append(b.labels[:keep].numpy())
            probs.append(torch.sigmoid(logits[:keep]).cpu().numpy())
    model.train(was_training)
    if world == 1:
        return np.concatenate(labels), np.concatenate(probs)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, (labels, probs))
    # batch by batch, the ranks' parts in rank order: the rows come back in the split's order
    return tuple(np.concatenate([e[i][b] for b in range(len(labels)) for e in every]) for i in (0, 1))


@dataclass
class TrainHooks:
    """What a compression stage adds to the plain loop (e.g. OptFS: gates, a penalty, a schedule)."""

    steps: tuple[Step, ...] = ()  # the structure to build (and to record in checkpoints)
    initial_state: dict[str, torch.Tensor] | None = None  # plain weights loaded after sharding
    attach: Callable[[nn.Module], None] | None = None  # adds modules to the model before sharding
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    sgd_lr: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> own plain SGD at this lr
    on_epoch_start: Callable[["Trainer"], None] | None = None


class TrainBatches(Protocol):
    """A source of training batches: the local Parquet loader, or one Ray worker's shard."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class Runtime:
    """Where the loop runs. Local: one process, the Parquet loader, CPU. In a Ray worker: that
    worker's data shard and device, its node's number of ranks for the sharding planner, and a
    callback that hands every saved checkpoint to Ray (all ranks call it; rank 0 saved the files)."""

    train_data: TrainBatches | None = None
    device: torch.device = CPU
    local_world_size: int | None = None
    on_checkpoint: Callable[[Path, dict[str, float]], None] | None = None


class Trainer:
    def __init__(self, cfg: ExperimentConfig, fmap: FeatureMap, data_dir: Path, run_dir: Path,
                 hooks: TrainHooks | None = None, runtime: Runtime | None = None, warm: WarmStart | None = None) -> None:
        """``warm``: the warm start of ``trainer.init_from`` when the caller has checked it already
        (``ctr train`` does, before it makes the run directory); else it is checked here."""
        self.cfg, self.t = cfg, cfg.trainer
        self.warm: WarmStart | None = None
        if hooks is None and self.t.init_from:  # a plain run grown from a parent (a stage's phases never are)
            self.warm = warm or warm_start(Path(self.t.init_from), fmap, data_dir, cfg.model.model_dump(mode="json"))
            hooks = TrainHooks(steps=self.warm.steps)
        self.hooks = hooks or TrainHooks()
        self.runtime = runtime or Runtime()
        self.fmap = fmap
        self.run_dir = run_dir
        self.paths = RunDir(run_dir)
        self.ckpt_dir = self.paths.checkpoints
        run_dir.mkdir(parents=True, exist_ok=True)
        t = self.t
        split = lambda name: data_dir / fmap.splits[name].file  # noqa: E731
        self.train_data = self.runtime.train_data or ParquetBatches(split("train"), fmap, t.batch_size, shuffle=t.shuffle,
                                                                    seed=t.seed)
        self.valid_data = ParquetBatches(split("valid"), fmap, t.eval_batch_size)
        self.test_data = ParquetBatches(split("test"), fmap, t.eval_batch_size)
        # The training loop alone (loading + steps, no validation or checkpoints): what throughput means.
        self.loop_seconds, self.loop_samples = 0.0, 0

    # -- building -----------------------------------------------------------------------------
    def _build(self) -> None:
        torch.manual_seed(self.t.seed)
        self.main = dist.get_rank() == 0  # the rank that writes files and shows progress
        model = build_model(self.fmap, self.cfg.model, steps=self.hooks.steps)
        model.embedding_penalty = self.t.embedding_l2 > 0
        if self.hooks.attach is not None:
            self.hooks.attach(model)
        self.model: DistributedModelParallel = shard_model(model, self.t.sparse_optimizer, self.t.sparse_lr,
                                                           self.runtime.device, self.runtime.local_world_size)
        if self.main and dist.get_world_size() > 1:
            atomic_write_text(self.paths.sharding, json.dumps(sharding_summary(self.model), indent=2) + "\n")
        if self.hooks.initial_state is not None:
            load_plain_state_dict(self.model, self.hooks.initial_state, partial=True)
        named = [(n, p) for n, p in in_backward_optimizer_filter(self.model.named_parameters()) if p.requires_grad]
        sgd_lr = lambda name: next((lr for k, lr in self.hooks.sgd_lr.items() if name.startswith(k)), None)  # noqa: E731
        # e.g. OptEmbed's thresholds: plain SGD, no clipping, no decay on plateau (as the reference)
        self.sgd = torch.optim.SGD([{"params": [p], "lr": sgd_lr(n)} for n, p in named if sgd_lr(n) is not None] or
                                   [{"params": []}], lr=0.0)
        self.dense_params = [p for n, p in named if sgd_lr(n) is None]
        opt = torch.optim.Adam if self.t.optimizer == "adam" else torch.optim.Adagrad
        self.optimizer = opt(self.dense_params, lr=self.t.lr, fused=True)
        self.state = LoopState(lr=self.t.lr, sparse_lr=self.t.sparse_lr)
        if self.warm is not None:  # a resumed run's own checkpoint replaces this afterwards
            self.warm.load_into(self.model, self.optimizer)
            self._set_lr()
            if self.main:
                self.warm.record(self.paths)

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.state.lr
        set_sparse_lr(self.model, self.state.sparse_lr)

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, name: str) -> None:
        """Collective: every rank contributes its shards, rank 0 writes the file."""
        model, sparse = plain_state_dict(self.model), fused_optimizer_state(self.model)
        if not self.main:
            return
        save_checkpoint(self.ckpt_dir / name, {
            "model": model,
            "dense_optimizer": self.optimizer.state_dict(),
            "sparse_optimizer": sparse,
            "sgd_optimizer": self.sgd.state_dict(),
            "loop": asdict(self.state),
            "rng": torch.get_rng_state(),
            "model_config": self.cfg.model.model_dump(mode="json"),
            "steps": [step_to_dict(s) for s in self.hooks.steps],
        })

    def _restore(self, name: str, with_training_state: bool = True, folder: Path | None = None) -> None:
        payload = load_checkpoint((folder or self.ckpt_dir) / name)
        load_plain_state_dict(self.model, payload["model"])
        if with_training_state:
            self.optimizer.load_state_dict(payload["dense_optimizer"])
            self.sgd.load_state_dict(payload["sgd_optimizer"])
            load_fused_optimizer_state(self.model, payload["sparse_optimizer"])
            self.state = LoopState(**payload["loop"])
            torch.set_rng_state(payload["rng"])
            self._set_lr()

    # -- evaluation, early stopping ---------------------------------------------------------------
    def _record(self, event: str, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        line = {"event": event, "epoch": self.state.epoch, "step": self.state.step, **metrics}
        append_json_line(self.paths.metrics, line)
        log.info("%s epoch %d step %d: auc %.5f logloss %.5f", event, self.state.epoch, self.state.step,
                 metrics["auc"], metrics["logloss"])

    def _forget_metrics_after(self, step: int) -> None:
        """Drop metric lines written after the checkpoint a run resumes from (they will be redone)."""
        path = self.paths.metrics
        if self.main and path.is_file():
            kept = [record for record in read_json_lines(path) if record["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    def _validate(self) -> None:
        metrics = classification_metrics(*predict(self.model, self.valid_data, self.runtime.device))
        # loop seconds so far in this process (validation and checkpoints excluded): time-to-AUC curves
        self._record("valid", {**metrics, "loop_seconds": round(self.loop_seconds, 3)})
        s = self.state
        s.history.append({"step": s.step, "auc": metrics["auc"], "logloss": metrics["logloss"]})
        if metrics["auc"] > s.best_auc + MIN_IMPROVEMENT:
            s.best_auc, s.best_step, s.bad_evals = metrics["auc"], s.step, 0
            self._save(BEST)
        else:
            s.bad_evals += 1
            s.lr = max(s.lr * self.t.lr_decay, self.t.min_lr)
            s.sparse_lr = max(s.sparse_lr * self.t.lr_decay, self.t.min_lr)
            self._set_lr()
            if s.bad_evals >= self.t.patience:
                s.stopped = True
                log.info("early stop: no AUC gain in %d validations (best %.5f at step %d)", s.bad_evals, s.best_auc, s.best_step)
        self._save(LAST)
        self._saved(metrics)

    def _saved(self, metrics: dict[str, float]) -> None:
        if self.runtime.on_checkpoint is not None:
            self.runtime.on_checkpoint(self.ckpt_dir, {"epoch": self.state.epoch, "step": self.state.step, **metrics})

    # -- the loop ---------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> float:
        """One training step. Its phases are marked for ``torch.profiler`` (benchmarks/profile_step.py);
        a mark costs about a microsecond when no profiler runs."""
        if self.runtime.device != CPU:
            batch = batch.to(self.runtime.device)
        with record_function(PHASES[0]):
            logits, penalty = self.model(batch.dense, batch.sparse)
        with record_function(PHASES[1]):
            loss = binary_cross_entropy_with_logits(logits, batch.labels)
            if self.t.embedding_l2:
                loss = loss + self.t.embedding_l2 * penalty
            if self.hooks.extra_loss is not None:
                loss = loss + self.hooks.extra_loss(self.model)
            if not torch.isfinite(loss):
                last = self.ckpt_dir / LAST
                kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written before it"
                raise TrainingDiverged(
                    f"{self.run_dir}: loss is {loss.item()} at epoch {self.state.epoch}, step {self.state.step}; training "
                    f"stopped and {kept} (lower trainer.lr / trainer.sparse_lr, or set trainer.grad_clip_norm)")
        self.optimizer.zero_grad(set_to_none=True)
        self.sgd.zero_grad(set_to_none=True)
        with record_function(PHASES[2]):
            loss.backward()  # also applies the fused embedding update to the rows of this batch
        with record_function(PHASES[3]):
            if self.t.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(self.dense_params, self.t.grad_clip_norm)
            self.optimizer.step()
            self.sgd.step()
        return loss.detach().item()

    def _epoch(self) -> None:
        s, t = self.state, self.t
        self.train_data.set_epoch(s.epoch)
        if self.hooks.on_epoch_start is not None and s.batch_in_epoch == 0:
            self.hooks.on_epoch_start(self)
        skip = s.batch_in_epoch
        bar = tqdm(total=len(self.train_data), initial=skip, disable=not (t.progress and self.main), desc=f"epoch {s.epoch}",
                   unit="batch", dynamic_ncols=True)
        running, started, seen = None, time.perf_counter(), 0
        for i, batch in enumerate(self.train_data):
            if i < skip:  # resuming mid-epoch: the seeded loader replays the same order, skip what was done
                continue
            loss = self._step(batch)
            s.step += 1
            s.batch_in_epoch = i + 1
            seen += batch.size
            running = loss if running is None else 0.98 * running + 0.02 * loss  # per epoch
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{seen / (time.perf_counter() - started):,.0f}", refresh=False)
            if t.eval_every_steps and s.step % t.eval_every_steps == 0:
                self._account(started, seen)
                started, seen = time.perf_counter(), 0
                self._validate()
                if s.stopped:
                    break
            elif t.checkpoint_every_steps and s.step % t.checkpoint_every_steps == 0:
                self._account(started, seen)
                started, seen = time.perf_counter(), 0
                self._save(LAST)
                self._saved({})
        self._account(started, seen)
        bar.close()
        if not s.stopped:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            if not t.eval_every_steps:
                self._validate()
            else:
                self._save(LAST)
                self._saved({})

    def _account(self, started: float, samples: int) -> None:
        self.loop_seconds += time.perf_counter() - started
        self.loop_samples += samples

    def load_best_weights(self) -> None:
        """The weights of the best validation so far (the training state stays as it is)."""
        self._restore(BEST, with_training_state=False)

    def train(self, resume: bool = False, resume_from: Path | None = None) -> float:
        """Run (or resume) the epochs until done or early-stopped; returns the seconds spent.
        Leaves the model as it is at the end, inside the process group the caller holds.
        ``resume_from``: the folder holding the checkpoint to resume (default: this run's)."""
        self._build()
        if resume and ((resume_from or self.ckpt_dir) / LAST).is_file():
            self._restore(LAST, folder=resume_from)
            log.info("resumed at epoch %d, batch %d (step %d)", self.state.epoch, self.state.batch_in_epoch, self.state.step)
        elif resume:
            log.info("no checkpoint was written before the interruption: starting from the beginning")
        if resume:
            self._forget_metrics_after(self.state.step)
        started = time.perf_counter()
        while not self.state.stopped and self.state.epoch < self.t.epochs:
            self._epoch()
        return time.perf_counter() - started

    def fit(self, resume: bool = False, resume_from: Path | None = None) -> dict[str, Any]:
        """Train (or resume), reload the best checkpoint, and return its test metrics.
        Uses the caller's process group (a Ray worker's) or makes a local one."""
        torch.set_num_threads(self.t.threads or default_threads())
        with local_process_group():
            seconds = self.train(resume, resume_from)
            self.load_best_weights()
            test = classification_metrics(*predict(self.model, self.test_data, self.runtime.device))
            self._record("test", test)
        result = {"best_valid_auc": self.state.best_auc, "best_step": self.state.best_step,
                  "steps": self.state.step, "train_seconds": seconds,
                  "train_samples_per_s": self.loop_samples / max(self.loop_seconds, 1e-9), **{f"test_{k}": v for k, v in test.items()}}
        if self.main:
            atomic_write_text(self.paths.result, json.dumps(result, indent=2) + "\n")
        return result
