"""The attribution engine: window-exact forward, targets, seeding / progress / cancel, explain().

The windowed forward's oracle is MONAI's ``sliding_window_inference`` (values), and autograd
through the FULL ``sliding_window_inference`` (gradients of a target restricted to its support,
which must run fewer windows). Targets are checked against numpy; per-voxel gradients against
autograd; the class target against the sum of its per-voxel gradients (linearity, METHODS 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.attribution import (
    ClassTarget,
    ClassThresholdTarget,
    InstanceTarget,
    RegionTarget,
    SegmentationForward,
    TargetSpec,
    VoxelTarget,
    explain,
    registry,
)
from SegXAILib.attribution.gradient import ExpectedGradients, IntegratedGradients, SmoothGrad
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.models.windows import WindowedForward
from SegXAILib.progress import Cancelled, CancelToken

PATCH = (8, 12, 8)


def make_card(blend="gaussian", overlap=0.25, patch=PATCH, channels=1):
    return model_card_from_dict({
        "name": "test", "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": [f"ch{c}" for c in range(channels)], "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend},
    })


class Counting(torch.nn.Module):
    """Counts the windows (network calls with sw_batch_size / window_batch 1)."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return self.network(x)


@pytest.fixture(scope="module")
def network():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2]).eval()


def monai_logits(network, x, card, sw_batch_size=1):
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, roi_size=card.patch_size, sw_batch_size=sw_batch_size, predictor=network,
                                    overlap=card.inference["overlap"], mode=card.inference["blend"],
                                    padding_mode="replicate")


# ---- the windowed forward ----------------------------------------------------------------------
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(5, 7, 6), (8, 12, 8), (17, 13, 11), (20, 5, 23)])
def test_windowed_forward_equals_monai_sliding_window_inference(network, blend, shape):
    card = make_card(blend)
    x = torch.randn((2, 1, *shape), generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ours = WindowedForward(network, card, shape)(x, window_batch=3)
        theirs = monai_logits(network, x, card)
    assert ours.shape == theirs.shape == (2, 2, *shape)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_region_gradient_equals_autograd_through_full_sliding_window_inference(network, blend):
    card = make_card(blend)
    shape = (19, 23, 15)  # 3 x 3 x 3 windows; the region touches 4 of them
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:5, 3:8, 10:12] = True
    mask[4, 10, 11] = True

    full = Counting(network)
    leaf = x.clone().requires_grad_(True)
    value_full = monai_logits(full, leaf, card)[0, 1][mask].sum()
    (gradient_full,) = torch.autograd.grad(value_full, leaf)

    restricted = Counting(network)
    forward = SegmentationForward(restricted, card, shape, RegionTarget(1, mask))
    with torch.no_grad():
        value = forward(x)
    assert restricted.calls < full.calls  # fewer windows
    restricted.calls = 0
    gradient = forward.gradient(x)
    print(f"windows: full {full.calls}, restricted {restricted.calls}")
    assert 0 < restricted.calls <= full.calls / 4
    torch.testing.assert_close(value, value_full.detach()[None], rtol=1e-5, atol=1e-4)
    assert float(gradient.abs().max()) > 0
    torch.testing.assert_close(gradient, gradient_full, rtol=1e-4, atol=1e-6)


# ---- targets -----------------------------------------------------------------------------------
def test_target_values_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 6, 4)).astype(np.float32)
    mask = rng.random((5, 6, 4)) > 0.6
    tensor = torch.from_numpy(logits)
    np.testing.assert_allclose(ClassTarget(2, torch.from_numpy(mask))(tensor).numpy(),
                               logits[:, 2][:, mask].sum(1), rtol=1e-5)
    np.testing.assert_allclose(RegionTarget(1, torch.from_numpy(mask))(tensor).numpy(),
                               logits[:, 1][:, mask].sum(1), rtol=1e-5)
    instance = InstanceTarget(1, torch.from_numpy(mask), instance_id=3)
    np.testing.assert_allclose(instance(tensor).numpy(), logits[:, 1][:, mask].sum(1), rtol=1e-5)
    assert instance.describe()["instance_id"] == 3 and instance.describe()["voxels"] == int(mask.sum())
    values = logits[:, 1]
    np.testing.assert_allclose(ClassThresholdTarget(1, 0.3)(tensor).numpy(),
                               (values * (values > 0.3)).reshape(2, -1).sum(1), rtol=1e-5)
    assert ClassThresholdTarget(1).support is None
    voxel = VoxelTarget(2, (4, 1, 3), (5, 6, 4))
    np.testing.assert_allclose(voxel(tensor).numpy(), logits[:, 2, 4, 1, 3])
    assert voxel.support.sum() == 1 and voxel.support[4, 1, 3]
    with pytest.raises(SegXAIInputError):
        ClassTarget(3, torch.from_numpy(mask))(tensor)
    with pytest.raises(SegXAIInputError):
        RegionTarget(1, torch.zeros(5, 6, 4, dtype=torch.bool))
    with pytest.raises(SegXAIInputError):
        VoxelTarget(1, (5, 0, 0), (5, 6, 4))


def test_voxel_gradients_and_linearity_of_the_class_target(network):
    card = make_card()
    shape = (13, 16, 11)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(6))
    voxels = [(2, 3, 4), (2, 4, 4), (7, 8, 2), (12, 15, 10), (6, 0, 5)]
    mask = torch.zeros(shape, dtype=torch.bool)
    for v in voxels:
        mask[v] = True
    leaf = x.clone().requires_grad_(True)
    logits = WindowedForward(network, card, shape)(leaf)
    total = torch.zeros_like(x)
    for v in voxels:
        (expected,) = torch.autograd.grad(logits[(0, 1, *v)], leaf, retain_graph=True)
        ours = SegmentationForward(network, card, shape, VoxelTarget(1, v, shape)).gradient(x)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
        total += ours
    summed = SegmentationForward(network, card, shape, ClassTarget(1, mask)).gradient(x)
    torch.testing.assert_close(summed, total, rtol=1e-4, atol=1e-6)


# ---- seeding, batching, progress, cancel -------------------------------------------------------
@pytest.fixture(scope="module")
def small(network):
    card = make_card(patch=(8, 8, 8))
    shape = (8, 8, 6)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:6, 2:6, 1:4] = True
    forward = SegmentationForward(network, card, shape, ClassTarget(1, mask))
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(7))
    references = torch.randn((3, 1, *shape), generator=torch.Generator().manual_seed(8))
    return forward, x, references


def stochastic_maps(forward, x, references, method, **kwargs):
    if method == "smoothgrad":
        return SmoothGrad(forward).attribute(x, n_samples=5, **kwargs)
    return ExpectedGradients(forward).attribute(x, references=references, n_samples=5, **kwargs)


@pytest.mark.parametrize("method", ["smoothgrad", "expected_gradients"])
def test_seed_reproducibility_whatever_the_batch_size(small, method):
    forward, x, references = small
    first = stochastic_maps(forward, x, references, method, seed=3, batch_size=2)
    torch.testing.assert_close(first, stochastic_maps(forward, x, references, method, seed=3, batch_size=2), rtol=0, atol=0)
    scale = float(first.abs().max())
    for batch_size in (1, 5):
        other = stochastic_maps(forward, x, references, method, seed=3, batch_size=batch_size)
        torch.testing.assert_close(other, first, rtol=1e-4, atol=1e-5 * scale)
    different = stochastic_maps(forward, x, references, method, seed=4, batch_size=2)
    assert float((different - first).abs().max()) > 1e-2 * scale


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "expected_gradients", "vanilla_gradient"])
def test_progress_is_monotone_and_cancel_raises(small, method):
    forward, x, references = small
    cls = registry.get_method(method)
    kwargs = {"references": references} if method == "expected_gradients" else {}
    if method != "vanilla_gradient":
        kwargs.update({"batch_size": 2} | ({"n_steps": 5} if method == "integrated_gradients" else {"n_samples": 5}))
    fractions = []
    cls(forward).attribute(x, progress=lambda f, m: fractions.append(f), **kwargs)
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        cls(forward).attribute(x, cancel=token, **kwargs)
    if method != "vanilla_gradient":  # cancelled between batches
        token = CancelToken()
        with pytest.raises(Cancelled):
            cls(forward).attribute(x, cancel=token, progress=lambda f, m: token.cancel(), **kwargs)


def test_integrated_gradients_black_white_progress(small):
    forward, x, _ = small
    fractions = []
    IntegratedGradients(forward).attribute(x, baselines="black_white", n_steps=4, batch_size=2,
                                           progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


# ---- explain() on the bundled lesion model -----------------------------------------------------
@pytest.fixture(scope="module")
def lesion_case():
    from SegXAILib.models import load_model
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=2026)

    def crop(start, size):
        start = np.asarray(start)
        affine = phantom.image.ijk_to_ras.copy()
        affine[:3, 3] += affine[:3, :3] @ start
        index = tuple(slice(s, s + n) for s, n in zip(start, size))
        return Image(phantom.image.array[(slice(None), *index)].copy(), affine, phantom.image.channel_names)

    model = load_model(resolve_model_card("lesions"), device="cpu")
    # three lesions of the phantom; and a corner with no brain (nothing predicted)
    return model, crop((60, 42, 3), (28, 20, 16)), crop((0, 0, 0), (20, 16, 12))


def test_explain_gives_maps_on_the_input_grid(lesion_case):
    model, image, _ = lesion_case
    fractions = []
    result = explain(image, model, "integrated_gradients", "class:lesion", params={"n_steps": 4, "batch_size": 4},
                     progress=lambda f, m: fractions.append(f))
    maps = result.maps
    assert maps.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(maps.ijk_to_ras, image.ijk_to_ras, atol=1e-6)
    assert maps.num_channels == 2 and tuple(maps.channel_names) == ("FLAIR", "T1")
    assert np.isfinite(maps.array).all() and np.abs(maps.array).max() > 0
    assert not np.allclose(maps.array[0], maps.array[1])  # a map per channel
    meta = result.metadata()
    assert meta["method"] == "integrated_gradients"
    assert meta["parameters"]["n_steps"] == 4 and meta["parameters"]["baselines"] == "zero"
    assert meta["target"]["kind"] == "ClassTarget" and meta["target"]["class_name"] == "lesion"
    assert meta["target"]["spec"] == "class" and meta["target"]["voxels"] > 0
    assert meta["channels"] == ["FLAIR", "T1"] and meta["model"] == model.card.name
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_explain_instance_and_voxel_targets(lesion_case):
    model, image, _ = lesion_case
    instance = explain(image, model, "vanilla_gradient", "instance:2")
    assert instance.target["kind"] == "InstanceTarget" and instance.target["instance_id"] == 2
    whole = explain(image, model, "vanilla_gradient", "class")
    assert 0 < instance.target["voxels"] < whole.target["voxels"]
    assert not np.allclose(instance.maps.array, whole.maps.array)
    centre = image.ijk_to_ras_points(np.array([[14.0, 10.0, 8.0]]))[0]
    voxel = explain(image, model, "vanilla_gradient", TargetSpec("voxel", ras=tuple(centre)))
    assert voxel.target["kind"] == "VoxelTarget" and voxel.maps.same_grid(image)


def test_explain_errors(lesion_case):
    model, image, empty = lesion_case
    with pytest.raises(SegXAIInputError, match="unknown"):
        explain(image, model, "no_such_method", "class")
    with pytest.raises(SegXAIInputError):
        explain(image, model, "vanilla_gradient", "nonsense:1")
    with pytest.raises(SegXAIInputError, match="no class"):
        explain(image, model, "vanilla_gradient", "class:tumour")
    with pytest.raises(SegXAIInputError, match="instance"):
        explain(image, model, "vanilla_gradient", "instance:99")
    with pytest.raises(SegXAIInputError, match="predicts no voxel"):
        explain(empty, model, "vanilla_gradient", "class:lesion")
    with pytest.raises(SegXAIInputError, match="on the input image's grid"):
        explain(image, model, "vanilla_gradient", TargetSpec("region", mask=None))


def test_target_spec_parse(tmp_path):
    from SegXAILib.io import write_image

    assert TargetSpec.parse("class") == TargetSpec("class")
    assert TargetSpec.parse("class:lesion") == TargetSpec("class", class_name="lesion")
    assert TargetSpec.parse("class_threshold:lesion:0.5") == TargetSpec("class_threshold", class_name="lesion", threshold=0.5)
    assert TargetSpec.parse("class_threshold:lesion").threshold == 0.0
    assert TargetSpec.parse("instance:2") == TargetSpec("instance", instance_id=2)
    assert TargetSpec.parse("instance:3:lesion") == TargetSpec("instance", instance_id=3, class_name="lesion")
    assert TargetSpec.parse("voxel:1.5,-2,3") == TargetSpec("voxel", ras=(1.5, -2.0, 3.0))
    assert TargetSpec.parse("voxel:1,2,3:lesion").class_name == "lesion"
    mask = Image(np.ones((1, 3, 4, 5), np.uint8), np.eye(4))
    path = write_image(mask, tmp_path / "mask.nii.gz")
    spec = TargetSpec.parse(f"region:{path}:lesion")
    assert spec.kind == "region" and spec.class_name == "lesion" and spec.mask.spatial_shape == (3, 4, 5)
    for bad in ("voxel:1,2", "voxel:a,b,c", "instance:x", "instance", "class_threshold", "class_threshold:l:x", "foo:bar", ""):
        with pytest.raises(SegXAIInputError):
            TargetSpec.parse(bad)
    assert TargetSpec("class").class_index(["background", "lesion"]) == 1
    with pytest.raises(SegXAIInputError):
        TargetSpec("class", class_name="x").class_index(["background", "lesion"])
