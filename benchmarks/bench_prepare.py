"""Prepare throughput and peak memory on 1M and 4M generated Criteo rows.

Each run is a fresh process; peak memory is the PSS of its process tree, sampled. The baseline, in the same run, is the
eager way: ``polars.read_csv`` of the whole file into memory, whose peak grows with the input; the
streaming prepare should stay nearly flat (4M peak well under 4x the 1M peak).

Usage: python benchmarks/bench_prepare.py [--rows 1000000 4000000]
"""

from __future__ import annotations

import argparse
import shutil
import sys

from _common import WORK, criteo_raw, load_note, run_measured

PREPARE = """
from pathlib import Path
from features.prepare import prepare
from features.schema import DatasetConfig
cfg = DatasetConfig(name="bench", layout="criteo_tsv", output="{out}", min_count=10)
prepare(cfg, raw=[Path("{raw}")])
"""

EAGER = """
import polars as pl
schema = {{"label": pl.Int8, **{{f"I{{i}}": pl.Int64 for i in range(1, 14)}}, **{{f"C{{i}}": pl.String for i in range(1, 27)}}}}
df = pl.read_csv("{raw}", separator="\\t", has_header=False, schema=schema, quote_char=None)
print(df.height)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        raw = criteo_raw(rows)
        out = WORK / f"prepared_{rows}"
        shutil.rmtree(out, ignore_errors=True)
        seconds, rss, _ = run_measured([sys.executable, "-c", PREPARE.format(out=out, raw=raw)])
        _, eager_rss, _ = run_measured([sys.executable, "-c", EAGER.format(raw=raw)])
        results.append((rows, seconds, rss, eager_rss, raw.stat().st_size / 1e6))
    print(f"\nprepare (raw Criteo TSV -> Parquet splits + vocabularies, min_count 10); {load_note()}")
    print("| rows | input MB | seconds | rows/s | peak memory MB | eager read_csv peak memory MB (baseline) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows, seconds, rss, eager_rss, mb in results:
        print(f"| {rows:,} | {mb:.0f} | {seconds:.1f} | {rows / seconds:,.0f} | {rss:,.0f} | {eager_rss:,.0f} |")
    if len(results) >= 2:
        (r0, _, a, ea, _), (r1, _, b, eb, _) = results[0], results[-1]
        print(f"\npeak memory ratio {r1:,} / {r0:,} rows: prepare {b / a:.2f}x, eager baseline {eb / ea:.2f}x "
              f"(input grew {r1 / r0:.1f}x)")


if __name__ == "__main__":
    main()
