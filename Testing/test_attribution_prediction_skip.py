"""explain() predicts the whole volume only when the target needs the prediction (issue 21).

A region or voxel target, and an instance target explained with the case's prediction, must not
run the full-volume prediction first: the network is counted window by window. The volume is
cut into 4 x 4 x 4 = 64 windows, so a full prediction alone makes 64 network calls; a vanilla
gradient of a target makes one call per window it touches (forward and backward of the kept
graph, or one vector-Jacobian product per window when the graph is split), plus at most
:data:`MEASURED` pass(es) on one window that the batch-size estimate times
(``attribution.base.memory_batch_size``). The maps must stay
those of autograd through MONAI's ``sliding_window_inference`` of the target's scalar.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.attribution import TargetSpec, explain
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.models.loaders import LoadedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (24, 24, 24)
PATCH = (8, 8, 8)
#: MONAI windows of an 8^3 patch at overlap 0.25 on 24 voxels: starts 0, 6, 12, 16 per axis
WINDOWS = 4**3
#: network passes the memory / time estimate may measure before a gradient
MEASURED = 1


class Counting(torch.nn.Module):
    """Counts the windows the network sees (window_batch 1: one window per call)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.network(x)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = Counting(UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2]).eval())
    card = model_card_from_dict({
        "name": "skip-test", "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": ["ch0"], "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(PATCH), "overlap": 0.25, "blend": "gaussian"},
    })
    return LoadedModel(network, card, torch.device("cpu"))


@pytest.fixture(scope="module")
def image() -> Image:
    values = np.random.default_rng(3).normal(size=(1, *SHAPE)).astype(np.float32)
    return Image(values, np.eye(4))


def _monai_gradient(model: LoadedModel, image: Image, mask: np.ndarray) -> np.ndarray:
    """d/dx of the class-1 logits summed over ``mask``, by autograd through the full
    ``sliding_window_inference`` (every window; the independent oracle)."""
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(image.array)[None].clone().requires_grad_(True)
    logits = sliding_window_inference(x, roi_size=PATCH, sw_batch_size=1, predictor=model.network.network,
                                      overlap=0.25, mode="gaussian", padding_mode="replicate")
    (gradient,) = torch.autograd.grad(logits[0, 1][torch.as_tensor(mask)].sum(), x)
    return gradient[0, 0].numpy()


def _close(ours: np.ndarray, reference: np.ndarray) -> None:
    # float32 sums over up to 8 overlapping windows and a few hundred products per voxel
    scale = float(np.abs(reference).max())
    assert scale > 0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * scale)


def test_region_target_runs_no_full_prediction(model, image):
    mask = np.zeros(SHAPE, np.uint8)
    mask[0:3, 1:3, 0:2] = 1  # inside the first window only (the second starts at 6)
    model.network.calls = 0
    result = explain(image, model, "vanilla_gradient", TargetSpec("region", mask=image.with_array(mask[None])))
    # one window: its forward and backward; a full prediction would add 64
    assert 1 <= model.network.calls <= 1 + MEASURED
    _close(result.maps.array[0], _monai_gradient(model, image, mask.astype(bool)))


def test_voxel_target_runs_no_full_prediction(model, image):
    model.network.calls = 0
    # voxel (17, 17, 17): the windows starting at 12 and 16 on each axis cover it -> 2^3 windows
    result = explain(image, model, "vanilla_gradient", TargetSpec("voxel", ras=(17.0, 17.0, 17.0)))
    assert 8 <= model.network.calls <= 8 + MEASURED
    mask = np.zeros(SHAPE, bool)
    mask[17, 17, 17] = True
    _close(result.maps.array[0], _monai_gradient(model, image, mask))


def test_threshold_target_runs_no_full_prediction(model, image):
    model.network.calls = 0
    explain(image, model, "vanilla_gradient", "class_threshold:thing:0")
    # its support is the whole volume and it is not linear in the logits: every window once for
    # the logits, once for the split backward; a prediction before it would add 64
    assert 2 * WINDOWS <= model.network.calls <= 2 * WINDOWS + MEASURED


def test_instance_target_with_the_prediction_runs_no_full_prediction(model, image):
    from SegXAILib.models import segment

    prediction = segment(image, model, amp=False)
    model.network.calls = 0
    explain(image, model, "vanilla_gradient", "instance:1", prediction=prediction)
    # at most one pass per window for the gradient; predicting again would add 64
    assert 0 < model.network.calls <= WINDOWS + MEASURED


def test_class_target_without_the_prediction_predicts(model, image):
    """The counter sees the prediction where one is needed (so the tests above can fail)."""
    model.network.calls = 0
    explain(image, model, "vanilla_gradient", "class")
    assert model.network.calls >= WINDOWS + 1  # the prediction, then at least one gradient window


def test_bad_region_is_refused_before_any_network_call(model, image):
    model.network.calls = 0
    other = Image(np.ones((1, 8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(SegXAIInputError, match="region"):
        explain(image, model, "vanilla_gradient", TargetSpec("region", mask=other))
    assert model.network.calls == 0
