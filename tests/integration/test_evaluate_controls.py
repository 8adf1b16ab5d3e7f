"""The built-in controls on real HAM10000 through `dermaflux evaluate --controls`: the grid sees the gain
of adding real images (real-extra) and no gain from the same images with shuffled labels; beside a
synthetic set balanced over classes (a stand-in, as `generate --per-class` makes them), the matched
control adds real images at that set's class mix, and the synthetic set is judged against it too.

This is the evidence that "no detectable effect" of a synthetic set means something: at this size,
seed count and test set, an effect of the real-extra size would have been seen. Small on purpose (a
300-image real subset, 32 px, a small timm CNN, a fixed step budget, 2 seeds) to fit a few minutes
on two cores; the CLI run at a more convincing size is in the issue's closing note."""

import json

import pytest

from dermaflux.cli import main
from dermaflux.lesion import taxonomy
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Measured here (2 seeds, the suite's setting: 2.4 min): real-extra ΔAUROC +0.076 [+0.045, +0.109], matched
# +0.081 [+0.050, +0.116], shuffled -0.079 [-0.119, -0.041], resolvable ±0.048.
# Measured before (3 seeds, resnet10t, 897 internal test images): at 100 steps real-extra ΔAUROC +0.072
# [+0.046, +0.098], shuffled -0.085 [-0.125, -0.049] (2.3 min on a quiet 2-core machine); at 150 steps
# +0.072 [+0.046, +0.099] and -0.111 [-0.149, -0.069]. At 300 real + 1:2 and 100 steps the gain of
# real-extra was +0.004 [-0.011, +0.020]: at a fixed step budget, extra data helps once the real
# subset is small enough to be seen many times over.
SIZE, RATIO, SEEDS, STEPS = 100, 4, 2, 100
PER_LABEL = 58  # the demo's synthetic set: 58 per class, 406 images; at 1:4 the pool runs short of nv
ARMS = {"synthetic", "real-extra", "shuffled", "matched"}


@pytest.fixture(scope="module")
def controlled(ham10000_dir, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("evaluate-controls")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=None, seed=0)
    synthetic = build_stand_in_synthetic(corpus, root / "synthetic", per_label=PER_LABEL)
    out = root / "report"
    code = main(["evaluate", "--corpus", str(corpus), "--synthetic", str(synthetic), "--out", str(out), "--controls",
                 "--sizes", str(SIZE), "--ratios", f"0,{RATIO}", "--seeds", str(SEEDS), "--model", "resnet10t",
                 "--steps", str(STEPS), "--parallel", "2", "--set", "evaluate.validations=2",
                 "--set", "evaluate.bootstrap=1000", "--set", "evaluate.quality=false",
                 # subgroups without skin tone: measuring 897 test images' ITA on the driver takes 2.5 min here
                 "--set", "evaluate.subgroup_attributes=[site,sex,age_band,source]"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def _comparison(results: dict, arm: str, against: str = "real only") -> dict:
    (found,) = [c for c in results["comparisons"]
                if c["arm"] == arm and c["test_set"] == "internal" and c["against"] == against]
    return found


def test_both_controls_are_written_as_synthetic_sets_and_run_beside_the_baseline(controlled):
    out, results = controlled
    for arm in ("real-extra", "shuffled"):
        manifest = json.loads((out / "controls" / arm / "manifest.json").read_text())
        assert manifest["control"] == arm and manifest["stand_in"] is True
        assert sorted((out / "controls" / arm / "shards").glob("*.parquet"))
    assert not (out / "controls" / "matched").exists()  # drawn from the real-extra set
    cells = results["cells"]
    assert len(cells) == SEEDS * 5 and {c["arm"] for c in cells} == ARMS
    for c in cells:
        assert c["train_real"] == SIZE and c["training"]["optimizer_steps"] == STEPS
        assert c["train_synthetic"] == (0 if c["ratio"] == 0 else RATIO * SIZE)


def test_real_extra_gives_a_positive_paired_difference(controlled):
    _, results = controlled
    extra = _comparison(results, "real-extra")["auroc"]
    assert extra["seeds"] == SEEDS and extra["ci"][0] > 0, extra
    check = [c for c in results["control_checks"] if c["arm"] == "real-extra" and c["test_set"] == "internal"]
    assert check[0]["detected"] == 1 and check[0]["as_expected"]


def test_shuffled_labels_give_no_gain(controlled):
    _, results = controlled
    shuffled = _comparison(results, "shuffled")["auroc"]
    assert shuffled["delta"] < _comparison(results, "real-extra")["auroc"]["delta"]
    assert not (shuffled["ci"][0] > 0), shuffled
    check = [c for c in results["control_checks"] if c["arm"] == "shuffled" and c["test_set"] == "internal"]
    assert check[0]["detected"] <= 0 and check[0]["as_expected"]


def test_the_report_states_the_controls_and_the_resolvable_difference(controlled):
    out, results = controlled
    md = (out / "report.md").read_text()
    assert "positive control (real-extra)" in md and "negative control (shuffled)" in md
    assert "as expected" in md and "NOT as expected" not in md
    resolvable = _comparison(results, "real-extra")["auroc"]["resolvable"]
    assert 0 < resolvable < 0.2 and f"±{resolvable:.3f}" in md


def test_the_matched_control_adds_real_images_at_the_synthetic_class_mix(controlled):
    out, results = controlled
    by = {(c["arm"], c["ratio"], c["seed"]): c for c in results["cells"]}
    for seed in range(SEEDS):
        syn, matched = by[("synthetic", RATIO, seed)], by[("matched", RATIO, seed)]
        assert matched["train_synthetic_label_counts"] == syn["train_synthetic_label_counts"]
        # A rare class's pool outside the cell's subset can hold fewer than its share (15 repeats measured).
        assert 0 <= matched["synthetic_duplicated"] < 0.1 * RATIO * SIZE
        real_share = sum(n for k, n in syn["train_real_label_counts"].items() if taxonomy.is_malignant(k)) / SIZE
        added_share = sum(n for k, n in syn["train_synthetic_label_counts"].items()
                          if taxonomy.is_malignant(k)) / (RATIO * SIZE)
        assert added_share > real_share + 0.15  # the confound the control is there for
        extra = by[("real-extra", RATIO, seed)]["train_synthetic_label_counts"]
        assert extra != syn["train_synthetic_label_counts"]
    figures = {f"{arm} vs {against}": _comparison(results, arm, against)["auroc"]
               for arm, against in (("real-extra", "real only"), ("matched", "real only"), ("shuffled", "real only"),
                                    ("synthetic", "real only"), ("synthetic", "matched"))}
    for name, a in figures.items():  # the figures of the closing note (pytest -s)
        print(f"{name}: ΔAUROC {a['delta']:+.3f} [{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}], adj. p {a['p_adjusted']:.3g}")
    assert figures["matched vs real only"]["ci"][0] > 0
    (verdict,) = results["verdicts"]
    assert verdict["versus_matched"] and verdict["versus_matched_by_ratio"][0]["against"] == "matched"
    md = (out / "report.md").read_text()
    assert "matched real (positive control at the synthetic set's class mix)" in md
    assert "Against matched real images at the same class mix" in md and "Controls: real-extra (positive" in md
