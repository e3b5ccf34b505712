"""Experiment config: one YAML file = dataset + model + trainer sections.

Each section maps straight onto the constructor that consumes it (FuxiCTR-style): ``model`` onto
``ctr.models.build_model`` (one config class per model, in ``ctr.experiment``), ``trainer`` onto ``ctr.train.Trainer``, ``dataset`` onto the prepare job.
Validation is strict, so a typo fails before any data is read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from common.strict import Strict
from features.schema import DatasetConfig


class RayConfig(Strict):
    """Where and how ``trainer.num_workers > 1`` (or ``ctr train --ray``) runs on Ray.

    ``address`` None starts a private local Ray instance (sized for a small machine); a cluster's
    address (e.g. ``ray://head:10001`` or ``auto``) joins it, and then ``trainer.run_dir`` must be on
    storage every node shares. ``cpus_per_worker`` below 1 leaves CPU for the Ray Data read tasks:
    workers holding every CPU starve them and the run hangs."""

    address: str | None = None
    cpus_per_worker: float = Field(default=0.5, gt=0.0)
    use_gpu: bool = False  # one GPU per worker, NCCL
    max_failures: int = Field(default=2, ge=0)  # worker-group restarts from the last checkpoint
    object_store_mb: int = Field(default=1024, ge=64)  # local instance only


class TrainerConfig(Strict):
    seed: int = 2024
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=4096, ge=1)
    eval_batch_size: int = Field(default=16384, ge=1)
    shuffle: bool = True
    # dense side (MLPs, cross layers, first-order dense weights)
    optimizer: Literal["adam", "adagrad"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    # sparse side: TorchRec's fused in-backward optimizer (fbgemm TBE); on CPU only this family exists
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    sparse_lr: float = Field(default=0.05, gt=0.0)
    embedding_l2: float = Field(default=0.0, ge=0.0)  # on the rows looked up in each batch
    grad_clip_norm: float | None = Field(default=10.0, gt=0.0)
    # validation, early stopping, learning-rate decay on plateau
    eval_every_steps: int | None = Field(default=None, ge=1)  # None: once per epoch
    patience: int = Field(default=2, ge=1)
    lr_decay: float = Field(default=0.1, gt=0.0, le=1.0)
    min_lr: float = Field(default=1e-6, ge=0.0)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)  # None: every core (or OMP_NUM_THREADS)
    progress: bool = True
    run_dir: str | None = None  # None: runs/<experiment name>
    # a trained run whose final model this run starts from, on data extended from that run's (ctr.warm_start)
    init_from: str | None = None
    num_workers: int = Field(default=1, ge=1)  # > 1: Ray Train workers, batch_size split among them
    ray: RayConfig = RayConfig()


SEARCH_SHARE = 0.5  # a search phase reads at most this share of one train epoch in all its epochs ...
SEARCH_MIN_ROWS = 1_000_000  # ... but never fewer rows per epoch than this (small sets search on everything)


def sample_rows(rows: int | None, fraction: float | None, train_rows: int, epochs: int,
                one_pass: bool = False) -> int | None:
    """The rows each epoch of a search phase trains on (``rows``, or ``fraction`` of the split), None
    for all of them. The sample is whole row groups drawn with the trainer's seed; the retrain always
    reads every row. The configs allow at most one of the two; with neither, the rule: the search's
    epochs read ``SEARCH_SHARE`` of the split in all, and at least ``SEARCH_MIN_ROWS`` each, so its
    cost stops growing with the data past a few million rows; ``one_pass`` (a search whose epochs
    read disjoint samples) caps that at a 1/``epochs`` share of the split, so no row is read twice."""
    if rows is None and fraction is None:
        rows = max(SEARCH_MIN_ROWS, int(SEARCH_SHARE * train_rows / epochs))
        rows = min(rows, train_rows // epochs) if one_pass else rows
    if rows is not None:
        return rows if rows < train_rows else None
    if fraction is not None and fraction < 1.0:
        return max(1, int(fraction * train_rows))
    return None


class OptFSConfig(Strict):
    """OptFS feature-value gates (Lyu et al., WWW'23); defaults from the reference at embedding 16.

    ``penalty`` is lambda in ``loss + lambda * sum_rows sigmoid(tau * m)``. A row survives while its
    mean data gradient per step outweighs lambda's, and that mean is the value's frequency times its
    mean gradient per sample; so None scales the reference's 1e-8 (tuned on Criteo's 36.7M train
    rows) by 36.7M / (the train split's rows): the same count threshold over the whole split at any
    size, whatever sample the search reads. ``gate_lr`` (the gates' Adam step) None: the step at which
    a row no batch touches reaches m = 0 halfway through the search (``OptFSStage.gate_settings``)."""

    start_from: Literal["init", "checkpoint"] = "init"  # init: the search trains from scratch, as the reference
    search_epochs: int = Field(default=5, ge=1)
    final_temp: float = Field(default=200.0, ge=1.0)
    penalty: float | None = Field(default=None, ge=0.0)
    rewind_epoch: int = Field(default=1, ge=0)
    retrain_epochs: int = Field(default=5, ge=1)
    retrain_patience: int = Field(default=1, ge=1)
    removed_to: Literal["zero", "oov"] = "zero"
    gate_lr: float | None = Field(default=None, gt=0.0)  # the gates' own Adam step; None: the rule's
    search_rows: int | None = Field(default=None, ge=1)  # the search on a sample (see sample_rows); None: all rows
    search_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    # the field test's one-sided level: a field whose kept rows do not lower the held-out log loss
    # significantly at this level is removed whole (ctr/compress/field_significance.py); 1 keeps every field
    field_p: float = Field(default=0.05, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _rewind_in_search(self) -> "OptFSConfig":
        if self.rewind_epoch >= self.search_epochs:
            raise ValueError(f"rewind_epoch {self.rewind_epoch} must be < search_epochs {self.search_epochs}")
        if self.search_rows is not None and self.search_fraction is not None:
            raise ValueError("give search_rows or search_fraction, not both")
        return self


class StageStep(Strict):
    """One entry of ``compress.stages``: a single key naming the stage, its settings as the value."""

    @property
    def stage(self) -> tuple[str, Strict]:
        (name, settings), = ((k, v) for k, v in self if v is not None)
        return name, settings


class OptFSStep(StageStep):
    optfs: OptFSConfig


class OptEmbedConfig(Strict):
    """OptEmbed (Lyu et al., CIKM'22): row pruning by learned per-field thresholds and per-field
    width search. Defaults follow the reference's search (20 candidates, mutation 0.1, 30
    generations); the supernet and retrain start from the source checkpoint's weights.

    ``rows: false`` keeps every row (use it after OptFS, which already selected rows).
    ``max_embedding_share`` makes a candidate whose embedding parameters exceed that share of the
    source's (rows x full width) infeasible."""

    rows: bool = True
    start_from: Literal["checkpoint", "init"] = "checkpoint"
    supernet_epochs: int = Field(default=1, ge=1)
    threshold_lr: float = Field(default=1e-4, gt=0.0)  # SGD on the per-field thresholds
    threshold_penalty: float = Field(default=1e-5, ge=0.0)  # alpha in alpha * sum_f exp(-t_f)
    search_rows: int = Field(default=20000, ge=1000)  # validation rows cached for the evolutionary search
    supernet_rows: int | None = Field(default=None, ge=1)  # the supernet on a sample (see sample_rows); None: all
    supernet_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    population: int = Field(default=20, ge=4)
    parents: int = Field(default=10, ge=2)  # the best candidates that mutate and cross over
    mutation_prob: float = Field(default=0.1, gt=0.0, le=1.0)
    generations: int = Field(default=30, ge=1)
    max_embedding_share: float | None = Field(default=None, gt=0.0, le=1.0)
    retrain_from: Literal["supernet", "rewind"] = "supernet"
    retrain_epochs: int = Field(default=3, ge=1)
    retrain_patience: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _parents_fit(self) -> "OptEmbedConfig":
        if self.parents > self.population:
            raise ValueError(f"parents {self.parents} must be <= population {self.population}")
        if self.supernet_rows is not None and self.supernet_fraction is not None:
            raise ValueError("give supernet_rows or supernet_fraction, not both")
        return self


class OptEmbedStep(StageStep):
    optembed: OptEmbedConfig


class RankRule(Strict):
    """Exactly one of: a fixed rank, a fraction of the width, or the smallest rank that keeps this
    share of the output variance (energy)."""

    fixed: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> "RankRule":
        if (self.fixed is not None) + (self.fraction is not None) + (self.energy is not None) != 1:
            raise ValueError("a rank rule needs exactly one of fixed, fraction or energy")
        return self


class AFMConfig(Strict):
    """AFM low-rank compression (Yu et al., KDD'24): PCA of Linear outputs (DNN layers, DCNv2 cross
    layers) and of each field's looked-up embeddings, then fine-tuning. ``layers_budget_mb`` (or the
    recipe's ``target_mb``) shares a parameter budget among the layers instead of ``layer_rank``."""

    layers: bool = True
    layer_rank: RankRule = RankRule(energy=0.99)
    layers_budget_mb: float | None = Field(default=None, gt=0.0)
    embeddings: bool = True
    embedding_rank: RankRule = RankRule(energy=0.99)  # rounded up to a multiple of 4
    calibration_rows: int = Field(default=65536, ge=256)
    finetune_epochs: int = Field(default=1, ge=0)
    finetune_patience: int = Field(default=1, ge=1)
    finetune_lr_scale: float = Field(default=0.1, gt=0.0)  # of trainer.lr and trainer.sparse_lr
    mimic_weight: float = Field(default=0.0, ge=0.0)  # feature-mimicking MSE beside logloss


class AFMStep(StageStep):
    afm: AFMConfig


class QuantizeConfig(Strict):
    """Row-wise low-bit embedding rows (codes of ``bits`` with an fp16 scale and bias per row),
    trained on with a straight-through gradient. ``bits`` gives every field one width; None chooses
    each field's width from ``choices`` under the recipe's ``target_mb`` (the fields whose rows matter
    least to the loss per byte get the fewest bits), and 8 everywhere without a target."""

    bits: Literal[8, 4, 2] | None = None
    choices: list[Literal[8, 4, 2]] = Field(default_factory=lambda: [8, 4, 2], min_length=1)
    calibration_rows: int = Field(default=65536, ge=256)
    finetune_epochs: int = Field(default=1, ge=0)
    finetune_patience: int = Field(default=1, ge=1)
    finetune_lr_scale: float = Field(default=0.1, gt=0.0)  # of trainer.lr and trainer.sparse_lr


class QuantizeStep(StageStep):
    quantize: QuantizeConfig


STEP_KINDS: tuple[type[StageStep], ...] = (OptFSStep, OptEmbedStep, AFMStep, QuantizeStep)
STAGE_NAMES = ", ".join(next(iter(kind.model_fields)) for kind in STEP_KINDS)


def _step_kind(value: object) -> str | None:
    """The class of the stage an entry names, so that a bad entry is checked against that stage
    only (not reported once per stage kind); None for an entry that names no single known stage."""
    if isinstance(value, StageStep):
        return type(value).__name__
    keys = list(value) if isinstance(value, dict) else []
    return next((kind.__name__ for kind in STEP_KINDS if keys == list(kind.model_fields)), None)


CompressStep = Annotated[
    Annotated[OptFSStep, Tag("OptFSStep")] | Annotated[OptEmbedStep, Tag("OptEmbedStep")]
    | Annotated[AFMStep, Tag("AFMStep")] | Annotated[QuantizeStep, Tag("QuantizeStep")],
    Discriminator(_step_kind, custom_error_type="stage_kind",
                  custom_error_message=f"each stage is one key naming it: {STAGE_NAMES}")]


class CompressRecipe(Strict):
    """The stages run in order by ``ctr compress``; ``target_mb``: the final model must fit (the last
    stage that sizes itself, quantize or AFM, sizes its bits or ranks to it; the recipe fails if the
    result is larger)."""

    target_mb: float | None = Field(default=None, gt=0.0)
    stages: list[CompressStep] = Field(default_factory=list)


class ExportConfig(Strict):
    """``ctr export`` defaults: how the edge file stores embedding tables (int8: per-row scale and bias)."""

    embeddings: Literal["fp32", "fp16", "int8"] = "fp32"


class ExperimentSections(Strict):
    """Every section of an experiment but ``model:``. The model configs live beside the models
    (``ctr/models/``, which need torch); this part does not, so ``ctr prepare`` can validate an
    experiment file without loading torch."""

    name: str
    dataset: DatasetConfig
    trainer: TrainerConfig = TrainerConfig()
    compress: CompressRecipe = CompressRecipe()  # a plain list of stages is accepted too
    export: ExportConfig = ExportConfig()

    @field_validator("compress", mode="before")
    @classmethod
    def _stage_list(cls, value: object) -> object:
        return {"stages": value} if isinstance(value, list) else value
