"""The paired statistics against known values: DeLong by brute force and by bootstrap, Holm and
Benjamini-Hochberg on the textbook example, kappa on the textbook table, weighted AUROC as sklearn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from dermaflux.evaluate.metrics import binary_auroc
from dermaflux.evaluate.stats import (
    agreement,
    benjamini_hochberg,
    delong,
    delong_paired_difference,
    holm,
    paired_bootstrap,
    resolvable_difference,
    stratified_weights,
    weighted_auroc,
    weighted_balanced_accuracy,
    weighted_macro_auroc,
)


def _two_models(rng, n=300, prevalence=0.3, ties=False):
    """Binormal scores of two correlated models on one test set (model b slightly better)."""
    y = rng.random(n) < prevalence
    shared = rng.normal(size=n)
    a = 0.9 * y + shared + 0.6 * rng.normal(size=n)
    b = 1.2 * y + shared + 0.6 * rng.normal(size=n)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


def _delong_brute_force(y, scores):
    """The definition: psi(x, y) = 1 / 0.5 / 0 over every positive-negative pair, then the structural
    components' sample covariances (DeLong et al. 1988, eq. for S10 and S01)."""
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    m, n = y.sum(), (~y).sum()
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_the_brute_force_definition(ties):
    y, a, b = _two_models(np.random.default_rng(1), n=150, ties=ties)
    aucs, cov = delong(y, np.vstack([a, b]))
    ref_aucs, ref_cov = _delong_brute_force(y, [a, b])
    assert aucs == pytest.approx(ref_aucs, abs=1e-12)
    assert cov == pytest.approx(ref_cov, abs=1e-12)
    assert aucs[0] == pytest.approx(binary_auroc(y, a)) and aucs[1] == pytest.approx(skm.roc_auc_score(y, b))


def test_delong_variance_of_a_paired_difference_agrees_with_the_bootstrap():
    y, a, b = _two_models(np.random.default_rng(2), n=400)
    aucs, cov = delong(y, np.vstack([a, b]))
    delong_sd = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    weights = stratified_weights(y, 4000, np.random.default_rng(3))
    boot = weighted_auroc(y, b, weights) - weighted_auroc(y, a, weights)
    assert boot.std() == pytest.approx(delong_sd, rel=0.1)
    assert boot.mean() == pytest.approx(aucs[1] - aucs[0], abs=0.005)
    # The same through the seed-aware wrapper with one seed: no seed term, DeLong alone.
    one = delong_paired_difference(y, a[None], b[None])
    assert one["se"] == pytest.approx(delong_sd) and one["se_seeds"] is None
    assert one["ci"][0] < one["delta"] < one["ci"][1]


def test_weighted_auroc_is_the_auroc_of_the_resampled_set():
    rng = np.random.default_rng(4)
    y, a, _ = _two_models(rng, n=80, ties=True)
    counts = rng.integers(0, 4, size=(3, 80))
    got = weighted_auroc(y, a, counts)
    for row, value in zip(counts, got):
        repeated = np.repeat(np.arange(80), row)
        assert value == pytest.approx(skm.roc_auc_score(y[repeated], a[repeated]))
    probs = rng.dirichlet(np.ones(4), size=80)
    targets = rng.integers(0, 4, size=80)
    macro = weighted_macro_auroc(targets, probs, np.ones((1, 80)))[0]
    assert macro == pytest.approx(skm.roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    predicted = probs.argmax(1)
    ba = weighted_balanced_accuracy(targets, predicted, counts[:1].astype(float))[0]
    repeated = np.repeat(np.arange(80), counts[0])
    assert ba == pytest.approx(skm.balanced_accuracy_score(targets[repeated], predicted[repeated]))


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(5)
    n, seeds = 300, 4
    y = rng.random(n) < 0.3
    base = [0.8 * y + rng.normal(size=n) for _ in range(seeds)]
    better = [s + 0.8 * y for s in base]  # a clearly better model per seed
    auroc = lambda t, s, w: weighted_auroc(t, s, w)
    gain = paired_bootstrap(y, base, better, auroc, n_boot=1000)
    assert gain.delta > 0.1 and gain.ci_low > 0 and gain.p_value < 0.01 and gain.seeds == seeds
    same = paired_bootstrap(y, base, [s.copy() for s in base], auroc, n_boot=1000)
    assert same.delta == 0 and same.ci_low == same.ci_high == 0 and same.p_value == 1.0
    # Noise of the same size as the signal in another direction: the CI must cover 0 most of the time.
    covered = 0
    for trial in range(20):
        r = np.random.default_rng(100 + trial)
        other = [0.8 * y + r.normal(size=n) for _ in range(seeds)]
        result = paired_bootstrap(y, base, other, auroc, n_boot=400, seed=trial)
        covered += result.ci_low <= 0 <= result.ci_high
    assert covered >= 16


def test_paired_bootstrap_refuses_unpaired_arms():
    with pytest.raises(ValueError, match="2 baseline vs 1 treatment"):
        paired_bootstrap(np.array([0, 1]), [np.zeros(2)] * 2, [np.zeros(2)], weighted_auroc)


def test_holm_and_benjamini_hochberg_on_the_textbook_example():
    # Holm (1979) as in most textbooks: four tests, alpha 0.05 -> Holm rejects the first and fourth.
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert (holm(p) <= 0.05).tolist() == [True, False, False, True]
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm([0.5]) == pytest.approx([0.5]) and holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_kappa_on_the_textbook_table():
    # 50 items, two raters: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o 0.7, p_e 0.5, kappa 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    result = agreement(a, b)
    assert result["agreement"] == pytest.approx(0.7) and result["chance"] == pytest.approx(0.5)
    assert result["kappa"] == pytest.approx(0.4) and result["n"] == 50


def test_resolvable_difference_is_2_8_standard_errors():
    assert resolvable_difference(0.01) == pytest.approx(0.028, abs=1e-4)
    assert resolvable_difference(0.01, power=0.5) == pytest.approx(0.0196, abs=1e-4)
