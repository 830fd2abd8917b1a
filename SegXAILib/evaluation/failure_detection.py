"""Statistics for judging reference-free QA scores as failure detectors (QA_PROTOCOL.md).

Plain NumPy / SciPy functions, no state: every function takes the per-case arrays of one cohort
and returns numbers.

Conventions
-----------
* ``risk_scores`` (n,): the detector's output, **higher = riskier** (more likely a bad contour).
  A quality score where higher is better (Dice estimate, pairwise Dice, max-softmax) is passed
  negated.
* ``risk`` (n,): the per-case loss, ``1 - Dice`` (any finite real loss works).
* ``insufficient`` (n,): boolean labels, True for a bad contour (e.g. Dice below the cohort's
  15 % quantile, :func:`insufficient_at_quantile`). Integer 0 / 1 arrays are accepted.
* ``groups`` (n,): the cluster each case belongs to (source scan, phantom seed): the unit of
  resampling and of cross-validation folds.

Risk-coverage view (Geifman, Uziel and El-Yaniv, "Bias-reduced uncertainty estimation for deep
neural classifiers", ICLR 2019; used with ``risk = 1 - Dice`` by Zenk et al., "Comparative
benchmarking of failure detection methods in medical image segmentation", MedIA 2025): the
cases are accepted from the lowest risk score upwards; at coverage ``k / n`` the *selective
risk* is the mean risk of the ``k`` accepted cases, and

    AURC = (1 / n) * sum_{k=1..n} selective_risk(k / n),

the mean selective risk over the ``n`` coverage levels (a trapezoidal integration of the same
points from coverage 0, holding the first selective risk ``r_1`` there, differs from it by
``(r_1 - r_n) / (2 n)``). The oracle ordering (by the risk itself)
minimises every selective risk at once, so it gives the smallest AURC (:func:`optimal_aurc`),
and ``excess AURC = AURC - optimal AURC >= 0`` (Geifman's E-AURC).

Ties: cases with the same score cannot be ordered by the detector, so they are accepted together
(:func:`risk_coverage_curve` has one point per distinct score). Inside a block of tied scores,
the AURC uses the expected selective risk when the tied cases are accepted in random order: the
accepted risk sum grows linearly across the block, by the block's mean risk per case. The AURC
is therefore the mean of the AURCs over all orders of the tied cases, and a constant score has
AURC equal to the mean risk, the expected AURC of a random detector.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from scipy.stats import norm, rankdata

from ..image import SegXAIInputError

__all__ = [
    "BootstrapResult",
    "DeLongResult",
    "PairedBootstrapResult",
    "aurc",
    "auroc",
    "auroc_at_thresholds",
    "cluster_bootstrap",
    "delong_ci",
    "delong_test",
    "excess_aurc",
    "holm",
    "insufficient_at_quantile",
    "optimal_aurc",
    "out_of_fold_predictions",
    "paired_bootstrap_difference",
    "partial_spearman",
    "repeated_grouped_folds",
    "risk_coverage_curve",
    "spearman",
]


# --------------------------------------------------------------------------- validation


def _vector(value: Any, name: str, n: int | None = None) -> np.ndarray:
    """``value`` as a finite float64 vector (of length ``n`` when given)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SegXAIInputError(f"{name} must be numeric: {error}") from None
    if array.ndim != 1:
        raise SegXAIInputError(f"{name} must be one-dimensional (one value per case), got shape {array.shape}")
    if array.size == 0:
        raise SegXAIInputError(f"{name} is empty")
    if n is not None and array.size != n:
        raise SegXAIInputError(f"{name} has {array.size} values, expected {n} (one per case)")
    if not np.all(np.isfinite(array)):
        raise SegXAIInputError(f"{name} holds {int(np.sum(~np.isfinite(array)))} non-finite values")
    return array


def _labels(value: Any, name: str, n: int) -> np.ndarray:
    """``value`` as a boolean vector of length ``n`` holding both classes."""
    array = np.asarray(value)
    if array.ndim != 1 or array.size != n:
        raise SegXAIInputError(f"{name} must be a vector of {n} labels (one per case), got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isin(array, (0, 1))):
            raise SegXAIInputError(f"{name} must be boolean (or 0 / 1)")
        array = array.astype(bool)
    if array.all() or not array.any():
        raise SegXAIInputError(
            f"{name} must hold both classes; it has {int(array.sum())} insufficient cases of {n}"
        )
    return array


def _groups(value: Any, n: int) -> np.ndarray:
    """Integer codes 0 .. G-1 of the ``groups`` labels (sorted by label)."""
    array = np.asarray(value)
    if array.ndim != 1 or array.size != n:
        raise SegXAIInputError(f"groups must be a vector of {n} labels (one per case), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise SegXAIInputError("groups holds non-finite labels")
    try:
        _, codes = np.unique(array, return_inverse=True)
    except TypeError as error:
        raise SegXAIInputError(f"groups labels must be comparable (one type): {error}") from None
    return codes.ravel()


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise SegXAIInputError(f"level must be in (0, 1), got {level}")
    return float(level)


# --------------------------------------------------------------------------- risk-coverage


def _tie_blocks(risk_scores: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score, ascending: number of cases and their risk sum."""
    _, inverse = np.unique(risk_scores, return_inverse=True)
    inverse = inverse.ravel()
    return np.bincount(inverse), np.bincount(inverse, weights=risk)


def risk_coverage_curve(risk_scores: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve: accept cases from the lowest risk score upwards.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    risk : array-like, shape (n,)
        Per-case loss, e.g. ``1 - Dice``.

    Returns
    -------
    coverage : ndarray, shape (m,)
        Fraction of cases accepted, increasing, ending at 1; one point per distinct score
        (``m <= n``): tied cases are accepted together.
    selective_risk : ndarray, shape (m,)
        Mean risk of the accepted cases at each coverage.
    """
    scores = _vector(risk_scores, "risk_scores")
    losses = _vector(risk, "risk", scores.size)
    counts, sums = _tie_blocks(scores, losses)
    accepted = np.cumsum(counts)
    return accepted / scores.size, np.cumsum(sums) / accepted


def aurc(risk_scores: Sequence[float], risk: Sequence[float]) -> float:
    """Area under the risk-coverage curve: the mean selective risk over coverages ``k / n``.

    ``AURC = (1 / n) sum_{k=1..n} R_k / k`` with ``R_k`` the risk summed over the ``k`` cases of
    lowest score (Geifman et al. 2019; Zenk et al. 2025). Inside a block of tied scores ``R_k``
    is the expectation over the orders of the tied cases (linear across the block), so the
    result does not depend on the order of the cases. Lower is better.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    risk : array-like, shape (n,)
        Per-case loss, e.g. ``1 - Dice``.

    Returns
    -------
    float
        AURC, in the units of ``risk`` (between ``min(risk)`` and ``max(risk)``).
    """
    scores = _vector(risk_scores, "risk_scores")
    losses = _vector(risk, "risk", scores.size)
    counts, sums = _tie_blocks(scores, losses)
    before_counts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    before_sums = np.concatenate(([0.0], np.cumsum(sums)[:-1]))
    k = np.arange(1, scores.size + 1)
    block = np.searchsorted(np.cumsum(counts), k, side="left")  # the tie block holding the k-th case
    accepted_risk = before_sums[block] + (k - before_counts[block]) * (sums[block] / counts[block])
    return float(np.mean(accepted_risk / k))


def optimal_aurc(risk: Sequence[float]) -> float:
    """AURC of the oracle detector that ranks the cases by their own risk (the lowest possible).

    Parameters
    ----------
    risk : array-like, shape (n,)
        Per-case loss, e.g. ``1 - Dice``.

    Returns
    -------
    float
        ``aurc(risk, risk)``.
    """
    losses = _vector(risk, "risk")
    return aurc(losses, losses)


def excess_aurc(risk_scores: Sequence[float], risk: Sequence[float]) -> float:
    """Excess AURC (E-AURC): ``aurc(risk_scores, risk) - optimal_aurc(risk)``, >= 0.

    Removes the part of the AURC that any detector pays for the cohort's overall risk level.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    risk : array-like, shape (n,)
        Per-case loss, e.g. ``1 - Dice``.

    Returns
    -------
    float
        Excess AURC; 0 for a detector that orders the cases as their risk does.
    """
    return aurc(risk_scores, risk) - optimal_aurc(risk)


# --------------------------------------------------------------------------- AUROC


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = rankdata(scores)  # average ranks: a tie between classes counts 1/2
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(risk_scores: Sequence[float], insufficient: Sequence[bool]) -> float:
    """AUROC of ``risk_scores`` as a detector of insufficient cases (Mann-Whitney).

    ``P(score of an insufficient case > score of a sufficient case)``, ties counting 1/2.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    insufficient : array-like of bool, shape (n,)
        True for bad cases; both classes must be present.

    Returns
    -------
    float
        AUROC in [0, 1]; 0.5 for an uninformative score.
    """
    scores = _vector(risk_scores, "risk_scores")
    labels = _labels(insufficient, "insufficient", scores.size)
    return _auroc(scores, labels)


def insufficient_at_quantile(dice: Sequence[float], q: float = 0.15) -> np.ndarray:
    """Label the cases whose Dice is strictly below the cohort's ``q``-quantile (paper 000).

    Parameters
    ----------
    dice : array-like, shape (n,)
        Per-case Dice.
    q : float
        Quantile level in (0, 1) (``numpy.quantile``, linear interpolation).

    Returns
    -------
    ndarray of bool, shape (n,)
        True for insufficient cases.
    """
    values = _vector(dice, "dice")
    if not 0 < q < 1:
        raise SegXAIInputError(f"q must be in (0, 1), got {q}")
    return values < np.quantile(values, q)


def auroc_at_thresholds(
    risk_scores: Sequence[float], dice: Sequence[float], thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC for ``insufficient = dice < t`` at each fixed Dice threshold ``t``.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    dice : array-like, shape (n,)
        Per-case Dice.
    thresholds : array-like, shape (t,)
        Dice thresholds.

    Returns
    -------
    auroc : ndarray, shape (t,)
        AUROC at each threshold; NaN where the threshold leaves one class only.
    n_insufficient : ndarray of int, shape (t,)
        Number of insufficient cases at each threshold (how much each AUROC rests on).
    """
    scores = _vector(risk_scores, "risk_scores")
    values = _vector(dice, "dice", scores.size)
    cuts = _vector(thresholds, "thresholds")
    result = np.full(cuts.size, np.nan)
    counts = np.zeros(cuts.size, dtype=int)
    for i, cut in enumerate(cuts):
        labels = values < cut
        counts[i] = int(labels.sum())
        if 0 < counts[i] < scores.size:
            result[i] = _auroc(scores, labels)
    return result, counts


# --------------------------------------------------------------------------- DeLong


class DeLongResult(NamedTuple):
    """Paired DeLong comparison of two AUROCs on the same cases."""

    auroc_a: float
    auroc_b: float
    difference: float  #: ``auroc_a - auroc_b``
    se: float  #: standard error of the difference
    z: float
    p_value: float  #: two-sided


def _placements(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values by midranks (Sun and Xu, IEEE SPL 2014).

    ``v10[i]``: fraction of negatives below positive ``i`` (ties 1/2); ``v01[j]``: fraction of
    positives above negative ``j`` (ties 1/2). ``mean(v10) = mean(v01) = AUROC``.
    """
    pos, neg = scores[labels], scores[~labels]
    combined = rankdata(np.concatenate((pos, neg)))
    v10 = (combined[: pos.size] - rankdata(pos)) / neg.size
    v01 = 1.0 - (combined[pos.size:] - rankdata(neg)) / pos.size
    return v10, v01


def _delong_covariance(scores: Sequence[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (m,) and DeLong's covariance matrix (m, m) of ``m`` scores on the same cases."""
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos < 2 or n_neg < 2:
        raise SegXAIInputError(
            f"insufficient must hold at least 2 cases of each class for DeLong's variance; "
            f"it has {n_pos} insufficient of {labels.size}"
        )
    v10, v01 = zip(*(_placements(s, labels) for s in scores))
    v10, v01 = np.array(v10), np.array(v01)
    covariance = np.atleast_2d(np.cov(v10)) / n_pos + np.atleast_2d(np.cov(v01)) / n_neg
    return v10.mean(axis=1), covariance


def delong_test(
    scores_a: Sequence[float], scores_b: Sequence[float], insufficient: Sequence[bool]
) -> DeLongResult:
    """DeLong's test for two correlated AUROCs (two detectors scored on the same cases).

    DeLong, DeLong and Clarke-Pearson, Biometrics 1988: the covariance of the two AUROCs from
    the structural components (placement values) of each case, ``S10 / n_pos + S01 / n_neg``;
    ``z = (A_a - A_b) / SE`` against a standard normal.

    Parameters
    ----------
    scores_a, scores_b : array-like, shape (n,)
        The two detectors' outputs, higher = riskier.
    insufficient : array-like of bool, shape (n,)
        True for bad cases; at least 2 of each class.

    Returns
    -------
    DeLongResult
        ``auroc_a``, ``auroc_b``, ``difference`` (a - b), ``se``, ``z`` and the two-sided
        ``p_value``. When the SE is 0 (e.g. identical scores): ``z = 0``, ``p = 1`` for a zero
        difference, ``z = +-inf``, ``p = 0`` otherwise.
    """
    a = _vector(scores_a, "scores_a")
    b = _vector(scores_b, "scores_b", a.size)
    labels = _labels(insufficient, "insufficient", a.size)
    aurocs, covariance = _delong_covariance((a, b), labels)
    difference = float(aurocs[0] - aurocs[1])
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    se = float(np.sqrt(max(variance, 0.0)))  # rounding can make a zero variance a hair negative
    if se > 0:
        z = difference / se
    else:
        z = 0.0 if difference == 0 else float(np.copysign(np.inf, difference))
    return DeLongResult(float(aurocs[0]), float(aurocs[1]), difference, se, z, float(2 * norm.sf(abs(z))))


def delong_ci(
    risk_scores: Sequence[float], insufficient: Sequence[bool], level: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """AUROC with a Wald confidence interval from DeLong's variance.

    Parameters
    ----------
    risk_scores : array-like, shape (n,)
        Detector output, higher = riskier.
    insufficient : array-like of bool, shape (n,)
        True for bad cases; at least 2 of each class.
    level : float
        Confidence level in (0, 1).

    Returns
    -------
    auroc : float
    ci : (float, float)
        ``auroc -+ z_{(1+level)/2} * SE``, clipped to [0, 1].
    """
    scores = _vector(risk_scores, "risk_scores")
    labels = _labels(insufficient, "insufficient", scores.size)
    level = _level(level)
    aurocs, covariance = _delong_covariance((scores,), labels)
    half = norm.ppf((1 + level) / 2) * np.sqrt(max(covariance[0, 0], 0.0))
    value = float(aurocs[0])
    return value, (max(value - half, 0.0), min(value + half, 1.0))


# --------------------------------------------------------------------------- bootstrap


class BootstrapResult(NamedTuple):
    """A statistic with its cluster-bootstrap percentile interval."""

    estimate: float  #: the statistic on the cohort itself
    ci: tuple[float, float]  #: percentile interval (NaN when no resample was usable)
    n_skipped: int  #: resamples where the statistic was undefined (left out of the interval)


class PairedBootstrapResult(NamedTuple):
    """Difference of one statistic between two scores, by a paired cluster bootstrap."""

    difference: float  #: ``statistic(scores_a) - statistic(scores_b)`` on the cohort
    ci: tuple[float, float]  #: percentile interval
    p_value: float  #: two-sided, from the resamples' sign
    n_skipped: int  #: resamples where either statistic was undefined


def _cluster_resamples(codes: np.ndarray, n_resamples: int, seed: int):
    """Yield the case indices of each cluster resample.

    Resample ``r`` draws ``rng.integers(0, G, size=G)`` groups (``rng =
    numpy.random.default_rng(seed)``, one draw per resample, in order) and takes every case of
    each drawn group as often as the group was drawn. Cases come out sorted by index.
    """
    rng = np.random.default_rng(seed)
    n_groups = int(codes.max()) + 1
    cases = np.arange(codes.size)
    for _ in range(n_resamples):
        times = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        yield np.repeat(cases, times[codes])


def _evaluate(statistic: Callable[..., float], arrays: Sequence[np.ndarray]) -> float:
    """The statistic of a resample; NaN where it refuses the resample (e.g. one class only).

    The callers also skip non-finite values the statistic returns itself.
    """
    try:
        value = float(statistic(*arrays))
    except SegXAIInputError:
        return float("nan")
    return value


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _resample_inputs(arrays: Sequence[Any], groups: Any, n_resamples: int) -> tuple[list[np.ndarray], np.ndarray]:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise SegXAIInputError(f"n_resamples must be an integer >= 1, got {n_resamples}")
    if not arrays:
        raise SegXAIInputError("arrays: give at least one per-case array to the statistic")
    data = [np.asarray(a) for a in arrays]
    n = data[0].shape[0] if data[0].ndim else 0
    for i, a in enumerate(data):
        if a.ndim == 0 or a.shape[0] != n:
            raise SegXAIInputError(
                f"arrays[{i}] has shape {a.shape}; every array needs {n} rows (one per case)"
            )
    if n == 0:
        raise SegXAIInputError("arrays are empty")
    return data, _groups(groups, n)


def cluster_bootstrap(
    statistic: Callable[..., float],
    *arrays: Any,
    groups: Any,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Percentile confidence interval of a statistic by resampling whole groups.

    Cases of one source scan or phantom seed are correlated; resampling the groups (with
    replacement, as many as there are) keeps that correlation inside each resample, so the
    interval is not too narrow. With one case per group this is the ordinary bootstrap.

    Parameters
    ----------
    statistic : callable
        ``statistic(*arrays) -> float`` on per-case arrays (rows = cases), e.g. :func:`auroc`
        or :func:`aurc`. It must not depend on the order of the cases. A resample where it
        raises :class:`SegXAIInputError` (e.g. one class only) or returns a non-finite value is
        skipped and counted.
    *arrays : array-like, shape (n, ...)
        Per-case inputs of ``statistic``, resampled together.
    groups : array-like, shape (n,)
        Group label of each case.
    n_resamples : int
        Number of resamples.
    seed : int
        Seed of ``numpy.random.default_rng``; resample ``r`` draws
        ``rng.integers(0, G, size=G)`` group codes (groups numbered in sorted label order).
    level : float
        Confidence level in (0, 1).

    Returns
    -------
    BootstrapResult
        ``estimate`` (the statistic on all cases, errors propagate), ``ci`` (low, high) and
        ``n_skipped``.
    """
    data, codes = _resample_inputs(arrays, groups, n_resamples)
    level = _level(level)
    estimate = float(statistic(*data))
    values = np.array([
        _evaluate(statistic, [a[i] for a in data]) for i in _cluster_resamples(codes, n_resamples, seed)
    ])
    valid = values[np.isfinite(values)]
    return BootstrapResult(estimate, _percentile_ci(valid, level), int(values.size - valid.size))


def paired_bootstrap_difference(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    targets: Any,
    groups: Any,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedBootstrapResult:
    """Difference of a statistic between two scores on the same cases, by cluster bootstrap.

    Both scores are evaluated on the same resampled cases, so their correlation cancels out of
    the interval. Two-sided p: the fraction of resampled differences on the other side of 0 than
    the observed one (0 included), with the +1 correction, doubled and capped at 1:
    ``min(1, 2 (1 + #{d* <= 0}) / (B + 1))`` for a positive difference (mirrored for a negative
    one; the smaller side for a zero difference), ``B`` the number of usable resamples.

    Parameters
    ----------
    statistic : callable
        ``statistic(scores, targets) -> float``, e.g. :func:`auroc` (targets = insufficient) or
        :func:`aurc` (targets = risk). Undefined resamples are skipped as in
        :func:`cluster_bootstrap`.
    scores_a, scores_b : array-like, shape (n,)
        The two detectors' outputs.
    targets : array-like, shape (n,)
        What the statistic compares the scores with.
    groups : array-like, shape (n,)
        Group label of each case.
    n_resamples, seed, level
        As in :func:`cluster_bootstrap` (same resamples for the same seed).

    Returns
    -------
    PairedBootstrapResult
        ``difference`` (a - b), ``ci``, ``p_value`` and ``n_skipped``.
    """
    (a, b, t), codes = _resample_inputs((scores_a, scores_b, targets), groups, n_resamples)
    level = _level(level)
    difference = float(statistic(a, t)) - float(statistic(b, t))
    values = np.array([
        _evaluate(statistic, (a[i], t[i])) - _evaluate(statistic, (b[i], t[i]))
        for i in _cluster_resamples(codes, n_resamples, seed)
    ])
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        p_value = float("nan")
    else:
        below = (1 + np.sum(valid <= 0)) / (valid.size + 1)
        above = (1 + np.sum(valid >= 0)) / (valid.size + 1)
        one_sided = below if difference > 0 else above if difference < 0 else min(below, above)
        p_value = float(min(1.0, 2 * one_sided))
    return PairedBootstrapResult(difference, _percentile_ci(valid, level), p_value, int(values.size - valid.size))


# --------------------------------------------------------------------------- multiple testing


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values (family-wise error rate).

    The ``i``-th smallest of ``m`` p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``
    (1-based): monotone in the order of the raw p-values, capped at 1.

    Parameters
    ----------
    pvalues : array-like, shape (m,)
        Raw p-values in [0, 1].

    Returns
    -------
    ndarray, shape (m,)
        Adjusted p-values, in the input order.
    """
    p = _vector(pvalues, "pvalues")
    if np.any((p < 0) | (p > 1)):
        raise SegXAIInputError("pvalues must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    factors = p.size - np.arange(p.size)
    adjusted = np.minimum(1.0, np.maximum.accumulate(factors * p[order]))
    result = np.empty_like(p)
    result[order] = adjusted
    return result


# --------------------------------------------------------------------------- rank correlation


def _pearson(x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    for d, ref, name in ((dx, x, names[0]), (dy, y, names[1])):
        # a spread at rounding level is no spread (e.g. ranks fully explained by the covariate)
        if np.linalg.norm(d) <= 1e-9 * max(np.linalg.norm(ref), 1.0):
            raise SegXAIInputError(f"{name} has no spread: the correlation is undefined")
    return float(np.clip(dx @ dy / (np.linalg.norm(dx) * np.linalg.norm(dy)), -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks.

    Parameters
    ----------
    x, y : array-like, shape (n,)
        Paired values; neither constant.

    Returns
    -------
    float
        rho in [-1, 1].
    """
    a = _vector(x, "x")
    b = _vector(y, "y", a.size)
    return _pearson(rankdata(a), rankdata(b), ("x", "y"))


def partial_spearman(x: Sequence[float], y: Sequence[float], covariate: Sequence[float]) -> float:
    """Spearman correlation of ``x`` and ``y`` with the (rank-linear) effect of a covariate removed.

    The three variables are rank-transformed; the ranks of ``x`` and of ``y`` are each
    regressed (least squares with intercept) on the ranks of ``covariate``, and the result is
    Pearson's correlation of the residuals. It equals
    ``(r_xy - r_xc r_yc) / sqrt((1 - r_xc^2)(1 - r_yc^2))`` with the pairwise Spearman rhos.
    Use it to ask whether a score tracks Dice beyond what log volume already explains.

    Parameters
    ----------
    x, y, covariate : array-like, shape (n,)
        Paired values.

    Returns
    -------
    float
        Partial rho in [-1, 1].
    """
    a = _vector(x, "x")
    b = _vector(y, "y", a.size)
    c = _vector(covariate, "covariate", a.size)
    design = np.column_stack((np.ones(a.size), rankdata(c)))
    ranks = np.column_stack((rankdata(a), rankdata(b)))
    coefficients, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    residuals = ranks - design @ coefficients
    return _pearson(residuals[:, 0], residuals[:, 1], ("x given covariate", "y given covariate"))


# --------------------------------------------------------------------------- cross-validation


def repeated_grouped_folds(
    groups: Any, n_splits: int = 5, n_repeats: int = 10, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Repeated K-fold splits that never put one group on both sides.

    Each repeat shuffles the groups (``numpy.random.default_rng(seed)``, one permutation per
    repeat) and deals them in that order to the fold holding the fewest cases so far (the
    lowest-numbered on a tie), which balances case counts while the shuffle makes the folds
    differ between repeats. Deterministic for a seed. With few groups repeats can coincide
    (e.g. as many groups as folds: leave-one-group-out every time).

    Parameters
    ----------
    groups : array-like, shape (n,)
        Group label of each case (source scan, phantom seed).
    n_splits : int
        Folds per repeat, 2 .. number of groups.
    n_repeats : int
        Number of repeats, >= 1.
    seed : int
        Random seed.

    Returns
    -------
    list of (train_idx, test_idx)
        ``n_repeats * n_splits`` pairs of sorted int index arrays, repeat after repeat; in each
        repeat every case is in exactly one ``test_idx``.
    """
    labels = np.asarray(groups)
    if labels.ndim != 1 or labels.size == 0:
        raise SegXAIInputError(f"groups must be a non-empty vector (one label per case), got shape {labels.shape}")
    codes = _groups(labels, labels.size)
    n_groups = int(codes.max()) + 1
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise SegXAIInputError(f"n_splits must be an integer >= 2, got {n_splits}")
    if n_splits > n_groups:
        raise SegXAIInputError(f"n_splits ({n_splits}) is larger than the number of groups ({n_groups})")
    if not isinstance(n_repeats, (int, np.integer)) or n_repeats < 1:
        raise SegXAIInputError(f"n_repeats must be an integer >= 1, got {n_repeats}")
    sizes = np.bincount(codes, minlength=n_groups)
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(n_repeats):
        fold_of_group = np.empty(n_groups, dtype=int)
        load = np.zeros(n_splits, dtype=int)
        for group in rng.permutation(n_groups):
            fold = int(np.argmin(load))
            fold_of_group[group] = fold
            load[fold] += sizes[group]
        fold_of_case = fold_of_group[codes]
        for fold in range(n_splits):
            test = fold_of_case == fold
            splits.append((np.flatnonzero(~test), np.flatnonzero(test)))
    return splits


def out_of_fold_predictions(
    fit: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], Any]],
    features: Any,
    targets: Any,
    groups: Any,
    n_splits: int = 5,
    n_repeats: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Held-out predictions of a model refitted inside every fold of :func:`repeated_grouped_folds`.

    Everything learnt (PCA, sigmoid, cut points, logistic or random-forest weights) must happen
    inside ``fit`` so that no test case informs its own prediction.

    Parameters
    ----------
    fit : callable
        ``fit(train_features, train_targets) -> predict``, with
        ``predict(test_features) -> array of shape (n_test,)``.
    features : array-like, shape (n, ...)
        Per-case inputs (rows = cases).
    targets : array-like, shape (n,)
        Per-case targets (e.g. Dice or insufficient labels).
    groups : array-like, shape (n,)
        Group label of each case.
    n_splits, n_repeats, seed
        As in :func:`repeated_grouped_folds`.

    Returns
    -------
    ndarray, shape (n_repeats, n)
        Row ``r``: each case's prediction by the model fitted on the other folds of repeat ``r``.
    """
    x = np.asarray(features)
    y = np.asarray(targets)
    if x.ndim == 0 or x.shape[0] == 0:
        raise SegXAIInputError("features must have one row per case")
    n = x.shape[0]
    if y.shape != (n,):
        raise SegXAIInputError(f"targets must have shape ({n},) (one per case), got {y.shape}")
    if np.issubdtype(x.dtype, np.number) and not np.all(np.isfinite(x)):
        raise SegXAIInputError("features holds non-finite values")
    if np.issubdtype(y.dtype, np.number) and not np.all(np.isfinite(y)):
        raise SegXAIInputError("targets holds non-finite values")
    if np.asarray(groups).shape != (n,):
        raise SegXAIInputError(f"groups must have shape ({n},) (one per case), got {np.asarray(groups).shape}")
    splits = repeated_grouped_folds(groups, n_splits, n_repeats, seed)
    predictions = np.full((n_repeats, n), np.nan)
    for index, (train, test) in enumerate(splits):
        predict = fit(x[train], y[train])
        values = np.asarray(predict(x[test]), dtype=np.float64)
        if values.shape != (test.size,):
            raise SegXAIInputError(
                f"fit returned a predictor whose output has shape {values.shape}, expected ({test.size},)"
            )
        predictions[index // n_splits, test] = values
    return predictions
