"""Judging reference-free QA detectors on one cohort (QA_PROTOCOL.md): every detector on the
same cases, out of sample, with confidence intervals and paired tests against each baseline.

A *detector* turns a case into a risk score (higher = riskier). Fixed detectors (the
predicted volume, the mask's shape, softmax and uncertainty scores, image-quality measures)
take their direction from :data:`SegXAILib.qa.scores.RISK_DIRECTION` and fit nothing. Fitted
detectors (the PC1 of Euler characteristic curves, the quality regressor, the logistic
combinations) are fitted inside grouped folds (:func:`repeated_grouped_folds`, by phantom seed
or source scan) and scored on the held-out fold only, repeated ``n_repeats`` times; a case's
score is the mean of its held-out scores over the repeats. Every detector's estimated Dice is
an isotonic regression of Dice on its score, fitted in the same folds.

Metrics (1 - Dice is the risk): AURC and excess AURC (primary), AUROC for Dice below the
cohort's 15 % quantile and at fixed Dice thresholds, Spearman and partial Spearman given log
volume, MAE of the estimated Dice. 95 % CIs by cluster bootstrap (by group); each saliency
detector against each baseline (the best detector of each baseline family on the cohort):
paired cluster-bootstrap difference in AURC and DeLong for AUROC, Holm-corrected across the
baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..evaluation.failure_detection import (
    aurc,
    auroc,
    cluster_bootstrap,
    delong_test,
    excess_aurc,
    holm,
    optimal_aurc,
    paired_bootstrap_difference,
    partial_spearman,
    repeated_grouped_folds,
    spearman,
)
from .scores import RISK_DIRECTION

__all__ = ["ADMISSION_MAX_VOLUME_AUROC", "ADMISSION_MIN_INSUFFICIENT", "DICE_THRESHOLDS", "Detector",
           "detector_scores", "kind_folds", "admission", "benchmark_cohort", "benchmark_markdown", "shippable_method",
           "best_shippable"]

#: version of the detectors and statistics: a kept result of another version is recomputed
BENCHMARK_VERSION = 2
#: a cohort is evidence only if the predicted volume's AUROC is at most this (every direction) ...
ADMISSION_MAX_VOLUME_AUROC = 0.70
#: ... with at least this many insufficient cases
ADMISSION_MIN_INSUFFICIENT = 30
#: the protocol's baseline rows; each saliency detector is compared with the best detector of each
BASELINE_FAMILIES = ("random", "volume", "shape", "softmax", "uncertainty", "regressor", "control", "image quality",
                     "agreement")
#: fixed Dice thresholds of the secondary AUROCs
DICE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9)
#: score groups (QA_PROTOCOL.md's table rows) by score name prefix
_FAMILIES = (
    ("volume", ("volume_", "log_volume")),
    ("shape", ("component_count", "compactness", "euler_characteristic", "largest_component")),
    ("softmax", ("mean_max_softmax", "mean_entropy", "soft_dice")),
    ("uncertainty", ("tta_", "mc_dropout_", "ensemble_")),
    ("image quality", ("noise_sigma", "laplacian")),
    ("agreement", ("dice_with_prediction",)),
)


@dataclass
class Detector:
    """One detector's held-out risk scores.

    ``scores``: ``(N,)`` mean held-out score per case (fixed detectors: the score itself);
    ``repeats``: ``(R, N)`` per-repeat held-out scores (fitted detectors) or None; ``family``:
    the protocol's row (volume, shape, softmax, uncertainty, regressor, control, saliency,
    combination, random).
    """

    name: str
    family: str
    scores: np.ndarray
    repeats: Optional[np.ndarray] = None
    description: str = ""


def _family(name: str) -> str:
    for family, prefixes in _FAMILIES:
        if any(name.startswith(p) for p in prefixes):
            return family
    return "other"


def _pc1_fit(train_curves: np.ndarray, train_dice: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """PC1 of the training curves, oriented so that a higher score is riskier (lower Dice)."""
    from ..topology.risk import _fit_pca

    mean, components, _ = _fit_pca(train_curves, train_dice, 1)
    return lambda curves: -((curves - mean) @ components[0])


def _fitted(fit: Callable[[np.ndarray, np.ndarray], Callable], features: np.ndarray, dice: np.ndarray,
            folds: Sequence[tuple[np.ndarray, np.ndarray]], n_repeats: int) -> np.ndarray:
    """``(R, N)`` held-out predictions of ``fit`` over the repeated folds."""
    n = len(dice)
    out = np.full((n_repeats, n), np.nan)
    per_repeat = len(folds) // n_repeats
    for f, (train, test) in enumerate(folds):
        predict = fit(features[train], dice[train])
        out[f // per_repeat, test] = predict(features[test])
    return out


def _standardise(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(train, axis=0)
    scale = np.nanstd(train, axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


def _regressor_fit(seed: int) -> Callable:
    def fit(x: np.ndarray, dice: np.ndarray) -> Callable:
        from sklearn.ensemble import RandomForestRegressor

        fill = np.nanmedian(x, axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        forest = RandomForestRegressor(n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1)
        forest.fit(np.where(np.isfinite(x), x, fill), dice)
        return lambda z: -forest.predict(np.where(np.isfinite(z), z, fill))
    return fit


def _combination_fit(curve_column: int, quantile: float) -> Callable:
    """Logistic regression of "insufficient" (Dice below the training fold's quantile) on a fixed
    score (column 0, already risk-oriented) and the PC1 of the curves (columns ``curve_column:``)."""
    def fit(x: np.ndarray, dice: np.ndarray) -> Callable:
        from sklearn.linear_model import LogisticRegression

        pc1 = _pc1_fit(x[:, curve_column:], dice)
        z = np.column_stack([x[:, 0], pc1(x[:, curve_column:])])
        mean, scale = _standardise(z)
        labels = dice < np.quantile(dice, quantile)
        if labels.all() or not labels.any():
            return lambda q: np.zeros(len(q))
        logistic = LogisticRegression(C=1.0).fit((z - mean) / scale, labels)
        return lambda q: logistic.decision_function(
            (np.column_stack([q[:, 0], pc1(q[:, curve_column:])]) - mean) / scale)
    return fit


def detector_scores(
    cases: Sequence[Mapping[str, Any]],
    curves: Sequence[Mapping[str, np.ndarray]],
    methods: Sequence[str],
    n_splits: int = 5,
    n_repeats: int = 10,
    seed: int = 0,
    quantile: float = 0.15,
    folds: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None,
) -> list[Detector]:
    """Every detector of the protocol on the cohort's usable cases.

    Parameters
    ----------
    cases : sequence of dict
        Cohort entries with ``dice``, ``group`` and ``scores`` (name -> float or None).
    curves : sequence of dict
        Per case: curve name -> ``(T,)`` (each method, ``control_shuffled:<method>``,
        ``control_intensity``).
    methods : sequence of str
        The saliency methods to judge (curves present in every case).
    folds : sequence of (train, test) index arrays, optional
        Folds to fit in instead of the repeated grouped folds (one repeat), e.g.
        :func:`kind_folds`.
    """
    dice = np.array([float(c["dice"]) for c in cases])
    groups = np.array([str(c.get("group", c["case_id"])) for c in cases])
    n = len(dice)
    if folds is None:
        folds = repeated_grouped_folds(groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    else:
        n_repeats = 1
    names = sorted({k for c in cases for k, v in (c.get("scores") or {}).items()})
    table = np.array([[np.nan if (c["scores"].get(k) is None) else float(c["scores"][k]) for k in names]
                      for c in cases], dtype=np.float64)
    detectors = [Detector("random", "random", np.random.default_rng(seed).random(n),
                          description="uniform random (seeded)")]

    volume = None
    for j, name in enumerate(names):
        column = table[:, j]
        if not np.isfinite(column).all() or np.ptp(column) == 0:
            continue
        direction = RISK_DIRECTION.get(name, 0)
        if name == "log_volume":
            volume = column
            detectors += [
                Detector("volume (smaller riskier)", "volume", -column, description="-log predicted volume"),
                Detector("volume (larger riskier)", "volume", column, description="log predicted volume"),
                Detector("volume (deviation)", "volume", np.abs(column - np.median(column)),
                         description="|log(volume / median)|"),
            ]
            continue
        if name == "euler_characteristic":
            detectors.append(Detector("mask Euler |chi - 1|", "shape", np.abs(column - 1.0),
                                      description="distance of the mask's Euler characteristic from a ball's"))
            continue
        if direction == 0:
            continue  # two-sided scores other than these (the raw volumes) have no direction
        detectors.append(Detector(name, _family(name), direction * column, description=f"score {name}"))

    # the quality regressor on every finite fixed score (rows 1-4 of the protocol)
    usable = [j for j, name in enumerate(names) if np.isfinite(table[:, j]).mean() > 0.5
              and _family(name) in ("volume", "shape", "softmax", "uncertainty")]
    if usable:
        held = _fitted(_regressor_fit(seed), table[:, usable], dice, folds, n_repeats)
        detectors.append(Detector("quality regressor (random forest)", "regressor", held.mean(0), held,
                                  description="random forest on volume, shape, softmax and uncertainty scores"))

    def curve_stack(name: str) -> Optional[np.ndarray]:
        if not all(name in c for c in curves):
            return None
        return np.asarray([c[name] for c in curves], dtype=np.float64)

    def pc1_detector(label: str, family: str, stack: np.ndarray, description: str) -> Detector:
        held = _fitted(_pc1_fit, stack, dice, folds, n_repeats)
        return Detector(label, family, held.mean(0), held, description)

    intensity = curve_stack("control_intensity")
    if intensity is not None and np.ptp(intensity) > 0:
        detectors.append(pc1_detector("control: intensity EC PC1", "control", intensity,
                                      "EC curve of the image intensity inside the contour"))
    voxels = np.array([max(1, int(c.get("contour_voxels") or c.get("predicted_voxels") or 1)) for c in cases], float)
    pairwise = table[:, names.index("tta_pairwise_dice")] if "tta_pairwise_dice" in names else None
    for method in methods:
        stack = curve_stack(method)
        if stack is None or np.ptp(stack) == 0:
            continue
        detectors.append(pc1_detector(f"EC PC1: {method}", "saliency", stack,
                                      f"PC1 of the EC curves of {method} inside the contour"))
        detectors.append(pc1_detector(f"EC PC1 / voxels: {method}", "ablation", stack / voxels[:, None],
                                      "ablation: the curve divided by the contour's voxel count"))
        detectors.append(pc1_detector(f"EC PC1 without t=0: {method}", "ablation", stack[:, 1:],
                                      "ablation: the t = 0 point (the mask's own EC) dropped"))
        shuffled = curve_stack(f"control_shuffled:{method}")
        if shuffled is not None and np.ptp(shuffled) > 0:
            detectors.append(pc1_detector(f"control: shuffled {method} EC PC1", "control", shuffled,
                                          "the saliency permuted inside the contour"))
        if volume is not None:
            held = _fitted(_combination_fit(1, quantile), np.column_stack([-volume, stack]), dice, folds, n_repeats)
            detectors.append(Detector(f"volume + PC1: {method}", "combination", held.mean(0), held,
                                      "logistic on -log volume and the EC PC1"))
        if pairwise is not None and np.isfinite(pairwise).all():
            held = _fitted(_combination_fit(1, quantile), np.column_stack([-pairwise, stack]), dice, folds, n_repeats)
            detectors.append(Detector(f"pairwise Dice + PC1: {method}", "combination", held.mean(0), held,
                                      "logistic on -TTA pairwise Dice and the EC PC1"))
    return detectors


def kind_folds(cases: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-degradation-kind-out folds (QA_PROTOCOL.md): each kind held out once, fitted
    on the others; empty when the cohort has fewer than two kinds."""
    kinds = np.array([str(c.get("kind", "")) for c in cases])
    names = sorted(set(kinds))
    if len(names) < 2:
        return []
    return [(np.flatnonzero(kinds != k), np.flatnonzero(kinds == k)) for k in names]


def _estimated_dice(score: np.ndarray, dice: np.ndarray, folds, n_repeats: int) -> np.ndarray:
    """Held-out isotonic estimate of Dice from a risk score (decreasing), mean over repeats."""
    from sklearn.isotonic import IsotonicRegression

    def fit(x: np.ndarray, d: np.ndarray) -> Callable:
        model = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(x[:, 0], d)
        return lambda z: model.predict(z[:, 0])

    return _fitted(fit, score[:, None], dice, folds, n_repeats).mean(0)


def admission(dice: np.ndarray, log_volume: np.ndarray, quantile: float = 0.15) -> dict[str, Any]:
    """The admission rule: predicted volume AUROC <= 0.70 one-sided both ways and two-sided,
    with at least 30 insufficient cases."""
    insufficient = dice < np.quantile(dice, quantile)
    result: dict[str, Any] = {"n_cases": int(len(dice)), "n_insufficient": int(insufficient.sum()),
                              "insufficient_dice": float(np.quantile(dice, quantile))}
    if insufficient.all() or not insufficient.any():
        result.update(admitted=False, reason="one class only")
        return result
    aurocs = {"smaller": auroc(-log_volume, insufficient), "larger": auroc(log_volume, insufficient),
              "deviation": auroc(np.abs(log_volume - np.median(log_volume)), insufficient)}
    result["volume_auroc"] = aurocs
    worst = max(aurocs.values())
    reasons = []
    if worst > ADMISSION_MAX_VOLUME_AUROC:
        reasons.append(f"predicted volume AUROC {worst:.2f} > {ADMISSION_MAX_VOLUME_AUROC}")
    if insufficient.sum() < ADMISSION_MIN_INSUFFICIENT:
        reasons.append(f"{int(insufficient.sum())} insufficient cases < {ADMISSION_MIN_INSUFFICIENT}")
    result.update(admitted=not reasons, reason="; ".join(reasons) or "admitted")
    return result


def _partial(scores: np.ndarray, risk: np.ndarray, log_volume: np.ndarray) -> Optional[float]:
    """Partial Spearman given log volume; None when the score is a function of the volume."""
    try:
        return float(partial_spearman(scores, risk, log_volume))
    except SegXAIInputError:
        return None


def _ci(values: tuple) -> list[float]:
    return [float(values[0]), float(values[1])]


def benchmark_cohort(
    cases: Sequence[Mapping[str, Any]],
    curves: Sequence[Mapping[str, np.ndarray]],
    methods: Sequence[str],
    n_splits: int = 5,
    n_repeats: int = 10,
    n_resamples: int = 2000,
    quantile: float = 0.15,
    seed: int = 0,
) -> dict[str, Any]:
    """The cohort's table: every detector's metrics with CIs, and each saliency detector's paired
    comparison with each baseline; with every case's held-out score per detector (``scores``,
    in the order of ``case_ids``) for plots. JSON-ready."""
    if len(cases) < 2 * n_splits:
        raise SegXAIInputError(f"cases: {len(cases)} usable case(s), need at least {2 * n_splits} for "
                               f"{n_splits}-fold cross-validation")
    dice = np.array([float(c["dice"]) for c in cases])
    risk = 1.0 - dice
    groups = np.array([str(c.get("group", c["case_id"])) for c in cases])
    log_volume = np.array([float(c["scores"]["log_volume"]) for c in cases])
    insufficient = dice < np.quantile(dice, quantile)
    folds = repeated_grouped_folds(groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    detectors = detector_scores(cases, curves, methods, n_splits, n_repeats, seed, quantile)
    rows = []
    for index, d in enumerate(detectors):
        estimate = _estimated_dice(d.scores, dice, folds, n_repeats)
        row: dict[str, Any] = {
            "detector": d.name, "family": d.family, "description": d.description,
            "aurc": float(aurc(d.scores, risk)), "excess_aurc": float(excess_aurc(d.scores, risk)),
            "auroc": float(auroc(d.scores, insufficient)),
            "spearman": float(spearman(d.scores, risk)),
            "partial_spearman": _partial(d.scores, risk, log_volume),
            "mae_estimated_dice": float(np.mean(np.abs(estimate - dice))),
            "auroc_at_dice": {f"{t:g}": (float(auroc(d.scores, dice < t)) if 0 < (dice < t).sum() < len(dice)
                                         else None) for t in DICE_THRESHOLDS},
        }
        aurc_point, aurc_ci = cluster_bootstrap(lambda s, r: aurc(s, r), d.scores, risk, groups=groups,
                                                n_resamples=n_resamples, seed=seed + index)[:2]
        auroc_point, auroc_ci = cluster_bootstrap(lambda s, y: auroc(s, y), d.scores, insufficient,
                                                  groups=groups, n_resamples=n_resamples, seed=seed + index)[:2]
        row["aurc_ci"], row["auroc_ci"] = _ci(aurc_ci), _ci(auroc_ci)
        if d.repeats is not None:
            per = [aurc(r, risk) for r in d.repeats]
            row["aurc_repeats"] = [float(np.mean(per)), float(np.std(per))]
        rows.append(row)

    # leave-one-degradation-kind-out: the fitted detectors refitted with each kind unseen
    by_kind = kind_folds(cases)
    if by_kind:
        held = {d.name: d for d in detector_scores(cases, curves, methods, n_splits, n_repeats, seed, quantile,
                                                   folds=by_kind)}
        for row in rows:
            d = held.get(row["detector"])
            if d is not None and d.repeats is not None:
                row["aurc_leave_kind_out"] = float(aurc(d.scores, risk))
                row["auroc_leave_kind_out"] = float(auroc(d.scores, insufficient))

    # each baseline row of the protocol: the family's best detector (lowest AURC) on this cohort
    aurc_of = {r["detector"]: r["aurc"] for r in rows}
    best_of: dict[str, Detector] = {}
    for d in detectors:
        if d.family in BASELINE_FAMILIES and (d.family not in best_of or aurc_of[d.name] < aurc_of[best_of[d.family].name]):
            best_of[d.family] = d
    baselines = [best_of[f] for f in BASELINE_FAMILIES if f in best_of]
    comparisons = []
    for index, d in enumerate(x for x in detectors if x.family in ("saliency", "combination")):
        tests = []
        for b in baselines:
            difference, ci, p_aurc = paired_bootstrap_difference(
                lambda s, r: aurc(s, r), d.scores, b.scores, risk, groups=groups, n_resamples=n_resamples,
                seed=seed + 1000 + index)[:3]
            delong = delong_test(d.scores, b.scores, insufficient)
            tests.append({"baseline": b.name, "delta_aurc": float(difference), "delta_aurc_ci": _ci(ci),
                          "p_aurc": float(p_aurc), "delta_auroc": float(delong.difference),
                          "p_auroc": float(delong.p_value)})
        for key in ("p_aurc", "p_auroc"):
            adjusted = holm(np.array([t[key] for t in tests]))
            for t, p in zip(tests, adjusted):
                t[f"{key}_holm"] = float(p)
        comparisons.append({"detector": d.name, "tests": tests})
    best = min(rows, key=lambda r: r["aurc"])
    return {
        "n_cases": int(len(cases)), "n_groups": int(len(set(groups))), "quantile": quantile,
        "insufficient_dice": float(np.quantile(dice, quantile)), "n_insufficient": int(insufficient.sum()),
        "optimal_aurc": float(optimal_aurc(risk)), "dice": {"min": float(dice.min()), "median": float(np.median(dice)),
                                                             "max": float(dice.max())},
        "admission": admission(dice, log_volume, quantile),
        "cross_validation": {"n_splits": n_splits, "n_repeats": n_repeats, "group_by": "group", "seed": seed},
        "bootstrap": {"n_resamples": n_resamples, "level": 0.95, "by": "group"},
        "rows": rows, "comparisons": comparisons, "best": best["detector"],
        "case_ids": [str(c["case_id"]) for c in cases], "dice_values": [float(v) for v in dice],
        "scores": {d.name: [float(v) for v in d.scores] for d in detectors},
    }


def shippable_method(row: Mapping[str, Any]) -> Optional[str]:
    """The risk-model method (``segxai qa calibrate --method``) that ships a detector row, or
    None when a risk model cannot carry it (random, controls, ablations, the forest, the
    combinations, two-sided scores): ``EC PC1: <method>`` -> ``<method>``; a one-sided
    reference-free score -> ``feature:<score>``; the predicted volume -> ``feature:log_volume``."""
    name, family = str(row["detector"]), str(row["family"])
    if family == "saliency" and name.startswith("EC PC1: "):
        return name[len("EC PC1: "):]
    if family == "volume" and name in ("volume (smaller riskier)", "volume (larger riskier)"):
        return "feature:log_volume"
    if family in ("shape", "softmax", "uncertainty", "image quality", "agreement") and RISK_DIRECTION.get(name, 0):
        return f"feature:{name}"
    return None


def best_shippable(result: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The method of the shippable detector with the lowest AURC on a cohort's table, and its row."""
    rows = [r for r in sorted(result["rows"], key=lambda r: r["aurc"]) if shippable_method(r)]
    if not rows:
        raise SegXAIInputError("result: no detector of this table can be shipped as a risk model")
    return shippable_method(rows[0]), rows[0]


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def benchmark_markdown(name: str, result: Mapping[str, Any], description: str = "") -> str:
    """One cohort's table in Markdown (rows sorted by AURC, best first)."""
    a = result["admission"]
    volume = a.get("volume_auroc", {})
    lines = [f"### {name}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"{result['n_cases']} cases in {result['n_groups']} groups; Dice {result['dice']['min']:.2f} / "
        f"{result['dice']['median']:.2f} / {result['dice']['max']:.2f} (min / median / max); insufficient = Dice < "
        f"{result['insufficient_dice']:.3f} ({result['n_insufficient']} cases); optimal AURC "
        f"{result['optimal_aurc']:.4f}.",
        "",
        f"**Admission: {'admitted' if a['admitted'] else 'NOT admitted'}** ({a['reason']}); predicted-volume AUROC "
        + ", ".join(f"{k} {v:.2f}" for k, v in volume.items()) + ".",
        "",
        "| detector | family | AURC [95 % CI] | excess AURC | AUROC q15 [95 % CI] | AUROC Dice<0.7 | Spearman | "
        "partial Spearman (log vol.) | MAE est. Dice | AURC leave-kind-out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: r["aurc"]):
        lines.append(
            f"| {r['detector']} | {r['family']} | {r['aurc']:.4f} [{r['aurc_ci'][0]:.4f}, {r['aurc_ci'][1]:.4f}] | "
            f"{r['excess_aurc']:.4f} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] | "
            f"{_fmt(r['auroc_at_dice'].get('0.7'))} | {r['spearman']:.3f} | {_fmt(r['partial_spearman'])} | "
            f"{r['mae_estimated_dice']:.3f} | {_fmt(r.get('aurc_leave_kind_out'), 4)} |")
    shipped, row = best_shippable(result)
    lines += ["", f"Best detector: **{result['best']}**; best that a risk model can carry: **{row['detector']}** "
              f"(`segxai qa calibrate --method {shipped}`)."]
    lines += ["", "Paired comparisons (saliency and combinations against each baseline; delta AURC < 0 means the "
              "first is better; p-values Holm-corrected across baselines):", "",
              "| detector | strongest baseline | delta AURC [95 % CI] | p (Holm) | beats every baseline (AURC, p < 0.05) |",
              "|---|---|---|---|---|"]
    rows = {r["detector"]: r for r in result["rows"]}
    for c in result["comparisons"]:
        tests = [t for t in c["tests"] if t["baseline"] != "random"]
        if not tests:
            continue
        strongest = min(tests, key=lambda t: rows[t["baseline"]]["aurc"])
        beats = all(t["delta_aurc"] < 0 and t["p_aurc_holm"] < 0.05 for t in tests)
        lines.append(f"| {c['detector']} | {strongest['baseline']} | {strongest['delta_aurc']:+.4f} "
                     f"[{strongest['delta_aurc_ci'][0]:+.4f}, {strongest['delta_aurc_ci'][1]:+.4f}] | "
                     f"{strongest['p_aurc_holm']:.3g} | {'yes' if beats else 'no'} |")
    return "\n".join(lines) + "\n"
