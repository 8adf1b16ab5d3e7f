"""Evaluate metrics agree with scikit-learn / scipy on known inputs; quality measures behave."""

import numpy as np
import pytest
from scipy import linalg
from sklearn import metrics as skm

from dermaflux.evaluate.metrics import binary_auroc, classification_metrics, summarise
from dermaflux.evaluate.quality import (
    frechet_distance,
    hamming_matrix,
    kernel_inception_distance,
    precision_recall,
)


def _random_probs(rng, n, c, ties=False):
    logits = rng.normal(size=(n, c))
    if ties:
        logits = np.round(logits, 1)  # many tied scores: the AUROC must average their ranks
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("n_classes, ties", [(2, False), (2, True), (5, False), (7, True)])
def test_classification_metrics_match_sklearn(n_classes, ties):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, size=300)
    probs = _random_probs(rng, 300, n_classes, ties)
    # Make predictions informative so the numbers are not all near chance.
    probs[np.arange(300), y] += rng.uniform(0, 0.6, size=300)
    probs /= probs.sum(1, keepdims=True)
    classes = [f"c{i}" for i in range(n_classes)]
    got = classification_metrics(y, probs, classes)
    pred = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    recalls = skm.recall_score(y, pred, average=None, labels=list(range(n_classes)))
    assert [got["per_class_recall"][c] for c in classes] == pytest.approx(list(recalls))
    if n_classes == 2:
        assert got["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    else:
        assert got["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_with_a_class_missing_from_the_test_labels():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 1, 3], size=120)  # class 2 never occurs
    probs = _random_probs(rng, 120, 4)
    got = classification_metrics(y, probs, ["a", "b", "c", "d"])
    pred = probs.argmax(1)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert "c" not in got["per_class_recall"]
    expected = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in (0, 1, 3)])
    assert got["macro_auroc"] == pytest.approx(expected)
    assert np.isnan(binary_auroc(np.zeros(5, bool), np.arange(5.0)))


def test_summary_mean_std_over_seeds_per_test_set_and_no_spread_for_one_seed():
    def cell(ratio, seed, auroc, external=None):
        def scored(value):
            m = {"auroc": value, "balanced_accuracy": value, "sensitivity": value, "specificity": value,
                 "accuracy": value, "macro_f1": value, "per_class_recall": {"benign": value, "malignant": value}}
            return {"images": 50, "left_out": 0, "metrics": m}

        sets = {"internal": scored(auroc), **({"isic": scored(external)} if external is not None else {})}
        return {"task": "binary", "model": "resnet18", "real_size": 100, "ratio": ratio, "seed": seed,
                "synthetic_only": False, "arm": "synthetic", "train_real": 100, "train_synthetic": int(100 * ratio),
                "synthetic_wanted": int(100 * ratio), "train_real_label_counts": {"nv": 80, "mel": 20},
                "train_synthetic_label_counts": {"mel": int(100 * ratio)}, "test_sets": sets,
                "training": {"optimizer_steps": 200}}

    rows = summarise([cell(0.0, 0, 0.60, 0.5), cell(0.0, 1, 0.70, 0.6), cell(1.0, 0, 0.75, 0.7)])
    by = {(r["ratio"], r["test_set"]): r for r in rows}
    assert [r["test_set"] for r in rows] == ["internal", "internal", "isic", "isic"]  # internal first
    base = by[(0.0, "internal")]
    assert base["auroc_mean"] == pytest.approx(0.65) and base["auroc_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert by[(0.0, "isic")]["auroc_mean"] == pytest.approx(0.55)
    one = by[(1.0, "internal")]
    assert one["seeds"] == 1 and one["auroc_std"] is None  # no spread estimate, not 0
    assert one["real_class_mix"] == {"mel": 0.2, "nv": 0.8} and one["synthetic_class_mix"] == {"mel": 1.0}
    assert one["optimizer_steps"] == [200]


def test_threshold_is_chosen_on_validation_and_applied_to_test():
    from dermaflux.evaluate.metrics import binary_metrics_at, choose_threshold, score_test_set

    val_y = np.array([0, 0, 0, 0, 1, 1])
    val_score = np.array([0.05, 0.1, 0.2, 0.3, 0.25, 0.4])  # argmax (0.5) would call every image benign
    threshold = choose_threshold(val_y, val_score)
    assert threshold == pytest.approx(0.25)  # J = 1 + 0.75 - 1, the only maximum
    at = binary_metrics_at(np.array([0, 1, 1, 0]), np.array([0.1, 0.26, 0.9, 0.5]), threshold)
    assert at["sensitivity"] == 1.0 and at["specificity"] == 0.5 and at["balanced_accuracy"] == 0.75
    probs = np.column_stack([1 - np.array([0.1, 0.26, 0.9, 0.5]), [0.1, 0.26, 0.9, 0.5]])
    scored = score_test_set(np.array([0, 1, 1, 0]), probs, ("benign", "malignant"), threshold)
    assert scored["balanced_accuracy"] == 0.75 and scored["balanced_accuracy_argmax"] == 0.75
    assert scored["auroc"] == pytest.approx(skm.roc_auc_score([0, 1, 1, 0], [0.1, 0.26, 0.9, 0.5]))
    assert choose_threshold(np.zeros(4), np.arange(4.0)) == 0.5  # val without positives


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_and_precision_recall_separate_same_from_shifted_distributions():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16))
    same = rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 3.0
    kid_same, _ = kernel_inception_distance(same, real, subset_size=100)
    kid_shift, _ = kernel_inception_distance(shifted, real, subset_size=100)
    assert abs(kid_same) < 0.05 < kid_shift
    p_same, r_same = precision_recall(real, same, k=3)
    p_shift, r_shift = precision_recall(real, shifted, k=3)
    assert p_same > 0.6 and r_same > 0.6  # k-NN balls shrink in 16-d; far above the shifted case
    assert p_shift < 0.1 and r_shift < 0.1
    # A generator that collapses onto one part of the real data (2-d, where k-NN balls are tight):
    # precise but without recall.
    real2 = rng.normal(size=(400, 2))
    part = real2[real2[:, 0] > 1.0]
    collapsed = part + rng.normal(scale=0.01, size=part.shape)
    p_col, r_col = precision_recall(real2, collapsed, k=3)
    assert p_col > 0.9 and r_col < 0.4


def test_hamming_matrix_counts_bits():
    a = np.array([0, 0xFF, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 1], dtype=np.uint64)
    assert hamming_matrix(a, b).tolist() == [[0, 1], [8, 7], [64, 63]]
    words = np.array([[1, 0, 0, 3], [0, 0, 0, 0]], dtype=np.uint64)  # 256-bit hashes as 4 words
    assert hamming_matrix(words, words[1:]).tolist() == [[3], [0]]
