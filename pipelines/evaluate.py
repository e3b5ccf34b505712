"""Offline evaluation: score models on held-out Parquet, exact metrics with DeLong intervals, a report.

Models are exported edge files (``.pt`` with their manifest) or run directories / checkpoints. The
data is streamed in Parquet record batches; what stays in memory is one score per row and model, the
labels, and the values of the fields asked for per-slice AUC. Outputs: ``metrics.json`` (with the
models' and the data's sha256) and ``report.html`` (ROC curves, reliability diagram, score
histograms, and the size-vs-AUC chart of a compression recipe's stages, as embedded PNGs).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from common.atomic import atomic_write, atomic_write_text, ensure_writable
from common.digest import sha256_file
from common.errors import DataError, one_line
from common.json_lines import read_json_lines
from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import model_size, plain_model
from ctr.loader import make_batch, stack_columns
from ctr.metrics import auc, auc_interval, classification_metrics, delong_test, group_auc, one_class_metrics
from ctr.run_dir import STAGE_CHECKPOINT, RunDir
from deploy.export import manifest_path, open_edge, prepared_scorer, resolve_source
from deploy.raw_rows import is_raw, raw_batches
from features.feature_map import FeatureMap
from features.schema import Layout
from features.vocab import OOV_ID

log = logging.getLogger("ctr.evaluate")

RELIABILITY_BINS = 10
BATCH_ROWS = 65536
ROC_POINTS = 512


@dataclass
class Scorer:
    """One model to evaluate: what it reads, how it scores a batch of columns, what it weighs."""

    name: str
    path: Path
    sha256: str
    bytes: int
    ids: list[str]
    dense: list[str]
    label: str
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (dense [B, D], ids [B, F]) -> probabilities
    raw: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # an edge file's (numbers, keys) -> probabilities
    layout: Layout | None = None  # the raw rows an edge file reads
    recipe: list[dict[str, Any]] = field(default_factory=list)  # the run's compression report, if any


def _recipe(run: RunDir) -> list[dict[str, Any]]:
    return read_json_lines(run.report)


def load_scorer(path: Path) -> Scorer:
    """An exported file (checked against its manifest), or a run directory / checkpoint file."""
    if path.is_file() and manifest_path(path).is_file():
        model, manifest = open_edge(path)
        inputs = manifest["inputs"]
        prepared = prepared_scorer(path, model, manifest)

        def edge(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return prepared(torch.from_numpy(dense), torch.from_numpy(ids)).numpy()

        def raw(numbers: np.ndarray, keys: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(numbers), torch.from_numpy(keys)).numpy()

        return Scorer(path.name, path, manifest["file_sha256"], manifest["file_bytes"], inputs["ids"], inputs["dense"],
                      inputs["label"], edge, raw=raw, layout=Layout.model_validate(
                          {k: inputs[k] for k in ("separator", "header", "columns")}),
                      recipe=_recipe(RunDir(path.parent / manifest["source"]["run_dir"])))
    run, checkpoint = resolve_source(path, None)
    fmap = FeatureMap.load(run.root)
    payload = load_checkpoint(checkpoint)
    net = plain_model(fmap, payload)
    keys = [f.name for f in fmap.categorical]
    vocab = np.array([int(f.num_embeddings or 0) for f in fmap.categorical], dtype=np.int64)

    def plain(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.where((ids >= 0) & (ids < vocab), ids, OOV_ID)  # as the exported model: unknown ids read OOV
        batch = make_batch(keys, torch.from_numpy(ids.T.copy()), torch.from_numpy(dense), torch.zeros(len(ids)))
        with torch.no_grad():
            return torch.sigmoid(net(batch.dense, batch.sparse)[0]).numpy()

    name = checkpoint.parent.name if checkpoint.name == STAGE_CHECKPOINT else f"{run.root.name}/{checkpoint.stem}"
    return Scorer(name, checkpoint, sha256_file(checkpoint), sum(model_size(fmap, run.prepared_data(), net)[1].values()), keys,
                  [f.name for f in fmap.dense], fmap.label, plain, _recipe(run))


def score_raw(path: Path, scorers: list[Scorer], fields: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(labels, scores per model) of a raw log, read once for every model: each must be an edge file
    (its transforms and vocabulary inside) of the same raw layout."""
    for s in scorers:
        if s.raw is None or s.layout is None:
            raise DataError(f"{path}: a raw log is scored by edge files; {s.path} is a run or checkpoint (export it "
                            "with ctr export, or score the prepared split)")
        if s.layout != scorers[0].layout:
            raise DataError(f"{path}: models {scorers[0].path} and {s.path} read different raw layouts (score each alone)")
    if fields:
        raise DataError(f"{path}: slices and groups read prepared splits; a raw log gives none (score the prepared split)")
    labels, scores = [], [[] for _ in scorers]
    for batch in raw_batches(path, scorers[0].layout):
        labels.append(batch.labels)
        for out, s in zip(scores, scorers):
            out.append(s.raw(batch.numbers, batch.keys).astype(np.float32))
    if not labels:
        raise DataError(f"{path}: the file has no rows")
    return np.concatenate(labels), [np.concatenate(s) for s in scores]


def parquet_files(data: Path) -> list[Path]:
    """The file itself, or every ``*.parquet`` of a directory in name order (the row order used)."""
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data] if data.is_file() else []
    if not files:
        raise DataError(f"{data}: no such Parquet file, or a directory without *.parquet files (check the path)")
    return files


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({one_line(exc, 160)}) "
                        "(give a Parquet file, e.g. a split written by ctr prepare)") from None


def check_types(path: Path, schema: pa.Schema, scorer: Scorer, label: str | None) -> None:
    """Ids must be integers (a float id would be truncated, a string one has no row), dense
    features and the label numbers."""
    for c in scorer.ids:
        kind = schema.field(c).type
        if not pa.types.is_integer(kind):
            raise DataError(f"{path}: column '{c}' holds {kind}, but the model reads integer ids from the feature map "
                            "(prepare the raw data with ctr prepare, which encodes the values)")
    for c in [*scorer.dense, *([label] if label else [])]:
        kind = schema.field(c).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise DataError(f"{path}: column '{c}' holds {kind}, not numbers (prepare the data with ctr prepare)")


def check_values(path: Path, batch: pa.RecordBatch, seen: int, scorer: Scorer, label: str | None) -> np.ndarray | None:
    """No missing value in what the model reads; labels 0 or 1. Returns the labels (if any)."""
    for c in [*scorer.ids, *scorer.dense, *([label] if label else [])]:
        column = batch.column(c)
        if column.null_count:
            row = seen + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row}: column '{c}' is empty (null) (fill it, or drop the row)")
    if label is None:
        return None
    y = batch.column(label).to_numpy(zero_copy_only=False)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(f"{path}: row {seen + int(np.flatnonzero(bad)[0])}: label {y[bad][0].item()} is not 0 or 1 "
                        "(labels are clicks: 0 or 1)")
    return y


def data_hash(files: list[Path]) -> str:
    """The file's sha256; for several files, the sha256 of their names and sha256s in order."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def check_columns(files: list[Path], scorers: list[Scorer], slices: list[str]) -> list[str]:
    """The columns to read; every file must hold what every model reads, and rows."""
    rows = 0
    for path in files:
        meta = open_parquet(path)
        have = set(meta.schema_arrow.names)
        for s in scorers:
            missing = [c for c in [s.label, *s.dense, *s.ids] if c not in have]
            if missing:
                raise DataError(f"{path}: model {s.path} reads columns {missing} that the file lacks "
                                f"(its feature map does not match this data)")
            check_types(path, meta.schema_arrow, s, s.label)
        unknown = [c for c in slices if c not in have]
        if unknown:
            raise DataError(f"{path}: slice or group field(s) {unknown} are not columns of the file "
                            "(name columns of the data)")
        rows += meta.metadata.num_rows
    if rows == 0:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: the file has no rows")
    return sorted({scorers[0].label, *(c for s in scorers for c in (*s.dense, *s.ids)), *slices})


def score_file(path: Path, scorers: list[Scorer], slices: list[str], columns: list[str],
               batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Per record batch of one file: labels (checked to be 0/1), each model's scores, slice values.
    Both the local stream and each Ray task score a file through this, batch for batch, so their
    scores are the same bits."""
    label, seen = scorers[0].label, 0
    for batch in open_parquet(path).iter_batches(batch_size=batch_size, columns=columns):
        y = check_values(path, batch, seen, scorers[0], label)
        for s in scorers[1:]:
            check_values(path, batch, seen, s, None)
        out = {"label": y.astype(np.float32)}
        for i, s in enumerate(scorers):
            out[f"score_{i}"] = s.score(*stack_columns(_arrow_column(batch), s.ids, s.dense, len(y))).astype(np.float32)
        for c in slices:
            out[f"slice_{c}"] = batch.column(c).to_numpy(zero_copy_only=False)
        seen += len(y)
        yield out


def _arrow_column(batch: pa.RecordBatch) -> Callable[[str], np.ndarray]:
    return lambda name: batch.column(name).to_numpy()


def gather(parts: list[dict[str, np.ndarray]], models: int,
           slices: list[str]) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """(labels, scores per model, slice values) from per-batch parts in row order."""
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    return cat("label"), [cat(f"score_{i}") for i in range(models)], {c: cat(f"slice_{c}") for c in slices}


def _score_stream(files: list[Path], scorers: list[Scorer], slices: list[str], batch_size: int,
                  progress: bool) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    columns = check_columns(files, scorers, slices)
    total = sum(open_parquet(f).metadata.num_rows for f in files)
    parts = []
    with tqdm(total=total, unit="row", unit_scale=True, desc="scoring", disable=not progress) as bar:
        for path in files:
            for part in score_file(path, scorers, slices, columns, batch_size):
                parts.append(part)
                bar.update(len(part["label"]))
    return gather(parts, len(scorers), slices)


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict[str, float]]:
    """Equal-count bins of predicted CTR: mean prediction against observed click rate in each."""
    order = np.argsort(probs, kind="mergesort")
    return [{"rows": int(part.size), "predicted": float(probs[part].mean()), "observed": float(labels[part].mean())}
            for part in np.array_split(order, bins) if part.size]


def slice_aucs(labels: np.ndarray, probs: np.ndarray, values: np.ndarray, top: int) -> list[dict[str, Any]]:
    """AUC for each of the ``top`` most frequent values of a field (None where one class is absent)."""
    uniques, counts = np.unique(values, return_counts=True)
    out = []
    for value in uniques[np.argsort(-counts, kind="mergesort")[:top]]:
        mask = values == value
        y = labels[mask]
        both = 0 < y.sum() < y.size
        out.append({"value": value.item(), "rows": int(mask.sum()), "ctr": float(y.mean()),
                    "auc": auc(y, probs[mask]) if both else None})
    return out


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(labels: np.ndarray, scores: list[np.ndarray], names: list[str], results: list[dict[str, Any]],
           recipe: list[dict[str, Any]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s, r in zip(names, scores, results) if 0 < labels.sum() < labels.size else ():
        order = np.argsort(-s, kind="mergesort")
        tp = np.cumsum(labels[order]) / labels.sum()
        fp = np.cumsum(1 - labels[order]) / (labels.size - labels.sum())
        keep = np.linspace(0, s.size - 1, min(ROC_POINTS, s.size)).astype(int)
        ax.plot(np.r_[0, fp[keep]], np.r_[0, tp[keep]], label=f"{name} (AUC {r['auc']:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (needs both classes)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    plots["ROC curves"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, r in zip(names, results):
        table = r["reliability"]
        ax.plot([b["predicted"] for b in table], [b["observed"] for b in table], marker="o", label=name)
    top = max(max(b["predicted"], b["observed"]) for r in results for b in r["reliability"])
    ax.plot([0, top], [0, top], color="grey", linestyle=":")
    ax.set(xlabel="mean predicted CTR (equal-count bins)", ylabel="observed CTR", title="Reliability")
    ax.legend(fontsize=7)
    plots["Reliability diagram"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in zip(names, scores):
        ax.hist(s, bins=50, range=(0, 1), histtype="step", label=name)
    ax.set(xlabel="predicted click probability", ylabel="rows", title="Score histograms")
    ax.legend(fontsize=7)
    plots["Score histograms"] = _png(fig)
    if len(results) > 1 and all(r["auc"] is not None for r in results):
        plots["Size vs test AUC: the frontier"] = _png(frontier_figure(plt, names, results))
    if recipe:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([line["bytes"] for line in recipe], [line["valid_auc"] for line in recipe], marker="o")
        for line in recipe:
            ax.annotate(line["stage_id"], (line["bytes"], line["valid_auc"]), fontsize=7)
        ax.set(xscale="log", xlabel="model bytes", ylabel="validation AUC", title="Compression recipe: size vs AUC")
        plots["Size vs AUC of the recipe's stages"] = _png(fig)
    plt.close("all")
    return plots


def pareto(points: list[tuple[int, float]]) -> list[int]:
    """Indices of the points no other point beats on both size (fewer bytes) and AUC, smallest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def frontier_figure(plt: Any, names: list[str], results: list[dict[str, Any]]) -> Any:
    """Every model at (file bytes, test AUC) on a log size axis, the first (the reference the DeLong
    tests compare against) as a star, and the Pareto frontier through the models nothing beats."""
    points = [(r["bytes"], r["auc"]) for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([b for b, _ in points[1:]], [a for _, a in points[1:]], zorder=3)
    ax.scatter([points[0][0]], [points[0][1]], marker="*", s=160, color="black", zorder=4, label=f"{names[0]} (reference)")
    front = pareto(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="grey", linestyle="--",
            label="frontier")
    for name, (b, a) in zip(names, points):
        ax.annotate(name, (b, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="model file bytes (log)", ylabel="test AUC", title="Size vs test AUC")
    ax.legend(fontsize=7)
    return fig


def comparison_table(result: dict[str, Any]) -> str:
    """The printed result: the models' table, then group AUC where asked for."""
    groups = group_table(result)
    return "\n".join(model_table(result) + ([""] + groups if groups else []))


def model_table(result: dict[str, Any]) -> list[str]:
    rows = ["| model | bytes | AUC [95% CI] | logloss | NE | calibration | DeLong p vs first |",
            "|---|---:|---|---:|---:|---:|---:|"]
    p_values = {c["model"]: c["p_value"] for c in result["comparisons"]}
    for m in result["models"]:
        low, high = m["auc_ci"]
        p = p_values.get(m["name"])
        shown = "undefined (one class)" if m["auc"] is None else f"{m['auc']:.5f} [{low:.5f}, {high:.5f}]"
        ne = "undefined" if m["ne"] is None else f"{m['ne']:.5f}"
        rows.append(f"| {m['name']} | {m['bytes']:,} | {shown} | {m['logloss']:.5f} | "
                    f"{ne} | {m['calibration']:.4f} | {'' if p is None else f'{p:.3g}'} |")
    return rows


def group_table(result: dict[str, Any]) -> list[str]:
    """Group AUC per model and group field, and by group size (impressions per group)."""
    if not any(m["groups"] for m in result["models"]):
        return []
    rows = ["| model | group field | group AUC | groups scored | groups skipped (one class) | by group size: "
            "size, groups, group AUC |", "|---|---|---:|---:|---:|---|"]
    for m in result["models"]:
        for column, g in m["groups"].items():
            sizes = "; ".join(f"{b['size']}: {b['groups']:,}, {'-' if b['group_auc'] is None else format(b['group_auc'], '.4f')}"
                              for b in g["by_size"] if b["groups"])
            shown = "undefined" if g["group_auc"] is None else f"{g['group_auc']:.5f}"
            rows.append(f"| {m['name']} | {column} | {shown} | {g['groups_scored']:,} | {g['groups_skipped_one_class']:,} "
                        f"| {sizes} |")
    return rows


def _html_table(table: list[str]) -> str:
    """A markdown table (as the command prints it) as HTML."""
    if not table:
        return ""
    head = [c.strip() for c in table[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")


def _html(result: dict[str, Any], plots: dict[str, str]) -> str:
    groups = group_table(result)
    group_html = f"<h2>Group AUC</h2>{_html_table(groups)}" if groups else ""
    figures = "".join(f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{png}'>"
                      f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, png in plots.items())
    slices = "".join(
        f"<h3>{html.escape(m['name'])}: AUC by {html.escape(f)}</h3><table><tr><th>value</th><th>rows</th><th>CTR</th>"
        f"<th>AUC</th></tr>" + "".join(
            f"<tr><td>{s['value']}</td><td>{s['rows']:,}</td><td>{s['ctr']:.4f}</td>"
            f"<td>{'-' if s['auc'] is None else format(s['auc'], '.4f')}</td></tr>" for s in rows) + "</table>"
        for m in result["models"] for f, rows in m["slices"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ctr evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:3px 8px}}table{{border-collapse:collapse}}
figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>Offline evaluation</h1><p>Data: {html.escape(result['data']['path'])} ({result['data']['rows']:,} rows,
sha256 {result['data']['sha256'][:16]}...)</p>
{_html_table(model_table(result))}{group_html}{figures}{slices}
<script>window.addEventListener("load", () => {{
  const shown = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-plots-rendered", String(shown));
}});</script></body></html>
"""


ScoresFrom = Callable[[list[Scorer], list[str]], tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]]


def _per_model_data(datas: list[Path], scorers: list[Scorer], fields: list[str], batch_size: int,
                    progress: bool) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """Scores of each model on its own encoding of the same rows (e.g. data prepared with another
    min count): each distinct data set is streamed once for its models, and every set's labels must
    equal the first's row for row, or the DeLong tests would pair different rows."""
    scores: list[np.ndarray | None] = [None] * len(scorers)
    labels, slice_values = None, {}
    for data in dict.fromkeys(datas):
        mine = [i for i, d in enumerate(datas) if d == data]
        y, got, values = _score_stream(parquet_files(data), [scorers[i] for i in mine], fields if labels is None else [],
                                       batch_size, progress)
        if labels is None:
            labels, slice_values = y, values
        elif not np.array_equal(y, labels):
            raise DataError(f"{data}: its labels differ from those of {datas[0]} (give each model the same test rows, "
                            "prepared with that model's feature map)")
        for i, s in zip(mine, got):
            scores[i] = s
    return labels, scores, slice_values


def evaluate(models: list[Path], data: Path | list[Path], out_dir: Path, slices: list[str] | None = None,
             top_values: int = 10, batch_size: int = BATCH_ROWS, progress: bool = True,
             scores_from: ScoresFrom | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every model on ``data`` (a Parquet file or a directory of them; or one per model: the
    same rows, each encoded by its model's feature map); writes ``metrics.json`` and ``report.html``
    into ``out_dir``. ``slices``: fields to report AUC per value for; ``groups``: fields to report
    group AUC by (a user or device id). ``scores_from``: another scoring backend (the Ray one) in
    place of the local stream, given the scorers and the extra fields to read."""
    datas = data if isinstance(data, list) else [data]
    if len(datas) not in (1, len(models)):
        raise DataError(f"{datas[0]}: {len(datas)} data sets for {len(models)} models (give one, or one per model)")
    if len(set(datas)) > 1 and scores_from is not None:
        raise DataError(f"{datas[0]}: Ray scoring reads one data set (give one --data, or score locally)")
    data = datas[0]
    files = [data] if is_raw(data) else parquet_files(data)
    ensure_writable(out_dir)  # before the scoring, not after it
    scorers = [load_scorer(m) for m in models]
    slices, groups = slices or [], groups or []
    fields = sorted({*slices, *groups})
    if is_raw(data) and len(set(datas)) == 1 and scores_from is None:
        labels, scores = score_raw(data, scorers, fields)
        slice_values: dict[str, np.ndarray] = {}
    elif len(set(datas)) > 1:
        labels, scores, slice_values = _per_model_data(datas, scorers, fields, batch_size, progress)
    elif scores_from is None:
        labels, scores, slice_values = _score_stream(files, scorers, fields, batch_size, progress)
    else:
        check_columns(files, scorers, fields)
        labels, scores, slice_values = scores_from(scorers, fields)
    both = 0 < labels.sum() < labels.size
    if not both:
        log.warning("%s: every label is %d: AUC, its interval, NE and the DeLong tests are undefined; logloss and "
                    "calibration are still reported", data, int(labels[0]))
    results = []
    for s, probs in zip(scorers, scores):
        metrics = classification_metrics(labels, probs) if both else {**one_class_metrics(labels, probs)}
        low, high = auc_interval(labels, probs)[1:] if both else (None, None)
        results.append({"name": s.name, "path": str(s.path), "sha256": s.sha256, "bytes": s.bytes, **metrics,
                        "auc_ci": [low, high], "reliability": reliability(labels, probs),
                        "slices": {c: slice_aucs(labels, probs, slice_values[c], top_values) for c in slices},
                        "groups": {c: group_auc(labels, probs, slice_values[c]) for c in groups}})
    comparisons = [{"model": r["name"], "against": results[0]["name"], **delong_test(labels, probs, scores[0])}
                   for r, probs in zip(results[1:], scores[1:])] if both else []
    result = {"data": {"path": str(data), "files": len(files), "sha256": data_hash(files), "rows": int(labels.size)},
              "models": results, "comparisons": comparisons}
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = next((s.recipe for s in scorers if s.recipe), [])
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / "report.html", _html(result, _plots(labels, scores, [s.name for s in scorers], results, recipe)))
    return result


def score_parquet(model_file: Path, data: Path, out: Path | None, batch_size: int = BATCH_ROWS) -> dict[str, Any]:
    """``ctr score``: a model over a prepared Parquet file, or (an edge file) over a raw log; the
    scores written atomically to ``out``; where the file has labels, logloss, calibration and (with
    both classes) AUC and NE too."""
    scorer = load_scorer(model_file)
    if out is not None:
        ensure_writable(out.parent)
    if is_raw(data):
        labels_raw, (probs_raw,) = score_raw(data, [scorer], [])
        return _score_result(probs_raw, labels_raw, data, out)
    files = parquet_files(data)
    if len(files) != 1:
        raise DataError(f"{data}: ctr score reads one Parquet file and this directory holds {len(files)} "
                        "(score them one at a time, or use ctr evaluate)")
    path = files[0]
    file = open_parquet(path)
    have = set(file.schema_arrow.names)
    missing = [c for c in scorer.dense + scorer.ids if c not in have]
    if missing:
        raise DataError(f"{path}: columns {missing} that the model reads are missing (score data prepared with the "
                        "model's feature map)")
    label = scorer.label if scorer.label in have else None
    check_types(path, file.schema_arrow, scorer, label)
    scores, labels, seen = [], [], 0
    for batch in file.iter_batches(batch_size=batch_size, columns=scorer.dense + scorer.ids + ([label] if label else [])):
        y = check_values(path, batch, seen, scorer, label)
        scores.append(scorer.score(*stack_columns(_arrow_column(batch), scorer.ids, scorer.dense, batch.num_rows)))
        if y is not None:
            labels.append(y.astype(np.float32))
        seen += batch.num_rows
    probs = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    return _score_result(probs, np.concatenate(labels) if labels else None, path, out)


def _score_result(probs: np.ndarray, y: np.ndarray | None, path: Path, out: Path | None) -> dict[str, Any]:
    """The scores written atomically to ``out``; with labels, logloss, calibration, and with both
    classes AUC and NE."""
    result: dict[str, Any] = {"rows": int(probs.size)}
    if out is not None:
        atomic_write(out, lambda fh: pq.write_table(pa.table({"score": probs}), fh))
        result["scores"] = str(out)
    if y is not None and probs.size:
        if 0 < y.sum() < y.size:
            result.update(classification_metrics(y, probs))
        else:
            log.warning("%s: every label is %d: AUC and NE are undefined", path, int(y[0]))
            result.update(one_class_metrics(y, probs))
    return result
