"""Helpers shared by the benchmarks: cached generated inputs, child-process peak memory, machine load."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import DataError
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


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pss_mb(root: int) -> float:
    """Proportional set size of ``root`` and all its descendants, in MB.

    PSS splits shared pages (Ray's object store, shared libraries) among the processes mapping them,
    so the sum over a process tree counts each page once, unlike a sum of RSS."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_measured(argv: list[str], log: Path | None = None, interval: float = 0.2) -> tuple[float, float, str]:
    """Run a command: (wall seconds, peak memory of its whole process tree in MB, stdout); its
    stderr goes to ``log`` (or nowhere).

    Peak memory is the largest PSS sum over the tree seen in samples every ``interval`` seconds, so
    helper processes (Ray's workers and object store) count too; a single process's peak RSS would
    miss them."""
    started = time.perf_counter()
    errors = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(interval):
            peak = max(peak, tree_pss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if log is not None:
        errors.close()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}"
                           + (f"; see {log}" if log is not None else ""))
    return seconds, peak, out


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def replace_section(results: Path, title: str, body: str) -> None:
    """Write ``body`` (a "## " section starting with ``title``) over that section of ``results`` in
    place, or add it at the end: each long benchmark owns one section and keeps the others."""
    text = results.read_text() if results.exists() else ""
    match = re.search(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[:match.start()] + body + "\n" + text[match.end():] if match else text.rstrip("\n") + "\n\n" + body
    atomic_write_text(results, text)
