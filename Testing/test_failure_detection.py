"""Failure-detection statistics (QA_PROTOCOL.md): hand-computed values, brute-force and library
oracles, and bounds from the sampling distributions."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import norm, spearmanr
from sklearn.metrics import roc_auc_score

from SegXAILib.evaluation import failure_detection as fd
from SegXAILib.image import SegXAIInputError


def _aurc_of_order(risk: np.ndarray) -> float:
    """Mean selective risk over the coverages k / n for cases accepted in the given order."""
    k = np.arange(1, risk.size + 1)
    return float(np.mean(np.cumsum(risk) / k))


# --------------------------------------------------------------------------- AURC


def test_aurc_four_cases_by_hand():
    scores = [0.1, 0.4, 0.35, 0.8]
    risk = [0.5, 0.0, 0.2, 1.0]
    # accepted by score: risks 0.5, 0.2, 0.0, 1.0 -> selective risks 1/2, 7/20, 7/30, 17/40
    expected = (Fraction(1, 2) + Fraction(7, 20) + Fraction(7, 30) + Fraction(17, 40)) / 4
    assert expected == Fraction(181, 480)
    # oracle order 0.0, 0.2, 0.5, 1.0 -> 0, 1/10, 7/30, 17/40
    optimal = (Fraction(0) + Fraction(1, 10) + Fraction(7, 30) + Fraction(17, 40)) / 4
    assert optimal == Fraction(91, 480)
    assert fd.aurc(scores, risk) == pytest.approx(181 / 480, abs=1e-15)
    assert fd.optimal_aurc(risk) == pytest.approx(91 / 480, abs=1e-15)
    assert fd.excess_aurc(scores, risk) == pytest.approx(90 / 480, abs=1e-15)
    coverage, selective = fd.risk_coverage_curve(scores, risk)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(selective, [1 / 2, 7 / 20, 7 / 30, 17 / 40], rtol=0, atol=1e-15)


def test_risk_coverage_curve_accepts_ties_together():
    scores = np.array([2.0, 1.0, 1.0, 3.0])
    risk = np.array([1.0, 0.2, 0.4, 0.0])
    coverage, selective = fd.risk_coverage_curve(scores, risk)
    np.testing.assert_allclose(coverage, [0.5, 0.75, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(selective, [0.3, 1.6 / 3, 0.4], rtol=0, atol=1e-15)
    for order in itertools.permutations(range(4)):  # no dependence on the order of the cases
        order = list(order)
        c, s = fd.risk_coverage_curve(scores[order], risk[order])
        np.testing.assert_allclose(c, coverage, rtol=0, atol=1e-15)
        np.testing.assert_allclose(s, selective, rtol=0, atol=1e-15)


def test_aurc_with_ties_is_the_mean_over_tie_orders_and_optimal_is_the_best_order():
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 6
        scores = rng.integers(0, 3, n).astype(float)  # many ties
        risk = rng.uniform(size=n)
        orders = [np.array(p) for p in itertools.permutations(range(n))]
        # every order of the cases consistent with the scores, ties in any order
        consistent = [_aurc_of_order(risk[p]) for p in orders if np.all(np.diff(scores[p]) >= 0)]
        assert fd.aurc(scores, risk) == pytest.approx(np.mean(consistent), abs=1e-12)
        best = min(_aurc_of_order(risk[p]) for p in orders)
        assert fd.optimal_aurc(risk) == pytest.approx(best, abs=1e-12)
        assert fd.optimal_aurc(risk) == pytest.approx(fd.aurc(risk, risk), abs=1e-15)
        assert fd.excess_aurc(scores, risk) >= -1e-12


def test_constant_score_has_the_mean_risk_as_aurc():
    risk = np.random.default_rng(0).uniform(size=50)
    assert fd.aurc(np.zeros(50), risk) == pytest.approx(risk.mean(), abs=1e-12)
    coverage, selective = fd.risk_coverage_curve(np.zeros(50), risk)
    assert coverage.tolist() == [1.0]
    assert selective[0] == pytest.approx(risk.mean(), abs=1e-12)


def test_random_scores_on_a_large_sample():
    n = 4000
    rng = np.random.default_rng(11)
    dice = rng.beta(8, 2, n)
    risk = 1 - dice
    scores = rng.normal(size=n)  # independent of the risk
    # AURC of a random order: mean over k of the mean of a sample of k without replacement.
    # E = mean(risk); Cov(m_j, m_k) = s^2 (n - K) / (K (n - 1)), K = max(j, k), so
    # Var(AURC) = s^2 / (n^2 (n - 1)) sum_K (2K - 1)(n - K) / K.
    s2 = risk.var()
    K = np.arange(1, n + 1)
    sd_aurc = np.sqrt(s2 / (n**2 * (n - 1)) * np.sum((2 * K - 1) * (n - K) / K))
    value = fd.aurc(scores, risk)
    assert abs(value - risk.mean()) < 5 * sd_aurc  # Chebyshev: fails with probability < 4 %
    excess = fd.excess_aurc(scores, risk)
    assert excess > 0
    assert excess == pytest.approx(value - fd.aurc(risk, risk), abs=1e-12)
    assert excess > risk.mean() - fd.optimal_aurc(risk) - 5 * sd_aurc
    # null distribution of the Mann-Whitney AUROC (continuous scores): variance (n1 + n0 + 1) / (12 n1 n0)
    insufficient = fd.insufficient_at_quantile(dice, 0.15)
    n1 = int(insufficient.sum())
    n0 = n - n1
    sd_auc = np.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    assert abs(fd.auroc(scores, insufficient) - 0.5) < 5 * sd_auc


# --------------------------------------------------------------------------- AUROC


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(10):
        n = int(rng.integers(5, 60))
        labels = rng.uniform(size=n) < 0.3
        labels[:2] = [True, False]
        scores = rng.integers(0, 4, n) + labels * rng.integers(0, 2, n)  # ties within and across classes
        assert fd.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert fd.auroc(scores, labels.astype(int)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_insufficient_at_quantile_by_hand():
    dice = np.arange(1, 21) / 20  # 0.05 .. 1.00
    # linear quantile at 0.15: position 0.15 * 19 = 2.85 -> 0.15 + 0.85 * 0.05 = 0.1925
    labels = fd.insufficient_at_quantile(dice[::-1], 0.15)[::-1]
    assert labels.tolist() == [True] * 3 + [False] * 17
    with pytest.raises(SegXAIInputError, match="q"):
        fd.insufficient_at_quantile(dice, 1.5)


def test_auroc_at_thresholds_against_sklearn():
    rng = np.random.default_rng(2)
    dice = rng.uniform(0.3, 1.0, 80)
    scores = -dice + 0.3 * rng.normal(size=80)
    thresholds = [0.2, 0.5, 0.7, 0.9, 1.5]
    values, counts = fd.auroc_at_thresholds(scores, dice, thresholds)
    for t, v, c in zip(thresholds, values, counts):
        labels = dice < t
        assert c == labels.sum()
        if 0 < c < 80:
            assert v == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        else:
            assert np.isnan(v)
    assert np.isnan(values[0]) and np.isnan(values[-1])


# --------------------------------------------------------------------------- DeLong


def _delong_brute(scores: list[np.ndarray], labels: np.ndarray):
    """DeLong 1988 with the kernel psi evaluated on every (positive, negative) pair."""
    v10, v01, aucs = [], [], []
    for s in scores:
        pos, neg = s[labels], s[~labels]
        psi = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in neg] for x in pos])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    S = (np.atleast_2d(np.cov(np.array(v10))) / labels.sum()
         + np.atleast_2d(np.cov(np.array(v01))) / (~labels).sum())
    return np.array(aucs), S


def test_delong_against_brute_force_placements():
    rng = np.random.default_rng(7)
    n = 70
    labels = rng.uniform(size=n) < 0.35
    latent = labels + rng.normal(size=n)
    a = np.round(latent + 0.5 * rng.normal(size=n), 1)  # rounded: ties
    b = np.round(latent + 1.5 * rng.normal(size=n), 1)
    aucs, S = _delong_brute([a, b], labels)
    result = fd.delong_test(a, b, labels)
    assert result.auroc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auroc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert result.difference == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    se = np.sqrt(S[0, 0] + S[1, 1] - 2 * S[0, 1])
    assert result.se == pytest.approx(se, rel=1e-10)
    assert result.z == pytest.approx((aucs[0] - aucs[1]) / se, rel=1e-10)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(result.z)), rel=1e-10)
    swapped = fd.delong_test(b, a, labels)
    assert swapped.difference == pytest.approx(-result.difference, abs=1e-15)
    assert swapped.se == pytest.approx(result.se, rel=1e-12)
    assert swapped.z == pytest.approx(-result.z, rel=1e-12)
    assert swapped.p_value == pytest.approx(result.p_value, rel=1e-12)

    auc, (low, high) = fd.delong_ci(a, labels, level=0.9)
    half = norm.ppf(0.95) * np.sqrt(S[0, 0])
    assert auc == pytest.approx(aucs[0], abs=1e-12)
    assert (low, high) == pytest.approx((aucs[0] - half, min(aucs[0] + half, 1.0)), abs=1e-10)


def test_delong_identical_scores_and_small_classes():
    rng = np.random.default_rng(0)
    labels = np.array([True, True, True, False, False, False, False])
    a = rng.normal(size=7)
    same = fd.delong_test(a, a, labels)
    assert same.difference == 0 and same.se == 0 and same.z == 0 and same.p_value == 1
    with pytest.raises(SegXAIInputError, match="insufficient"):
        fd.delong_test(a, a, [True] + [False] * 6)
    with pytest.raises(SegXAIInputError, match="scores_b"):
        fd.delong_test(a, a[:-1], labels)


# --------------------------------------------------------------------------- bootstrap


def test_cluster_bootstrap_with_singleton_groups_is_the_ordinary_bootstrap():
    x = np.random.default_rng(1).exponential(size=40)
    result = fd.cluster_bootstrap(np.mean, x, groups=np.arange(40)[::-1], n_resamples=500, seed=9, level=0.9)
    assert result.estimate == pytest.approx(x.mean(), abs=1e-15)
    # reversed labels: group codes follow sorted labels, so group code g is case 39 - g
    rng = np.random.default_rng(9)
    ordinary = np.array([x[39 - rng.integers(0, 40, size=40)].mean() for _ in range(500)])
    assert result.ci == pytest.approx(tuple(np.quantile(ordinary, [0.05, 0.95])), rel=1e-12)
    assert result.n_skipped == 0


def test_cluster_bootstrap_interval_of_a_clustered_mean():
    # G groups of m cases: y = u_g + e, u ~ N(0, 1), e ~ N(0, 1); Var(mean) = 1/G + 1/(G m)
    G, m, mu = 300, 5, 2.0
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(G), m)
    y = mu + rng.normal(size=G)[groups] + rng.normal(size=G * m)
    se = np.sqrt(1 / G + 1 / (G * m))
    wide = fd.cluster_bootstrap(np.mean, y, groups=groups, n_resamples=20000, seed=0, level=0.999)
    assert wide.ci[0] < mu < wide.ci[1]  # misses with probability about 0.1 %
    result = fd.cluster_bootstrap(np.mean, y, groups=groups, n_resamples=2000, seed=1)
    half = (result.ci[1] - result.ci[0]) / 2
    # the sample SD of G = 300 group means is within ~4 % (sqrt(1 / (2 G))) of sigma; the
    # 2.5 / 97.5 % percentiles of 2000 resamples add a few %: 25 % is > 5 standard errors.
    assert half == pytest.approx(norm.ppf(0.975) * se, rel=0.25)
    # resampling cases instead of groups would give sqrt(2 / (G m)), 39 % narrower
    naive = fd.cluster_bootstrap(np.mean, y, groups=np.arange(G * m), n_resamples=2000, seed=1)
    assert (naive.ci[1] - naive.ci[0]) / 2 < 0.8 * half


def test_cluster_bootstrap_skips_undefined_resamples():
    n, B = 10, 2000
    labels = np.zeros(n, bool)
    labels[0] = True  # one positive: resamples without case 0 have one class only
    scores = np.arange(n, dtype=float)
    result = fd.cluster_bootstrap(fd.auroc, scores, labels, groups=np.arange(n), n_resamples=B, seed=3)
    p = (1 - 1 / n) ** n  # a resample misses case 0
    assert abs(result.n_skipped - B * p) < 5 * np.sqrt(B * p * (1 - p))
    assert result.estimate == pytest.approx(roc_auc_score(labels, scores))
    assert np.isfinite(result.ci).all()


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(8)
    G = 60
    groups = np.repeat(np.arange(G), 3)
    dice = np.clip(rng.beta(6, 2, G)[groups] + 0.05 * rng.normal(size=3 * G), 0, 1)
    labels = fd.insufficient_at_quantile(dice)
    good = -dice + 0.05 * rng.normal(size=3 * G)
    poor = rng.normal(size=3 * G)
    result = fd.paired_bootstrap_difference(fd.auroc, good, poor, labels, groups, n_resamples=1000, seed=2)
    assert result.difference == pytest.approx(fd.auroc(good, labels) - fd.auroc(poor, labels), abs=1e-15)
    assert result.ci[0] > 0
    assert result.p_value == pytest.approx(2 / 1001)  # no resample reaches 0: the +1 floor
    swapped = fd.paired_bootstrap_difference(fd.auroc, poor, good, labels, groups, n_resamples=1000, seed=2)
    assert swapped.difference == pytest.approx(-result.difference, abs=1e-15)
    assert swapped.ci == pytest.approx((-result.ci[1], -result.ci[0]), abs=1e-12)
    assert swapped.p_value == pytest.approx(result.p_value)
    same = fd.paired_bootstrap_difference(fd.aurc, good, good, 1 - dice, groups, n_resamples=200, seed=2)
    assert same.difference == 0 and same.ci == (0.0, 0.0) and same.p_value == 1.0


def test_paired_bootstrap_p_value_counts_resamples_across_zero():
    # statistic = mean of the scores: the resampled difference is the mean of (a - b), whose
    # sign we can count directly on the documented resamples
    rng = np.random.default_rng(6)
    n = 30
    a = rng.normal(0.2, 1, n)
    b = np.zeros(n)
    mean_stat = lambda s, t: float(np.mean(s))  # noqa: E731
    result = fd.paired_bootstrap_difference(mean_stat, a, b, np.zeros(n), np.arange(n), n_resamples=999, seed=5)
    draws = np.random.default_rng(5)
    diffs = np.array([a[draws.integers(0, n, size=n)].mean() for _ in range(999)])
    side = np.sum(diffs <= 0) if a.mean() > 0 else np.sum(diffs >= 0)
    assert result.p_value == pytest.approx(min(1, 2 * (1 + side) / 1000), abs=1e-12)


# --------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    # sorted 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> monotone 0.06
    np.testing.assert_allclose(fd.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(fd.holm([0.4, 0.9, 0.01]), [0.8, 0.9, 0.03], rtol=1e-12)
    np.testing.assert_allclose(fd.holm([0.7, 0.8]), [1.0, 1.0], rtol=0)
    with pytest.raises(SegXAIInputError, match="pvalues"):
        fd.holm([0.1, 1.2])


# --------------------------------------------------------------------------- rank correlation


def test_spearman_against_scipy_and_partial_identity():
    rng = np.random.default_rng(10)
    c = rng.normal(size=200)
    x = np.round(c + rng.normal(size=200), 1)  # ties
    y = np.round(0.5 * c + 0.5 * x + rng.normal(size=200), 1)
    r = lambda u, v: spearmanr(u, v).statistic  # noqa: E731
    assert fd.spearman(x, y) == pytest.approx(r(x, y), abs=1e-12)
    rxy, rxc, ryc = r(x, y), r(x, c), r(y, c)
    expected = (rxy - rxc * ryc) / np.sqrt((1 - rxc**2) * (1 - ryc**2))
    assert fd.partial_spearman(x, y, c) == pytest.approx(expected, abs=1e-12)


def test_partial_spearman_removes_a_shared_covariate():
    n = 2000
    rng = np.random.default_rng(12)
    c = rng.normal(size=n)
    x = np.exp(c + 0.3 * rng.normal(size=n))  # both monotone in c plus independent noise
    y = np.tanh(c + 0.3 * rng.normal(size=n))
    assert fd.spearman(x, y) > 0.85
    # sd about 1 / sqrt(n) = 0.022, plus a small bias (the ranks are not exactly linear in c's)
    assert abs(fd.partial_spearman(x, y, c)) < 0.15
    with pytest.raises(SegXAIInputError, match="x"):
        fd.spearman(np.ones(5), np.arange(5))
    with pytest.raises(SegXAIInputError, match="covariate"):
        fd.partial_spearman(x, y, c[:-1])


# --------------------------------------------------------------------------- cross-validation


def test_repeated_grouped_folds():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 25, 120).astype(str)  # string labels, uneven sizes
    n, k, r = 120, 5, 4
    splits = fd.repeated_grouped_folds(groups, n_splits=k, n_repeats=r, seed=3)
    assert len(splits) == k * r
    largest = max(np.unique(groups, return_counts=True)[1])
    for repeat in range(r):
        block = splits[repeat * k:(repeat + 1) * k]
        tested = np.concatenate([test for _, test in block])
        assert np.sort(tested).tolist() == list(range(n))  # every case tested once per repeat
        sizes = [test.size for _, test in block]
        assert max(sizes) - min(sizes) <= largest  # greedy balance
        for train, test in block:
            assert np.intersect1d(train, test).size == 0 and train.size + test.size == n
            assert not set(groups[train]) & set(groups[test])  # no group split
    partitions = [frozenset(frozenset(test.tolist()) for _, test in splits[i * k:(i + 1) * k]) for i in range(r)]
    assert len(set(partitions)) == r  # repeats differ
    again = fd.repeated_grouped_folds(groups, n_splits=k, n_repeats=r, seed=3)
    assert all(np.array_equal(t1, t2) for (_, t1), (_, t2) in zip(splits, again))
    other = fd.repeated_grouped_folds(groups, n_splits=k, n_repeats=1, seed=4)
    assert frozenset(frozenset(t.tolist()) for _, t in other) != partitions[0]
    with pytest.raises(SegXAIInputError, match="n_splits"):
        fd.repeated_grouped_folds(np.arange(4) // 2, n_splits=3)


def test_out_of_fold_predictions_do_not_leak():
    rng = np.random.default_rng(1)
    n = 60
    groups = np.repeat(np.arange(15), 4)
    targets = rng.uniform(size=n)
    # a fit that memorises its training groups: it can only answer for groups it has seen
    features = groups.astype(float)[:, None]

    def memorise(train_x, train_y):
        seen = set(train_x[:, 0].tolist())
        return lambda test_x: np.array([1.0 if v in seen else 0.0 for v in test_x[:, 0]])

    held_out = fd.out_of_fold_predictions(memorise, features, targets, groups, n_splits=5, n_repeats=3, seed=0)
    assert held_out.shape == (3, n)
    assert np.all(held_out == 0)  # no case's group was ever in its own training set

    def mean_of_training(train_x, train_y):
        value = train_y.mean()
        return lambda test_x: np.full(len(test_x), value)

    predictions = fd.out_of_fold_predictions(mean_of_training, features, targets, groups, 5, 3, seed=0)
    folds = fd.repeated_grouped_folds(groups, 5, 3, seed=0)
    for index, (train, test) in enumerate(folds):
        np.testing.assert_allclose(predictions[index // 5, test], targets[train].mean(), rtol=1e-12)
    # held-out means differ from the in-sample one (which contains the case's own target)
    assert np.all(np.abs(predictions - targets.mean()) > 0)

    with pytest.raises(SegXAIInputError, match="fit"):
        fd.out_of_fold_predictions(lambda x, y: (lambda t: np.zeros((len(t), 2))), features, targets, groups)


# --------------------------------------------------------------------------- validation


def test_inputs_are_validated_by_name():
    with pytest.raises(SegXAIInputError, match="risk"):
        fd.aurc([0.1, 0.2], [0.1])
    with pytest.raises(SegXAIInputError, match="risk_scores"):
        fd.aurc([0.1, np.nan], [0.1, 0.2])
    with pytest.raises(SegXAIInputError, match="insufficient"):
        fd.auroc([0.1, 0.2, 0.3], [False, False, False])
    with pytest.raises(SegXAIInputError, match="insufficient"):
        fd.auroc([0.1, 0.2, 0.3], [0.0, 0.5, 1.0])
    with pytest.raises(SegXAIInputError, match="groups"):
        fd.cluster_bootstrap(np.mean, np.ones(4), groups=np.ones(3))
    with pytest.raises(SegXAIInputError, match="level"):
        fd.cluster_bootstrap(np.mean, np.ones(4), groups=np.arange(4), level=95)
    with pytest.raises(SegXAIInputError, match="n_resamples"):
        fd.cluster_bootstrap(np.mean, np.ones(4), groups=np.arange(4), n_resamples=0)
