"""Risk models calibrated on QA cohorts (QA_PROTOCOL.md): feature risk models (a reference-free
score as a one-point curve), the held-out AURC and estimated-Dice error they state, and the
calibration domain that turns a case far outside it into "outside calibration" instead of a
confident band. The QA step scores a case with exactly the score its calibration cohort stored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from SegXAILib.evaluation.failure_detection import aurc, optimal_aurc
from SegXAILib.image import SegXAIInputError
from SegXAILib.pipeline.case import QAResult
from SegXAILib.qa.cohort_table import save_case_curves
from SegXAILib.topology.cohort import COHORT_FORMAT, COHORT_VERSION, calibrate_cohort
from SegXAILib.topology.risk import OUTSIDE_BAND, RiskModel, feature_range

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_cohort(folder, checksum: str = "0" * 64, n: int = 80, seed: int = 0):
    """A QA cohort folder whose ``quality`` score equals the Dice (the oracle) and whose
    ``noise`` score is independent of it."""
    rng = np.random.default_rng(seed)
    dice = rng.uniform(0.3, 0.95, n)
    cases = []
    (folder / "cases").mkdir(parents=True)
    for i in range(n):
        case_id = f"case_{i:03d}"
        (folder / "cases" / case_id).mkdir()
        save_case_curves(folder / "cases" / case_id / "curves.npz", {"m": rng.normal(size=100)})
        cases.append({"case_id": case_id, "group": f"g{i}", "dice": float(dice[i]), "status": "ok",
                      "files": {"curves": f"cases/{case_id}/curves.npz"},
                      "scores": {"quality": float(dice[i]), "noise": float(rng.normal()),
                                 "log_volume": float(rng.normal(1.0, 0.2)), "noise_sigma": float(rng.uniform(0.01, 0.02))}})
    document = {"format": COHORT_FORMAT, "version": COHORT_VERSION, "complete": True, "cohort": "synthetic_qa",
                "model": {"checksum": checksum}, "class_name": "x", "methods": {"m": {}}, "thresholds": 100,
                "cases": cases}
    (folder / "cohort.json").write_text(json.dumps(document))
    return dice


def test_feature_risk_model_states_its_held_out_error(tmp_path):
    dice = write_cohort(tmp_path / "c")
    model, curves, used, _ = calibrate_cohort(tmp_path / "c", "feature:quality")
    assert model.method == "feature:quality" and model.thresholds.tolist() == [0.0] and curves.shape == (80, 1)
    assert model.calibration_cohort == "synthetic_qa"
    # the score is the Dice: held out it still orders (nearly) perfectly and estimates Dice closely
    random_excess = aurc(np.random.default_rng(1).random(80), 1 - dice) - optimal_aurc(1 - dice)
    assert model.aurc_cv - optimal_aurc(1 - dice) < 0.1 * random_excess
    assert model.estimated_dice_mae_cv < 0.05
    # higher score, higher estimated Dice; bands follow
    low, high = (model.score(np.array([v]), "feature:quality", "0" * 64) for v in (0.35, 0.9))
    assert low["estimated_dice"] < high["estimated_dice"] and abs(high["estimated_dice"] - 0.9) < 0.1
    assert low["band"] == "high" and high["band"] == "low"
    assert high["calibration"]["cohort"] == "synthetic_qa" and high["calibration"]["aurc_cv"] == model.aurc_cv
    # a noise score carries nothing: its held-out AURC is no better than chance's order of magnitude
    noise, _, _, _ = calibrate_cohort(tmp_path / "c", "feature:noise")
    assert noise.aurc_cv - optimal_aurc(1 - dice) > 0.5 * random_excess


def test_outside_the_calibration_domain(tmp_path):
    write_cohort(tmp_path / "c")
    model, _, _, _ = calibrate_cohort(tmp_path / "c", "feature:quality")
    assert set(model.feature_ranges) == {"risk_score", "log_volume", "noise_sigma"}
    inside = model.score(np.array([0.7]), "feature:quality", "0" * 64,
                         features={"log_volume": 1.0, "noise_sigma": 0.015})
    assert inside["outside_calibration"] == [] and inside["band"] != OUTSIDE_BAND
    outside = model.score(np.array([0.7]), "feature:quality", "0" * 64,
                          features={"log_volume": 4.0, "noise_sigma": 0.015})
    assert outside["outside_calibration"] == ["log_volume"] and outside["band"] == OUTSIDE_BAND
    assert outside["estimated_dice"] == inside["estimated_dice"]  # reported, but flagged
    far = model.score(np.array([5.0]), "feature:quality", "0" * 64)
    assert far["outside_calibration"] == ["risk_score"]
    text = QAResult("x", model.method, model.thresholds, np.array([0.7]), None, risk=outside).summary_text()
    assert text.startswith(OUTSIDE_BAND.upper()) and "log_volume" in text and "synthetic_qa" in text
    text = QAResult("x", model.method, model.thresholds, np.array([0.7]), None, risk=inside).summary_text()
    assert inside["band"].upper() in text and f"held-out AURC {model.aurc_cv:.3f}" in text


def test_feature_range_is_the_widened_percentile_range():
    values = np.arange(101, dtype=float)  # percentiles 1 and 99 are 1 and 99
    assert feature_range(values) == [1 - 0.25 * 98, 99 + 0.25 * 98]
    assert feature_range(np.array([np.nan, 2.0, 2.0])) == [2.0, 2.0]
    with pytest.raises(SegXAIInputError, match="no finite value"):
        feature_range(np.array([np.nan]))


def test_new_fields_round_trip_and_old_files_load(tmp_path):
    write_cohort(tmp_path / "c")
    model, _, _, _ = calibrate_cohort(tmp_path / "c", "feature:quality")
    again = RiskModel.load(model.save(tmp_path / "risk.json"))
    assert again.to_dict() == model.to_dict() and again.feature_ranges == model.feature_ranges
    old = model.to_dict()
    for key in ("calibration_cohort", "aurc_cv", "estimated_dice_mae_cv", "estimated_dice_error_q90", "feature_ranges"):
        old.pop(key)
    legacy = RiskModel.from_dict(old)
    assert legacy.feature_ranges == {} and legacy.aurc_cv is None
    assert legacy.score(np.array([99.0]), "feature:quality", "0" * 64)["outside_calibration"] == []
    bad = {**model.to_dict(), "feature_ranges": {"log_volume": [2.0, 1.0]}}
    with pytest.raises(SegXAIInputError, match="feature_ranges"):
        RiskModel.from_dict(bad)
    with pytest.raises(SegXAIInputError, match="no case with this score"):
        calibrate_cohort(tmp_path / "c", "feature:nothing")


def test_qa_step_scores_a_case_as_its_cohort_did(tmp_path):
    """One S6 parotid case through ``build_qa_cohort`` and through ``run_case`` with a feature
    risk model: the QA step's score is the cohort's stored TTA pairwise Dice."""
    from SegXAILib.pipeline import CaseSettings, MethodSettings, run_case
    from SegXAILib.pipeline.qa_cohort import build_qa_cohort, make_cohort_case
    from SegXAILib.pipeline.steps import load_case_model, resolve_model_card

    checksum = resolve_model_card("parotid-S6").checksum()
    cohort = tmp_path / "one"
    build_qa_cohort("c1_parotid_S6", cohort, n_cases=1, methods=[MethodSettings(method="gradcam")])
    stored = json.loads((cohort / "cohort.json").read_text())["cases"][0]
    write_cohort(tmp_path / "c", checksum=checksum)
    model, _, _, _ = calibrate_cohort(tmp_path / "c", "feature:quality")
    data = model.to_dict()
    data["method"] = "feature:tta_pairwise_dice"
    RiskModel.from_dict(data).save(tmp_path / "risk.json")
    item = make_cohort_case("c1_parotid_S6", 0, stored["kind"], stored["severity"], seed=0)
    settings = CaseSettings.from_dict({"model": "parotid-S6", "instances": {"enabled": False}, "device": "cpu",
                                       "qa": {"risk_model": str(tmp_path / "risk.json")}}, "t")
    case = run_case(item.image, load_case_model(settings), settings)
    expected = model.project(np.array([stored["scores"]["tta_pairwise_dice"]]))
    assert math.isclose(case.qa.risk["pc1"], expected, rel_tol=0, abs_tol=1e-12)
    assert case.qa.saliency is None and case.qa.method == "feature:tta_pairwise_dice"


def test_demo_states_whether_the_estimate_agrees_with_the_known_dice():
    from SegXAILib.demo import qa_agreement

    risk = {"band": "low", "estimated_dice": 0.80, "pc1": 1.0, "insufficient_probability": 0.1,
            "outside_calibration": [], "calibration": {"estimated_dice_error_q90": 0.1}}
    qa = QAResult("lesion", "m", np.zeros(1), np.zeros(1), None, risk=risk)
    assert "0.80 against the known 0.85 (off by 0.05): within" in qa_agreement(qa, 0.85)
    assert "NOT within the risk model's stated error (0.10" in qa_agreement(qa, 0.95)
    qa.risk = {**risk, "outside_calibration": ["log_volume"]}
    assert "outside the risk model's calibration data" in qa_agreement(qa, 0.95)


def test_parameters_added_since_a_record_take_their_former_value():
    from SegXAILib.attribution import get_method
    from SegXAILib.attribution.registry import ADDED_PARAMETERS, recorded_params

    assert recorded_params("gradcam", {"layer": "x"}) == {"layer": "x", "weights": "per_window"}
    assert recorded_params("gradcam", {"weights": "global"}) == {"weights": "global"}
    assert recorded_params("smoothgrad", {"n_samples": 2}) == {"n_samples": 2}
    for name, (methods, before) in ADDED_PARAMETERS.items():
        for method in methods:  # every added parameter exists, and its former value is allowed
            spec = next(p for p in get_method(method).parameters if p.name == name)
            assert before in (spec.choices or (before,))


def test_what_ships_follows_the_table():
    """The risk model each bundled model ships is the best detector a risk model can carry in its
    cohort's table (Testing/Benchmarks/results/qa_benchmark.json), calibrated on that cohort, and
    the demo presets use it."""
    from pathlib import Path

    from SegXAILib.pipeline import CaseSettings
    from SegXAILib.qa.benchmark import best_shippable
    from SegXAILib.topology import bundled_risk_model, shipped_risk_model
    from SegXAILib.topology.risk import SHIPPED_RISK_MODELS

    table = Path(__file__).resolve().parent / "Benchmarks" / "results" / "qa_benchmark.json"
    cohorts = json.loads(table.read_text(encoding="utf-8"))["cohorts"]
    for model, (cohort, method) in SHIPPED_RISK_MODELS.items():
        assert best_shippable(cohorts[cohort])[0] == method
        shipped = RiskModel.load(bundled_risk_model(model))
        assert shipped.method == method and shipped.calibration_cohort == cohort
        assert shipped.n_cases == cohorts[cohort]["n_cases"]
        assert sorted(p.name for p in bundled_risk_model(model).parent.glob("risk_*.json")) == \
            [bundled_risk_model(model).name]  # nothing else ships
    assert CaseSettings.demo().qa.risk_model == shipped_risk_model("lesions")
    assert CaseSettings.quick_demo().qa.risk_model == shipped_risk_model("lesions")
