"""Grad-CAM / Grad-CAM++ on fold ensembles and mirrored windows (issue 16).

Oracle: a hand computation written here, independent of the windowing code: for each member
and mirror flip, the layer's activations ``A`` and the gradient ``G`` of the target through
that pass (one autograd graph through the mean over members x flips of the flipped-back
logits), the CAM in the pass's frame, upsampled, flipped back and averaged. Axioms: with one
member and no mirrors an ensemble card gives the single network's map bit for bit; the
mirrored ensemble's CAM is equivariant under the mirrored flips. Smoke: the shipped nnU-Net demo
(2 folds x 8 flips, several windows) gives finite maps of the input's shape.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegXAILib.attribution.cam import GradCAM, GradCAMPlusPlus, GuidedGradCAM
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.targets import ClassTarget
from SegXAILib.models.card import model_card_from_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (6, 8, 6)  # one window: the patch is the image
DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "nnunet_demo"


class Tiny(torch.nn.Module):
    """Down-sampling conv, ReLU (the CAM layer ``act``, half resolution), up-sampling head;
    asymmetric kernels, so flipping the input changes the output."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.down = torch.nn.Conv3d(1, 4, kernel_size=(3, 3, 2), stride=2, padding=(1, 1, 0))
        self.act = torch.nn.ReLU()
        self.up = torch.nn.ConvTranspose3d(4, 2, kernel_size=2, stride=2)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.eval()

    def forward(self, x):
        return self.up(self.act(self.down(x)))


def card(members: int, mirror_axes=(), scheme: str = "nnunet", patch=SHAPE):
    return model_card_from_dict({
        "name": "cam-ensemble-test",
        "architecture": {"format": "monai", "name": "UNet", "weights": [f"fold_{k}.pt" for k in range(members)]},
        "input_channels": ["ch0"], "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": 0.5, "blend": "gaussian",
                      "mirror_axes": list(mirror_axes), "window_scheme": scheme},
    })


@pytest.fixture(scope="module")
def case():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((1, 1, *SHAPE), generator=generator)
    mask = torch.rand(SHAPE, generator=generator) < 0.3
    return [Tiny(1), Tiny(2)], x, mask


def hand_cam(networks, x, mask, mirror_axes, kind="gradcam"):
    """The oracle (see the module docstring); one window covering ``x``."""
    flips = [c for n in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, n)]
    captured = []

    def keep(module, args, output):
        captured.append(output)

    outputs = []
    x = x.detach()
    for network in networks:
        handle = network.act.register_forward_hook(keep)
        try:
            for axes in flips:
                dims = [a + 2 for a in axes]
                out = network(torch.flip(x, dims) if dims else x)
                outputs.append(torch.flip(out, dims) if dims else out)
        finally:
            handle.remove()
    logits = torch.stack(outputs).mean(0)
    target = logits[0, 1][mask].sum()
    gradients = torch.autograd.grad(target, captured)
    total = torch.zeros((1, 1, *SHAPE), dtype=torch.float64)
    passes = [(a, g, axes) for (a, g), axes in zip(zip(captured, gradients), flips * len(networks))]
    for a, g, axes in passes:
        a, g = a.detach().double(), g.double()
        if kind == "gradcam":
            weights = g.mean(dim=(2, 3, 4), keepdim=True)
        else:  # Grad-CAM++ closed form (paper 001)
            denominator = 2 * g**2 + a.sum(dim=(2, 3, 4), keepdim=True) * g**3
            alpha = torch.where(denominator != 0, g**2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
            weights = (alpha * g.clamp(min=0)).sum(dim=(2, 3, 4), keepdim=True)
        cam = (weights * a).sum(dim=1, keepdim=True).clamp(min=0)
        cam = F.interpolate(cam, size=SHAPE, mode="trilinear", align_corners=False)
        dims = [ax + 2 for ax in axes]
        total += torch.flip(cam, dims) if dims else cam
    return total / len(passes)


def forward_of(networks, mask, mirror_axes=(), scheme="nnunet", shape=SHAPE, patch=SHAPE, members=None):
    return SegmentationForward(networks[0], card(members or len(networks), mirror_axes, scheme, patch), shape,
                               ClassTarget(1, mask), networks=networks)


@pytest.mark.parametrize("method, kind", [(GradCAM, "gradcam"), (GradCAMPlusPlus, "gradcam_plusplus")])
@pytest.mark.parametrize("scheme", ["nnunet", "monai"])
def test_ensemble_mirrored_cam_equals_hand_computation(case, method, kind, scheme):
    networks, x, mask = case
    forward = forward_of(networks, mask, (0, 2), scheme)
    assert forward.windowed.passes == 8 and len(forward.windowed.windows) == 1
    ours = method(forward).attribute(x, layer="act")
    expected = hand_cam(networks, x, mask, (0, 2), kind)
    assert ours.shape == (1, 1, *SHAPE)
    assert float(expected.max()) > 0
    # float32 activations/gradients through a few dozen terms, against float64 arithmetic
    assert torch.allclose(ours.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
    # the flips matter: without them the map is a different one
    plain = hand_cam(networks, x, mask, (), kind)
    assert not torch.allclose(plain, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))


def test_one_member_card_is_the_single_network_cam(case):
    networks, x, mask = case
    network = networks[0]
    single = SegmentationForward(network, card(1), SHAPE, ClassTarget(1, mask))
    member = forward_of([network], mask)
    for method in (GradCAM, GradCAMPlusPlus):
        ours = method(member).attribute(x, layer="act")
        assert torch.equal(ours, method(single).attribute(x, layer="act"))
    assert torch.allclose(GradCAM(member).attribute(x, layer="act").double(), hand_cam([network], x, mask, ()),
                          rtol=1e-5, atol=1e-5 * float(hand_cam([network], x, mask, ()).max()))


def test_mirrored_ensemble_cam_is_flip_equivariant(case):
    """The flips form a group: flipping the input and the target by a mirrored axis flips the map."""
    networks, x, mask = case
    ours = GradCAM(forward_of(networks, mask, (0, 2))).attribute(x, layer="act")
    flipped = GradCAM(forward_of(networks, torch.flip(mask, [2]), (0, 2))).attribute(torch.flip(x, [4]), layer="act")
    assert torch.allclose(torch.flip(flipped, [4]), ours, rtol=1e-5, atol=1e-5 * float(ours.max()))


def test_guided_cam_on_a_mirrored_ensemble_is_finite(case):
    networks, x, mask = case
    result = GuidedGradCAM(forward_of(networks, mask, (0, 2))).attribute(x, layer="act")
    assert result.shape == x.shape and bool(torch.isfinite(result).all())


@pytest.mark.parametrize("method", ["gradcam", "gradcam_plusplus"])
def test_cam_runs_on_the_shipped_nnunet_demo(method):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed")
    from SegXAILib.attribution import explain
    from SegXAILib.image import Image
    from SegXAILib.models.loaders import load_model

    shape = (30, 34, 22)
    rng = np.random.default_rng(3)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    distance = np.linalg.norm(ijk - np.array([14, 16, 11]), axis=-1)
    array = 100.0 + 10.0 * rng.standard_normal(shape) + 60.0 * (distance <= 7) + 50.0 * (distance <= 3.5)
    image = Image(array[None].astype(np.float32), np.eye(4), ("MR",))
    model = load_model(DEMO, device="cpu")
    assert len(model.networks) == 2 and len(model.card.mirror_axes) == 3
    result = explain(image, model, method, "class:sphere")
    maps = result.maps.array
    assert result.maps.same_grid(image) and maps.shape[1:] == shape
    assert np.all(np.isfinite(maps)) and np.abs(maps).max() > 0
