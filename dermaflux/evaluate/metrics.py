"""Classification metrics in plain numpy (the definitions scikit-learn uses), and seed summaries.

Conventions follow scikit-learn so numbers compare with published work: macro-F1 averages over
the labels present in y_true or y_pred; balanced accuracy is the mean recall over labels present
in y_true; AUROC is the Mann-Whitney statistic with ties counted half, macro one-vs-rest over
classes that have both positives and negatives in y_true.

Two-class tasks also get a decision threshold chosen on the validation split (Youden's J), at
which the test sets' balanced accuracy, sensitivity and specificity are taken (`score_test_set`);
the argmax figures stay beside them. The paired statistics between cells live in stats.py/paired.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dermaflux.evaluate import stats

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


def choose_threshold(val_y: np.ndarray, val_score: np.ndarray) -> float:
    """The decision threshold on P(positive) that maximises Youden's J (sensitivity + specificity - 1,
    i.e. balanced accuracy) on the validation split; 0.5 when val lacks a class. Predict positive
    when score >= threshold; a tie in J goes to the threshold nearest 0.5."""
    val_y = np.asarray(val_y).astype(bool)
    if val_y.all() or not val_y.any():
        return 0.5
    candidates = np.unique(np.asarray(val_score, dtype=np.float64))
    predicted = val_score[None, :] >= candidates[:, None]  # (thresholds, images)
    sensitivity = (predicted & val_y).sum(1) / val_y.sum()
    specificity = (~predicted & ~val_y).sum(1) / (~val_y).sum()
    youden = sensitivity + specificity - 1
    best = np.flatnonzero(np.isclose(youden, youden.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def binary_metrics_at(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, balanced accuracy, accuracy and F1 when predicting score >= threshold."""
    y_true = np.asarray(y_true).astype(bool)
    predicted = np.asarray(score) >= threshold
    tp, tn = int((predicted & y_true).sum()), int((~predicted & ~y_true).sum())
    fp, fn = int((predicted & ~y_true).sum()), int((~predicted & y_true).sum())
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    present = [v for v in (sensitivity, specificity) if not math.isnan(v)]
    return {
        "sensitivity": sensitivity, "specificity": specificity,
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "accuracy": (tp + tn) / max(1, len(y_true)),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }


def score_test_set(y_true: np.ndarray, probs: np.ndarray, classes, threshold: float | None) -> dict:
    """The metrics of one test set. AUROC is the primary metric. Two classes: balanced accuracy,
    sensitivity and specificity at `threshold` (chosen on val); more: at the argmax. The argmax
    figures of `classification_metrics` are kept beside them under their old names."""
    base = classification_metrics(y_true, probs, classes)
    out = {**base, "auroc": base["macro_auroc"], "balanced_accuracy_argmax": base["balanced_accuracy"],
           "threshold": threshold, "sensitivity": None, "specificity": None}
    if len(classes) == 2 and threshold is not None:
        at = binary_metrics_at(np.asarray(y_true) == 1, probs[:, 1], threshold)
        out.update(balanced_accuracy=at["balanced_accuracy"], accuracy=at["accuracy"], sensitivity=at["sensitivity"],
                   specificity=at["specificity"])
        out["per_class_recall"] = {classes[0]: at["specificity"], classes[1]: at["sensitivity"]}
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return float("nan"), None
    # Sample std (ddof=1) over seeds; a single seed has no spread to estimate (None, never 0).
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else None


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: the key `score_test_set` writes, its name in words, its column
    head in the report, and - when the grid compares it pairwise - what the bootstrap resamples
    (`paired_input`: the class probabilities or the predicted class) with which weighted form."""

    key: str
    name: str
    column: str
    in_report: bool = True  # a column of the report's summary table
    paired_input: Literal["probs", "predicted"] | None = None  # None: not compared pairwise
    weighted: stats.WeightedMetric | None = None


# The one metric table: the seed summary, results.json, the paired statistics, the report's columns and
# the plots all read it. The first paired metric is the primary one (verdicts, DeLong, resolvable difference).
METRICS = (
    Metric("auroc", "AUROC", "AUROC", paired_input="probs", weighted=stats.weighted_macro_auroc),
    Metric("balanced_accuracy", "balanced accuracy", "bal. acc.", paired_input="predicted",
           weighted=stats.weighted_balanced_accuracy),
    Metric("sensitivity", "sensitivity", "sensitivity"),
    Metric("specificity", "specificity", "specificity"),
    Metric("accuracy", "accuracy", "accuracy", in_report=False),
    Metric("macro_f1", "macro-F1", "macro-F1", in_report=False),
)
BY_KEY = {m.key: m for m in METRICS}
SUMMARY_METRICS = tuple(m.key for m in METRICS)
PAIRED_METRICS = tuple(m for m in METRICS if m.paired_input is not None)
REPORT_METRICS = tuple(m for m in METRICS if m.in_report)
PRIMARY = PAIRED_METRICS[0].key


def class_counts(cells: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """{(task, test set): {class: images}} from the cells' scored test sets (the same test rows for
    every cell of a task). Cells written before the counts were recorded give nothing."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for cell in cells:
        for name, scored in cell["test_sets"].items():
            if "label_counts" in scored:
                out.setdefault((cell["task"], name), dict(zip(cell["classes"], scored["label_counts"])))
    return out


def not_scorable(cells: list[dict], min_per_class: int) -> list[dict]:
    """The (task, test set) pairs a task cannot score: fewer than two classes with at least
    `min_per_class` images each (e.g. a melanoma-only external set under the binary task holds
    malignant rows alone). Such a pair gets no metric, Δ, p-value or verdict; this list says why."""
    left_out = {(c["task"], name): s.get("left_out", 0) for c in cells for name, s in c["test_sets"].items()}
    out = []
    for (task, test_set), counts in sorted(class_counts(cells).items()):
        if sum(n >= min_per_class for n in counts.values()) < 2:
            out.append({"task": task, "test_set": test_set, "counts": counts, "images": sum(counts.values()),
                        "left_out": left_out[(task, test_set)], "min_per_class": min_per_class})
    return out


def _group_key(cell: dict, test_set: str) -> tuple:
    return (cell["task"], cell["model"], cell["real_size"], cell.get("arm", "synthetic"), cell["synthetic_only"],
            cell["ratio"], test_set)


def summarise(cells: list[dict], unscorable: list[dict] = ()) -> list[dict]:
    """Mean and sample std over seeds per (task, model, real size, arm, ratio, test set), with the
    actual training-set make-up (synthetic images really added, and their class mix). A pair in
    `unscorable` (see `not_scorable`) keeps its row and counts but no metric (NaN, no spread)."""
    skip = {(u["task"], u["test_set"]) for u in unscorable}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for cell in cells:
        for name, scored in cell["test_sets"].items():
            groups[_group_key(cell, name)].append((cell, scored))
    rows = []
    # Reading order: internal test set first; per size real-only, then the synthetic ratios, then the controls.
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[6] != "internal", k[6], k[2], k[4], k[3] != "synthetic",
                                             k[3], k[5])):
        members = groups[key]
        task, model, real_size, arm, synthetic_only, ratio, test_set = key
        cells_ = [c for c, _ in members]
        row = {
            "task": task, "model": model, "real_size": real_size, "arm": arm, "synthetic_only": synthetic_only,
            "ratio": ratio, "test_set": test_set, "seeds": len(members), "fraction": cells_[0].get("fraction"),
            "test_images": members[0][1]["images"], "left_out": members[0][1]["left_out"],
            "train_real": float(np.mean([c["train_real"] for c in cells_])),
            "train_synthetic": float(np.mean([c["train_synthetic"] for c in cells_])),
            "synthetic_wanted": float(np.mean([c.get("synthetic_wanted", c["train_synthetic"]) for c in cells_])),
            "synthetic_shortfall": float(np.mean([c.get("synthetic_shortfall", 0) for c in cells_])),
            "real_class_mix": _class_share(cells_, "train_real_label_counts"),
            "synthetic_class_mix": _class_share(cells_, "train_synthetic_label_counts"),
            "optimizer_steps": sorted({c["training"].get("optimizer_steps") for c in cells_}, key=str),
        }
        row["scorable"] = (task, test_set) not in skip
        for metric in SUMMARY_METRICS:
            values = [s["metrics"].get(metric) for _, s in members] if row["scorable"] else []
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        recalls: dict[str, list[float]] = defaultdict(list)
        for _, scored in members if row["scorable"] else ():
            for name, value in scored["metrics"]["per_class_recall"].items():
                recalls[name].append(value)
        row["per_class_recall_mean"] = {name: _mean_std(v)[0] for name, v in recalls.items()}
        rows.append(row)
    return rows


def _class_share(cells: list[dict], field: str) -> dict[str, float]:
    """Share of each label among the images of `field` (label counts), pooled over the seeds."""
    total: dict[str, int] = defaultdict(int)
    for cell in cells:
        for label, count in (cell.get(field) or {}).items():
            total[label] += count
    n = sum(total.values())
    return {label: count / n for label, count in sorted(total.items())} if n else {}
