"""Every registered attribution method on the shipped nnU-Net v2 model (a 2-fold ensemble with
8 mirror flips per window), and the gradient of a class target through SegXAI's inference of
the real nnU-Net network against central finite differences in float64.

The methods that cannot apply to a fold ensemble refuse it with a reason; :data:`REFUSED`
lists them, so that a method starting to work (or to fail) on nnU-Net models is noticed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.image import SegXAIInputError

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install 'SegXAILib[nnunet]')")

from conftest import grid_matrix  # noqa: E402
from test_attribution_all_methods import cheap_params  # noqa: E402
from test_nnunet_models import _sphere_image  # noqa: E402

from SegXAILib.attribution import available_methods, explain, get_method  # noqa: E402
from SegXAILib.attribution.forward import SegmentationForward  # noqa: E402
from SegXAILib.attribution.targets import ClassTarget  # noqa: E402
from SegXAILib.models.loaders import load_model  # noqa: E402
from SegXAILib.models.preprocessing import model_input  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)
DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "nnunet_demo"
#: the methods that refuse a fold ensemble with mirroring, and the reason their message gives
REFUSED = {
    # patterns are fitted to one network's convolutions
    # (one fold alone: fitting fails today, the unused deep-supervision heads see no data)
    "pattern_net": r"fold ensemble of 2 networks is not supported \(patterns belong to one network\)",
    "pattern_attribution": r"fold ensemble of 2 networks is not supported \(patterns belong to one network\)",
}
#: smaller still than test_attribution_all_methods' settings: 16 network passes per window
NNUNET_CHEAP = {
    "occlusion": {"window": 8, "stride": 8},
    "kernel_shap": {"n_samples": 16},
    # deconvolution by one backward of the target; guided backprop keeps the exact per-voxel sum
    # (its only run through a fold ensemble with flips; about 20 s on one core)
    "deconvolution": {"aggregation": "target"},
    # the Grad-CAM family reads the decoder's last stage of every fold and flip (16 per window)
    "guided_gradcam": {"aggregation": "target"},
    "guided_gradcam_plusplus": {"aggregation": "target"},
}


@pytest.fixture(scope="module")
def nnunet_case():
    """The demo model and a small sphere-with-core image (24 x 28 x 18 voxels, oblique grid)."""
    model = load_model(DEMO, device="cpu")
    image = _sphere_image(grid_matrix("oblique"), shape=(24, 28, 18))
    reference = _sphere_image(grid_matrix("oblique"), shape=(24, 28, 18), seed=4)
    return model, image, [reference]


def test_the_refusals_name_registered_methods():
    assert set(REFUSED) <= set(available_methods())


@pytest.mark.parametrize("method", available_methods())
def test_method_on_the_nnunet_demo(nnunet_case, method):
    model, image, references = nnunet_case
    params = cheap_params(method, references)
    names = {p.name for p in get_method(method).parameters}
    params.update({k: v for k, v in NNUNET_CHEAP.get(method, {}).items() if k in names})
    if method in REFUSED:
        with pytest.raises(SegXAIInputError, match=REFUSED[method]):
            explain(image, model, method, "class:core", params)
        return
    result = explain(image, model, method, "class:core", params)
    assert result.maps.same_grid(image) and result.maps.channel_names == ("MR",)
    assert result.maps.array.shape == (1, *image.spatial_shape)
    assert np.all(np.isfinite(result.maps.array)) and np.abs(result.maps.array).max() > 0
    assert result.metadata()["method"] == method


def _activation_signs(networks, forward, x: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """``forward(x)`` and the sign pattern of every LeakyReLU input over all its passes (call order)."""
    signs: list[torch.Tensor] = []
    hooks = [module.register_forward_hook(lambda m, inputs, output: signs.append(inputs[0] > 0))
             for network in networks for module in network.modules() if isinstance(module, torch.nn.LeakyReLU)]
    try:
        with torch.no_grad():
            value = forward(x).item()
    finally:
        for hook in hooks:
            hook.remove()
    assert signs  # nnU-Net's U-Net uses LeakyReLU
    return signs, value


def test_class_gradient_against_finite_differences_float64(nnunet_case):
    """dT/dx of T = sum of the core logits over the predicted core, through nnU-Net's windows,
    Gaussian, 8 flips and 2 folds of the real networks (converted to float64), against central
    differences at voxels inside the core and elsewhere.

    The networks are piecewise smooth (LeakyReLU kinks; convolutions, InstanceNorm and the
    blend are smooth): a voxel is compared only when no LeakyReLU input changes sign between
    ``x - h e`` and ``x + h e``, so the difference quotient sees one smooth piece and its error
    is truncation plus rounding alone.
    """
    model, image, _ = nnunet_case
    networks = [copy.deepcopy(network).double().eval() for network in model.networks]
    x, _ = model_input(image, model.card)
    x = x.double()
    shape = tuple(x.shape[2:])
    everywhere = ClassTarget(2, torch.ones(shape, dtype=torch.bool))
    with torch.no_grad():
        logits = SegmentationForward(networks[0], model.card, shape, everywhere, networks=networks).logits(x)
    core = logits[0].argmax(0) == 2
    assert 0 < int(core.sum()) < core.numel() // 4  # the model finds the core
    forward = SegmentationForward(networks[0], model.card, shape, ClassTarget(2, core), networks=networks)
    gradient = forward.gradient(x)
    assert gradient.dtype == torch.float64 and gradient.shape == x.shape
    signs, _ = _activation_signs(networks, forward, x)
    # the sum of the |logits| T adds up bounds the size of its rounding error
    magnitude = float(logits[0, 2][core].abs().sum())
    rng = np.random.default_rng(0)
    inside = torch.nonzero(core)
    candidates = [tuple(int(i) for i in inside[j]) for j in rng.choice(len(inside), 6, replace=False)]
    candidates += [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(6)]
    step = 1e-3  # z-scored inputs: values of order 1
    compared = 0
    for voxel in candidates:
        delta = torch.zeros_like(x)
        delta[(0, 0, *voxel)] = step
        plus_signs, plus = _activation_signs(networks, forward, x + delta)
        minus_signs, minus = _activation_signs(networks, forward, x - delta)
        if not all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(signs, plus_signs, minus_signs)):
            continue  # a kink lies within the step: the difference quotient mixes two slopes
        numeric = (plus - minus) / (2 * step)
        exact = gradient[(0, 0, *voxel)].item()
        # truncation (h^2 / 6) |T'''| with T''' of the order of T' on z-scored inputs; rounding:
        # T in float64 after ~1e4 operations per output, error 1e4 eps sum|logits|, over 2h
        tolerance = step**2 * abs(exact) + 1e4 * EPS64 * magnitude / step
        assert abs(exact - numeric) <= tolerance, (voxel, exact, numeric, tolerance)
        compared += 1
    assert compared >= 6  # most steps of 1e-3 cross no kink: the check is not vacuous
    assert gradient[0, 0][core].abs().max() > 0
