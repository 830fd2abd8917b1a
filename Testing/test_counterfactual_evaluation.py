"""Quantitative checks of counterfactual generators (``SegXAILib.counterfactual.evaluation``) and the
shipped generators of the bundled lesion model.

Oracles: the bootstrap CI of a large normal sample against the central limit theorem; the paired
tests against hand-computed t and exact Wilcoxon values (and SciPy's functions on the same data);
SSIM against the numpy definition of ``test_counterfactual``; dilation and locality shares counted
by hand; deletion curves of a voxel-wise model (class-1 logit ``x - 2``) whose scores after
deleting any set of voxels are known in closed form. The shipped generators: readable with
``weights_only=True``, the card's SHA-256 (hashlib), the bundled model's checksum, and on a
held-out phantom G+ raises and G- lowers the model's score of a reference lesion.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import write_voxelwise_card
from test_counterfactual import numpy_ssim
from SegXAILib.image import SegXAIInputError
from SegXAILib.counterfactual import IntensityFrame, PatchGeometry, SegmentationScore
from SegXAILib.counterfactual.evaluation import (bootstrap_mean_ci, deletion_area, deletion_curves, locality,
                                                 neighbourhood, paired_comparison, patch_fractions, proximity,
                                                 restrict)
from SegXAILib.models.loaders import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "lesions" / "counterfactual"


# ---- bootstrap and paired tests ----------------------------------------------------------------

def test_bootstrap_ci_of_a_large_normal_sample_is_the_clt_interval():
    values = np.random.default_rng(3).normal(5.0, 2.0, 4000)
    se = values.std(ddof=1) / math.sqrt(values.size)
    low, high = bootstrap_mean_ci(values, 0.95, 10_000, seed=1)
    z = stats.norm.ppf(0.975)
    # the percentiles of 10 000 resampled means scatter by ~0.03 se (binomial quantile error)
    assert abs(low - (values.mean() - z * se)) < 0.15 * se
    assert abs(high - (values.mean() + z * se)) < 0.15 * se
    low90, high90 = bootstrap_mean_ci(values, 0.90, 10_000, seed=1)
    assert low < low90 < values.mean() < high90 < high
    assert bootstrap_mean_ci(values, seed=1) == (low, high)  # seeded


def test_bootstrap_ci_of_a_constant_sample_is_the_constant():
    assert bootstrap_mean_ci([2.5] * 7) == (2.5, 2.5)
    assert bootstrap_mean_ci([-1.0]) == (-1.0, -1.0)


@pytest.mark.parametrize("kwargs", [dict(values=[]), dict(values=[1.0, float("nan")]),
                                    dict(values=[1.0, 2.0], confidence=1.0), dict(values=[1.0], resamples=0)])
def test_bootstrap_rejects_bad_input(kwargs):
    with pytest.raises(SegXAIInputError):
        bootstrap_mean_ci(**kwargs)


def test_paired_comparison_against_hand_computed_statistics():
    before = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    after = np.array([1.0, -2.0, 3.0, 4.0, 5.0])  # |d| ranks 1..5; W+ = 13, W- = 2
    result = paired_comparison(before, after, "two-sided")
    d = after - before
    assert result.n == 5
    assert result.mean_before == 0.0 and result.mean_after == pytest.approx(2.2)
    assert result.mean_difference == pytest.approx(2.2)
    assert result.t_statistic == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
    # exact null distribution of W- for n = 5: subsets of {1..5} with rank sum <= 2 are {}, {1}, {2}
    assert result.wilcoxon_statistic == 2.0
    assert result.wilcoxon_p == pytest.approx(2 * 3 / 32)
    greater = paired_comparison(before, after, "greater")
    assert greater.wilcoxon_statistic == 13.0 and greater.wilcoxon_p == pytest.approx(3 / 32)
    assert greater.t_p == pytest.approx(result.t_p / 2)
    less = paired_comparison(before, after, "less")
    assert less.wilcoxon_p == pytest.approx(1 - 2 / 32)  # P(W+ <= 13) = 1 - P(W+ >= 14) = 1 - 2/32
    assert result.share_greater == pytest.approx(0.8)
    lo, hi = result.ci_difference
    assert lo <= 2.2 <= hi


def test_paired_comparison_matches_scipy_on_random_pairs():
    rng = np.random.default_rng(0)
    before = rng.normal(0.4, 0.1, 30)
    after = before + rng.normal(0.2, 0.1, 30)
    result = paired_comparison(before, after)
    t = stats.ttest_rel(after, before)
    w = stats.wilcoxon(after - before)
    assert result.t_statistic == pytest.approx(t.statistic) and result.t_p == pytest.approx(t.pvalue)
    assert result.wilcoxon_statistic == pytest.approx(w.statistic) and result.wilcoxon_p == pytest.approx(w.pvalue)
    assert result.ci_before[0] < before.mean() < result.ci_before[1]
    assert result.ci_after[0] < after.mean() < result.ci_after[1]
    assert json.loads(json.dumps(result.to_dict()))["ci_after"] == list(result.ci_after)


def test_paired_comparison_of_equal_samples_has_no_evidence():
    result = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert result.wilcoxon_p == 1.0 and result.t_p == 1.0 and result.share_greater == 0.0


@pytest.mark.parametrize("before, after, alternative", [([1.0, 2.0], [1.0], "two-sided"), ([1.0], [2.0], "greater"),
                                                        ([1.0, 2.0], [2.0, 3.0], "up")])
def test_paired_comparison_rejects_bad_input(before, after, alternative):
    with pytest.raises(SegXAIInputError):
        paired_comparison(before, after, alternative)


# ---- proximity and locality --------------------------------------------------------------------

def test_proximity_of_identity_and_of_a_constant_shift():
    x = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    same = proximity(x, x.clone())
    np.testing.assert_allclose(same["l1"], 0.0)
    np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-6)
    shifted = proximity(x, x + 0.25)
    np.testing.assert_allclose(shifted["l1"], 0.25, rtol=1e-6)  # float32 sums of 512 values of 0.25


def test_proximity_ssim_in_the_frame_against_the_numpy_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 16, 16, generator=g) * torch.tensor([4.0, 1.0]).view(1, 2, 1, 1)
    y = x + 0.3 * torch.randn(x.shape, generator=g)
    frame = IntensityFrame((2.0, 0.5), (2.0, 0.5))
    result = proximity(x, y, frame, window=7)
    u = (x.numpy() - np.array([2.0, 0.5]).reshape(1, 2, 1, 1)) / np.array([2.0, 0.5]).reshape(1, 2, 1, 1)
    v = (y.numpy() - np.array([2.0, 0.5]).reshape(1, 2, 1, 1)) / np.array([2.0, 0.5]).reshape(1, 2, 1, 1)
    expected = [np.mean([numpy_ssim(u[b, c].astype(np.float64), v[b, c].astype(np.float64), 7) for c in range(2)])
                for b in range(2)]
    np.testing.assert_allclose(result["ssim"], expected, atol=1e-5)  # float32 window sums
    np.testing.assert_allclose(result["l1"], np.abs(y.numpy() - x.numpy()).reshape(2, -1).mean(1), rtol=1e-5)


def test_proximity_rejects_bad_input():
    with pytest.raises(SegXAIInputError):
        proximity(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(SegXAIInputError):
        proximity(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), IntensityFrame((0.0, 0.0), (1.0, 1.0)))


def test_neighbourhood_balls_counted_by_hand():
    point = np.zeros((7, 7, 7), bool)
    point[3, 3, 3] = True
    assert neighbourhood(point, 0).sum() == 1
    assert neighbourhood(point, 1).sum() == 7  # the centre and its 6 face neighbours
    assert neighbourhood(point, math.sqrt(2)).sum() == 19  # 3 x 3 x 3 less the 8 corners
    flat = np.zeros((9, 9), bool)
    flat[4, 4] = True
    # spacing (1, 2), radius 2: offsets (i, 0) for |i| <= 2 and (0, +-1): 7 voxels
    grown = neighbourhood(flat, 2.0, spacing=(1.0, 2.0))
    assert grown.sum() == 7 and grown[2, 4] and grown[4, 3] and not grown[3, 3]
    with pytest.raises(SegXAIInputError):
        neighbourhood(flat, 1.0, spacing=(1.0,))


def test_locality_shares_by_hand():
    relevance = np.zeros((2, 4, 4))
    relevance[0, 0, 0] = 3.0
    relevance[1, 0, 0] = -1.0  # |R| summed over channels: 4 at (0, 0)
    relevance[0, 3, 3] = -6.0  # 6 outside
    inside = np.zeros((4, 4), bool)
    inside[:2, :2] = True
    assert locality(relevance, inside) == pytest.approx(0.4)
    assert locality(torch.as_tensor(relevance[0]), inside) == pytest.approx(3 / 9)
    assert math.isnan(locality(np.zeros((4, 4)), inside))
    with pytest.raises(SegXAIInputError):
        locality(np.zeros((4, 5)), inside)


# ---- deletion through the project's fidelity metric --------------------------------------------

GEOMETRY = PatchGeometry(2, (16, 16), (16, 16, 4), (6, 6))


@pytest.fixture(scope="module")
def voxelwise(tmp_path_factory):
    card = write_voxelwise_card(tmp_path_factory.mktemp("voxelwise"), orientation="RAS", threshold=2.0,
                                patch=GEOMETRY.context_size)
    return load_model(card, "cpu")


def test_restrict_and_patch_fractions():
    support = np.zeros((4, 4, 2), bool)
    support[:, :, 1] = True
    values = torch.ones(1, 2, 4, 4, 2)
    restricted = restrict(values, support)
    assert restricted[..., 0].abs().sum() == 0 and torch.equal(restricted[..., 1], values[..., 1])
    np.testing.assert_allclose(patch_fractions(support, 4), [0, 0.125, 0.25, 0.375, 0.5])
    with pytest.raises(SegXAIInputError):
        patch_fractions(np.zeros((2, 2), bool))
    with pytest.raises(SegXAIInputError):
        restrict(values, np.ones((4, 4), bool))


def test_deletion_curves_of_a_voxelwise_model_are_known(voxelwise):
    """Class-1 logit ``x - 2`` per voxel, target = its sum over the central 6 x 6 region: deleting a
    set S of voxels (to 0) lowers the target by the sum of x over S within the region, and the
    fully masked input scores 0 after normalisation, so MiF(S) = 1 - x(S & region) / x(region)."""
    score = SegmentationScore(voxelwise, GEOMETRY)
    context = torch.ones(1, 1, *GEOMETRY.context_size)
    support = np.zeros(GEOMETRY.context_size, bool)
    support[GEOMETRY.patch_slices] = True  # the 16 x 16 patch slice: 256 of 1024 voxels
    region = GEOMETRY.region_mask().numpy()
    good = torch.as_tensor(np.where(region, 2.0, 1.0) * support, dtype=torch.float32)[None, None]  # region first
    bad = torch.as_tensor(np.where(region, 1.0, 2.0) * support, dtype=torch.float32)[None, None]  # region last
    curves = deletion_curves(score.forward, context, {"good": good, "bad": bad}, support, "signed", steps=4)
    np.testing.assert_allclose(curves["good"].fractions, [0, 0.0625, 0.125, 0.1875, 0.25])
    # steps delete 64, 128, 192, 256 voxels; the region has 36, the rest of the patch 220
    np.testing.assert_allclose(curves["good"].mif, [1, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(curves["bad"].mif, [1, 1, 1, 1, 0], atol=1e-6)
    # LiF deletes the zeroed voxels outside the patch first (ranked below the support): no change
    np.testing.assert_allclose(curves["good"].lif, 1.0, atol=1e-6)
    assert deletion_area(curves["good"]) == pytest.approx(0.125, abs=1e-6)  # (h / 2) / 4h
    assert deletion_area(curves["bad"]) == pytest.approx(0.875, abs=1e-6)  # 3.5h / 4h
    with pytest.raises(SegXAIInputError):
        deletion_curves(score.forward, context, {}, support)


# ---- the shipped generators ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_card():
    path = SHIPPED / "card.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run Utilities/train_counterfactual_demo.py")
    return json.loads(path.read_text())


def test_shipped_generators_match_their_card(shipped_card):
    from SegXAILib.sample_data import bundled_model_card

    path = SHIPPED / shipped_card["files"]["generators"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shipped_card["generators_sha256"]
    assert path.stat().st_size < 4_000_000  # the repository ships it
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and strings only
    metadata = json.loads(state["metadata"])
    assert metadata["geometry"] == shipped_card["geometry"] and metadata["config"] == shipped_card["config"]
    assert metadata["model_name"] == shipped_card["explains"]["model"]
    model = load_model(bundled_model_card("lesions"), "cpu")
    assert model.card.checksum() == shipped_card["explains"]["model_checksum"]  # trained against this model
    assert not set(shipped_card["held_out_phantom_seeds"]) & set(shipped_card["training_phantoms"]["seeds"])
    with (SHIPPED / shipped_card["files"]["log"]).open() as handle:
        log = list(csv.reader(handle))
    assert len(log) - 1 == shipped_card["iterations"] == shipped_card["config"]["iterations"]


def test_shipped_generators_move_the_score_on_a_held_out_phantom(shipped_card):
    from SegXAILib.counterfactual import counterfactual_relevance, load_counterfactual_generators
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import bundled_model_card, load_sample_head

    generators = load_counterfactual_generators(SHIPPED / shipped_card["files"]["generators"])
    model = load_model(bundled_model_card("lesions"), "cpu")
    phantom = make_lesion_phantom(load_sample_head(), seed=shipped_card["held_out_phantom_seeds"][0])
    labels = phantom.lesions.array[0]
    largest = int(np.argmax(np.bincount(labels[labels > 0].ravel())))  # the clearest lesion
    region = phantom.lesions.with_array((labels == largest)[None].astype(np.uint8))
    result = counterfactual_relevance(phantom.image, model, generators, region=region)
    assert result.scores["plus"] > result.scores["original"] > result.scores["minus"]
