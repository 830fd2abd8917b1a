"""KernelSHAP and occlusion on supervoxels.

Oracles: a hand-computed 3-player game (Shapley values worked out on paper), the Shapley
formula enumerated over all 2^M coalitions (:func:`exact_shapley`), additivity (a linear
model's game is additive: every budget gives the exact values, and they equal the supervoxel
occlusion drops), Captum's ``KernelShap`` (a Monte-Carlo estimate: statistical tolerance) and
the dummy-player axiom (features the target cannot see score 0 and leaving them out changes
nothing).

Tolerances: when every proper coalition is evaluated the weighted regression *is* the Shapley
value (Lundberg & Lee 2017), so the only error is the rounding of the game values (float32
model outputs ~10: atol 1e-5; none when both sides evaluate the same values: float64
arithmetic only). Captum's sampled estimate gets a bound from its sampling variance, derived
at the test. The sampled budgets of our own estimator are checked against thresholds stated
with their measured errors.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from SegXAILib.attribution import ClassTarget, RegionTarget, SegmentationForward, registry
from SegXAILib.attribution.shap import (KernelSHAP, SupervoxelOcclusion, cube_features, exact_shapley, kernel_shap,
                                        semantic_features, shapley_design, supervoxel_features)
from SegXAILib.image import SegXAIInputError
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.progress import Cancelled, CancelToken

from conftest import tiny_unet


def make_card(patch=(8, 8, 8), overlap=0.25, channels=1):
    return model_card_from_dict({
        "name": "test",
        "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": [f"ch{c}" for c in range(channels)],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": "gaussian"},
        "output_activation": "softmax",
    })


class RegionGame(torch.nn.Module):
    """Class-1 logit everywhere = ``a1 m1 + a2 m2 + a3 m3 + a12 m1 m2``, ``m_k`` = mean of the input
    over region k. With the input 1 and baseline 0, coalition S gives ``v(S) = sum_{k in S} a_k
    + a12 [1, 2 in S]``."""

    def __init__(self, regions: torch.Tensor, a=(1.0, 2.0, 3.0), a12=6.0):
        super().__init__()
        self.register_buffer("regions", regions)
        self.a, self.a12 = a, a12

    def forward(self, x):
        means = [x[:, 0][:, self.regions == k].mean(1) for k in range(3)]
        value = sum(a * m for a, m in zip(self.a, means)) + self.a12 * means[0] * means[1]
        logits = torch.zeros((x.shape[0], 2, *x.shape[2:]), dtype=x.dtype)
        logits[:, 1] = value.view(-1, 1, 1, 1)
        return logits


class Linear(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, x):
        return torch.einsum("kcdhw,bcdhw->bkdhw", self.weights, x)


def three_regions(shape=(6, 6, 6)) -> torch.Tensor:
    regions = torch.zeros(shape, dtype=torch.int64)
    regions[2:4] = 1
    regions[4:] = 2
    return regions


def one_voxel_target(shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, 0, 0] = True
    return RegionTarget(1, mask)


# ---- the hand-computed 3-feature case ------------------------------------------------------------
def test_three_features_hand_computed_exact_and_kernel_shap_agree():
    # v(1)=1 v(2)=2 v(3)=3, the pair {1,2} adds 6: phi = (1 + 6/2, 2 + 6/2, 3) = (4, 5, 3)
    hand = np.array([4.0, 5.0, 3.0])

    def game(z):
        z = np.asarray(z, float)
        return z[:, 0] + 2 * z[:, 1] + 3 * z[:, 2] + 6 * z[:, 0] * z[:, 1]

    np.testing.assert_allclose(exact_shapley(game, 3), hand, atol=1e-12)
    values, design = kernel_shap(game, 3, n_samples=6)
    assert design.complete and len(design.coalitions) == 6  # all 2^3 - 2 proper coalitions
    np.testing.assert_allclose(values, hand, atol=1e-12)

    # the same game through the image pipeline (windowed forward, coalitions as volumes)
    shape = (6, 6, 6)
    regions = three_regions(shape)
    forward = SegmentationForward(RegionGame(regions), make_card(shape), shape, one_voxel_target(shape))
    x = torch.ones((1, 1, *shape))
    method = KernelSHAP(forward)
    result = method.attribute(x, feature_mask=regions, n_samples=6, baseline="zero", batch_size=4)
    np.testing.assert_allclose(method.values, hand, atol=1e-5)
    for k in range(3):  # every voxel of a feature carries the feature's value (paper 003, eq. 6)
        torch.testing.assert_close(result[0, 0][regions == k], torch.full(((regions == k).sum(),), float(hand[k])))
    # the registry's default budget (200) covers all coalitions too
    KernelSHAP(forward).attribute(x, feature_mask=regions)
    # a number as the baseline: absent features at 1 = present, so every value is 0
    assert float(KernelSHAP(forward).attribute(x, feature_mask=regions, baseline="1").abs().max()) == 0.0


def test_exact_enumeration_equals_kernel_shap_on_a_unet():
    shape = (12, 12, 12)
    network = tiny_unet()
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 3:9, 3:9] = True
    forward = SegmentationForward(network, make_card((16, 16, 16)), shape, ClassTarget(1, mask))
    regions = torch.zeros(shape, dtype=torch.int64)
    regions[6:] = 1
    regions[:, 6:] += 2  # four features
    fill = torch.full_like(x, -0.5)

    def game(z):
        with torch.no_grad():
            return np.array([float(forward(torch.where(torch.as_tensor(row)[regions], x, fill))[0]) for row in z])

    exact = exact_shapley(game, 4)
    assert np.abs(exact).max() > 0.1
    # batch_size=1: our coalitions run through the same float32 forward one at a time as in
    # `game`, so both see the same game values v(S) and differ only by the float64 arithmetic
    # of the 16-term Shapley sums and of the 14 x 4 weighted least squares: a few
    # 1e-16 of max |v(S)| (the values are ~1e1, the Shapley values ~1e-1). 1e-12 max |v| is that
    # bound with margin and still 1e5 times below float32 rounding (6e-8).
    every = np.array(list(itertools.product([False, True], repeat=4)))
    tolerance = 1e-12 * np.abs(game(every)).max()
    method = KernelSHAP(forward)
    method.attribute(x, feature_mask=regions, n_samples=14, baseline=-0.5, batch_size=1)  # 2^4 - 2 = 14
    np.testing.assert_allclose(method.values, exact, rtol=0, atol=tolerance)
    # efficiency holds exactly, also with a budget that samples: sum = v(N) - v(empty)
    method.attribute(x, feature_mask=regions, n_samples=5, baseline=-0.5, seed=3, batch_size=1)
    assert method.values.sum() == pytest.approx(exact.sum(), rel=0, abs=tolerance)


def test_sampled_budget_converges_and_keeps_efficiency():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 10))

    def game(z):
        z = np.asarray(z, float)
        return z @ weights[0] + np.tanh(z @ weights[1:].T).sum(1)

    exact = exact_shapley(game, 10)
    full = game(np.ones((1, 10)))[0] - game(np.zeros((1, 10)))[0]
    errors = {}
    for budget in (100, 600, 1022):
        values, design = kernel_shap(game, 10, n_samples=budget, seed=1)
        assert len(design.coalitions) <= budget
        assert values.sum() == pytest.approx(full, abs=1e-9)  # the constraint is exact
        errors[budget] = np.abs(values - exact).max() / np.abs(exact).max()
    # measured: 0.14 (100), 0.05 (600), 3e-16 (1022 = all coalitions)
    assert errors[1022] < 1e-9
    assert errors[600] < 0.1 and errors[100] < 0.3
    # the design: sizes enumerated first (here sizes 1 and 9 fit a budget of 100), each
    # coalition's complement present (paired sampling)
    design = shapley_design(10, 100, np.random.default_rng(0))
    sizes = design.coalitions.sum(1)
    assert (sizes == 1).sum() == 10 and (sizes == 9).sum() == 10
    keys = {row.tobytes() for row in design.coalitions}
    assert all((~row).tobytes() in keys for row in design.coalitions)


def test_additive_game_is_exact_at_any_budget_and_equals_supervoxel_occlusion():
    shape = (6, 6, 4)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn((2, 1, *shape), generator=generator)
    x = torch.randn((1, 1, *shape), generator=generator)
    forward = SegmentationForward(Linear(weights), make_card(shape), shape, RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    ids = cube_features(shape, 2)
    contribution = (weights[1] * x[0])[0]
    expected = torch.zeros(shape)
    for k in range(8):
        expected[ids == k] = contribution[ids == k].sum()
    shap = KernelSHAP(forward).attribute(x, features="cubes", cubes=2, n_samples=20, seed=4)  # 20 of 254 coalitions
    torch.testing.assert_close(shap[0, 0], expected, rtol=1e-4, atol=1e-4)
    occlusion = SupervoxelOcclusion(forward).attribute(x, features="cubes", cubes=2, batch_size=3)
    torch.testing.assert_close(occlusion[0, 0], expected, rtol=1e-4, atol=1e-4)


def test_per_channel_players():
    shape = (4, 4, 4)
    generator = torch.Generator().manual_seed(2)
    weights = torch.randn((2, 2, *shape), generator=generator)
    x = torch.randn((1, 2, *shape), generator=generator)
    forward = SegmentationForward(Linear(weights), make_card(shape, channels=2), shape,
                                  RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    regions = (torch.arange(4).view(4, 1, 1) >= 2).long().expand(shape).clone()
    method = KernelSHAP(forward)
    result = method.attribute(x, feature_mask=regions, per_channel=True, n_samples=14)
    assert len(method.players) == 4
    for c in range(2):
        for k in range(2):
            expected = float((weights[1, c] * x[0, c])[regions == k].sum())
            assert float(result[0, c][regions == k][0]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_captum_kernel_shap_agrees_statistically():
    from captum.attr import KernelShap

    shape = (6, 6, 6)
    regions = three_regions(shape)
    forward = SegmentationForward(RegionGame(regions, a=(1.0, -2.0, 0.5), a12=3.0), make_card(shape), shape,
                                  one_voxel_target(shape))
    x = torch.ones((1, 1, *shape))
    ours = KernelSHAP(forward).attribute(x, feature_mask=regions, n_samples=6)

    class AsModule(torch.nn.Module):
        def forward(self, inputs):
            return forward(inputs)

    torch.manual_seed(0)  # Captum draws from the global RNG
    samples = 2000
    theirs = KernelShap(AsModule()).attribute(x, baselines=0.0, feature_mask=regions[None, None], n_samples=samples,
                                              perturbations_per_eval=50)
    # Captum's estimate: its first two samples are the full and the empty coalition (weight
    # 1e6), then n = samples - 2 draws from the Shapley kernel, for 3 players uniform over the
    # 6 proper coalitions; a weighted least squares with the draw counts n_S as weights. Equal
    # counts give the exact values (ours: all 6 coalitions, exact). The additive part of the
    # game fits at any counts, so the error comes from the interaction a12 [1, 2 in S] alone;
    # to first order in the multinomial count deviations dn_S (var n/6 * 5/6, cov -n/36):
    #   dphi_1 = -(a12 / 2n) (2 dn_1 - 2 dn_23 - dn_2 + dn_13), dphi_2 likewise, dphi_3 = -(dphi_1 + dphi_2)
    #   => sd(phi_1) = sd(phi_2) = (a12 / 2) sqrt(10 / 6n), sd(phi_3) = (a12 / 2) sqrt(4 / 6n)
    # (0.043 and 0.027 here). Tolerance: 5 sd (a 6e-7 two-sided tail per value) plus 0.01 for
    # the finite end-point weight (constraint violation ~ n / 1e6 * a12 = 6e-3) and Captum's
    # float32 least squares.
    a12, n = 3.0, samples - 2
    sd = (a12 / 2) * np.sqrt(np.array([10.0, 10.0, 4.0]) / (6 * n))
    tolerance = 5 * sd + 0.01
    for k in range(3):
        error = float((theirs - ours)[0, 0][regions == k].abs().max())
        assert error <= tolerance[k], (k, error, tolerance[k])


# ---- the sliding-window restriction, features, parameters -------------------------------------
def test_features_the_target_cannot_see_are_dummies_and_skipped():
    network = tiny_unet()
    shape = (40, 16, 8)  # three windows along the first axis; the target sits in the first
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:5, 5:9, 3:6] = True
    forward = SegmentationForward(network, make_card((16, 16, 16)), shape, RegionTarget(1, mask))
    regions = (torch.arange(40) // 8).view(40, 1, 1).expand(shape).clone()  # 5 slabs of 8
    restricted = KernelSHAP(forward)
    a = restricted.attribute(x, feature_mask=regions, n_samples=30)
    assert len(restricted.players) < 5  # the far slabs are left out of the game
    full = KernelSHAP(forward)
    b = full.attribute(x, feature_mask=regions, n_samples=30, restrict=False)  # 2^5 - 2 = 30: exact
    assert len(full.players) == 5
    far = [k for k in range(5) if k not in [f for _, f in restricted.players]]
    np.testing.assert_allclose(full.values[far], 0.0, atol=1e-5)  # dummy players
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_feature_maps():
    ids = cube_features((5, 7, 9), 2)
    assert ids.shape == (5, 7, 9) and ids.unique().tolist() == list(range(8))
    assert sorted(torch.bincount(ids.flatten()).tolist()) == sorted(
        [a * b * c for a in (2, 3) for b in (4, 3) for c in (4, 5)])  # edges at round(n/2)
    assert cube_features((3, 8, 8), 8).max() == 3 * 8 * 8 - 1  # an axis shorter than `cubes`
    labels = torch.zeros((6, 6, 6), dtype=torch.int64)
    labels[0:2, 0:2, 0:2] = 3
    labels[4:6, 4:6, 4:6] = 3  # two separate regions of label 3
    labels[0:2, 4:6, 0:2] = 1
    assert semantic_features(labels).unique().tolist() == [0, 1, 2]
    connected = semantic_features(labels, connected=True)
    assert connected.unique().numel() == 4
    assert connected[0, 0, 0] != connected[5, 5, 5]
    # semantic features of a prediction: the clean argmax's regions
    shape = (8, 8, 8)
    weights = torch.zeros((2, 1, *shape))
    weights[1, 0] = 1.0
    x = -torch.ones((1, 1, *shape))
    x[0, 0, 2:5, 2:5, 2:5] = 1.0
    forward = SegmentationForward(Linear(weights), make_card(shape), shape, ClassTarget(1, x[0, 0] > 0))
    features = supervoxel_features(forward, x, "semantic")
    assert torch.equal(features.bool(), x[0, 0] > 0)
    with pytest.raises(SegXAIInputError):
        supervoxel_features(forward, x, "hexagons")
    with pytest.raises(SegXAIInputError):
        supervoxel_features(forward, x, feature_mask=torch.zeros(3, 3, 3))


def test_seed_progress_cancel_and_registry():
    shape = (8, 8, 8)
    network = tiny_unet(seed=1)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(5))
    forward = SegmentationForward(network, make_card(shape), shape, RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    first = KernelSHAP(forward).attribute(x, features="cubes", cubes=3, n_samples=30, seed=1)
    torch.testing.assert_close(first, KernelSHAP(forward).attribute(x, features="cubes", cubes=3, n_samples=30, seed=1),
                               rtol=0, atol=0)
    assert not torch.equal(first, KernelSHAP(forward).attribute(x, features="cubes", cubes=3, n_samples=30, seed=2))
    fractions = []
    KernelSHAP(forward).attribute(x, features="cubes", cubes=2, n_samples=20, batch_size=8,
                                  progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        KernelSHAP(forward).attribute(x, features="cubes", cubes=2, cancel=token)
    with pytest.raises(Cancelled):
        SupervoxelOcclusion(forward).attribute(x, features="cubes", cubes=2, cancel=token)
    with pytest.raises(SegXAIInputError):
        KernelSHAP(forward).attribute(x, baseline="grey")
    assert registry.get_method("kernel_shap") is KernelSHAP
    assert registry.get_method("supervoxel_occlusion") is SupervoxelOcclusion
    assert registry.parse_params("kernel_shap", ["features=cubes", "cubes=4", "baseline=min"]) == {
        "features": "cubes", "cubes": 4, "baseline": "min"}
    with pytest.raises(SegXAIInputError):
        registry.parse_params("kernel_shap", ["features=hexagons"])
