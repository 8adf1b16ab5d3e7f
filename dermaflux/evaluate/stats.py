"""Paired statistics of the grid, in pure numpy/scipy (no torch, no Ray, no files).

- `weighted_auroc`, `weighted_balanced_accuracy`: the metrics under bootstrap weights, all
  resamples at once (a resample is a vector of image counts, so no image array is copied).
- `paired_bootstrap`: the difference treatment - baseline of a metric, averaged over seeds,
  with a percentile CI from resampling test images (within each class) and seeds together.
- `delong`: AUROCs of several score vectors on one test set and their covariance (DeLong et al.
  1988, the fast midrank form of Sun & Xu 2014); `delong_paired_difference` adds the seeds.
- `holm`, `benjamini_hochberg`: multiple-comparison adjusted p-values.
- `resolvable_difference`: the smallest true difference a test with this standard error would
  detect (two-sided alpha, given power).
- `agreement`: observed vs chance agreement and Cohen's kappa of two labelings.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

# Metric under bootstrap weights: (targets (n,), prediction of one model, weights (B, n)) -> (B,)
WeightedMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def weighted_auroc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (ties count half) where image i counts weights[b, i] times in resample b; (B,) values.

    With integer weights this is exactly the Mann-Whitney AUROC of the resampled test set."""
    positive = np.asarray(positive, dtype=bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    pos, w = positive[order], weights[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]  # one group per distinct score
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    pairs = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w_pos * (neg_below + 0.5 * w_neg)).sum(1) / pairs


def weighted_macro_auroc(targets: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC averaged over the classes that have positives and negatives; (B,)."""
    targets = np.asarray(targets)
    if probs.shape[1] == 2:
        return weighted_auroc(targets == 1, probs[:, 1], weights)
    per_class = [weighted_auroc(targets == c, probs[:, c], weights) for c in range(probs.shape[1])
                 if 0 < (targets == c).sum() < len(targets)]
    return np.mean(per_class, axis=0)


def weighted_balanced_accuracy(targets: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in `targets`, images weighted; (B,)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    recalls = []
    for c in np.unique(targets):
        in_class = targets == c
        recalls.append((weights * (in_class & (predicted == c))).sum(1) / (weights * in_class).sum(1))
    return np.mean(recalls, axis=0)


def stratified_weights(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) image counts: each stratum (class) resampled with replacement to its own size,
    so every resample keeps the class counts (an AUROC needs both classes)."""
    strata = np.asarray(strata)
    weights = np.zeros((n_boot, len(strata)))
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_boot)
    return weights


@dataclass(frozen=True)
class PairedResult:
    """A paired difference treatment - baseline, averaged over seeds."""

    delta: float  # observed mean difference over seeds
    ci_low: float
    ci_high: float
    se: float  # bootstrap standard error of the mean difference
    p_value: float  # two-sided, normal approximation delta / se (not limited to 1 / n_boot)
    p_percentile: float  # two-sided, from the share of resamples on the other side of 0
    per_seed: list[float]
    seeds: int
    n_boot: int

    def to_dict(self) -> dict:
        return {"delta": self.delta, "ci": [self.ci_low, self.ci_high], "se": self.se, "p_value": self.p_value,
                "p_percentile": self.p_percentile, "per_seed": self.per_seed, "seeds": self.seeds,
                "n_boot": self.n_boot}


def paired_bootstrap(targets: np.ndarray, baseline: list, treatment: list, metric: WeightedMetric, *,
                     n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> PairedResult:
    """Mean over seeds s of metric(treatment[s]) - metric(baseline[s]) on one test set, with a
    percentile CI and p-value from resampling test images (stratified by target) and seeds together.

    baseline[s] and treatment[s] are the predictions of seed s's pair on the same images; the
    same image resample is applied to both arms and all seeds (that is what makes it paired)."""
    if len(baseline) != len(treatment) or not baseline:
        raise ValueError(f"paired_bootstrap: {len(baseline)} baseline vs {len(treatment)} treatment seeds")
    rng = np.random.default_rng(seed)
    seeds = len(baseline)
    ones = np.ones((1, len(targets)))
    per_seed = [float(metric(targets, t, ones)[0] - metric(targets, b, ones)[0]) for b, t in zip(baseline, treatment)]
    image_w = stratified_weights(targets, n_boot, rng)
    deltas = np.stack([metric(targets, t, image_w) - metric(targets, b, image_w) for b, t in zip(baseline, treatment)])
    seed_w = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=n_boot) / seeds  # (B, S)
    boot = (seed_w * deltas.T).sum(1)
    boot = boot[np.isfinite(boot)]
    if len(boot) < 2:  # e.g. an AUROC on a test set holding one class only: nothing to estimate
        nan = float("nan")
        return PairedResult(float(np.mean(per_seed)), nan, nan, nan, nan, nan, per_seed, seeds, 0)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    delta, se = float(np.mean(per_seed)), float(boot.std(ddof=1))
    # Percentile p: how often the resampled difference falls on the other side of 0 (+1: never exactly 0);
    # it cannot go below 2 / n_boot, too coarse for a Holm family, hence the normal p beside it.
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    p_percentile = min(1.0, 2 * (tail + 1) / (len(boot) + 1))
    p_value = float(2 * sps.norm.sf(abs(delta) / se)) if se > 0 else (1.0 if delta == 0 else 0.0)
    return PairedResult(delta, float(low), float(high), se, p_value, p_percentile, per_seed, seeds, int(len(boot)))


def delong(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the k score rows `scores` (k, n) and their (k, k) covariance over test-set
    sampling (DeLong, DeLong & Clarke-Pearson 1988; midrank algorithm of Sun & Xu 2014)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 positives and >= 2 negatives, got {m} and {n}")
    tx = sps.rankdata(x, axis=1)
    ty = sps.rankdata(y, axis=1)
    tz = sps.rankdata(np.hstack([x, y]), axis=1)
    aucs = tz[:, :m].sum(1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negatives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def delong_paired_difference(positive: np.ndarray, baseline: np.ndarray, treatment: np.ndarray,
                             alpha: float = 0.05) -> dict:
    """Mean over seeds of AUROC(treatment[s]) - AUROC(baseline[s]) (score rows (S, n)) with a normal
    CI and p-value. Variance = DeLong's test-sampling variance of the contrast (all 2S models
    jointly) + the seed-to-seed variance of the per-seed differences / S (none with one seed)."""
    seeds = len(baseline)
    aucs, cov = delong(positive, np.vstack([baseline, treatment]))
    contrast = np.r_[np.full(seeds, -1.0 / seeds), np.full(seeds, 1.0 / seeds)]
    per_seed = aucs[seeds:] - aucs[:seeds]
    var_test = float(contrast @ cov @ contrast)
    var_seeds = float(np.var(per_seed, ddof=1) / seeds) if seeds > 1 else 0.0
    se = float(np.sqrt(max(var_test + var_seeds, 0.0)))
    delta = float(per_seed.mean())
    z = sps.norm.ppf(1 - alpha / 2)
    p_value = float(2 * sps.norm.sf(abs(delta) / se)) if se > 0 else (1.0 if delta == 0 else 0.0)
    return {"delta": delta, "ci": [delta - z * se, delta + z * se], "se": se, "p_value": p_value,
            "se_test_images": float(np.sqrt(max(var_test, 0.0))),
            "se_seeds": float(np.sqrt(var_seeds)) if seeds > 1 else None}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false-discovery-rate control)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


ADJUSTMENTS = {"holm": holm, "benjamini-hochberg": benjamini_hochberg}


def resolvable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided level-`alpha` test with standard error `se` detects
    with probability `power` (normal approximation: (z_{1-alpha/2} + z_power) * se)."""
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)


def agreement(requested, measured) -> dict:
    """Observed agreement, the agreement expected by chance from the two marginals, and Cohen's
    kappa = (observed - chance) / (1 - chance): 0 at chance, 1 when every pair agrees."""
    requested, measured = np.asarray(requested, dtype=object), np.asarray(measured, dtype=object)
    n = len(requested)
    if n == 0:
        return {"n": 0, "agreement": None, "chance": None, "kappa": None}
    observed = float(np.mean(requested == measured))
    values = set(requested.tolist()) | set(measured.tolist())
    chance = float(sum(np.mean(requested == v) * np.mean(measured == v) for v in values))
    kappa = (observed - chance) / (1 - chance) if chance < 1 else float("nan")
    return {"n": int(n), "agreement": observed, "chance": chance, "kappa": float(kappa)}


def kappa_interval(requested, measured, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of Cohen's kappa over images."""
    requested, measured = np.asarray(requested, dtype=object), np.asarray(measured, dtype=object)
    if len(requested) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(requested), len(requested))
        values.append(agreement(requested[pick], measured[pick])["kappa"])
    values = np.array(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.quantile(values, [alpha / 2, 1 - alpha / 2])]
