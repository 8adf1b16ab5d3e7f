"""Classification metrics in plain numpy (the definitions scikit-learn uses), and seed summaries.

Conventions follow scikit-learn so numbers compare with published work: macro-F1 averages over
the labels present in y_true or y_pred; balanced accuracy is the mean recall over labels present
in y_true; AUROC is the Mann-Whitney statistic with ties counted half, macro one-vs-rest over
classes that have both positives and negatives in y_true.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] | list[str]) -> dict:
    """Metrics of predicted class probabilities `probs` (N, C) against integer labels `y_true`."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    n_classes = probs.shape[1]
    recall, f1 = {}, {}
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        support = int(np.sum(y_true == c))
        predicted = int(np.sum(y_pred == c))
        if support:
            recall[c] = tp / support
        if support or predicted:
            precision_c = tp / predicted if predicted else 0.0
            recall_c = tp / support if support else 0.0
            f1[c] = 0.0 if precision_c + recall_c == 0 else 2 * precision_c * recall_c / (precision_c + recall_c)
    if n_classes == 2:
        auroc = binary_auroc(y_true == 1, probs[:, 1])
    else:
        per_class = [binary_auroc(y_true == c, probs[:, c]) for c in range(n_classes)]
        per_class = [a for a in per_class if not math.isnan(a)]
        auroc = float(np.mean(per_class)) if per_class else float("nan")
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else float("nan"),
        "macro_f1": float(np.mean(list(f1.values()))) if f1 else float("nan"),
        "macro_auroc": auroc,
        "per_class_recall": {classes[c]: recall[c] for c in sorted(recall)},
        "n": int(len(y_true)),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return float("nan"), float("nan")
    # Sample std (ddof=1) over seeds; a single seed has no spread to report.
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def summarise(cells: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (task, model, real size, ratio, synthetic_only), plus the gain over real-only."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        key = (cell["task"], cell["model"], cell["real_size"], cell["ratio"], cell["synthetic_only"])
        groups[key].append(cell)
    rows = []
    for key, members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][4], kv[0][3])):
        task, model, real_size, ratio, synthetic_only = key
        row = {
            "task": task, "model": model, "real_size": real_size, "ratio": ratio,
            "synthetic_only": synthetic_only, "seeds": len(members),
            "train_real": members[0]["train_real"], "train_synthetic": members[0]["train_synthetic"],
            "fraction": members[0].get("fraction"),
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([m["metrics"][metric] for m in members])
        recalls: dict[str, list[float]] = defaultdict(list)
        for m in members:
            for name, value in m["metrics"]["per_class_recall"].items():
                recalls[name].append(value)
        row["per_class_recall_mean"] = {name: _mean_std(v)[0] for name, v in recalls.items()}
        rows.append(row)
    baseline = {
        (r["task"], r["model"], r["real_size"]): r for r in rows if r["ratio"] == 0 and not r["synthetic_only"]
    }
    for row in rows:
        base = baseline.get((row["task"], row["model"], row["real_size"]))
        for metric in METRICS:
            row[f"{metric}_gain"] = (
                row[f"{metric}_mean"] - base[f"{metric}_mean"] if base is not None else float("nan")
            )
    return rows
