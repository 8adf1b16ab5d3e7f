"""Paired comparisons of the grid, from the saved per-image predictions (no training, no Ray).

A comparison is one (task, model, real size, arm, ratio, test set): for every seed, the cell
with added images against the real-only cell of the same seed (same real subset, same init),
scored on the same test images. Beside a matched control, each synthetic cell is also compared
with the matched cell of the same seed and ratio (`against` "matched": the same class mix from
real images). Per comparison, every paired metric of the metric table (metrics.METRICS; AUROC,
the primary one, and balanced accuracy): the difference, mean over seeds, with a paired bootstrap
CI over test images and seeds (stats.paired_bootstrap); for two-class tasks also DeLong's test of
ΔAUROC (plus the seeds' spread), whose p-value is the one adjusted. p-values are adjusted across
the grid (Holm or Benjamini-Hochberg) within a family: the synthetic set against real only, the
synthetic set against the matched control, and the controls, each of one metric, apart. Each
(task, model, test set, size) gets the smallest difference its spread can resolve and, for the
synthetic set, a verdict. A test set a task cannot score (metrics.not_scorable) gets no comparison.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from dermaflux.evaluate import stats
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.controls import BY_NAME as CONTROL_ARMS
from dermaflux.evaluate.controls import MATCHED
from dermaflux.evaluate.data import INTERNAL
from dermaflux.evaluate.metrics import PAIRED_METRICS, PRIMARY

REAL_ONLY = "real only"  # what a comparison's `against` names: the real-only cell, or the MATCHED control


@dataclass
class Arm:
    """One seed's predictions on one test set, aligned by image id."""

    ids: np.ndarray
    targets: np.ndarray
    probs: np.ndarray  # (n, classes)
    threshold: float | None

    def predicted(self) -> np.ndarray:
        if self.probs.shape[1] == 2 and self.threshold is not None:
            return (self.probs[:, 1] >= self.threshold).astype(np.int64)
        return self.probs.argmax(1)


def arm_of(cell: dict, predictions: dict, test_set: str) -> Arm:
    """A cell's predictions on `test_set` (columns as in cells/<id>.parquet), sorted by id."""
    rows = np.array([s == "test" and t == test_set for s, t in zip(predictions["split"], predictions["test_set"])])
    ids = np.asarray(predictions["id"], dtype=object)[rows]
    order = np.argsort(ids)
    probs = np.column_stack([np.asarray(predictions[f"score_{c}"], dtype=np.float64)[rows] for c in cell["classes"]])
    return Arm(ids[order], np.asarray(predictions["target"])[rows][order], probs[order], cell.get("threshold"))


def _scores(arm: Arm, kind: str) -> np.ndarray:
    return arm.probs if kind == "probs" else arm.predicted()


def compare_pair(baseline: list[Arm], treatment: list[Arm], cfg: EvaluateConfig) -> dict:
    """The difference of every paired metric of one comparison (lists aligned by seed)."""
    targets = baseline[0].targets
    for arm in baseline + treatment:
        if not np.array_equal(arm.ids, baseline[0].ids):
            raise ValueError("paired cells were scored on different test images; re-run the grid")
    boot = dict(n_boot=cfg.bootstrap, alpha=cfg.alpha)
    out: dict = {"test_images": int(len(targets))}
    for metric in PAIRED_METRICS:
        result = stats.paired_bootstrap(targets, [_scores(a, metric.paired_input) for a in baseline],
                                        [_scores(a, metric.paired_input) for a in treatment], metric.weighted, **boot)
        out[metric.key] = result.to_dict()
    out["auroc"]["delong"] = None
    if baseline[0].probs.shape[1] == 2 and min((targets == 1).sum(), (targets == 0).sum()) >= 2:
        delong = stats.delong_paired_difference(targets == 1, np.stack([a.probs[:, 1] for a in baseline]),
                                                np.stack([a.probs[:, 1] for a in treatment]), cfg.alpha)
        out["auroc"]["delong"] = delong
        out["auroc"]["p_value"] = delong["p_value"]  # analytic, and it includes the seeds' spread
    return out


def _pairs(cells: list[dict]) -> dict[tuple, list[tuple[dict, dict]]]:
    """{(task, model, size, arm, ratio, against): [(baseline cell, treated cell) per seed]}: every
    cell with added images against its seed's real-only cell, and every synthetic cell against its
    seed's matched control cell at the same ratio."""
    def arm(c: dict) -> str:
        return c.get("arm", "synthetic")

    baseline = {(c["task"], c["model"], c["real_size"], c["seed"]): c for c in cells
                if c["ratio"] == 0 and not c["synthetic_only"] and arm(c) == "synthetic"}
    matched = {(c["task"], c["model"], c["real_size"], c["seed"], c["ratio"]): c for c in cells if arm(c) == MATCHED}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for c in cells:
        if c["ratio"] > 0 and not c["synthetic_only"]:
            key = (c["task"], c["model"], c["real_size"])
            base = baseline.get((*key, c["seed"]))
            if base is not None:
                groups[(*key, arm(c), c["ratio"], REAL_ONLY)].append((base, c))
            twin = matched.get((*key, c["seed"], c["ratio"]))
            if arm(c) == "synthetic" and twin is not None:
                groups[(*key, arm(c), c["ratio"], MATCHED)].append((twin, c))
    return groups


def compare_grid(cells: list[dict], predictions: dict[str, dict], cfg: EvaluateConfig,
                 unscorable: list[dict] = ()) -> list[dict]:
    """Every comparison of the grid, p-values adjusted, each with its resolvable difference; none on
    a (task, test set) pair in `unscorable` (metrics.not_scorable)."""
    skip = {(u["task"], u["test_set"]) for u in unscorable}
    comparisons = []
    for (task, model, size, arm, ratio, against), pairs in sorted(_pairs(cells).items(), key=lambda kv: str(kv[0])):
        pairs = sorted(pairs, key=lambda bc: bc[0]["seed"])
        for test_set in sorted(pairs[0][0]["test_sets"], key=lambda name: (name != INTERNAL, name)):
            if (task, test_set) in skip:
                continue
            base = [arm_of(b, predictions[b["id"]], test_set) for b, _ in pairs]
            treated = [arm_of(t, predictions[t["id"]], test_set) for _, t in pairs]
            comparisons.append({
                "task": task, "model": model, "real_size": size, "arm": arm, "ratio": ratio, "test_set": test_set,
                "against": against, "seeds": [b["seed"] for b, _ in pairs],
                "train_synthetic": float(np.mean([t["train_synthetic"] for _, t in pairs])),
                "synthetic_wanted": float(np.mean([t.get("synthetic_wanted", t["train_synthetic"]) for _, t in pairs])),
                "train_real": float(np.mean([t["train_real"] for _, t in pairs])),
                "synthetic_duplicated": float(np.mean([t.get("synthetic_duplicated", 0) for _, t in pairs])),
                **compare_pair(base, treated, cfg),
            })
    adjust(comparisons, cfg.adjustment)
    resolvable(comparisons, cfg)
    return comparisons


def family(comparison: dict) -> str:
    if comparison["arm"] != "synthetic":
        return "controls"
    return "synthetic" if comparison.get("against", REAL_ONLY) == REAL_ONLY else "synthetic vs matched"


def adjust(comparisons: list[dict], method: str) -> None:
    """Adds p_adjusted to every comparison's metrics, per (family, metric)."""
    for fam in {family(c) for c in comparisons}:
        for metric in (m.key for m in PAIRED_METRICS):
            members = [c for c in comparisons if family(c) == fam]
            for c in members:  # no p-value (one class in the test set): not in the family
                c[metric].update(p_adjusted=float("nan"), family_size=0)
            members = [c for c in members if np.isfinite(c[metric]["p_value"])]
            adjusted = stats.ADJUSTMENTS[method]([c[metric]["p_value"] for c in members]) if members else []
            for c, p in zip(members, adjusted):
                c[metric].update(p_adjusted=float(p), family_size=len(members))


def _size_key(c: dict) -> tuple:
    return (c["task"], c["model"], c["test_set"], c["real_size"], c.get("against", REAL_ONLY))


def resolvable(comparisons: list[dict], cfg: EvaluateConfig) -> None:
    """Each comparison's metric gets `resolvable`: the smallest difference the median standard error
    of its (task, model, test set, size, against) group - controls and synthetic arms, all seeds -
    would detect at level alpha with the configured power (unadjusted)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in comparisons:
        groups[_size_key(c)].append(c)
    for members in groups.values():
        for metric in (m.key for m in PAIRED_METRICS):
            ses = [c[metric]["se"] for c in members if np.isfinite(c[metric]["se"])]
            se = float(np.median(ses)) if ses else float("nan")
            for c in members:
                c[metric]["resolvable"] = stats.resolvable_difference(se, cfg.alpha, cfg.power)


def significant(metric: dict, alpha: float) -> int:
    """+1 a detected gain, -1 a detected loss, 0 nothing detected (adjusted p)."""
    if not metric["p_adjusted"] < alpha:  # NaN (nothing estimable) is no detection either
        return 0
    return 1 if metric["delta"] > 0 else -1


def _word(signs: set[int], words: tuple[str, str, str, str]) -> str:
    gain, loss, mixed, none = words
    return mixed if {1, -1} <= signs else gain if 1 in signs else loss if -1 in signs else none


def verdicts(comparisons: list[dict], task: str, alpha: float) -> list[dict]:
    """One verdict per (model, test set, real size) of `task` for the synthetic set, on the primary
    metric: gain, loss, mixed (both at different ratios) or no detectable effect against real only;
    beside a matched control also `versus_matched`: above, below, mixed or not distinguishable from
    real images at the synthetic set's class mix."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in comparisons:
        if c["task"] == task and c["arm"] == "synthetic":
            groups[(c["model"], c["test_set"], c["real_size"])].append(c)
    out = []
    for (model, test_set, size), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != INTERNAL,
                                                                                  kv[0][1], kv[0][2])):
        base = sorted((c for c in members if c.get("against", REAL_ONLY) == REAL_ONLY), key=lambda c: c["ratio"])
        twin = sorted((c for c in members if c.get("against") == MATCHED), key=lambda c: c["ratio"])
        if not base:
            continue
        signs = {significant(c[PRIMARY], alpha) for c in base}
        versus = {significant(c[PRIMARY], alpha) for c in twin}
        out.append({"task": task, "model": model, "test_set": test_set, "real_size": size,
                    "verdict": _word(signs, ("gain", "loss", "mixed", "no detectable effect")),
                    "versus_matched": _word(versus, ("above matched real", "below matched real", "mixed",
                                                     "not distinguishable from matched real")) if twin else None,
                    "resolvable": base[0][PRIMARY]["resolvable"], "by_ratio": base, "versus_matched_by_ratio": twin})
    return out


def control_checks(comparisons: list[dict], alpha: float) -> list[dict]:
    """Did the harness see the positive controls' gain, and no gain from the negative control?"""
    out = []
    for c in comparisons:
        if c["arm"] == "synthetic":
            continue
        sign = significant(c[PRIMARY], alpha)
        expected = CONTROL_ARMS[c["arm"]].expected
        ok = sign == expected if expected else sign <= 0
        out.append({**{k: c[k] for k in ("task", "model", "test_set", "real_size", "arm", "ratio")},
                    "detected": sign, "as_expected": ok, "auroc": c["auroc"],
                    "synthetic_duplicated": c.get("synthetic_duplicated", 0)})
    return out
