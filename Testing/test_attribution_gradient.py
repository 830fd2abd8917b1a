"""The gradient family against Captum, and the axioms it must satisfy.

Captum is the oracle: our :class:`SegmentationForward` is wrapped as a module ``x -> T (B,)``
and given to Captum's methods, on a MONAI UNet with random weights, a fixed class target and a
single-window input. SmoothGrad's oracle is the mean of Captum ``Saliency`` over the very noise
samples we draw (rebuilt with ``sample_generator``), and Captum's ``NoiseTunnel`` is fed that
same noise: its own noise comes from one ``torch.normal`` call on the global RNG for all
samples at once, which no seeding can make equal to our per-sample generators (seeded from
``(seed, sample index)`` so that the map does not depend on ``batch_size``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.attribution import ClassTarget, InstanceTarget, SegmentationForward
from SegXAILib.attribution.gradient import (
    ExpectedGradients,
    IntegratedGradients,
    SmoothGrad,
    VanillaGradient,
    make_baseline,
    noise_sigma,
    sample_generator,
)
from SegXAILib.models.card import model_card_from_dict

SHAPE = (12, 16, 10)  # one 16^3 window (padded)


class AsModule(torch.nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.f = forward

    def forward(self, x):
        return self.f(x)


@pytest.fixture(scope="module")
def setup():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=[4, 8], strides=[2]).eval()
    card = model_card_from_dict({
        "name": "test", "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": ["a", "b"], "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blend": "gaussian"},
    })
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[3:9, 5:11, 2:7] = True
    forward = SegmentationForward(network, card, SHAPE, ClassTarget(1, mask))
    x = torch.randn((1, 2, *SHAPE), generator=torch.Generator().manual_seed(1))
    return forward, x


def assert_close_maps(ours, theirs, rtol=1e-4):
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=rtol, atol=rtol * scale)


def test_vanilla_gradient_equals_captum_saliency(setup):
    from captum.attr import Saliency

    forward, x = setup
    assert_close_maps(VanillaGradient(forward).attribute(x), Saliency(AsModule(forward)).attribute(x, abs=False))


@pytest.mark.parametrize("baseline", ["zero", "min", "max", "custom"])
def test_integrated_gradients_equals_captum(setup, baseline):
    from captum.attr import IntegratedGradients as CaptumIG

    forward, x = setup
    if baseline == "custom":
        ours_baseline = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 0.5
    else:
        ours_baseline = baseline
    theirs_baseline = make_baseline(x, ours_baseline)
    ours = IntegratedGradients(forward).attribute(x, baselines=ours_baseline, n_steps=12, batch_size=5)
    theirs = CaptumIG(AsModule(forward)).attribute(
        x, baselines=theirs_baseline, n_steps=12, method="riemann_right", internal_batch_size=6
    )
    assert_close_maps(ours, theirs)


def our_noise(x, n_samples, noise_level, seed):
    sigma = noise_sigma(x, noise_level)
    return [torch.randn(x.shape[1:], generator=sample_generator(seed, k)) * sigma for k in range(n_samples)]


@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_equals_captum_saliency_over_our_noise(setup, squared):
    from captum.attr import NoiseTunnel, Saliency

    forward, x = setup
    n, level, seed = 6, 0.15, 7
    ours = SmoothGrad(forward).attribute(x, n_samples=n, noise_level=level, squared=squared, batch_size=4, seed=seed)
    noise = our_noise(x, n, level, seed)
    saliency = Saliency(AsModule(forward))
    maps = [saliency.attribute(x + e[None], abs=False) for e in noise]
    explicit = torch.stack([m**2 if squared else m for m in maps]).mean(0)
    assert_close_maps(ours, explicit)

    # Captum's NoiseTunnel, its noise replaced by ours (the same draws in the same order)
    draws = iter(noise)

    class OurNoiseTunnel(NoiseTunnel):
        @staticmethod
        def _add_noise_to_input(input, stdev, nt_samples_partition):
            repeated = input.repeat_interleave(nt_samples_partition, dim=0)
            return repeated + torch.stack([next(draws) for _ in range(nt_samples_partition)])

    tunnel = OurNoiseTunnel(saliency).attribute(
        x, nt_type="smoothgrad_sq" if squared else "smoothgrad", nt_samples=n, nt_samples_batch_size=4,
        stdevs=noise_sigma(x, level), abs=False,
    )
    assert_close_maps(ours, tunnel)


def test_integrated_gradients_black_white_is_the_mean_of_min_and_max(setup):
    forward, x = setup
    method = IntegratedGradients(forward)
    both = method.attribute(x, baselines="black_white", n_steps=8, batch_size=8)
    low = method.attribute(x, baselines="min", n_steps=8, batch_size=8)
    high = method.attribute(x, baselines="max", n_steps=8, batch_size=8)
    assert_close_maps(both, (low + high) / 2, rtol=1e-5)


def test_expected_gradients_with_one_reference_approaches_integrated_gradients(setup):
    """EG with one reference x' is a Monte Carlo estimate of IG(x') over alpha ~ U(0, 1):
    ``E ||EG_n - IG||^2 = sum_voxels Var_alpha[(x - x') dT/dx(x' + alpha (x - x'))] / n``. The
    variance comes from a fine midpoint grid of alphas (the same grid gives IG); we assert the
    squared error is within 9x its expectation (3 standard errors of the norm)."""
    forward, x = setup
    reference = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    grid = 48
    alphas = (torch.arange(grid, dtype=x.dtype) + 0.5) / grid
    path = reference + alphas.view(-1, 1, 1, 1, 1) * (x - reference)
    contributions = (x - reference) * torch.cat([forward.gradient(path[k : k + 16]) for k in range(0, grid, 16)])
    ig = contributions.mean(0, keepdim=True)
    variance = float(contributions.var(0).sum())
    n = 64
    eg = ExpectedGradients(forward).attribute(x, references=reference, n_samples=n, batch_size=16, seed=11)
    squared_error = float(((eg - ig) ** 2).sum())
    assert squared_error < 9 * variance / n
    # and it is a real estimate: much closer to IG than the spread of one sample
    assert squared_error < 0.2 * variance
    # reproducible with its seed, whatever the batch size; another seed gives another map
    again = ExpectedGradients(forward).attribute(x, references=reference, n_samples=n, batch_size=5, seed=11)
    torch.testing.assert_close(eg, again, rtol=1e-4, atol=1e-5 * float(eg.abs().max()))
    other = ExpectedGradients(forward).attribute(x, references=reference, n_samples=n, batch_size=16, seed=12)
    assert not torch.allclose(eg, other)


# ---- IG completeness on the bundled lesion model -------------------------------------------------
@pytest.fixture(scope="module")
def lesion_case():
    """The bundled lesion model on a crop of a lesion phantom with three lesions (one window)."""
    from SegXAILib.attribution.api import instance_labels
    from SegXAILib.image import Image
    from SegXAILib.models import load_model
    from SegXAILib.models.inference import activate
    from SegXAILib.models.preprocessing import preprocess
    from SegXAILib.models.windows import WindowedForward
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=2026)
    start = np.array([60, 42, 3])
    crop = tuple(slice(s, s + n) for s, n in zip(start, (28, 20, 16)))
    affine = phantom.image.ijk_to_ras.copy()
    affine[:3, 3] += affine[:3, :3] @ start
    image = Image(phantom.image.array[(slice(None), *crop)].copy(), affine, phantom.image.channel_names)
    model = load_model(resolve_model_card("lesions"), device="cpu")
    x = preprocess(image, model.card).as_tensor()[None]
    with torch.no_grad():
        logits = WindowedForward(model.network, model.card, x.shape[2:])(x)
    labels = activate(logits, model.card)[0].argmax(0)
    instances = torch.from_numpy(instance_labels((labels == 1).numpy()))
    return model, x, labels, instances


@pytest.mark.parametrize("kind, baseline, steps, bound", [
    # measured relative errors |sum IG - (T(x) - T(x'))| / |T(x) - T(x')| on this crop, for
    # 16 / 32 / 64 / 128 steps: class/min 0.0088 / 0.0188 / 0.0112 / 0.0033; instance 2/max
    # 0.0282 / 0.0096 / 0.0103 / 0.0042 (not monotone: the path crosses sharp transitions). The
    # zero baseline stays at 0.50-0.57 even with 128 steps: T(a x) jumps for a < 0.01 (instance
    # normalisation makes the network nearly scale invariant), which a uniform grid misses.
    ("class", "min", 32, 0.04),
    ("instance", "max", 32, 0.04),
])
def test_integrated_gradients_completeness(lesion_case, kind, baseline, steps, bound):
    model, x, labels, instances = lesion_case
    if kind == "class":
        target = ClassTarget(1, labels == 1)
    else:
        assert int(instances.max()) >= 2, "the crop should hold several lesions"
        target = InstanceTarget(1, instances == 2, instance_id=2)
    forward = SegmentationForward(model.network, model.card, x.shape[2:], target)
    ig = IntegratedGradients(forward).attribute(x, baselines=baseline, n_steps=steps, batch_size=8)
    with torch.no_grad():
        difference = float(forward(x)) - float(forward(make_baseline(x, baseline)))
    error = abs(float(ig.sum()) - difference) / abs(difference)
    print(f"IG completeness {kind}/{baseline}/{steps}: T(x)-T(x')={difference:.2f} relative error {error:.4f}")
    assert error < bound
