"""Per-case QA scores (SegXAILib.qa): baselines and controls of the QA protocol.

Oracles: closed forms (the marching-cubes surface of a digitised cube, entropies of p = 0.5 and
one-hot, Soft Dice Confidence of a constant probability, the variance of the Laplacian of white
noise), topological invariants (Euler characteristic of a ball, a hollow sphere, a torus; the
component count of separated balls), the limit of a digitised ball's compactness, Dice and the
coefficient of variation computed by hand from two sample masks, the sampling distribution of
the noise estimator, and the existing curve functions called explicitly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from SegXAILib.attribution.postprocess import normalise_000
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.qa import (RISK_DIRECTION, case_scores, image_quality_scores, intensity_curve, mask_shape_scores,
                          probability_scores, risk_oriented, shuffled_saliency_curve, uncertainty_scores)
from SegXAILib.topology import default_thresholds, euler_characteristic_curve, saliency_curve
from SegXAILib.uncertainty import UncertaintyAccumulator, UncertaintyResult


def grid(shape):
    return np.indices(shape, dtype=np.float64)


def ball(radius, shape=None, centre=None, spacing=(1.0, 1.0, 1.0)):
    """Voxels whose centre lies within ``radius`` mm of ``centre`` (mm), on a grid of ``spacing``."""
    spacing = np.asarray(spacing, dtype=float)
    if shape is None:
        shape = tuple(int(math.ceil(2 * radius / s)) + 6 for s in spacing)
    if centre is None:  # off the lattice, so the digitisation is generic
        centre = (np.asarray(shape) - 1) / 2 * spacing + 0.3 * spacing
    z, y, x = (grid(shape) * spacing.reshape(3, 1, 1, 1))
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


# ---- mask shape ---------------------------------------------------------------------------------------------
def test_volume_in_ml_and_voxels_with_spacing():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:6, 2:7, 3:5] = True  # 40 voxels
    scores = mask_shape_scores(mask, spacing=(2.0, 0.5, 3.0))
    assert scores["volume_voxels"] == 40
    assert scores["volume_ml"] == pytest.approx(40 * 3.0 / 1000)
    assert scores["log_volume"] == pytest.approx(math.log(0.12))


def test_cube_compactness_is_the_closed_form_of_its_marching_cubes_surface():
    """Binary marching cubes on an n^3 cube of unit voxels gives the cube of side n with every
    edge bevelled (right triangles of legs 1/2) and every corner cut (an equilateral triangle):
    A = 6 (n-1)^2 + 6 sqrt(2) (n-1) + sqrt(3), V = n^3 - 3/2 (n-1) - 5/6. Area in float32
    vertices: relative error a few 1e-7, so 1e-5 on A^3 is ample."""
    for n in (4, 12):
        mask = np.zeros((n + 2, n + 2, n + 2), bool)
        mask[1:-1, 1:-1, 1:-1] = True
        area = 6 * (n - 1) ** 2 + 6 * math.sqrt(2) * (n - 1) + math.sqrt(3)
        volume = n ** 3 - 1.5 * (n - 1) - 5 / 6
        expected = 36 * math.pi * volume ** 2 / area ** 3
        assert mask_shape_scores(mask, smoothing=0)["compactness"] == pytest.approx(expected, rel=1e-5)
    # from the closed form: A = 6 n^2 (1 - (2 - sqrt(2)) / n + O(1/n^2)), V = n^3 (1 + O(1/n^2)), so
    # 36 pi V^2 / A^3 = pi/6 (1 + 3 (2 - sqrt(2)) / n + ...) ~ pi/6 (1 + 1.76 / n): within 2/n
    n = 40
    mask = np.ones((n, n, n), bool)
    value = mask_shape_scores(mask, smoothing=0)["compactness"]
    assert abs(value / (math.pi / 6) - 1) < 2 / n


def test_ball_compactness_approaches_one():
    """The smoothed surface of a digitised ball tends to the sphere: compactness rises towards 1
    with the radius (binary marching cubes would stay near 0.78, the staircase's area)."""
    values = [mask_shape_scores(ball(r))["compactness"] for r in (3, 6, 12)]
    assert values[0] < values[1] < values[2] <= 1.0 + 1e-6
    assert values[2] > 0.98
    assert mask_shape_scores(ball(12), smoothing=0)["compactness"] < 0.85


def test_compactness_uses_the_spacing():
    """A physical ball on an anisotropic grid (an ellipsoid in voxel indices) is still round."""
    spacing = (3.0, 1.0, 1.0)
    physical = mask_shape_scores(ball(12.0, spacing=spacing), spacing=spacing)["compactness"]
    squashed = mask_shape_scores(ball(12.0, spacing=spacing), spacing=(1.0, 1.0, 1.0))["compactness"]
    assert physical > 0.9  # 3 mm slices: the smoothing (1 voxel) leaves some of the z staircase
    assert squashed < 0.6  # the same voxels as an oblate ellipsoid of axes 1:3:3 (about 0.5)


def test_component_count_of_separated_balls():
    for k in (1, 3, 5):
        mask = np.zeros((20, 20, 20 * k), bool)
        for i in range(k):
            mask |= ball(4.0, shape=mask.shape, centre=(9.5, 9.5, 20 * i + 9.5))
        scores = mask_shape_scores(mask)
        assert scores["component_count"] == k
        assert scores["euler_characteristic"] == k
        assert scores["largest_component_fraction"] == pytest.approx(1.0 / k)


def test_components_touching_at_a_corner_are_one():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # 26-connectivity
    mask[3, 3, 3] = True
    scores = mask_shape_scores(mask)
    assert scores["component_count"] == 2
    assert scores["largest_component_fraction"] == pytest.approx(2 / 3)


def solid_torus(major=8.0, minor=3.0):
    shape = (int(2 * minor) + 6, int(2 * (major + minor)) + 6, int(2 * (major + minor)) + 6)
    z, y, x = grid(shape)
    c = (np.asarray(shape) - 1) / 2 + 0.3
    ring = np.hypot(y - c[1], x - c[2]) - major
    return ring ** 2 + (z - c[0]) ** 2 <= minor ** 2


@pytest.mark.parametrize("name, make, chi", [
    ("solid ball", lambda: ball(6.0), 1),
    ("hollow sphere", lambda: ball(8.0, shape=(24, 24, 24)) & ~ball(5.0, shape=(24, 24, 24)), 2),
    ("solid torus", solid_torus, 0),
])
def test_euler_characteristic_of_known_shapes(name, make, chi):
    mask = make()
    assert mask_shape_scores(mask)["euler_characteristic"] == chi
    skimage_measure = pytest.importorskip("skimage.measure")
    # independent oracle: skimage's octree-free counting, 26-connectivity of the foreground
    assert skimage_measure.euler_number(np.pad(mask, 1), connectivity=3) == chi


def test_empty_mask_scores():
    scores = mask_shape_scores(np.zeros((5, 5, 5), bool))
    assert scores["volume_voxels"] == 0 and scores["component_count"] == 0 and scores["euler_characteristic"] == 0
    for name in ("log_volume", "compactness", "largest_component_fraction"):
        assert math.isnan(scores[name])


def test_mask_shape_input_errors():
    with pytest.raises(SegXAIInputError, match="spacing"):
        mask_shape_scores(np.ones((3, 3, 3), bool), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(SegXAIInputError, match="mask"):
        mask_shape_scores(np.full((3, 3, 3), 0.5))
    with pytest.raises(SegXAIInputError, match="smoothing"):
        mask_shape_scores(np.ones((3, 3, 3), bool), smoothing=-1.0)


# ---- probabilities ------------------------------------------------------------------------------------------
def test_entropy_of_a_coin_is_log_two_nats():
    mask = ball(4.0)
    half = np.full(mask.shape, 0.5)
    for probabilities in (half, np.stack([half, half])):
        scores = probability_scores(probabilities, mask)
        for name in ("mean_entropy_image", "mean_entropy_foreground", "mean_entropy_boundary"):
            assert scores[name] == pytest.approx(math.log(2), rel=1e-12)  # natural log: nats
        assert scores["mean_max_softmax_mask"] == pytest.approx(0.5)


def test_one_hot_has_no_entropy_full_confidence_and_sdc_one():
    mask = ball(4.0)
    three = np.stack([~mask & (grid(mask.shape)[2] < 5), mask, ~mask & (grid(mask.shape)[2] >= 5)]).astype(float)
    for probabilities, index in ((mask.astype(float), 1), (three, 1)):
        scores = probability_scores(probabilities, mask, class_index=index)
        assert scores["mean_max_softmax_mask"] == 1.0
        for name in ("mean_entropy_image", "mean_entropy_foreground", "mean_entropy_boundary"):
            assert scores[name] == pytest.approx(0.0, abs=1e-12)
        assert scores["soft_dice_confidence"] == pytest.approx(1.0, rel=1e-12)


def test_sdc_of_a_constant_probability():
    """p = c everywhere, |M| mask voxels of N: SDC = 2 c |M| / (c N + |M|)."""
    mask = ball(4.0)
    c, m, n = 0.3, int(mask.sum()), mask.size
    scores = probability_scores(np.full(mask.shape, c), mask)
    assert scores["soft_dice_confidence"] == pytest.approx(2 * c * m / (c * n + m), rel=1e-12)
    assert scores["mean_max_softmax_mask"] == pytest.approx(0.7)


def test_boundary_band_entropy_sees_only_the_band():
    """Entropy log 2 on the band (one voxel layer each side at band 1 mm), 0 elsewhere."""
    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 3:9, 3:9] = True
    from scipy import ndimage
    face = np.array(ndimage.generate_binary_structure(3, 1))
    band = (ndimage.binary_dilation(mask, face) & ~mask) | (mask & ~ndimage.binary_erosion(mask, face))
    p = np.where(band, 0.5, mask.astype(float))
    scores = probability_scores(p, mask, band_mm=1.0)
    assert scores["mean_entropy_boundary"] == pytest.approx(math.log(2))
    inner = mask & band
    assert scores["mean_entropy_foreground"] == pytest.approx(math.log(2) * inner.sum() / mask.sum())
    assert scores["mean_entropy_image"] == pytest.approx(math.log(2) * band.sum() / mask.size)


def test_probability_scores_of_an_empty_mask_and_bad_inputs():
    mask = np.zeros((6, 6, 6), bool)
    scores = probability_scores(np.full(mask.shape, 0.2), mask)
    assert math.isnan(scores["mean_max_softmax_mask"]) and math.isnan(scores["mean_entropy_boundary"])
    assert scores["soft_dice_confidence"] == 0.0
    assert math.isnan(probability_scores(np.zeros(mask.shape), mask)["soft_dice_confidence"])
    with pytest.raises(SegXAIInputError, match="sum to 1"):
        probability_scores(np.full((2, 6, 6, 6), 0.7), mask)
    with pytest.raises(SegXAIInputError, match=r"\[0, 1\]"):
        probability_scores(np.full((6, 6, 6), 1.5), mask)
    with pytest.raises(SegXAIInputError, match="class_index"):
        probability_scores(np.full((2, 6, 6, 6), 0.5), mask, class_index=2)


# ---- uncertainty ------------------------------------------------------------------------------------------
def two_sample_result(sources):
    """An UncertaintyResult of two softmax samples with masks A and B (hard 0/1 probabilities)."""
    shape = (10, 10, 10)
    a = np.zeros(shape, bool)
    a[2:7, 2:7, 2:7] = True   # 125 voxels
    b = np.zeros(shape, bool)
    b[3:8, 2:7, 2:6] = True   # 100 voxels, overlap 4*5*4 = 80
    image = Image(np.zeros(shape, np.float32))
    accumulator = UncertaintyAccumulator(image, ("background", "thing"), "softmax", a[None], max_samples=2)
    for mask in (a, b):
        accumulator.add(np.stack([~mask, mask]).astype(np.float32))
    maps = accumulator.maps()
    structures, instances = accumulator.tables(maps)
    images = {name: image.with_array(values) for name, values in maps.items()}
    return UncertaintyResult(**images, structures=structures, instances=instances, samples=2, sources=sources,
                             seed=0, activation="softmax")


@pytest.mark.parametrize("sources, prefix", [
    ({"flips": {}}, "tta"), ({"gamma": {}, "noise": {}}, "tta"), ({"mc_dropout": {}}, "mc_dropout"),
    ({"ensemble": {}}, "ensemble"),
])
def test_uncertainty_scores_map_the_structure_row(sources, prefix):
    scores = uncertainty_scores(two_sample_result(sources))
    assert set(scores) == {f"{prefix}_pairwise_dice", f"{prefix}_volume_cv"}
    assert scores[f"{prefix}_pairwise_dice"] == pytest.approx(2 * 80 / (125 + 100), rel=1e-9)
    # population sd / mean of two volumes: |v1 - v2| / (v1 + v2)
    assert scores[f"{prefix}_volume_cv"] == pytest.approx(25 / 225, rel=1e-9)
    assert uncertainty_scores(two_sample_result(sources), structure="thing") == scores
    assert uncertainty_scores(two_sample_result(sources), structure=1) == scores


def test_uncertainty_scores_refuse_mixed_families_unless_prefixed():
    result = two_sample_result({"mc_dropout": {}, "noise": {}})
    with pytest.raises(SegXAIInputError, match="prefix"):
        uncertainty_scores(result)
    assert "mc_dropout_pairwise_dice" in uncertainty_scores(result, prefix="mc_dropout")
    with pytest.raises(SegXAIInputError, match="structure"):
        uncertainty_scores(result, structure="other", prefix="tta")


# ---- image quality ----------------------------------------------------------------------------------------
def smooth_image(shape):
    z, y, x = grid(shape)
    # per-axis trends (annihilated by the diagonal wavelet detail) plus a broad blob
    blob = 50 * np.exp(-((z - 20) ** 2 + (y - 30) ** 2 + (x - 25) ** 2) / (2 * 15.0 ** 2))
    return 100 + 2 * z - 0.05 * y ** 2 + 30 * np.sin(x / 10) + blob


def test_noise_sigma_recovers_added_gaussian_noise():
    """MAD of n Gaussian detail coefficients: relative standard error 1 / (2 phi(q) q sqrt(n))
    with q = 0.6745 (about 1.17 / sqrt(n)); allow 6 of them."""
    shape = (48, 48, 48)
    n = (48 // 2) ** 3
    bound = 6 * 1 / (2 * norm.pdf(norm.ppf(0.75)) * norm.ppf(0.75) * math.sqrt(n))
    rng = np.random.default_rng(7)
    clean = smooth_image(shape)
    assert image_quality_scores(clean)["noise_sigma"] < 0.02  # the smooth part leaves next to nothing
    for sigma in (1.0, 5.0):
        estimate = image_quality_scores(clean + rng.normal(0, sigma, shape))["noise_sigma"]
        assert abs(estimate / sigma - 1) < bound + 0.02 / sigma


def test_noise_sigma_agrees_with_skimage_when_pywavelets_is_there():
    pytest.importorskip("pywt")
    from skimage.restoration import estimate_sigma
    image = np.random.default_rng(3).normal(0, 2.0, (16, 16, 16))
    assert image_quality_scores(image)["noise_sigma"] == pytest.approx(estimate_sigma(image, wavelet="haar"))


def test_laplacian_variance_of_white_noise():
    """7-point stencil: var = (36 + 6) sigma^2 for independent values; the sample variance of
    ~10^5 correlated values (each shares with 12 others) is within a few percent."""
    sigma = 2.0
    image = np.random.default_rng(11).normal(0, sigma, (48, 48, 48))
    mask = np.zeros(image.shape, bool)
    mask[10:40, 10:40, 10:40] = True
    scores = image_quality_scores(image, mask)
    assert scores["laplacian_variance"] == pytest.approx(42 * sigma ** 2, rel=0.03)
    assert scores["laplacian_variance_mask"] == pytest.approx(42 * sigma ** 2, rel=0.05)
    assert image_quality_scores(np.full((8, 8, 8), 3.0))["laplacian_variance"] == 0.0
    assert math.isnan(image_quality_scores(image)["laplacian_variance_mask"])


# ---- control curves ---------------------------------------------------------------------------------------
def structured_saliency(shape):
    z, y, x = grid(shape)
    return np.cos(z / 1.5) * np.cos(y / 1.5) + 0.3 * np.cos(x / 2.0)  # many separate peaks


def test_shuffled_curve_is_seeded_and_keeps_the_support():
    mask = ball(7.0)
    saliency = structured_saliency(mask.shape)
    thresholds = default_thresholds(21)
    first = shuffled_saliency_curve(saliency, mask, thresholds, seed=1)
    assert np.array_equal(first, shuffled_saliency_curve(saliency, mask, thresholds, seed=1))
    assert not np.array_equal(first, shuffled_saliency_curve(saliency, mask, thresholds, seed=2))
    original = saliency_curve(saliency, mask, thresholds)
    assert not np.array_equal(first, original)
    # t = 0: every mask voxel is present, whatever the order of the values: the mask's own chi
    assert first[0] == original[0] == mask_shape_scores(mask)["euler_characteristic"]
    # outside the mask nothing changes: the curve of a mask-restricted map ignores it
    moved = saliency.copy()
    moved[~mask] = 1e3
    assert np.array_equal(shuffled_saliency_curve(moved, mask, thresholds, seed=1), first)


def test_intensity_curve_is_the_ec_curve_of_the_normalised_image():
    mask = ball(6.0)
    image = 40.0 * structured_saliency(mask.shape) - 300.0  # negative, CT-like
    thresholds = default_thresholds(17)
    normalised = np.zeros(mask.shape)
    normalised[mask] = normalise_000(image[mask][None])[0]
    expected = euler_characteristic_curve(normalised, thresholds, mask=mask, superlevel=True)
    assert np.array_equal(intensity_curve(image, mask, thresholds), expected)


def test_control_curves_refuse_bad_inputs():
    mask = ball(3.0)
    with pytest.raises(SegXAIInputError, match="seed"):
        shuffled_saliency_curve(np.ones(mask.shape), mask, default_thresholds(5), seed=-1)
    with pytest.raises(SegXAIInputError, match="empty"):
        shuffled_saliency_curve(np.ones(mask.shape), np.zeros(mask.shape, bool), default_thresholds(5))


# ---- one case ---------------------------------------------------------------------------------------------
def test_case_scores_assemble_what_is_given_and_every_name_has_a_direction():
    mask = ball(5.0)
    only_mask = case_scores(mask)
    assert set(only_mask) == set(mask_shape_scores(mask))
    everything = case_scores(mask[:10, :10, :10], probabilities=np.full((10, 10, 10), 0.4),
                             image=smooth_image((10, 10, 10)), uncertainty=[two_sample_result({"flips": {}}),
                                                                             two_sample_result({"ensemble": {}})])
    assert {"soft_dice_confidence", "noise_sigma", "tta_pairwise_dice", "ensemble_volume_cv"} <= set(everything)
    assert set(everything) <= set(RISK_DIRECTION)
    assert set(RISK_DIRECTION.values()) <= {-1, 0, 1}
    with pytest.raises(SegXAIInputError, match="two results"):
        case_scores(mask[:10, :10, :10], uncertainty=[two_sample_result({"flips": {}})] * 2)
    oriented = risk_oriented(everything)
    assert oriented["soft_dice_confidence"] == -everything["soft_dice_confidence"]
    assert oriented["component_count"] == everything["component_count"]
    assert "volume_ml" not in oriented
