"""Grad-CAM / Grad-CAM++ over several sliding windows: the whole target's channel weights (issue 21).

Oracles: whole-volume Grad-CAM / Grad-CAM++ written here with torch autograd, on networks whose
windowed inference equals whole-volume inference (1x1x1 convolutions at full resolution; a
stride-2, kernel-2 encoder whose windows start on its cells, with mirror flips), and the
closed-form weights of one layer grid. Axiom: on a smooth input covered by 2 x 2 x 2 windows
with constant blending, no neighbour difference across a window border exceeds the largest
inside the windows (the per-window weights fail this: ``weights="per_window"``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from SegXAILib.attribution.cam import GradCAM, GradCAMPlusPlus, _pooled_weights, cam_from_layer
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.targets import ClassTarget
from SegXAILib.image import SegXAIInputError
from SegXAILib.models.card import model_card_from_dict

from conftest import make_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = [(GradCAM, "gradcam"), (GradCAMPlusPlus, "gradcam_plusplus")]


def card(patch, scheme="monai", blend="constant", overlap=0.5, mirror_axes=()):
    return model_card_from_dict({
        "name": "cam-windows-test",
        "architecture": {"format": "monai", "name": "UNet", "weights": "unused.pt"},
        "input_channels": ["ch0"], "classes": [{"name": "background"}, {"name": "thing"}],
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend,
                      "mirror_axes": list(mirror_axes), "window_scheme": scheme},
    })


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
    return module.eval()


def pointwise(seed: int = 0) -> torch.nn.Module:
    """1x1x1 convolutions: every voxel's output depends on that voxel alone, so sliding windows
    (any blend) give the whole-volume logits and activations. Layer ``"1"``: full resolution."""
    return seeded(torch.nn.Sequential(torch.nn.Conv3d(1, 5, 1), torch.nn.Softplus(), torch.nn.Conv3d(5, 2, 1)), seed)


class Cells(torch.nn.Module):
    """Kernel-2, stride-2 encoder (layer ``act``, half resolution), kernel-2 stride-2 decoder: each
    2^3 cell's output depends on that cell alone, so windows starting on even voxels give the
    whole-volume values; asymmetric weights, so mirror flips differ."""

    def __init__(self, seed: int):
        super().__init__()
        self.down = torch.nn.Conv3d(1, 4, kernel_size=2, stride=2)
        self.act = torch.nn.Softplus()
        self.up = torch.nn.ConvTranspose3d(4, 2, kernel_size=2, stride=2)
        seeded(self, seed)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


def whole_volume_weights(a: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """Selvaraju / Chattopadhay weights ``(1, K, 1, 1, 1)`` of one feature map ``a``, ``g`` (float64)."""
    a, g = a.double(), g.double()
    if kind == "gradcam":
        return g.mean(dim=(2, 3, 4), keepdim=True)
    denominator = 2 * g**2 + a.sum(dim=(2, 3, 4), keepdim=True) * g**3
    alpha = torch.where(denominator != 0, g**2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    return (alpha * g.clamp(min=0)).sum(dim=(2, 3, 4), keepdim=True)


def whole_volume_cam(network, layer, x, mask, kind, mirror_axes=()):
    """Grad-CAM (++) on the whole volume in one pass per flip (no windows): logits the mean over
    flips of the flipped-back outputs, each flip's CAM in its frame, upsampled, flipped back, averaged."""
    flips = [c for n in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, n)]
    captured = []
    handle = dict(network.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        outputs = []
        for axes in flips:
            dims = [a + 2 for a in axes]
            out = network(torch.flip(x, dims) if dims else x)
            outputs.append(torch.flip(out, dims) if dims else out)
    finally:
        handle.remove()
    target = torch.stack(outputs).mean(0)[0, 1][mask].sum()
    gradients = torch.autograd.grad(target, captured)
    total = torch.zeros((1, 1, *x.shape[2:]), dtype=torch.float64)
    for a, g, axes in zip(captured, gradients, flips):
        weights = whole_volume_weights(a.detach(), g, kind)
        cam = (weights * a.detach().double()).sum(dim=1, keepdim=True).clamp(min=0)
        cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        dims = [ax + 2 for ax in axes]
        total += torch.flip(cam, dims) if dims else cam
    return total / len(flips)


def close(ours: torch.Tensor, expected: torch.Tensor) -> bool:
    # float32 activations and gradients summed over a few thousand voxels, against float64
    return torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("method, kind", KINDS)
@pytest.mark.parametrize("scheme, blend", [("monai", "constant"), ("nnunet", "gaussian"), ("monai", "gaussian")])
def test_pooled_cam_is_the_whole_volume_cam(method, kind, scheme, blend):
    shape, patch = (11, 14, 9), (6, 8, 5)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((1, 1, *shape), generator=generator)
    mask = torch.rand(shape, generator=generator) < 0.3
    network = pointwise(4)
    forward = SegmentationForward(network, card(patch, scheme, blend), shape, ClassTarget(1, mask))
    windows = forward.windowed.windows
    assert len(windows) >= 8 and forward.windowed.windows_for(mask) == list(range(len(windows)))
    expected = whole_volume_cam(network, "1", x, mask, kind)
    assert float(expected.max()) > 0
    assert close(method(forward).attribute(x, layer="1"), expected)
    # the per-window weights give another map
    assert not close(method(forward).attribute(x, layer="1", weights="per_window"), expected)


def interior(windows, shape) -> torch.Tensor:
    """Voxels at least one voxel from every border of every window that holds them: there a
    window's trilinear upsampling (x2) of its layer map reads the same cells as the volume's."""
    inside = torch.ones(shape, dtype=torch.bool)
    for window in windows:
        held = torch.zeros(shape, dtype=torch.bool)
        held[window] = True
        core = torch.zeros(shape, dtype=torch.bool)
        core[tuple(slice(s.start + 1, s.stop - 1) for s in window)] = True
        inside &= ~held | core
    return inside


@pytest.mark.parametrize("method, kind", KINDS)
def test_pooled_cam_on_coarse_cells_with_mirroring_is_the_whole_volume_cam(method, kind):
    shape, patch = (12, 16, 12), (8, 8, 8)  # window starts 0, 4 (, 8): even, on the cells
    generator = torch.Generator().manual_seed(4)
    x = torch.randn((1, 1, *shape), generator=generator)
    mask = torch.rand(shape, generator=generator) < 0.3
    network = Cells(2)
    forward = SegmentationForward(network, card(patch, mirror_axes=(0, 2)), shape, ClassTarget(1, mask))
    windowed = forward.windowed
    assert len(windowed.windows) == 12 and windowed.passes == 4
    assert all(s.start % 2 == 0 for window in windowed.windows for s in window)
    expected = whole_volume_cam(network, "act", x, mask, kind, mirror_axes=(0, 2))
    ours = method(forward).attribute(x, layer="act")
    inside = interior([w[0:3] for w in windowed.windows], shape)
    assert int(inside.sum()) > 100 and float(expected[0, 0][inside].max()) > 0
    assert close(ours[0, 0][inside], expected[0, 0][inside])
    per_window = method(forward).attribute(x, layer="act", weights="per_window")
    assert not close(per_window[0, 0][inside], expected[0, 0][inside])


@pytest.mark.parametrize("kind", ["gradcam", "gradcam_plusplus"])
@pytest.mark.parametrize("flips", [(), (0, 2)])
def test_pooled_weights_of_one_window_are_the_layer_grid_weights(kind, flips):
    """The stitching on pieces reduces to the plain weights when one window (cells 2 x 3 x 1)
    covers the grid, flipped frames included."""
    generator = torch.Generator().manual_seed(6)
    a = torch.rand((1, 3, 4, 2, 6), generator=generator)
    g = torch.randn((1, 3, 4, 2, 6), generator=generator)
    window = (slice(0, 8), slice(0, 6), slice(0, 6))
    importance = torch.rand((8, 6, 6), generator=generator) + 0.5
    weights = _pooled_weights(kind, [(window, flips, a, g)], importance, importance.clone())
    expected = whole_volume_weights(a, g, kind)
    assert torch.allclose(weights.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
def test_one_window_is_the_single_window_cam(method):
    shape = (6, 8, 6)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((1, 1, *shape), generator=generator)
    mask = torch.rand(shape, generator=generator) < 0.3
    network = Cells(1)
    forward = make_forward(network, shape, ClassTarget(1, mask), blend="constant")
    assert len(forward.windowed.windows) == 1
    ours = method(forward).attribute(x, layer="act")
    assert torch.equal(ours, method(forward).attribute(x, layer="act", weights="per_window"))
    kind = "gradcam" if method is GradCAM else "gradcam_plusplus"
    assert close(ours, whole_volume_cam(network, "act", x, mask, kind))


def seam_measure(cam: torch.Tensor, borders: list[int]) -> tuple[float, float]:
    """The largest absolute difference between neighbouring voxels across a window border (the
    pairs ``(b, b + 1)`` for ``b`` in ``borders``, on every axis) and the largest elsewhere."""
    cam = cam.double()
    across, inside = 0.0, 0.0
    for axis in range(3):
        steps = torch.diff(cam, dim=axis).abs()
        at_border = torch.zeros(steps.shape[axis], dtype=torch.bool)
        at_border[borders] = True
        index = [slice(None)] * 3
        index[axis] = at_border
        across = max(across, float(steps[tuple(index)].max()))
        index[axis] = ~at_border
        inside = max(inside, float(steps[tuple(index)].max()))
    return across, inside


def seam_case():
    """12^3 smooth input, 8^3 windows at 0 and 4 on every axis (2 x 2 x 2), constant blend; the
    target is a ball near one corner, so the windows hold different parts of it."""
    torch.manual_seed(1)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, padding=1, padding_mode="replicate"), torch.nn.Softplus(),
                                  torch.nn.Conv3d(6, 2, 1)).eval()
    i, j, k = torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij")
    x = (0.02 * (i - 6) ** 2 + 0.1 * j - 0.07 * k)[None, None]
    mask = ((i - 3) ** 2 + (j - 3) ** 2 + (k - 3) ** 2) < 16
    forward = make_forward(network, (12, 12, 12), ClassTarget(1, mask), patch=(8, 8, 8), blend="constant", overlap=0.5)
    assert [w[0].start for w in forward.windowed.windows[::4]] == [0, 4]
    assert len(forward.windowed.windows) == 8 and forward.windowed.windows_for(mask) == list(range(8))
    return forward, x


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
def test_no_seams_at_window_borders(method):
    forward, x = seam_case()
    borders = [3, 7]  # pairs (3, 4) and (7, 8): where the second window starts and the first ends
    cam = method(forward).attribute(x, layer="1")[0, 0]
    across, inside = seam_measure(cam, borders)
    assert inside > 0 and across <= inside
    # the measure sees seams: each window's own weights give jumps at the borders
    old_across, old_inside = seam_measure(method(forward).attribute(x, layer="1", weights="per_window")[0, 0], borders)
    assert old_across > 2 * old_inside


def test_weights_choice_is_checked():
    forward, x = seam_case()
    with pytest.raises(SegXAIInputError, match="weights"):
        GradCAM(forward).attribute(x, layer="1", weights="window")
