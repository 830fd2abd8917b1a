"""The QA benchmark's detectors and statistics on synthetic cohorts with known answers
(QA_PROTOCOL.md): a score equal to the Dice is the oracle, curves that carry the Dice give a
PC1 detector near it, random curves give chance, and the admission rule catches a cohort
whose predicted volume gives the answer away."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SegXAILib.evaluation.failure_detection import optimal_aurc
from SegXAILib.image import SegXAIInputError
from SegXAILib.qa.benchmark import admission, benchmark_cohort, benchmark_markdown, detector_scores


def synthetic_cohort(n_groups: int = 40, per_group: int = 3, seed: int = 0, volume_tracks_dice: bool = False):
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    dice = rng.uniform(0.3, 0.95, n)
    log_volume = np.log(20.0) + (2.0 * dice if volume_tracks_dice else rng.normal(0.0, 0.5, n))
    shape = np.sin(np.linspace(0.0, np.pi, 30))
    cases, curves = [], []
    for i in range(n):
        cases.append({"case_id": f"case_{i:03d}", "group": f"g{i // per_group}", "dice": float(dice[i]),
                      "contour_voxels": 100,
                      "scores": {"log_volume": float(log_volume[i]), "tta_pairwise_dice": float(dice[i]),
                                 "compactness": float(rng.random())}})
        curves.append({"signal": 100.0 * (1.0 - dice[i]) * shape + rng.normal(0.0, 0.5, shape.size),
                       "control_shuffled:signal": rng.normal(0.0, 1.0, shape.size),
                       "control_intensity": rng.normal(0.0, 1.0, shape.size)})
    return cases, curves, dice


def test_detectors_oracle_signal_and_chance():
    cases, curves, dice = synthetic_cohort()
    result = benchmark_cohort(cases, curves, ["signal"], n_splits=5, n_repeats=2, n_resamples=1000, seed=0)
    rows = {r["detector"]: r for r in result["rows"]}
    risk = 1.0 - dice
    # the pairwise Dice equals the Dice: the oracle ordering (no ties): excess AURC 0, AUROC 1
    oracle = rows["tta_pairwise_dice"]
    assert oracle["excess_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert oracle["aurc"] == pytest.approx(optimal_aurc(risk))
    assert oracle["auroc"] == 1.0 and oracle["spearman"] == pytest.approx(1.0)
    # curves proportional to 1 - Dice (plus small noise): the held-out PC1 ranks nearly perfectly
    assert rows["EC PC1: signal"]["auroc"] > 0.97
    assert rows["EC PC1: signal"]["excess_aurc"] < 0.2 * rows["random"]["excess_aurc"]
    # pure-noise controls: chance; the null SD of an AUROC with 18 / 102 cases is about 0.07
    for name in ("control: shuffled signal EC PC1", "control: intensity EC PC1", "compactness"):
        assert abs(rows[name]["auroc"] - 0.5) < 5 * 0.075, name
    # the CI holds the point estimate; the held-out estimate of Dice from the oracle is close
    for row in result["rows"]:
        assert row["aurc_ci"][0] <= row["aurc"] + 1e-12 and row["aurc"] <= row["aurc_ci"][1] + 1e-12 or \
            row["detector"] == "random"
    assert oracle["mae_estimated_dice"] < 0.05
    # paired comparisons: the signal beats random (Holm-adjusted p >= raw p, monotone)
    signal = next(c for c in result["comparisons"] if c["detector"] == "EC PC1: signal")
    versus_random = next(t for t in signal["tests"] if t["baseline"] == "random")
    assert versus_random["delta_aurc"] < 0 and versus_random["p_aurc_holm"] < 0.05
    assert all(t["p_aurc_holm"] >= t["p_aurc"] - 1e-12 for t in signal["tests"])
    json.dumps(result, allow_nan=False)
    text = benchmark_markdown("synthetic", result)
    assert "EC PC1: signal" in text and "NOT admitted" in text  # 18 insufficient cases < 30


def test_fitted_detectors_are_held_out():
    """A PC1 fitted in-sample on pure-noise curves finds spurious signal; held out it may not."""
    cases, curves, dice = synthetic_cohort(seed=3)
    for c in curves:
        c["signal"] = c["control_intensity"]
    detectors = {d.name: d for d in detector_scores(cases, curves, ["signal"], n_splits=5, n_repeats=3, seed=0)}
    held = detectors["EC PC1: signal"]
    assert held.repeats.shape == (3, len(cases)) and np.isfinite(held.repeats).all()
    from SegXAILib.evaluation.failure_detection import auroc
    insufficient = dice < np.quantile(dice, 0.15)
    assert abs(auroc(held.scores, insufficient) - 0.5) < 5 * 0.075


def test_admission_rule():
    cases, _, dice = synthetic_cohort(volume_tracks_dice=True)
    log_volume = np.array([c["scores"]["log_volume"] for c in cases])
    verdict = admission(dice, log_volume)
    assert not verdict["admitted"] and verdict["volume_auroc"]["smaller"] == 1.0
    assert "predicted volume AUROC 1.00" in verdict["reason"]
    cases, _, dice = synthetic_cohort(n_groups=100, per_group=3, seed=1)
    log_volume = np.array([c["scores"]["log_volume"] for c in cases])
    verdict = admission(dice, log_volume)
    assert verdict["n_insufficient"] >= 30 and verdict["admitted"], verdict


def test_too_few_cases_refused():
    cases, curves, _ = synthetic_cohort(n_groups=3, per_group=2)
    with pytest.raises(SegXAIInputError, match="cases: 6 usable"):
        benchmark_cohort(cases, curves, ["signal"])


def test_leave_one_kind_out():
    """Fitted detectors refitted with each degradation kind unseen: curves carrying the Dice in
    every kind still rank; a cohort of one kind has no such column."""
    from SegXAILib.qa.benchmark import kind_folds

    cases, curves, dice = synthetic_cohort()
    assert kind_folds(cases) == []
    for i, case in enumerate(cases):
        case["kind"] = "abc"[i % 3]
    folds = kind_folds(cases)
    assert [len(test) for _, test in folds] == [40, 40, 40]
    assert all(set(train).isdisjoint(test) and len(train) + len(test) == len(cases) for train, test in folds)
    result = benchmark_cohort(cases, curves, ["signal"], n_splits=5, n_repeats=1, n_resamples=100, seed=0)
    rows = {r["detector"]: r for r in result["rows"]}
    assert rows["EC PC1: signal"]["auroc_leave_kind_out"] > 0.95
    assert "aurc_leave_kind_out" not in rows["tta_pairwise_dice"]  # fixed scores fit nothing


def test_what_a_risk_model_can_ship():
    from SegXAILib.qa.benchmark import best_shippable, shippable_method

    assert shippable_method({"detector": "EC PC1: lrp", "family": "saliency"}) == "lrp"
    assert shippable_method({"detector": "tta_pairwise_dice", "family": "uncertainty"}) == "feature:tta_pairwise_dice"
    assert shippable_method({"detector": "volume (smaller riskier)", "family": "volume"}) == "feature:log_volume"
    for row in ({"detector": "random", "family": "random"}, {"detector": "EC PC1 / voxels: lrp", "family": "ablation"},
                {"detector": "quality regressor (random forest)", "family": "regressor"},
                {"detector": "volume (deviation)", "family": "volume"},
                {"detector": "mask Euler |chi - 1|", "family": "shape"}):
        assert shippable_method(row) is None, row
    cases, curves, _ = synthetic_cohort()
    result = benchmark_cohort(cases, curves, ["signal"], n_splits=5, n_repeats=1, n_resamples=100, seed=0)
    assert best_shippable(result)[0] == "feature:tta_pairwise_dice"  # the oracle score
