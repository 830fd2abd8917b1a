"""Evaluation metrics of attribution maps (papers 002, 003).

Oracles: hand-computed values on tiny maps (complexity, pointing ROC, region Dice, Pearson /
Spearman), the pairwise (Mann-Whitney) definition of the pointing AUC and direct counts for the
pointing ROC (the code calls scikit-learn / SciPy), a linear model (masking a voxel removes exactly its
contribution ``w x``: the MiF / LiF curves and the faithfulness correlation of ``w x`` are known
in closed form), and a network whose output depends only on a known region (every sound method
points at it; the random baseline does not, and scores ~0 fidelity).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.attribution import RegionTarget, SegmentationForward, get_method
from SegXAILib.attribution.gradient import sample_generator
from SegXAILib.evaluation import metrics as M
from SegXAILib.image import SegXAIInputError
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.progress import Cancelled, CancelToken


def make_card(patch, channels=1):
    return model_card_from_dict({
        "name": "test",
        "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": [f"ch{c}" for c in range(channels)],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": 0.25, "blend": "gaussian"},
        "output_activation": "softmax",
    })


class Linear(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, x):
        return torch.einsum("kcdhw,bcdhw->bkdhw", self.weights, x)


class RegionOnly(torch.nn.Module):
    """A small ReLU network that sees the input only inside ``region`` (its output depends on
    nothing else)."""

    def __init__(self, region: torch.Tensor, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("region", region.float()[None, None])
        self.conv1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv3d(4, 2, 1)
        with torch.no_grad():
            self.conv1.bias.fill_(0.5)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x * self.region)))


SHAPE = (12, 12, 12)


@pytest.fixture(scope="module")
def region_case():
    region = torch.zeros(SHAPE, dtype=torch.bool)
    region[4:8, 4:8, 4:8] = True
    network = RegionOnly(region).eval()
    x = torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(1)) + 0.5
    forward = SegmentationForward(network, make_card(SHAPE), SHAPE, RegionTarget(1, torch.ones(SHAPE, dtype=torch.bool)))
    return region, forward, x


def linear_case(shape=(8, 6, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros((2, 1, *shape))
    weights[1] = torch.rand((1, *shape), generator=generator)
    x = torch.rand((1, 1, *shape), generator=generator) + 0.1
    forward = SegmentationForward(Linear(weights), make_card(shape), shape, RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    return forward, x, (weights[1] * x[0])[None]


# ---- hand-checked values --------------------------------------------------------------------------
def test_complexity_hand_values():
    one_hot = np.zeros((4, 5, 6))
    one_hot[1, 2, 3] = 7.0
    assert M.complexity(one_hot) == pytest.approx(1 / 120)
    assert M.complexity(one_hot, "signed") == pytest.approx(1 / 120)
    values = np.array([1.0, 0.05, 0.2, -0.5, 0.1, 0.0]).reshape(1, 1, 6)
    assert M.complexity(values, "absolute") == pytest.approx(3 / 6)  # 1, 0.2, 0.5 exceed 0.1; 0.1 does not
    assert M.complexity(values, "signed") == pytest.approx(2 / 6)  # -0.5 is counter-evidence
    assert M.complexity(np.zeros((2, 2, 2))) == 0.0
    # channels add up before thresholding
    two = np.zeros((2, 1, 1, 4))
    two[0, 0, 0] = [1.0, 0.06, 0.0, 0.0]
    two[1, 0, 0] = [0.0, 0.06, 0.0, 0.0]
    assert M.complexity(two) == pytest.approx(2 / 4)


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The AUC's definition (Mann-Whitney U / (n1 n0)): over all (inside, outside) voxel pairs,
    1 when the inside voxel scores higher, 1/2 on a tie."""
    inside, outside = scores[labels], scores[~labels]
    difference = inside[:, None] - outside[None, :]
    return float(((difference > 0) + 0.5 * (difference == 0)).mean())


def test_pointing_auc_equals_the_pairwise_count_and_roc_curve_by_hand():
    rng = np.random.default_rng(0)
    attribution = np.round(rng.normal(size=(2, 6, 5, 4)), 1)  # rounded: many ties
    reference = rng.random((6, 5, 4)) < 0.3
    for variant in ("signed", "absolute"):
        expected = pairwise_auc(M.spatial_map(attribution, variant).ravel(), reference.ravel())
        # 120 voxels: float64 sums of at most 120 * 120 halves, exact up to rounding ~1e-14
        assert M.pointing_auc(attribution, reference, variant) == pytest.approx(expected, abs=1e-12)
    perfect = reference.astype(float) + 0.0
    assert M.pointing_auc(perfect, reference) == 1.0 and M.pointing_auc(-perfect, reference, "signed") == 0.0
    # ROC by hand: values 0, 0.5, 1 (normalised), reference = the last two voxels
    values = np.array([0.0, 0.5, 0.5, 1.0]).reshape(1, 1, 4)
    truth = np.array([False, False, True, True]).reshape(1, 1, 4)
    steps, fpr, tpr = M.pointing_roc(values, truth, "absolute", thresholds=3)
    np.testing.assert_allclose(steps, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [1.0, 1.0, 0.5])
    np.testing.assert_allclose(fpr, [1.0, 0.5, 0.0])
    assert M.roc_area(fpr, tpr) == pytest.approx(0.875) == pytest.approx(M.pointing_auc(values, truth))
    with pytest.raises(SegXAIInputError):
        M.pointing_auc(values, np.zeros((1, 1, 4), bool))
    with pytest.raises(SegXAIInputError):
        M.pointing_auc(values, np.ones((2, 2, 2), bool))
    with pytest.raises(SegXAIInputError, match="reference"):  # one class only: AUC undefined
        M.pointing_auc(values, np.ones((1, 1, 4), bool))


def test_pointing_roc_equals_direct_counts_at_every_threshold():
    rng = np.random.default_rng(1)
    # quarters (exact in binary) with the peak at 1: the normalised map hits the thresholds
    # 0, 0.25, ..., 1 exactly, so ">=" at a tie is tested too
    values = rng.integers(0, 5, size=(5, 4, 3)) / 4.0
    values[0, 0, 0] = 1.0
    reference = rng.random((5, 4, 3)) < 0.4
    for thresholds in (5, 9, 101):
        steps, fpr, tpr = M.pointing_roc(values, reference, "absolute", thresholds=thresholds)
        assert steps.shape == fpr.shape == tpr.shape == (thresholds,)
        for t, f, p in zip(steps, fpr, tpr):
            assert p == (values[reference] >= t).mean() and f == (values[~reference] >= t).mean()
    # a threshold sweep of every distinct value integrates to the AUC
    steps, fpr, tpr = M.pointing_roc(values, reference, "absolute", thresholds=5)
    assert M.roc_area(fpr, tpr) == pytest.approx(pairwise_auc(values.ravel(), reference.ravel()), abs=1e-12)


def test_correlations_hand_values():
    from SegXAILib.attribution.sanity import similarity

    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = 4 / 5
    assert M._pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)
    assert M._pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    assert M._pearson([1, 1, 1], [1, 2, 3]) == 0.0 and M._pearson([1, 2, 3], [5, 5, 5]) == 0.0
    # Spearman with a tie: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 3.0, 2.0, 4.0])
    result = similarity(a, b)
    assert result["spearman"] == pytest.approx(3 / np.sqrt(10), abs=1e-15)
    # |a| ranks: the same; Pearson of the values: deviations (-1, 0, 0, 1), (-1.5, .5, -.5, 1.5)
    assert result["spearman_abs"] == pytest.approx(3 / np.sqrt(10), abs=1e-15)
    assert result["pearson"] == pytest.approx(3 / np.sqrt(2 * 5), abs=1e-15)
    assert similarity(a, torch.ones(4)) == {"spearman_abs": 0.0, "spearman": 0.0, "pearson": 0.0}


def test_region_dice_hand_values():
    regions = np.repeat(np.arange(4), 2).reshape(8, 1, 1) * np.ones((8, 3, 3), int)  # 4 slabs of 18 voxels
    attribution = np.zeros((8, 3, 3))
    attribution[2:4] = 1.0  # slab 1 ranks first
    attribution[6:8] = 0.5  # slab 3 second
    reference = np.zeros((8, 3, 3), bool)
    reference[2:4] = True
    result = M.region_dice(attribution, reference, regions, fractions=(0.1, 0.25, 0.5, 1.0))
    # 0.1 and 0.25 of 72 voxels: slab 1 alone (Dice 1); 0.5: slabs 1 + 3 (2*18 / (36 + 18)); 1: all
    np.testing.assert_allclose(result.dice, [1.0, 1.0, 2 * 18 / 54, 2 * 18 / 90])
    assert result.maximum == 1.0 and result.best_fraction == 0.1 and result.n_regions == 4


def test_slic_supervoxels_cover_the_volume():
    image = np.zeros((1, 16, 16, 16), np.float32)
    image[0, 4:12, 4:12, 4:12] = 1.0
    regions = M.slic_regions(image, n_segments=20, compactness=0.1)
    assert regions.shape == (16, 16, 16) and regions.min() == 0
    assert 4 <= regions.max() + 1 <= 60
    # supervoxels follow the cube's edge: almost every region is inside or outside the cube
    cube = image[0] > 0
    purity = [max(cube[regions == r].mean(), 1 - cube[regions == r].mean()) for r in range(regions.max() + 1)]
    assert np.mean(purity) > 0.9


# ---- model-based metrics on closed-form cases -------------------------------------------------------
def test_fidelity_of_a_linear_model_in_closed_form():
    forward, x, contribution = linear_case()
    values = contribution[0, 0].numpy().ravel().astype(np.float64)
    total = values.sum()
    fractions = M.FIDELITY_FRACTIONS
    curves = M.fidelity(forward, x, contribution, "absolute", batch_size=16)
    order = np.argsort(-values)
    n = values.size
    expected_mif = [1 - values[order[: int(round(q * n))]].sum() / total for q in fractions]
    expected_lif = [1 - values[order[::-1][: int(round(q * n))]].sum() / total for q in fractions]
    np.testing.assert_allclose(curves.mif, expected_mif, atol=1e-5)
    np.testing.assert_allclose(curves.lif, expected_lif, atol=1e-5)
    assert curves.mif[0] == pytest.approx(1.0) and curves.mif[-1] == pytest.approx(0.0, abs=1e-6)
    assert curves.area > 0.2
    # a "dice" score: the Linear model's class-1 logit is w x > 0 = class 0's 0: all class 1
    dice_curves = M.fidelity(forward, x, contribution, "absolute", score="dice", fractions=(0.0, 0.5, 1.0))
    np.testing.assert_allclose(dice_curves.mif, [1.0, 2 * 120 / 360, 0.0], atol=1e-6)


def test_faithfulness_of_the_exact_contributions_is_one():
    forward, x, contribution = linear_case(seed=1)
    # masking S at 0 removes exactly sum_S w x: Pearson 1
    assert M.faithfulness_correlation(forward, x, contribution, n_subsets=30, subset_fraction=0.05) == pytest.approx(1.0)
    random_map = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    assert abs(M.faithfulness_correlation(forward, x, random_map, n_subsets=30, subset_fraction=0.05)) < 0.6
    assert M.faithfulness_correlation(forward, x, torch.zeros_like(x), n_subsets=5) == 0.0


def test_sensitivity_hand_values():
    x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    constant = torch.ones_like(x)
    constant[0, 0, 0, 0, 0] = 2.0
    # an input-independent map: 0
    result = M.sensitivity(lambda noisy: constant, x, constant, "absolute", n_samples=2)
    assert result == {"mean": 0.0, "max": 0.0, "n_samples": 2, "noise_level": 0.05}
    # map = input: the distance is ||n(x + e) - n(x)|| / ||n(x)|| with the same noise draws
    result = M.sensitivity(lambda noisy: noisy, x, x, "signed", n_samples=3, noise_level=0.1, seed=7)
    reference = M.normalise(x[0, 0].numpy(), "signed")
    expected = []
    for k in range(3):  # sample k's draw: its own seeded CPU generator (the same on every device)
        noisy = x + 0.1 * 7.0 * torch.randn(x.shape, generator=sample_generator(7, k))
        expected.append(np.linalg.norm(M.normalise(noisy[0, 0].numpy(), "signed") - reference) / np.linalg.norm(reference))
    assert result["mean"] == pytest.approx(np.mean(expected)) and result["max"] == pytest.approx(np.max(expected))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        M.sensitivity(lambda noisy: noisy, x, x, cancel=token)


# ---- the known-region model -------------------------------------------------------------------------
SOUND = {
    "vanilla_gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 4},
    "integrated_gradients": {"n_steps": 8},
    "guided_backprop": {"aggregation": "target"},  # per_voxel (exact, default) is 100x slower here
    "deconvolution": {"aggregation": "target"},
    "occlusion": {"window": 2, "stride": 2},
    "kernel_shap": {"features": "cubes", "cubes": 6, "n_samples": 150},
    "supervoxel_occlusion": {"features": "cubes", "cubes": 6},
}


def test_every_sound_method_points_at_the_region_the_output_depends_on(region_case):
    region, forward, x = region_case
    aucs = {}
    for name, params in SOUND.items():
        attribution = get_method(name)(forward).attribute(x, **params)
        aucs[name] = M.pointing_auc(attribution, region, "absolute")
    random_map = get_method("random")(forward).attribute(x, seed=0)
    assert all(auc > 0.9 for auc in aucs.values()), aucs
    assert abs(M.pointing_auc(random_map, region, "absolute") - 0.5) < 0.1


def test_random_baseline_scores_about_zero_fidelity(region_case):
    region, forward, x = region_case
    gradient = get_method("vanilla_gradient")(forward).attribute(x)
    sound = M.fidelity(forward, x, gradient, "absolute", batch_size=16).area
    random_areas = [M.fidelity(forward, x, get_method("random")(forward).attribute(x, seed=s), "absolute", batch_size=16,
                               seed=s).area for s in range(3)]
    # measured: sound 0.93; random -0.01, 0.02, 0.00
    assert sound > 0.5
    assert abs(np.mean(random_areas)) < 0.1 * sound and max(abs(a) for a in random_areas) < 0.2 * sound


def test_randomisation_similarity_and_timing(region_case):
    region, forward, x = region_case
    network, card = forward.network, forward.card
    result = M.randomisation_similarity(network, card, x, forward.target, "vanilla_gradient", seed=0)
    # measured: spearman 0.16, pearson -0.03; spearman_abs stays 0.9996: outside the region both
    # maps are exactly 0 (tied ranks), which |a|-rank similarity cannot tell apart
    assert result["layers"] == 2 and result["spearman"] < 0.5 and abs(result["pearson"]) < 0.5
    # the random map does not depend on the model: identical maps (float64: 1 up to rounding)
    assert M.randomisation_similarity(network, card, x, forward.target, "random", seed=0)["spearman_abs"] == pytest.approx(1.0, abs=1e-12)
    # the network itself is left alone
    assert float(network.conv1.bias[0].detach()) == 0.5
    attribution, record = M.timed(lambda: get_method("vanilla_gradient")(forward).attribute(x))
    assert record["device"] == "cpu" and record["shape"] == list(SHAPE) and record["voxels"] == 12**3
    assert record["seconds"] >= 0 and attribution.shape == x.shape
