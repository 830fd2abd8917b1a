"""QA risk model from EC curves (METHODS.md section 6): synthetic cohorts with known answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from SegXAILib.image import SegXAIInputError
from SegXAILib.topology.euler import default_thresholds, euler_characteristic_curve
from SegXAILib.topology.risk import RiskModel, calibrate_risk_model, saliency_curve

T = 40
A_TRUE, K_TRUE, Z0_TRUE = 0.92, 2.5, -0.4
METHOD, CHECKSUM = "guided_gradcam", "sha256:abc123"
RESOURCE_MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def _cohort(n: int, seed: int, dice_noise: float = 0.01, latent_noise: float = 0.0):
    """Curves = base + z * pattern * 20 + nuisance (smaller variance); Dice = sigmoid(z) + noise.

    PC1 is the unit pattern direction, so pc1 = 20 * |pattern| * z up to sign / noise.
    ``latent_noise`` blurs z in the curves (an imperfect detector, AUROC < 1).
    """
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, T)
    base = 50 * np.exp(-3 * grid)
    pattern = np.sin(np.pi * grid)
    nuisance = np.cos(3 * np.pi * grid)
    z = rng.normal(size=n)
    seen = z + latent_noise * rng.normal(size=n)  # what the curves reveal of z
    curves = (
        base
        + 20 * seen[:, None] * pattern
        + 4 * rng.normal(size=(n, 1)) * nuisance
        + 0.3 * rng.normal(size=(n, T))
    )
    dice = A_TRUE / (1 + np.exp(-K_TRUE * (z - Z0_TRUE))) + dice_noise * rng.normal(size=n)
    return curves, dice, z, 20 * np.linalg.norm(pattern)


@pytest.fixture(scope="module")
def fitted():
    curves, dice, z, scale = _cohort(300, seed=1)
    model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, {"layer": "enc4"}, CHECKSUM)
    return model, scale


def test_synthetic_cohort_recovers_sigmoid_and_detects(fitted):
    model, scale = fitted
    assert model.sigmoid_status == "fitted"
    # pc1 = scale * z (+ centring): A and k / scale are identifiable
    assert model.sigmoid_a == pytest.approx(A_TRUE, abs=0.03)
    assert model.sigmoid_k * scale == pytest.approx(K_TRUE, rel=0.15)
    assert model.auroc > 0.9
    assert model.auroc_cv_mean > 0.85
    assert model.n_insufficient == pytest.approx(0.15 * 300, abs=1)
    # held-out cases: Dice prediction error small, PC1 increases with Dice
    curves, dice, z, _ = _cohort(200, seed=2)
    scored = [model.score(c, METHOD, CHECKSUM) for c in curves]
    predicted = np.array([s["estimated_dice"] for s in scored])
    pc1 = np.array([s["pc1"] for s in scored])
    assert np.mean(np.abs(predicted - dice)) < 0.03
    assert spearmanr(pc1, dice).statistic > 0.9
    probability = np.array([s["insufficient_probability"] for s in scored])
    assert spearmanr(probability, dice).statistic < -0.9
    assert np.all((probability >= 0) & (probability <= 1))


def assert_cut_rule(model):
    """The documented cut-point rule, checked against an independent brute force over cuts."""
    pc1, bad = model.calibration_pc1, model.calibration_insufficient()

    def sens_spec(cut):
        flagged = pc1 <= cut
        return flagged[bad].mean(), (~flagged[~bad]).mean()

    candidates = np.concatenate([[-np.inf], np.sort(pc1)])
    stats = [sens_spec(c) for c in candidates]
    # high: best sensitivity within the specificity budget, the strictest such cut
    allowed = [(c, se) for c, (se, sp) in zip(candidates, stats) if sp >= model.specificity_target]
    best = max(se for _, se in allowed)
    assert model.cut_high == min(c for c, se in allowed if se == best)
    # low: the most lenient cut meeting both targets; else the strictest reaching sensitivity
    both = [c for c, (se, sp) in zip(candidates, stats)
            if se >= model.sensitivity_target and sp >= model.specificity_target]
    if both:
        assert model.cut_low == max(both)
    else:
        assert model.cut_low == min(c for c, (se, _) in zip(candidates, stats) if se >= model.sensitivity_target)
    assert model.cut_high <= model.cut_low
    assert model.operating_points["low"]["sensitivity"] == pytest.approx(sens_spec(model.cut_low)[0])


def test_perfect_separation_keeps_a_moderate_band(fitted):
    model, _ = fitted
    assert_cut_rule(model)
    pc1, bad = model.calibration_pc1, model.calibration_insufficient()
    # near-noiseless Dice: one cut meets both targets. High = the strictest such cut, the
    # review flag (moderate + high) the most lenient one: the moderate band is not empty,
    # holds only sufficient contours here, and at most 1 - specificity_target of them
    assert model.cut_high < model.cut_low
    moderate = (pc1 > model.cut_high) & (pc1 <= model.cut_low)
    assert moderate.any() and not moderate[bad].any()
    assert moderate[~bad].mean() <= 1 - model.specificity_target + 1e-12
    assert model.operating_points["high"]["specificity"] >= 0.9
    assert model.operating_points["high"]["sensitivity"] >= 0.85
    assert model.operating_points["low"]["specificity"] >= 0.9
    bands = np.array([model.band(v) for v in pc1])
    assert set(bands) == {"low", "moderate", "high"}


@pytest.mark.parametrize("seed", range(4))
def test_cut_rule_brute_force(seed):
    curves, dice, _, _ = _cohort(80, seed=30 + seed, dice_noise=0.03, latent_noise=0.3 * seed)
    model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM)
    assert_cut_rule(model)


def test_bands_ordered_on_held_out():
    curves, dice, _, _ = _cohort(300, seed=11, dice_noise=0.02, latent_noise=0.7)
    model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM)
    assert model.cut_high < model.cut_low
    assert model.operating_points["high"]["specificity"] >= 0.9
    assert model.operating_points["low"]["sensitivity"] >= 0.85
    curves, dice, _, _ = _cohort(600, seed=12, dice_noise=0.02, latent_noise=0.7)
    pc1 = np.array([model.score(c, METHOD, CHECKSUM)["pc1"] for c in curves])
    bands = np.array([model.score(c, METHOD, CHECKSUM)["band"] for c in curves])
    assert set(bands) == {"low", "moderate", "high"}
    mean_dice = {b: dice[bands == b].mean() for b in ("low", "moderate", "high")}
    assert mean_dice["high"] < mean_dice["moderate"] < mean_dice["low"]
    # bands are contiguous in PC1: every high < every moderate < every low
    assert pc1[bands == "high"].max() <= pc1[bands == "moderate"].min()
    assert pc1[bands == "moderate"].max() <= pc1[bands == "low"].min()
    # held-out detection: insufficient (by the calibration cut) mostly flagged, as targeted
    bad = dice < model.insufficient_dice
    assert np.mean(bands[bad] != "low") > 0.75
    assert np.mean(bands[~bad] != "high") > 0.8


def test_pc1_sign_convention_survives_flipped_data():
    curves, dice, _, _ = _cohort(120, seed=4)
    # negate the pattern's relation: same data mirrored around the mean -> PCA sign arbitrary
    mirrored = 2 * curves.mean(axis=0) - curves
    for data in (curves, mirrored):
        model = calibrate_risk_model(data, dice, default_thresholds(T), METHOD, None, CHECKSUM)
        pc1 = np.array([model.project(c) for c in data])
        assert np.corrcoef(pc1, dice)[0, 1] > 0.8
        assert model.sigmoid_k > 0


@pytest.mark.parametrize("seed", range(5))
def test_unrelated_curves_give_chance_cv_auroc(seed):
    rng = np.random.default_rng(100 + seed)
    curves = rng.normal(size=(120, T)) * np.linspace(5, 1, T)
    dice = rng.uniform(0.5, 0.95, size=120)
    model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM, seed=seed)
    assert abs(model.auroc_cv_mean - 0.5) < 0.2


def test_unrelated_curves_cv_auroc_mean_over_seeds():
    values = []
    for seed in range(8):
        rng = np.random.default_rng(200 + seed)
        curves = rng.normal(size=(100, T))
        dice = rng.uniform(0.5, 0.95, size=100)
        values.append(calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM).auroc_cv_mean)
    assert abs(np.mean(values) - 0.5) < 0.1  # observed 0.45 (small-sample CV runs slightly pessimistic)


def test_json_round_trip(fitted, tmp_path):
    model, _ = fitted
    path = model.save(tmp_path / "risk.json")
    loaded = RiskModel.load(path)
    assert loaded.to_dict() == model.to_dict()
    for name in ("thresholds", "pca_mean", "pca_components", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.method_parameters == {"layer": "enc4"}
    curve = _cohort(1, seed=9)[0][0]
    assert loaded.score(curve, METHOD, CHECKSUM) == model.score(curve, METHOD, CHECKSUM)
    json.loads(path.read_text())  # strict JSON
    assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_infinite_cut_round_trips(fitted, tmp_path):
    model, _ = fitted
    data = model.to_dict()
    data["cut_high"] = None
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    loaded = RiskModel.load(path)
    assert loaded.cut_high == -np.inf
    assert loaded.to_dict()["cut_high"] is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("pca_mean", None),
        ("pca_components", [[1.0, 2.0]]),
        ("sigmoid_k", "fast"),
        ("sigmoid_a", float("nan")),
        ("cut_low", "x"),
        ("version", 99),
        ("method", 3),
        ("method_parameters", []),
        ("pc1_scale", -1.0),
        ("format", "other"),
        ("curve_quantiles", [[1.0, 2.0]]),
        ("calibration_dice", [0.5]),
    ],
)
def test_load_rejects_corrupted_field(fitted, tmp_path, field, value):
    model, _ = fitted
    data = model.to_dict()
    data[field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SegXAIInputError, match=f"{re.escape(str(path))}: {field}: "):
        RiskModel.load(path)


@pytest.mark.parametrize("field", ["thresholds", "cut_high", "model_checksum", "auroc_cv_std", "curve_quantiles"])
def test_load_rejects_missing_field(fitted, tmp_path, field):
    model, _ = fitted
    data = model.to_dict()
    del data[field]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SegXAIInputError, match=f"{re.escape(str(path))}: {field}: Field required"):
        RiskModel.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        # wrong type
        (lambda d: d.update(n_cases=True), "n_cases: Input should be a valid integer, got True"),
        (lambda d: d.update(thresholds=[0.0, "0.5"]), "thresholds.1: Input should be a valid number, got '0.5'"),
        (lambda d: d.update(operating_points="high"), "operating_points: Input should be an object, got 'high'"),
        # missing
        (lambda d: d.pop("format"), "format: Field required"),
        (lambda d: d.pop("calibration_pc1"), "calibration_pc1: Field required"),
        # bad value
        (lambda d: d.update(cut_high=1.0, cut_low=0.5), "cut_low: must not be below cut_high (1.0), got 0.5"),
        (lambda d: d.update(pca_components=[[1.0] * T, [1.0]]), "pca_components: rows must all have the same length"),
        (lambda d: d.update(explained_variance_ratio=[0.5] * 7), "explained_variance_ratio: must have 3 entries"),
        (lambda d: d.update(pca_mean=[]), "pca_mean: List should have at least 1 item"),
        (lambda d: d.update(pc1_convention="lower"), "pc1_convention: Input should be 'higher_pc1_higher_dice'"),
    ],
)
def test_schema_names_the_field(fitted, tmp_path, change, message):
    model, _ = fitted
    assert model.pca_components.shape[0] == 3  # the "3 entries" above
    data = model.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SegXAIInputError, match=f"^risk model {re.escape(str(path))}: {re.escape(message)}"):
        RiskModel.load(path)


def test_unknown_keys_are_ignored_and_non_objects_rejected(fitted):
    model, _ = fitted
    data = {**model.to_dict(), "comment": "written by hand"}
    assert RiskModel.from_dict(data).to_dict() == model.to_dict()
    with pytest.raises(SegXAIInputError, match="risk model <dict>: expected a JSON object"):
        RiskModel.from_dict([1, 2])


@pytest.mark.parametrize("path", sorted(RESOURCE_MODELS.glob("*/risk_*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_risk_models_validate(path):
    model = RiskModel.load(path)
    # what loads is what is on disk (integers compare equal to their floats)
    assert model.to_dict() == json.loads(path.read_text(encoding="utf-8"))


def test_load_rejects_unreadable(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(SegXAIInputError, match="not valid JSON"):
        RiskModel.load(path)
    with pytest.raises(SegXAIInputError, match="cannot be read"):
        RiskModel.load(tmp_path / "absent.json")


def test_score_refuses_other_provenance(fitted):
    model, _ = fitted
    curve = model.pca_mean.copy()
    with pytest.raises(SegXAIInputError, match="attribution method"):
        model.score(curve, "integrated_gradients", CHECKSUM)
    with pytest.raises(SegXAIInputError, match="checksum"):
        model.score(curve, METHOD, "sha256:other")
    with pytest.raises(SegXAIInputError, match="threshold grid"):
        model.score(curve[:-1], METHOD, CHECKSUM)
    with pytest.raises(SegXAIInputError, match="method parameters"):
        model.score(curve, METHOD, CHECKSUM, method_parameters={"layer": "enc3"})
    with pytest.raises(SegXAIInputError, match="finite"):
        model.score(np.full(T, np.nan), METHOD, CHECKSUM)
    assert model.score(curve, METHOD, CHECKSUM, method_parameters={"layer": "enc4"})["band"] in {
        "low", "moderate", "high",
    }


def test_calibration_errors():
    curves, dice, _, _ = _cohort(50, seed=5)
    thresholds = default_thresholds(T)
    with pytest.raises(SegXAIInputError, match="too few calibration cases"):
        calibrate_risk_model(curves[:5], dice[:5], thresholds, METHOD, None, CHECKSUM)
    with pytest.raises(SegXAIInputError, match="dice has"):
        calibrate_risk_model(curves, dice[:-1], thresholds, METHOD, None, CHECKSUM)
    with pytest.raises(SegXAIInputError, match="grid has"):
        calibrate_risk_model(curves, dice, thresholds[:-1], METHOD, None, CHECKSUM)
    bad = curves.copy()
    bad[3, 4] = np.nan
    with pytest.raises(SegXAIInputError, match="curves must be finite"):
        calibrate_risk_model(bad, dice, thresholds, METHOD, None, CHECKSUM)
    bad_dice = dice.copy()
    bad_dice[0] = np.nan
    with pytest.raises(SegXAIInputError, match="dice must be finite"):
        calibrate_risk_model(curves, bad_dice, thresholds, METHOD, None, CHECKSUM)
    with pytest.raises(SegXAIInputError, match="no insufficient cases"):
        calibrate_risk_model(curves, np.full(50, 0.8), thresholds, METHOD, None, CHECKSUM)
    with pytest.raises(SegXAIInputError, match="no variance"):
        calibrate_risk_model(np.ones((50, T)), dice, thresholds, METHOD, None, CHECKSUM)


def test_sigmoid_fallback_is_explicit():
    rng = np.random.default_rng(6)
    curves = rng.normal(size=(30, T))
    dice = rng.uniform(0.5, 0.9, size=30)
    # a pathological Dice target still yields a finite, flagged model
    model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM)
    assert model.sigmoid_status in {"fitted", "fallback_constant"}
    assert np.isfinite([model.sigmoid_a, model.sigmoid_k, model.sigmoid_lambda0]).all()


def _no_convergence(*args, **kwargs):
    raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev = 5000.")


def _infeasible(*args, **kwargs):
    raise ValueError("x0 is infeasible")


def _non_finite(f, xdata, ydata, p0, **kwargs):
    return np.full(3, np.nan), np.full((3, 3), np.nan)


@pytest.mark.parametrize("failing_fit", [_no_convergence, _infeasible, _non_finite])
def test_forced_sigmoid_fallback_estimates_the_calibration_mean_dice(monkeypatch, tmp_path, failing_fit):
    """Every start of the least-squares sigmoid fit fails (curve_fit raises, as when it does not
    converge within maxfev, or returns non-finite parameters): the documented constant
    fallback, k = 0 and A = 2 mean(Dice), so that every curve's estimate is the calibration
    mean Dice, at lambda0 = median(PC1), with a warning; the rest of the model is unaffected."""
    import scipy.optimize

    curves, dice, _, _ = _cohort(60, seed=5)
    monkeypatch.setattr(scipy.optimize, "curve_fit", failing_fit)  # risk.py imports it at call time
    with pytest.warns(RuntimeWarning, match="sigmoid fit of Dice on PC1 failed"):
        model = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM)
    assert model.sigmoid_status == "fallback_constant"
    assert model.sigmoid_k == 0.0
    assert model.sigmoid_a == pytest.approx(2 * np.mean(dice), rel=1e-12)
    pc1 = np.array([model.project(c) for c in curves])
    assert model.sigmoid_lambda0 == pytest.approx(np.median(pc1), abs=1e-9 * np.abs(pc1).max())
    for curve in (curves[0], curves[-1], _cohort(1, seed=8)[0][0]):  # any curve: the mean Dice
        assert model.score(curve, METHOD, CHECKSUM)["estimated_dice"] == pytest.approx(np.mean(dice), rel=1e-12)
    # the PC1 detector does not depend on the sigmoid: same cuts and AUROC as a fitted model
    monkeypatch.undo()
    fitted = calibrate_risk_model(curves, dice, default_thresholds(T), METHOD, None, CHECKSUM)
    assert fitted.sigmoid_status == "fitted"
    assert (model.cut_high, model.cut_low, model.auroc) == (fitted.cut_high, fitted.cut_low, fitted.auroc)
    loaded = RiskModel.load(model.save(tmp_path / "fallback.json"))
    assert loaded.sigmoid_status == "fallback_constant" and loaded.sigmoid_k == 0.0


def test_saliency_curve_matches_hand_normalisation():
    rng = np.random.default_rng(7)
    saliency = rng.normal(size=(5, 6, 4))
    mask = np.zeros(saliency.shape, bool)
    mask[1:4, 1:5, :3] = True
    mask[2, 2, 1] = False  # a hole
    thresholds = default_thresholds(25)
    inside = saliency[mask]
    shifted = np.maximum(inside - np.median(inside), 0)
    hand = np.zeros_like(saliency)
    hand[mask] = shifted / shifted.max()
    expected = euler_characteristic_curve(hand, thresholds, mask=mask, superlevel=True)
    curve = saliency_curve(saliency, mask, thresholds)
    np.testing.assert_array_equal(curve, expected)
    assert curve[0] == euler_characteristic_curve(mask.astype(float), [1.0], mask=mask)[0]
    # values outside the mask do not matter (normalisation is over the mask only)
    outside = saliency.copy()
    outside[~mask] = 1e6
    np.testing.assert_array_equal(saliency_curve(outside, mask, thresholds), curve)
    # whole-volume normalisation would give a different curve here
    whole = np.maximum(saliency - np.median(saliency), 0)
    whole = whole / whole.max()
    assert not np.array_equal(euler_characteristic_curve(whole, thresholds, mask=mask), curve)


def test_saliency_curve_input_errors():
    thresholds = default_thresholds(5)
    with pytest.raises(SegXAIInputError, match="empty"):
        saliency_curve(np.ones((3, 3, 3)), np.zeros((3, 3, 3), bool), thresholds)
    with pytest.raises(SegXAIInputError, match="shape"):
        saliency_curve(np.ones((3, 3, 3)), np.ones((3, 3, 2), bool), thresholds)
    bad = np.ones((3, 3, 3))
    bad[1, 1, 1] = np.nan
    with pytest.raises(SegXAIInputError, match="finite"):
        saliency_curve(bad, np.ones((3, 3, 3), bool), thresholds)
