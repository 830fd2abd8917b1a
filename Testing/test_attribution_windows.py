"""Window-by-window backward (bounded memory) equals autograd through the full
``sliding_window_inference``, for linear and non-linear targets, with and without padding."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from SegXAILib.attribution import ClassThresholdTarget, RegionTarget, SegmentationForward
from SegXAILib.models import load_model

from conftest import write_unet_card


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_unet_card(tmp_path_factory.mktemp("unet")), "cpu")


@pytest.mark.parametrize("shape", [(40, 30, 13), (33, 20, 50), (12, 40, 9)])
@pytest.mark.parametrize("threshold_target", [False, True])
def test_windowwise_backward_equals_full_autograd(model, shape, threshold_target):
    torch.manual_seed(0)
    x = torch.randn(3, 1, *shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:30, 3:15, 1:9] = True
    target = ClassThresholdTarget(1, 0.0) if threshold_target else RegionTarget(1, mask)
    leaf = x.clone().requires_grad_(True)
    logits = sliding_window_inference(
        leaf, model.card.patch_size, 1, model.network, overlap=0.25, mode="gaussian", padding_mode="replicate"
    )
    (expected,) = torch.autograd.grad(target(logits).sum(), leaf)
    windowwise = SegmentationForward(model.network, model.card, shape, target, window_batch=2, max_graph_windows=0)
    whole_graph = SegmentationForward(model.network, model.card, shape, target, window_batch=2, max_graph_windows=10**6)
    assert len(windowwise.windowed.windows_for(target.support)) >= 2  # several windows: the split backward runs
    torch.testing.assert_close(windowwise.gradient(x), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(whole_graph.gradient(x), expected, atol=2e-6, rtol=1e-5)
