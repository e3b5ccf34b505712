"""Helpers shared by the benchmarks: cached generated inputs, child-process peak memory, machine load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from features.errors import DataError
from features.feature_map import FeatureMap
from features.prepare import prepare
from features.schema import DatasetConfig
from pipelines.synthetic import generate

WORK = Path(__file__).parent / "_work"


def criteo_raw(rows: int, seed: int = 2024) -> Path:
    """A generated Criteo-layout file of ``rows`` rows, made once and reused by later runs."""
    path = WORK / f"criteo_{rows}.txt"
    if not path.exists():
        generate("criteo", rows, path, seed=seed)
    return path


def prepared(rows: int) -> tuple[Path, FeatureMap]:
    """The generated file of ``rows`` rows prepared (min count 10, random 8:1:1), made once and reused."""
    out = WORK / f"prepared_{rows}"
    try:
        return out, FeatureMap.load(out)
    except DataError:  # missing, or written by an older format
        cfg = DatasetConfig(name="bench", layout="criteo_tsv", output=str(out), min_count=10)
        return out, prepare(cfg, raw=[criteo_raw(rows)]).feature_map


def run_measured(code: str) -> tuple[float, float, str]:
    """Run Python ``code`` in a fresh process: (wall seconds, peak RSS in MB, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed ({status}):\n{code}")
    return seconds, usage.ru_maxrss / 1024, out


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"
