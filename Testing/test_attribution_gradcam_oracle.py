"""Grad-CAM++ (class level, 5D input) against pytorch-grad-cam 1.5.7, the reference the field uses.

pytorch-grad-cam imports torchvision at import time for its 2D image helpers, and PyPI's
torchvision cannot be installed beside this project's pinned torch. Its Grad-CAM / Grad-CAM++
math (``BaseCAM``, numpy and scipy for 3D) does not use it, so the test registers an empty
stand-in ``torchvision`` before importing the package. The Makefile installs grad-cam without
its dependencies (``pip install --no-deps grad-cam==1.5.7 ttach==0.0.3``); OpenCV comes with
the test extra.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from SegXAILib.attribution import ClassTarget, SegmentationForward
from SegXAILib.attribution.cam import GradCAM, GradCAMPlusPlus
from SegXAILib.models.card import model_card_from_dict

from conftest import install_torchvision_stand_in


@pytest.fixture(scope="module")
def pytorch_grad_cam():
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip("grad-cam 1.5.7 is not installed (make installs it with --no-deps)")
    install_torchvision_stand_in()
    return importlib.import_module("pytorch_grad_cam")


def _network() -> torch.nn.Module:
    torch.manual_seed(11)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(6, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.ConvTranspose3d(8, 6, 2, stride=2), torch.nn.ReLU(),
        torch.nn.Conv3d(6, 2, 1),
    ).eval()
    with torch.no_grad():
        # pytorch-grad-cam adds 1e-6 to the Grad-CAM++ denominator 2 g^2 + sum(A) g^3: large logits
        # keep g^2 far above it, so the two definitions agree to float precision
        network[-1].weight.mul_(1000.0)
    return network


# layers "1" and "5" run at the input's resolution (no resampling on either side); for layer "5"
# (right before the 1x1 head) class 1's map is identically 0 on this network, so class 0 is used
@pytest.mark.parametrize("layer, class_index", [("1", 1), ("5", 0)])
@pytest.mark.parametrize("ours_class, theirs_name", [(GradCAMPlusPlus, "GradCAMPlusPlus"), (GradCAM, "GradCAM")])
def test_class_level_cam_equals_pytorch_grad_cam(pytorch_grad_cam, layer, class_index, ours_class, theirs_name):
    network = _network()
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        logits = network(x)
    margin = logits[0, class_index] - logits[0, 1 - class_index]
    mask = margin > margin.median()  # a class-level mask of half the volume
    target = ClassTarget(class_index, mask)
    card = model_card_from_dict({
        "name": "oracle", "architecture": {"format": "torchscript", "file": "unused.pt"},
        "input_channels": ["a", "b"], "classes": [{"name": "bg"}, {"name": "fg"}],
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25},
    })
    ours = ours_class(SegmentationForward(network, card, (16, 16, 16), target)).attribute(x, layer=layer)[0, 0]

    theirs_class = getattr(pytorch_grad_cam, theirs_name)
    with theirs_class(model=network, target_layers=[network[int(layer)]]) as cam:
        theirs = cam(input_tensor=x, targets=[lambda output: target(output[None])])[0]  # min-max scaled, (D, H, W)
    # theirs = (m - min m) / (max m - min m + 1e-7) of the same relu(sum_k w_k A_k)
    expected = ours - ours.min()
    expected = (expected / (expected.max() + 1e-7)).numpy()
    assert float(ours.max()) > 0
    np.testing.assert_allclose(theirs, expected, atol=2e-4)
