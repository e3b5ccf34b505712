"""Exact, whole-split CTR metrics in NumPy.

AUC is computed from ranks over every scored row (ties get their average rank), never averaged over
batches: a batch average is biased and its error does not shrink with more data.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

RELIABILITY_BINS = 10  # equal-count bins of the reliability diagram


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    ranks = np.empty_like(values)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _classes(labels: np.ndarray) -> tuple[np.ndarray, int, int]:
    labels = np.asarray(labels).astype(bool, copy=False)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    return labels, n_pos, n_neg


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > random negative), ties counting 1/2."""
    labels, n_pos, n_neg = _classes(labels)
    ranks = midranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def delong(labels: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several scorings of the same rows and their DeLong covariance matrix (DeLong et al.
    1988, with the midrank computation of Sun & Xu 2014: O(n log n) per model)."""
    labels, m, n = _classes(labels)
    aucs, v10, v01 = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        pos, neg = s[labels], s[~labels]
        whole = midranks(np.r_[pos, neg])
        tx, ty = midranks(pos), midranks(neg)
        aucs.append((whole[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((whole[:m] - tx) / n)  # per positive: share of negatives it beats
        v01.append(1.0 - (whole[m:] - ty) / m)  # per negative: share of positives that beat it
    cov = np.atleast_2d(np.cov(np.array(v10), ddof=1)) / m + np.atleast_2d(np.cov(np.array(v01), ddof=1)) / n
    return np.array(aucs), cov


def auc_interval(labels: np.ndarray, scores: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, low, high): a normal interval with the DeLong variance, clipped to [0, 1]."""
    aucs, cov = delong(labels, scores)
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * math.sqrt(max(cov[0, 0], 0.0))
    return float(aucs[0]), max(0.0, float(aucs[0]) - half), min(1.0, float(aucs[0]) + half)


def delong_test(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Is AUC(a) different from AUC(b) on the same rows? Two-sided DeLong z test."""
    aucs, cov = delong(labels, a, b)
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    z = diff / math.sqrt(var) if var > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "z": z,
            "p_value": math.erfc(abs(z) / math.sqrt(2.0))}


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Logloss divided by the logloss of always predicting the observed CTR (He et al., 2014)."""
    ctr = float(np.mean(labels))
    return logloss(labels, probs) / logloss(labels, np.full(len(labels), ctr))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted CTR over observed CTR: 1.0 is calibrated, above 1 over-predicts clicks."""
    return float(np.mean(probs) / np.mean(labels))


def one_class_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """What is still defined when every label is the same: logloss and calibration (AUC needs a
    positive and a negative; NE divides by the entropy of the base rate, which is 0)."""
    return {"auc": None, "logloss": logloss(labels, probs), "ne": None, "calibration": calibration(labels, probs),
            "rows": float(len(labels))}


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every whole-split metric the training loop reports."""
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration": calibration(labels, probs),
        "rows": float(len(labels)),
    }


GROUP_SIZES = (1, 2, 10, 100, 1000)  # lower edges of the group-size buckets of the breakdown


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Group AUC: the AUC of each group (a user, a device) that has both classes, averaged with
    weights equal to the group's impressions; what online metrics per user align with. Also the
    groups skipped for having one class, and the same figures by group size. Exact (midranks within
    a group for tied scores) and vectorised: one sort of (group, score) for every group at once."""
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((scores, codes))
    g, s, y = codes[order], np.asarray(scores)[order], np.asarray(labels, dtype=np.float64)[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    group = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]  # a run: equal scores within one group
    run = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], s.size]
    midrank = run_start - group_start[group[run_start]] + (run_end - run_start + 1) / 2.0
    n = np.bincount(group).astype(np.float64)
    n_pos = np.bincount(group, weights=y)
    n_neg = n - n_pos
    rank_sum = np.bincount(group, weights=midrank[run] * y)
    both = (n_pos > 0) & (n_neg > 0)
    aucs = np.full(n.size, np.nan)
    aucs[both] = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])

    def summary(mask: np.ndarray) -> dict[str, Any]:
        scored = mask & both
        weight = n[scored].sum()
        return {"groups": int(mask.sum()), "groups_scored": int(scored.sum()), "impressions": int(n[mask].sum()),
                "group_auc": float((n[scored] * aucs[scored]).sum() / weight) if weight else None}

    edges = [*GROUP_SIZES, np.inf]
    by_size = [{"size": f"{low}" if high == low + 1 else f"{low}+" if high == np.inf else f"{low}-{int(high) - 1}",
                **summary((n >= low) & (n < high))} for low, high in zip(edges[:-1], edges[1:])]
    return {**summary(np.ones(n.size, dtype=bool)), "groups_skipped_one_class": int((~both).sum()), "by_size": by_size}



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
