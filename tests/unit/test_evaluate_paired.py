"""The paired statistics and the report's tables on a hand-made grid: one metric table drives both,
a test set a task cannot score gets no figure, and the synthetic set is judged against the matched
control as well as against real only."""

import numpy as np
import pytest

from dermaflux.evaluate import paired, report
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.metrics import PAIRED_METRICS, REPORT_METRICS, not_scorable, score_test_set, summarise

SIGNAL = {("synthetic", 0.0): 0.4, ("synthetic", 4.0): 0.7, ("matched", 4.0): 1.6, ("real-extra", 4.0): 1.6}
INTERNAL_Y = np.repeat([0, 1], 60)
CLINIC_Y = np.ones(20, dtype=np.int64)  # a melanoma-only set under the binary task: malignant rows alone


def _cell(arm: str, ratio: float, seed: int, task: str = "binary") -> tuple[dict, dict]:
    rng = np.random.default_rng([seed, int(ratio), len(arm)])
    image_noise = np.random.default_rng(seed).normal(size=len(INTERNAL_Y) + len(CLINIC_Y))
    y = np.r_[INTERNAL_Y, CLINIC_Y]
    score = 1 / (1 + np.exp(-(SIGNAL[(arm, ratio)] * (2 * y - 1) + image_noise + 0.5 * rng.normal(size=len(y)))))
    probs = np.column_stack([1 - score, score])
    classes = ["benign", "malignant"]
    sets = {}
    for name, part in (("internal", slice(0, len(INTERNAL_Y))), ("clinic", slice(len(INTERNAL_Y), None))):
        sets[name] = {"images": len(y[part]), "left_out": 7 if name == "clinic" else 0,
                      "label_counts": np.bincount(y[part], minlength=2).tolist(),
                      "metrics": score_test_set(y[part], probs[part], classes, 0.5)}
    cell = {"task": task, "model": "resnet10t", "real_size": 100, "ratio": ratio, "seed": seed, "arm": arm,
            "synthetic_only": False, "id": f"{arm}-{ratio}-{seed}", "classes": classes, "threshold": 0.5,
            "test_sets": sets, "train_real": 100, "train_synthetic": int(100 * ratio),
            "synthetic_wanted": int(100 * ratio), "synthetic_duplicated": 12 if arm == "matched" else 0,
            "train_real_label_counts": {"nv": 84, "mel": 16}, "train_synthetic_label_counts": {"nv": 200, "mel": 200},
            "training": {"optimizer_steps": 100}}
    ids = [f"i{k:03d}" for k in range(len(y))]
    predictions = {"id": ids, "split": ["test"] * len(y), "test_set": ["internal"] * len(INTERNAL_Y) + ["clinic"] * 20,
                   "target": y, "score_benign": probs[:, 0], "score_malignant": probs[:, 1]}
    return cell, predictions


@pytest.fixture(scope="module")
def grid():
    made = [_cell(arm, ratio, seed) for seed in range(3) for arm, ratio in SIGNAL]
    cells, predictions = [c for c, _ in made], {c["id"]: p for c, p in made}
    cfg = EvaluateConfig(bootstrap=300)
    unscorable = not_scorable(cells, cfg.min_test_per_class)
    return cells, unscorable, paired.compare_grid(cells, predictions, cfg, unscorable), cfg


def test_a_one_class_test_set_is_not_scorable_and_gets_no_delta_p_or_verdict(grid):
    cells, unscorable, comparisons, cfg = grid
    assert unscorable == [{"task": "binary", "test_set": "clinic", "counts": {"benign": 0, "malignant": 20},
                           "images": 20, "left_out": 7, "min_per_class": 2}]
    assert comparisons and {c["test_set"] for c in comparisons} == {"internal"}
    assert {v["test_set"] for v in paired.verdicts(comparisons, "binary", cfg.alpha)} == {"internal"}
    rows = summarise(cells, unscorable)
    clinic = [r for r in rows if r["test_set"] == "clinic"]
    assert clinic and all(not r["scorable"] and np.isnan(r["balanced_accuracy_mean"]) for r in clinic)
    assert all(r["scorable"] and r["auroc_mean"] > 0.5 for r in rows if r["test_set"] == "internal")
    # Below a configured minimum per class, a two-class set is not scorable either.
    assert [u["test_set"] for u in not_scorable(cells, 61)] == ["clinic", "internal"]
    table = report.summary_table(rows, unscorable)
    for row in (r for r in table.rows if "clinic" in r[2]):
        assert "not scorable for this task: benign 0, malignant 20" in row[2]
        assert row[-len(REPORT_METRICS):] == ["–"] * len(REPORT_METRICS)
    note = report.not_scorable_note(unscorable)
    assert "clinic under the binary task (benign 0, malignant 20; 7 rows without a target for it)" in note
    assert report.not_scorable_note([]) is None


def test_the_synthetic_set_is_judged_against_real_only_and_against_the_matched_control(grid):
    _, _, comparisons, cfg = grid
    against = {(c["arm"], c["against"]) for c in comparisons}
    assert against == {("synthetic", "real only"), ("synthetic", "matched"), ("matched", "real only"),
                       ("real-extra", "real only")}
    assert {paired.family(c) for c in comparisons} == {"synthetic", "synthetic vs matched", "controls"}
    (verdict,) = paired.verdicts(comparisons, "binary", cfg.alpha)
    assert verdict["verdict"] == "gain" and verdict["versus_matched"] == "below matched real"
    (versus,) = verdict["versus_matched_by_ratio"]
    assert versus["auroc"]["delta"] < 0 and versus["auroc"]["ci"][1] < 0
    checks = {c["arm"]: c for c in paired.control_checks(comparisons, cfg.alpha)}
    assert checks["matched"]["detected"] == 1 and checks["matched"]["as_expected"]
    assert checks["matched"]["synthetic_duplicated"] == 12
    line = report._verdict_line(verdict, cfg.alpha)
    assert "GAIN" in line and "Against matched real images at the same class mix: BELOW MATCHED REAL" in line
    assert "12 of the added images duplicated real" in report._control_line(checks["matched"])
    assert report._control_line(checks["matched"]).startswith("positive control at the synthetic set's class mix")


def test_the_report_columns_and_the_paired_statistics_come_from_the_metric_table(grid):
    cells, unscorable, comparisons, _ = grid
    for c in comparisons:
        assert all(np.isfinite(c[m.key]["delta"]) and "p_adjusted" in c[m.key] for m in PAIRED_METRICS)
    table = report.comparisons_table(comparisons, "comparisons")
    paired_heads = [h for h in table.head if h.startswith("Δ")]
    assert paired_heads == [f"Δ{m.column} [95% CI]" for m in PAIRED_METRICS]
    assert table.head.count("p (adj.)") == len(PAIRED_METRICS) and all(len(r) == len(table.head) for r in table.rows)
    summary = report.summary_table(summarise(cells, unscorable), unscorable)
    assert summary.head[-len(REPORT_METRICS):] == [m.column for m in REPORT_METRICS]
    assert {r[6] for r in table.rows} == {"real only", "matched real (same class mix)"}
    assert report.arm_label("matched", 4) == "+ matched real (positive control at the synthetic set's class mix) 1:4"
