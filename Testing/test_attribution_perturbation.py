"""Perturbation baselines and the randomisation sanity check.

Oracles: a linear model (occlusion with 1-voxel cubes and baseline 0 is exactly ``w * x``),
``captum.attr.Occlusion`` on a small UNet (same cube placement, same averaging), the uniform
distribution (random baseline), and Adebayo's expectation that randomising every layer
destroys a faithful map.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from SegXAILib.attribution import ClassTarget, RegionTarget, SegmentationForward
from SegXAILib.attribution import registry
from SegXAILib.attribution.perturbation import Occlusion, RandomBaseline, occlusion_starts, read_region
from SegXAILib.attribution.sanity import model_randomisation, parameterised_layers, similarity
from SegXAILib.image import SegXAIInputError
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.progress import Cancelled, CancelToken

from conftest import tiny_unet


def make_card(patch=(16, 16, 16), overlap=0.25, blend="gaussian", channels=1):
    return model_card_from_dict({
        "name": "test",
        "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": [f"ch{c}" for c in range(channels)],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend},
        "output_activation": "softmax",
    })


class Linear(torch.nn.Module):
    """``logits[k] = sum_c W[k, c] * x[c]`` voxel by voxel (W of the patch's shape)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, x):
        return torch.einsum("kcdhw,bcdhw->bkdhw", self.weights, x)


class AsModule(torch.nn.Module):
    """Our forward as a Captum forward function: ``(B, C, D, H, W) -> (B,)``."""

    def __init__(self, forward):
        super().__init__()
        self.f = forward

    def forward(self, x):
        return self.f(x)


# ---- occlusion ---------------------------------------------------------------------------------
def test_occlusion_of_a_linear_model_is_w_times_x():
    shape = (4, 5, 3)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn((2, 2, *shape), generator=generator)
    x = torch.randn((1, 2, *shape), generator=generator)
    forward = SegmentationForward(Linear(weights), make_card(shape, channels=2), shape,
                                  RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    expected = weights[1][None] * x
    per_channel = Occlusion(forward).attribute(x, window=1, stride=1, per_channel=True, batch_size=64)
    torch.testing.assert_close(per_channel, expected, rtol=1e-5, atol=1e-5)
    together = Occlusion(forward).attribute(x, window=1, stride=1, batch_size=64)
    torch.testing.assert_close(together, expected.sum(1, keepdim=True).expand_as(x), rtol=1e-5, atol=1e-5)
    # a non-zero baseline b: the drop is w * (x - b)
    shifted = Occlusion(forward).attribute(x, window=1, stride=1, baseline=0.5, per_channel=True, batch_size=64)
    torch.testing.assert_close(shifted, weights[1][None] * (x - 0.5), rtol=1e-5, atol=1e-5)


def test_occlusion_of_a_linear_model_with_cubes_is_the_mean_over_covering_cubes():
    # bigger cubes: the drop of a cube is the sum of w*x in it; each voxel averages its cubes
    shape = (6, 5, 4)
    generator = torch.Generator().manual_seed(2)
    weights = torch.randn((2, 1, *shape), generator=generator)
    x = torch.randn((1, 1, *shape), generator=generator)
    forward = SegmentationForward(Linear(weights), make_card(shape), shape, RegionTarget(1, torch.ones(shape, dtype=torch.bool)))
    contribution = (weights[1] * x[0])[0].numpy()
    total = np.zeros(shape)
    count = np.zeros(shape)
    for a in occlusion_starts(6, 3, 2):
        for b in occlusion_starts(5, 3, 2):
            for c in occlusion_starts(4, 3, 2):
                cube = (slice(a, a + 3), slice(b, b + 3), slice(c, c + 3))
                total[cube] += contribution[cube].sum()
                count[cube] += 1
    result = Occlusion(forward).attribute(x, window=3, stride=2, batch_size=7)
    np.testing.assert_allclose(result[0, 0].numpy(), total / count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_occlusion_equals_captum(per_channel):
    from captum.attr import Occlusion as CaptumOcclusion

    network = tiny_unet(channels=2)
    shape = (11, 14, 9)  # (size - window) / stride not integral on two axes: cut-off last cubes
    x = torch.randn((1, 2, *shape), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:8, 4:9, 2:6] = True
    forward = SegmentationForward(network, make_card(channels=2), shape, ClassTarget(1, mask))
    ours = Occlusion(forward).attribute(x, window=4, stride=3, baseline=-0.5, per_channel=per_channel, batch_size=16)
    depth = 1 if per_channel else 2
    with torch.no_grad():
        theirs = CaptumOcclusion(AsModule(forward)).attribute(
            x, sliding_window_shapes=(depth, 4, 4, 4), strides=(depth, 3, 3, 3), baselines=-0.5, perturbations_per_eval=16
        )
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if not per_channel:
        torch.testing.assert_close(ours[:, 0], ours[:, 1])


def test_occlusion_skips_cubes_the_target_cannot_see_and_still_equals_captum():
    from captum.attr import Occlusion as CaptumOcclusion

    network = tiny_unet()
    shape = (40, 16, 8)  # three windows along the first axis; the target sits in the first
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:5, 5:9, 3:6] = True
    forward = SegmentationForward(network, make_card(), shape, RegionTarget(1, mask))
    box = read_region(forward)
    assert box[0][1] < shape[0] and box[1:] == [(0, 16), (0, 8)]
    calls = []
    original = forward.__call__

    class Counting(SegmentationForward):
        def __call__(self, inputs):
            calls.append(inputs.shape[0])
            return original(inputs)

    forward.__class__ = Counting
    ours = Occlusion(forward).attribute(x, window=4, stride=4, batch_size=1)
    cubes = 10 * 4 * 2
    assert 1 < sum(calls) - 1 < cubes  # the reference forward plus the cubes within the box
    with torch.no_grad():
        theirs = CaptumOcclusion(AsModule(forward)).attribute(x, sliding_window_shapes=(1, 4, 4, 4), strides=(1, 4, 4, 4),
                                                               baselines=0.0, perturbations_per_eval=40)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float(ours[0, 0, 30:].abs().max()) == 0.0


def test_occlusion_progress_cancel_and_checks():
    network = tiny_unet()
    shape = (8, 8, 8)
    x = torch.randn((1, 1, *shape))
    forward = SegmentationForward(network, make_card(), shape, ClassTarget(1, torch.ones(shape, dtype=torch.bool)))
    fractions = []
    Occlusion(forward).attribute(x, window=4, stride=2, batch_size=5, progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 6  # 27 cubes, 5 per call
    token = CancelToken()

    def cancel_after_first(fraction, message):
        token.cancel()

    with pytest.raises(Cancelled):
        Occlusion(forward).attribute(x, window=4, stride=2, batch_size=5, progress=cancel_after_first, cancel=token)
    with pytest.raises(SegXAIInputError):
        Occlusion(forward).attribute(x, window=2, stride=3)
    with pytest.raises(SegXAIInputError):
        Occlusion(forward).attribute(x, baseline=torch.zeros(1, 1, 4, 4, 4))
    # a tensor baseline equal to the constant gives the same map
    torch.testing.assert_close(Occlusion(forward).attribute(x, window=4, stride=4, baseline=torch.full_like(x, 0.3)),
                               Occlusion(forward).attribute(x, window=4, stride=4, baseline=0.3))


def test_occlusion_starts_match_captum_placement():
    assert occlusion_starts(11, 4, 3) == [0, 3, 6, 9]  # ceil(7/3) + 1 cubes, the last cut off
    assert occlusion_starts(10, 4, 3) == [0, 3, 6]
    assert occlusion_starts(3, 8, 8) == [0]  # a cube larger than the axis covers it once


# ---- random baseline ---------------------------------------------------------------------------
def test_random_baseline_is_seeded_and_uniform():
    from scipy import stats

    x = torch.randn(1, 2, 10, 11, 12)
    method = RandomBaseline(forward=None)  # the model is never run
    first = method.attribute(x, seed=3)
    assert first.shape == x.shape and first.dtype == x.dtype
    torch.testing.assert_close(first, method.attribute(x, seed=3), rtol=0, atol=0)
    assert not torch.equal(first, method.attribute(x, seed=4))
    values = first.numpy().ravel()
    assert values.min() >= 0.0 and values.max() < 1.0
    assert stats.kstest(values, "uniform").pvalue > 1e-3
    # i.i.d.: neighbouring voxels are uncorrelated
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.1
    assert RandomBaseline.stochastic and registry.get_method("random") is RandomBaseline
    assert registry.get_method("occlusion") is Occlusion


# ---- model randomisation (Adebayo 2018) --------------------------------------------------------
def test_model_randomisation_destroys_the_gradient_map_and_leaves_the_network_alone():
    network = tiny_unet(channels=1, seed=5)
    before = copy.deepcopy(network.state_dict())
    shape = (12, 14, 10)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 4:10, 2:8] = True
    target = ClassTarget(1, mask)
    card = make_card()
    fractions = []
    steps = model_randomisation(network, card, x, target, "vanilla_gradient", seed=0,
                                progress=lambda f, m: fractions.append(f))
    layers = parameterised_layers(network, torch.zeros(1, 1, 16, 16, 16))
    assert [s["layer"] for s in steps[1:]] == layers
    # output side first: the first randomised layer is the one that runs last
    assert steps[1]["layer"] == layers[0] and steps[-1]["layer"] == layers[-1]
    assert steps[0]["spearman_abs"] == 1.0 and steps[0]["randomised"] == 0
    assert steps[-1]["randomised"] == len(layers)
    # measured (seed 0): spearman_abs 1 -> 0.39 (last layer) -> 0.33 (all five); pearson 1 -> 0.12 -> -0.07.
    # |gradient| keeps some rank agreement: voxels outside the target's receptive field are 0 in every map
    assert steps[-1]["spearman_abs"] < 0.6 and abs(steps[-1]["pearson"]) < 0.35
    assert all(s["spearman_abs"] < 0.7 for s in steps[1:])
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the caller's network is untouched
    after = network.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # reproducible with its seed
    again = model_randomisation(network, card, x, target, "vanilla_gradient", seed=0)
    assert [s["spearman_abs"] for s in again] == pytest.approx([s["spearman_abs"] for s in steps])
    # independent randomisation of the last layer alone also changes the map
    independent = model_randomisation(network, card, x, target, "vanilla_gradient", seed=0, cascading=False,
                                      layers=layers[:1])
    assert independent[1]["spearman_abs"] < 0.99 and independent[1]["randomised"] == 1
    with pytest.raises(SegXAIInputError):
        model_randomisation(network, card, x, target, "vanilla_gradient", layers=["no.such.layer"])
    with pytest.raises(SegXAIInputError):
        model_randomisation(network, card, x, target, "no_such_method")


def test_similarity_measures():
    a = torch.arange(24.0).reshape(1, 1, 2, 3, 4)
    same = similarity(a, 2 * a + 1)
    assert same == pytest.approx({"spearman_abs": 1.0, "spearman": 1.0, "pearson": 1.0})
    flipped = similarity(a - 11.5, -(a - 11.5))
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["spearman_abs"] == pytest.approx(1.0)
    assert similarity(a, torch.zeros_like(a))["pearson"] == 0.0
