"""One object owns a run directory's layout, so no other module builds these paths by hand.

``config.yaml`` (the resolved experiment), ``feature_map.json`` and ``data.json`` (where the
prepared data is, stored relative to the run directory so the pair can move together or be read
from any working directory), ``checkpoints/{last,best}.pt``, ``metrics.jsonl``, ``result.json``,
``compress/NN_<stage>/`` (a ``StageDir``) with ``compress/report.jsonl`` (and per budget of a sweep
the same under ``compress/target_<MB>MB/``), ``compress/superseded/``, ``export/``, ``evaluation/`` and, for a warm-started run, ``parent.json``.
A run without ``trainer.run_dir`` lives in ``runs/<experiment name>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import ConfigError
from features.feature_map import FILE_NAME as FEATURE_MAP

CONFIG_FILE = "config.yaml"
LAST, BEST = "last.pt", "best.pt"
STAGE_CHECKPOINT = "checkpoint.pt"
REPORT = "report.jsonl"
DEFAULT_RUNS = Path("runs")


@dataclass(frozen=True)
class StageDir:
    """One compression stage's folder: its checkpoint, the fingerprint of its inputs, a run folder
    per training phase (a search, a retrain, a fine-tune: each resumes on its own), its search's
    record and the weights a rewind returns to."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoint(self) -> Path:
        return self.root / STAGE_CHECKPOINT

    @property
    def fingerprint(self) -> Path:
        return self.root / "stage.json"

    @property
    def recipe_report(self) -> Path:
        """The report of the recipe this stage belongs to."""
        return self.root.parent / REPORT

    @property
    def adopting(self) -> Path:
        """Where a stage reused from another budget is linked in before it is renamed into place."""
        return self.root.with_name(f".{self.root.name}.adopting")

    def phase(self, name: str) -> "RunDir":
        return RunDir(self.root / name)

    @property
    def search_result(self) -> Path:
        return self.root / "search.json"

    @property
    def search_log(self) -> Path:
        return self.root / "search.jsonl"

    @property
    def rewind(self) -> Path:
        return self.root / "rewind.pt"

    def exists(self) -> bool:
        return self.root.exists()


@dataclass(frozen=True)
class RunDir:
    root: Path
    compress_dir: str = "compress"  # a budget sweep runs each budget's recipe in its own folder under compress/

    @staticmethod
    def of(run_dir: str | None, experiment: str) -> "RunDir":
        """An experiment's run: ``trainer.run_dir`` if set, else ``runs/<experiment name>``."""
        return RunDir(Path(run_dir) if run_dir else DEFAULT_RUNS / experiment)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def feature_map(self) -> Path:
        return self.root / FEATURE_MAP

    @property
    def data_json(self) -> Path:
        return self.root / "data.json"

    @property
    def parent(self) -> Path:
        """A warm-started run's record of the run it grew from (``ctr.warm_start``)."""
        return self.root / "parent.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def compress(self) -> Path:
        return self.root / self.compress_dir

    def sweep_point(self, target_mb: float) -> "RunDir":
        """The same run, its recipe at one budget of a sweep: ``compress/target_<MB>MB/``."""
        return self.point(f"target_{target_mb:g}MB")

    def point(self, name: str) -> "RunDir":
        """The same run, its recipe in the sweep point folder ``compress/<name>/``."""
        return RunDir(self.root, f"compress/{name}")

    def stage_folders(self, name: str) -> list[StageDir]:
        """Every folder called ``name`` in this run's recipe and sweep points (where a stage may be reused from)."""
        base = self.root / "compress"
        return [StageDir(p) for p in (base / name, *sorted(base.glob(f"target_*/{name}"))) if p.is_dir()]

    @property
    def report(self) -> Path:
        return self.compress / REPORT

    @property
    def superseded(self) -> Path:
        """Where a stage folder goes when its inputs change or the recipe drops it (never deleted)."""
        return self.compress / "superseded"

    def stage(self, index: int, name: str) -> StageDir:
        return StageDir(self.compress / f"{index:02d}_{name}")

    def stage_dirs(self) -> list[StageDir]:
        """Every stage folder of this recipe on disk, in recipe order."""
        return [StageDir(p) for p in sorted(self.compress.glob("[0-9][0-9]_*")) if p.is_dir()]

    def stage_checkpoints(self) -> list[Path]:
        """Every finished stage's checkpoint, in recipe order."""
        return [d.checkpoint for d in self.stage_dirs() if d.checkpoint.is_file()]

    @property
    def tune(self) -> Path:
        """Where ``ctr tune`` keeps its trials and their results."""
        return self.root / "tune"

    @property
    def sharding(self) -> Path:
        """How a multi-worker run placed its tables."""
        return self.root / "sharding.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def exported(self) -> Path:
        """Which edge file ``ctr export`` last wrote from this run (its path, digest and bytes)."""
        return self.root / "exported.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def is_run(self) -> bool:
        return self.feature_map.is_file()

    def link_data(self, prepared: Path) -> None:
        """Tie this run to its prepared data: a copy of the data's feature map, and ``data.json`` with
        where the data is (relative to this directory, and absolute) and the feature map's sha256."""
        text = (prepared / FEATURE_MAP).read_text(encoding="utf-8")
        atomic_write_text(self.feature_map, text)
        relative = os.path.relpath(prepared.resolve(), self.root.resolve())
        atomic_write_text(self.data_json, json.dumps({
            "prepared": relative, "prepared_absolute": str(prepared.resolve()),
            "feature_map_sha256": hashlib.sha256(text.encode()).hexdigest()}, indent=2) + "\n")

    def prepared_data(self) -> Path:
        """The prepared data directory named by ``data.json``: relative to this directory (the two
        moved together, or read from another working directory), else where it was (the run moved alone)."""
        if not self.data_json.is_file():
            raise ConfigError(f"{self.data_json}: missing; this run directory does not say where its data is "
                              "(train it with 'ctr train')")
        try:
            record = json.loads(self.data_json.read_text())
            candidates = [self.root / record["prepared"], Path(record.get("prepared_absolute", record["prepared"]))]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.data_json}: not a data.json written by ctr ({exc}) (train the run again)") from None
        return next((c for c in candidates if c.is_dir()), candidates[0])
