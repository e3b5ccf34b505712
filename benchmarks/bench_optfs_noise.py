"""Does OptFS find the noise? The shipped OptFS config on generated sets it was not tuned on.

Each set is the built-in generator with its own seed and its own pure-noise fields (``--noise``:
those fields carry no weight in the teacher), at two table sizes: the default scenario (1M rows,
min count 10: about 72k table rows) and the Criteo profile (10M rows, min count 2: about 2M table
rows). For each: generate, prepare, train the DNN baseline, run the OptFS stage of
``configs/experiments/synthetic_dnn_optfs.yaml`` unchanged, and score both on the test rows (DeLong).
Printed per set: the share of the noise fields' rows OptFS removed, of all rows, the informative
fields its field test removed whole, the AUC change, and the stage's own minutes (reused when the
code and config are unchanged).
Writes the "## OptFS noise" section of benchmarks/RESULTS.md. Not part of CI (about 45 minutes).

Usage: python benchmarks/bench_optfs_noise.py [--skip-large] [--large-rows N]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from bench_compress import measure, noise_share_removed
from bench_scale import RESULTS
from run_all import machine

from _common import WORK, load_note, replace_section
from ctr.metrics import delong_test
from features.feature_map import FeatureMap
from pipelines.synthetic import read_teacher

CONFIG = Path("configs/experiments/synthetic_dnn_optfs.yaml")
TITLE = "## OptFS noise"


@dataclass(frozen=True)
class NoiseSet:
    seed: int
    noise: tuple[str, ...]
    rows: int
    profile: bool

    @property
    def min_count(self) -> int:
        return 2 if self.profile else 10

    @property
    def name(self) -> str:
        return f"{'profile' if self.profile else 'default'}_{self.rows}_s{self.seed}"

    @property
    def folder(self) -> Path:
        return (WORK / "optfs_noise" / self.name).resolve()

    def overrides(self) -> list[str]:
        folder = self.folder
        return ["trainer.progress=false", f"dataset.raw=[{folder}/raw.txt]", f"dataset.output={folder}/prepared",
                f"dataset.min_count={self.min_count}", f"trainer.run_dir={folder}/run",
                f"dataset.synthetic={{kind: criteo, rows: {self.rows}, seed: {self.seed}, profile: {str(self.profile).lower()}, "
                f"noise: [{', '.join(self.noise)}]}}"]


# the generator's own noise fields, then two choices it never had (other cardinalities, pair fields among them)
SMALL = [NoiseSet(2024, ("C5", "C10", "C15", "C20", "C25", "C26"), 1_000_000, False),
         NoiseSet(7, ("C2", "C8", "C12", "C19", "C22"), 1_000_000, False),
         NoiseSet(11, ("C3", "C9", "C16", "C18", "C21", "C24", "C25"), 1_000_000, False)]


def large(rows: int) -> list[NoiseSet]:
    return [NoiseSet(5, ("C4", "C10", "C16", "C19", "C26"), rows, True)]


def run(sets: list[NoiseSet]) -> list[str]:
    lines = ["| set | table rows | noise fields (and I12, I13) | noise rows removed | all rows removed | "
             "informative fields removed | baseline test AUC | OptFS test AUC | change | DeLong p | OptFS minutes |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for s in sets:
        (_, _, base_test), (_, optfs, test) = measure(CONFIG, s.overrides())[0]
        p = delong_test(test["scores"][0], test["scores"][1], base_test["scores"][1])["p_value"]
        fmap = FeatureMap.load(s.folder / "prepared")
        noise = set(read_teacher(s.folder / "raw.txt")["noise"])  # the chosen fields, and the teacher's unweighted I12, I13
        removed = noise_share_removed(optfs, noise, {f.name: int(f.num_embeddings or 0) for f in fmap.categorical})
        wrong = [f for f in optfs["fields_removed"] if f not in noise]
        lines.append(f"| {s.name} | {optfs['rows_before']:,} | {', '.join(s.noise)} | {removed:.1%} | "
                     f"{1 - optfs['rows_after'] / optfs['rows_before']:.1%} | {', '.join(wrong) or 'none'} | "
                     f"{base_test['auc']:.5f} | {test['auc']:.5f} | {test['auc'] - base_test['auc']:+.5f} | {p:.2g} | "
                     f"{optfs['seconds'] / 60:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-rows", type=int, default=10_000_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    table = run(SMALL + ([] if args.skip_large else large(args.large_rows)))
    body = "\n".join([TITLE, "", f"Written by `make bench-optfs` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; "
                      f"machine: {machine()}. The OptFS stage of `{CONFIG}` unchanged on every set; the DNN baseline "
                      "from the same config; test split.", "", *table, "", f"_{load_note()} at the end._", ""])
    replace_section(args.out, TITLE, body)


if __name__ == "__main__":
    main()
