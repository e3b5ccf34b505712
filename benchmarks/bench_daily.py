"""Day after day (``make bench-daily``): warm-starting each day against retraining from scratch.

A deployment simulated on generated Avazu-profile day files (default 7 days of 2M rows, a tenth of each
field's values replaced by new ones per day: ``ctr generate --days --drift``). Day 1 trains from scratch
(``configs/experiments/avazu_daily.yaml``, early-stopped) and is compressed by the DNN recipe
(``avazu_daily_recipe.yaml``). Then each day k = 2..N-1 is prepared with ``--extend`` from day k-1, and
three strategies each end the day with a model that is scored on day k+1's raw rows through its edge file:
  (a) warm start: yesterday's (a) model, one epoch over day k's rows in order (``--init-from``);
  (b) from scratch: days 1..k prepared in one go, trained early-stopped;
  (c) stale: the day-1 model, never updated;
and the recipe's compressed model warm-started under (a). One ``ctr evaluate`` per day scores them all on
the same raw rows of the next day, with DeLong against (b). Every step is skipped when its output is
there (a rerun continues). Writes the "## Day after day" section of benchmarks/RESULTS.md, the plot
benchmarks/daily_auc.png and _work/daily/<run>/results.json.

Usage: python benchmarks/bench_daily.py [--rows 2000000] [--days 7] [--drift 0.1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench_scale import CTR, RESULTS, Section
from run_all import machine

from ctr.run_dir import RunDir
from features.feature_map import FeatureMap

from _common import WORK, load_note, replace_section

CONFIG = "configs/experiments/avazu_daily.yaml"
RECIPE = "configs/experiments/avazu_daily_recipe.yaml"
TITLE = "## Day after day"
PLOT = Path(__file__).parent / "daily_auc.png"
STRATEGIES = {"b": "(b) from scratch", "a": "(a) warm start", "c": "(c) day-1 model", "r": "(a) recipe, warm start"}


class Daily:
    """The run's folders and the steps, each skipped when its output exists."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = (WORK / "daily" / f"avazu_{args.rows}x{args.days}_drift{args.drift:g}").resolve()
        self.sec = Section()

    def raw(self, day: int) -> Path:
        return self.root / "raw" / f"day{day:02d}.csv"

    def data(self, name: str) -> Path:
        return self.root / "prepared" / name

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def edge(self, name: str) -> Path:
        return self.root / "edges" / f"{name}.pt"

    @property
    def measured(self) -> Path:
        """Every step's table row as it was measured, kept so that a rerun that skips it still shows it."""
        return self.root / "steps.md"

    def step(self, key: str, label: str, argv: list[str], done: Path) -> None:
        if done.exists():
            earlier = self.measured.read_text().splitlines() if self.measured.is_file() else []
            self.sec.rows.append(next((row for row in earlier if row.startswith(f"| {label} |")),
                                      f"| {label} | (done earlier) | | |"))
            return
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.sec.timed(key, label, argv, self.root / "logs" / f"{key}.log")
        with self.measured.open("a") as fh:
            fh.write(self.sec.rows[-1] + "\n")

    def prepare(self, name: str, days: list[int], parent: str | None = None) -> Path:
        out = self.data(name)
        extend = ["--extend", str(self.data(parent))] if parent else []
        self.step(f"prepare_{name}", f"`ctr prepare{' --extend' if parent else ''}` {name}",
                  [CTR, "prepare", CONFIG, "--raw", *(str(self.raw(d)) for d in days), "--output", str(out), *extend],
                  out / "feature_map.json")
        return out

    def train(self, name: str, data: str, days: list[int], config: str = CONFIG, parent: str | None = None) -> Path:
        run = self.run(name)
        if run.exists() and not RunDir(run).result.is_file():  # killed part-way by an earlier run of this script
            shutil.rmtree(run)
        warm = ["trainer.epochs=1", "trainer.shuffle=false", "--init-from", str(self.run(parent))] if parent else []
        raw = ",".join(str(self.raw(d)) for d in days)
        self.step(f"train_{name}", f"`ctr train{' --init-from' if parent else ''}` {name}",
                  [CTR, "train", config, f"dataset.raw=[{raw}]", f"dataset.output={self.data(data)}",
                   f"trainer.run_dir={run}", "trainer.progress=false", *warm], RunDir(run).result)
        return run

    def export(self, name: str, run: str, stage: str | None = None) -> Path:
        out = self.edge(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.step(f"export_{name}", f"`ctr export` {name}",
                  [CTR, "export", str(self.run(run)), "--out", str(out), *(["--stage", stage] if stage else [])], out)
        return out

    def evaluate(self, day: int, edges: dict[str, Path]) -> dict[str, Any]:
        out = self.root / "evaluation" / f"day{day:02d}"
        self.step(f"evaluate_day{day:02d}", f"`ctr evaluate` on day {day}'s raw rows",
                  [CTR, "evaluate", *(str(e) for e in edges.values()), "--data", str(self.raw(day)), "--out", str(out)],
                  out / "metrics.json")
        return json.loads((out / "metrics.json").read_text())


def seconds_of(run: Path) -> float:
    return json.loads(RunDir(run).result.read_text())["train_seconds"]


def simulate(d: Daily, started: float) -> dict[str, Any]:
    args = d.args
    d.step("generate", f"`ctr generate --profile avazu --days {args.days} --drift {args.drift:g}` {args.rows:,} rows a day",
           [CTR, "generate", "--profile", "avazu", "--rows", str(args.rows), "--days", str(args.days), "--drift",
            str(args.drift), "--out", str(d.root / "raw")], d.raw(args.days))
    d.prepare("day01", [1])
    d.train("scratch01", "day01", [1])
    if not (d.run("recipe01") / "compress").exists():
        shutil.rmtree(d.run("recipe01"), ignore_errors=True)
        shutil.copytree(d.run("scratch01"), d.run("recipe01"))
    d.step("compress_recipe01", "`ctr compress` the DNN recipe on day 1",
           [CTR, "compress", RECIPE, f"dataset.raw=[{d.raw(1)}]", f"dataset.output={d.data('day01')}",
            f"trainer.run_dir={d.run('recipe01')}", "trainer.progress=false"], RunDir(d.run("recipe01")).report)
    days = []
    for k in range(1, args.days):
        if k > 1:
            d.prepare(f"day{k:02d}", [k], parent=f"day{k - 1:02d}")
            d.prepare(f"upto{k:02d}", list(range(1, k + 1)))
            d.train(f"scratch{k:02d}", f"upto{k:02d}", list(range(1, k + 1)))
            d.train(f"warm{k:02d}", f"day{k:02d}", [k], parent=f"warm{k - 1:02d}" if k > 2 else "scratch01")
            d.train(f"recipe{k:02d}", f"day{k:02d}", [k], config=RECIPE, parent=f"recipe{k - 1:02d}")
        runs = {"b": f"scratch{k:02d}", "a": f"warm{k:02d}" if k > 1 else "scratch01", "c": "scratch01",
                "r": f"recipe{k:02d}"}
        edges = {s: d.export(run, run, stage="latest" if run == "recipe01" else None) for s, run in runs.items()}
        metrics = d.evaluate(k + 1, edges)
        fmap = FeatureMap.load(d.data(f"day{k:02d}"))
        days.append({
            "trained_through": k, "tested_on": k + 1, "runs": runs,
            "auc": {s: m["auc"] for s, m in zip(runs, metrics["models"])},
            "logloss": {s: m["logloss"] for s, m in zip(runs, metrics["models"])},
            "bytes": {s: m["bytes"] for s, m in zip(runs, metrics["models"])},
            "p_vs_b": {s: c["p_value"] for s, c in zip(list(runs)[1:], metrics["comparisons"])},
            "train_seconds": {s: seconds_of(d.run(run)) for s, run in runs.items() if s != "c"},
            "vocabulary": sum(int(f.num_embeddings or 0) for f in fmap.categorical),
        })
        publish(d, {"days": days, "steps": d.sec.numbers}, started)  # each day as it ends: a long run shows progress
    return {"days": days, "steps": d.sec.numbers}


def publish(d: Daily, numbers: dict[str, Any], started: float) -> None:
    """The raw numbers, the plot and the results section for the days done so far."""
    (d.root / "results.json").write_text(json.dumps(numbers, indent=2))
    plot(numbers["days"])
    replace_section(d.args.out, TITLE, section(d, numbers, started))


def plot(days: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [day["tested_on"] for day in days]
    for s, label in STRATEGIES.items():
        ax.plot(x, [day["auc"][s] for day in days], marker="o", label=label)
    ax.set_xlabel("day tested on (trained through the day before)")
    ax.set_ylabel("next-day AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def section(d: Daily, numbers: dict[str, Any], started: float) -> str:
    args, days = d.args, numbers["days"]
    rows = ["| tested on | (b) AUC | (a) AUC | (a) - (b) | p | (c) AUC | (c) - (b) | p | recipe (a) AUC | p | "
            "(b) train s | (a) train s | recipe train s | (a) file bytes | recipe file bytes | table rows |",
            "|---|" + "---:|" * 15]
    for day in days:
        auc, p, sec = day["auc"], day["p_vs_b"], day["train_seconds"]
        rows.append(f"| day {day['tested_on']} | {auc['b']:.5f} | {auc['a']:.5f} | {auc['a'] - auc['b']:+.5f} | "
                    f"{p['a']:.2g} | {auc['c']:.5f} | {auc['c'] - auc['b']:+.5f} | {p['c']:.2g} | {auc['r']:.5f} | "
                    f"{p['r']:.2g} | {sec['b']:,.0f} | {sec['a']:,.0f} | {sec['r']:,.0f} | {day['bytes']['a']:,} | "
                    f"{day['bytes']['r']:,} | {day['vocabulary']:,} |")
    total_a = sum(day["train_seconds"]["a"] for day in days)  # day 1's from-scratch run counts for both
    total_b = sum(day["train_seconds"]["b"] for day in days)
    own = [day for day in days if day["runs"]["a"] != day["runs"]["b"]] or days  # day 1's model is all three
    within = all(day["auc"]["a"] >= day["auc"]["b"] - 0.001 for day in own)
    when = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({(time.perf_counter() - started) / 60:.0f} min)"
    checks = [
        f"(a) within 0.001 of (b)'s next-day AUC on every day: **{'yes' if within else 'no'}** "
        f"(from day {own[0]['tested_on']}, where they differ: worst {min(day['auc']['a'] - day['auc']['b'] for day in own):+.5f}).",
        f"(a)'s training time over the days: {total_a:,.0f} s against (b)'s {total_b:,.0f} s = "
        f"**{total_a / total_b:.3f}** of it (target at most 0.25; day 1's run counts in both).",
        f"(c), the day-1 model, is {own[0]['auc']['c'] - own[0]['auc']['b']:+.5f} AUC from (b) on day {own[0]['tested_on']} "
        f"and {own[-1]['auc']['c'] - own[-1]['auc']['b']:+.5f} on day {own[-1]['tested_on']}: what staleness costs. The recipe's "
        f"model under (a) keeps the rows its day-1 selection chose, and every later value reads its field's OOV row: "
        f"{own[-1]['auc']['r'] - own[-1]['auc']['b']:+.5f} from (b) on day {own[-1]['tested_on']}, at "
        f"{own[-1]['bytes']['r']:,} bytes against (a)'s {own[-1]['bytes']['a']:,}.",
    ]
    partial = "" if days[-1]["tested_on"] == args.days else f" **Partial: the run has reached day {days[-1]['tested_on']}.**"
    return "\n".join([
        TITLE, "", f"Written by `make bench-daily` on {when}; machine: {machine()}.{partial} {args.days} days of {args.rows:,} "
        f"generated Avazu-profile rows, drift {args.drift:g} (that share of each field's values replaced per day); the "
        "model trained through day k is scored on every raw row of day k+1 through its edge file; DeLong p against (b).",
        "", *rows, "", *(f"- {c}" for c in checks), "", f"![next-day AUC by day]({PLOT.name})", "",
        "| step | seconds | peak memory MB | load (1 min) after it |", "|---|---:|---:|---:|", *d.sec.rows, "",
        f"_{load_note()} at the end._", ""])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--drift", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    simulate(Daily(args), started)
    print(f"wrote the {TITLE.lstrip('# ')} section of {args.out}")


if __name__ == "__main__":
    main()
