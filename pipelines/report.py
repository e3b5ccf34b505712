"""``ctr evaluate``'s report: the printed tables and ``report.html`` (ROC curves, reliability diagram,
score histograms, the size-vs-AUC frontier with each model's DeLong interval, a recipe's stages), its
plots embedded as PNGs."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

ROC_POINTS = 512


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def report_plots(labels: np.ndarray, scores: list[np.ndarray], names: list[str], results: list[dict[str, Any]],
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
    """Every model at (file bytes, test AUC) on a log size axis, with its AUC's 95% DeLong interval as
    an error bar (so a gap inside the bars reads as noise), the first (the reference the DeLong tests
    compare against) as a star, and the Pareto frontier through the models nothing beats."""
    points = [(r["bytes"], r["auc"]) for r in results]
    below = [a - (r["auc_ci"][0] if r["auc_ci"][0] is not None else a) for (_, a), r in zip(points, results)]
    above = [(r["auc_ci"][1] if r["auc_ci"][1] is not None else a) - a for (_, a), r in zip(points, results)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([b for b, _ in points], [a for _, a in points], yerr=[below, above], fmt="none", ecolor="tab:blue",
                elinewidth=1, capsize=3, zorder=2, label="95% DeLong interval")
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


def report_html(result: dict[str, Any], plots: dict[str, str]) -> str:
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
