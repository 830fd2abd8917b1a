"""Instance-level saliency (METHODS section 3, paper 001): instances and their SmoothGrad
aggregations, checked against a plain loop of single-voxel backward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import grid_matrix, model_grid_instances, write_unet_card
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.gradient import SmoothGrad, noise_sigma, sample_generator
from SegXAILib.attribution.targets import ClassThresholdTarget, InstanceTarget, VoxelTarget
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.instances import find_instances, instance_at, instance_smoothgrad
from SegXAILib.progress import CancelToken, Cancelled


# ---- find_instances ------------------------------------------------------------------------------
def test_find_instances_components_ids_and_sizes():
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch only at a corner: one component (26-connectivity)
    mask[5:8, 5:8, 5:8] = True  # 27 voxels, the largest
    mask[1:3, 7:9, 1] = True  # 4 voxels
    mask[9, 0, 9] = True  # 1 voxel
    mask[9, 9, 0] = True  # 1 voxel, later in raster order
    labels, instances = find_instances(mask, grid=np.eye(4))
    assert labels.dtype == np.int32
    assert [i.voxels for i in instances] == [27, 4, 2, 1, 1]
    assert [i.id for i in instances] == [1, 2, 3, 4, 5]
    assert labels[1, 1, 1] == labels[2, 2, 2] == 3
    assert labels[9, 0, 9] == 4 and labels[9, 9, 0] == 5  # ties: first voxel in raster order
    assert instances[0].bbox == ((5, 5, 5), (8, 8, 8))
    assert instances[2].bbox == ((1, 1, 1), (3, 3, 3))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    # drop small components (voxels), renumbered in the same order
    labels, instances = find_instances(mask, min_voxels=2, grid=np.eye(4))
    assert [i.voxels for i in instances] == [27, 4, 2] and labels.max() == 3 and labels[9, 0, 9] == 0
    assert labels[1, 1, 1] == 3
    # empty
    labels, instances = find_instances(np.zeros((4, 4, 4), bool), grid=np.eye(4))
    assert instances == [] and not labels.any()
    with pytest.raises(SegXAIInputError, match="grid"):
        find_instances(mask)


def test_find_instances_volume_centroid_and_probability_on_oblique_anisotropic_grids():
    rng = np.random.default_rng(3)
    mask = np.zeros((9, 7, 5), bool)
    mask[1:4, 1:3, 0:2] = True  # 12 voxels
    mask[6:8, 4:7, 3] = True  # 6 voxels
    mask[5, 0, 4] = True  # 1 voxel
    probabilities = rng.uniform(size=mask.shape)
    for name in ("anisotropic", "oblique", "oblique_left_handed"):
        image = Image(mask.astype(np.uint8), grid_matrix(name))
        labels, instances = find_instances(image, probabilities)
        spacing = image.spacing
        for instance in instances:
            voxels = np.argwhere(labels == instance.id)
            assert instance.volume_mm3 == pytest.approx(len(voxels) * np.prod(spacing))
            ras = image.ijk_to_ras_points(voxels)
            np.testing.assert_allclose(instance.centroid_ras, ras.mean(axis=0), atol=1e-9)
            assert instance.mean_probability == pytest.approx(probabilities[labels == instance.id].mean())
        # the minimum volume is physical: 6 voxels of the anisotropic grid are 6 * 1.35 mm^3
        voxel = float(np.prod(spacing))
        _, kept = find_instances(image, min_volume_mm3=6 * voxel - 1e-6)
        assert [i.voxels for i in kept] == [12, 6]
        _, kept = find_instances(image, min_volume_mm3=6 * voxel + 1e-6)
        assert [i.voxels for i in kept] == [12]
    # an array with a grid equals the Image
    labels_a, instances_a = find_instances(mask, grid=grid_matrix("oblique"))
    labels_b, instances_b = find_instances(Image(mask.astype(np.uint8), grid_matrix("oblique")))
    assert np.array_equal(labels_a, labels_b)
    assert [i.to_dict() for i in instances_a] == [i.to_dict() for i in instances_b]


# ---- instance_at ---------------------------------------------------------------------------------
def test_instance_at_inside_near_and_far():
    grid = Image(np.zeros((1, 12, 12, 12), np.uint8), grid_matrix("anisotropic"))  # spacing 0.5, 0.9, 3.0
    mask = np.zeros((12, 12, 12), bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels: id 1
    mask[8, 8, 8] = True  # id 2
    labels, _ = find_instances(mask, grid=grid)
    at = lambda ijk, **kw: instance_at(labels, grid, grid.ijk_to_ras_points(np.array(ijk, float))[0], **kw)
    assert at((2.2, 3.4, 2.9)) == 1
    assert at((8, 8, 8)) == 2
    # 4 voxels along i from id 2 is 2 mm (spacing 0.5); 1 voxel along k is 3 mm
    assert at((12.0, 8, 8), radius_mm=2.5) == 2
    with pytest.raises(SegXAIInputError, match=r"nearest is instance 2 at 3\.0 mm"):
        at((8, 8, 9), radius_mm=2.5)
    assert at((8, 8, 9), radius_mm=3.5) == 2
    # nearest of two: (5, 3, 3) is 1 mm from id 1 (i spacing 0.5 => 2 voxels) and far from id 2
    assert at((5, 3, 3), radius_mm=1.5) == 1
    with pytest.raises(SegXAIInputError, match=r"no instance within 5 mm .* nearest is instance 1 at 6\.0 mm"):
        at((3, 3, 5))  # two voxels along k: 6 mm
    # on an oblique grid: a point 1.5 mm off the voxel centre along the physical normal
    oblique = Image(np.zeros((1, 12, 12, 12), np.uint8), grid_matrix("oblique"))
    labels, _ = find_instances(mask, grid=oblique)
    centre = oblique.ijk_to_ras_points(np.array([8.0, 8.0, 8.0]))[0]
    point = centre + 3.0 * oblique.direction[:, 2]  # 3 mm along k (spacing 2.2): outside the voxel
    assert instance_at(labels, oblique, point, radius_mm=3.01) == 2
    with pytest.raises(SegXAIInputError, match=r"at 3\.0 mm"):
        instance_at(labels, oblique, point, radius_mm=2.99)


# ---- aggregation: exact against a loop -----------------------------------------------------------
SHAPE = (12, 22, 12)  # patch 16: two overlapping windows along the second axis, padding on the others


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    model = load_model(resolve_model_card(str(write_unet_card(tmp_path_factory.mktemp("unet")))), "cpu")
    x = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[5:7, 9:11, 6] = True  # 4 voxels in the windows' overlap
    mask[7, 11, 7] = True  # 5 voxels, diagonal contact
    forward = SegmentationForward(model.network, model.card, SHAPE, InstanceTarget(1, mask, instance_id=1))
    return model, x, mask, forward


def loop_reference(model, x, mask, n_samples, noise_level, seed):
    """Plain loops: one VoxelTarget backward per (noise sample, voxel)."""
    sigma = noise_sigma(x, noise_level)
    voxels = [tuple(int(i) for i in v) for v in torch.nonzero(mask)]
    forwards = [SegmentationForward(model.network, model.card, SHAPE, VoxelTarget(1, v, SHAPE)) for v in voxels]
    means, maxes = [], []
    for k in range(n_samples):
        noise = torch.randn(x.shape[1:], generator=sample_generator(seed, k)) * sigma
        noisy = x + noise[None]
        maps = torch.stack([f.gradient(noisy)[0] for f in forwards])
        means.append(maps.mean(dim=0))
        maxes.append(maps.amax(dim=0))
    return torch.stack(means).mean(dim=0)[None], torch.stack(maxes).mean(dim=0)[None]


def close(a, b, rtol=1e-4):
    scale = float(b.abs().max())
    assert scale > 0
    return float((a - b).abs().max()) <= rtol * scale + 1e-7


def test_mean_and_max_equal_a_loop_of_single_voxel_gradients(unet_case):
    model, x, mask, forward = unet_case
    size = int(mask.sum())
    assert size == 5
    mean_ref, max_ref = loop_reference(model, x, mask, n_samples=2, noise_level=0.1, seed=3)
    for batch_size in (1, 3, 16):
        mean = instance_smoothgrad(forward, x, n_samples=2, aggregation="mean", batch_size=batch_size, seed=3)
        maximum = instance_smoothgrad(forward, x, n_samples=2, aggregation="max", batch_size=batch_size, seed=3)
        assert mean.shape == maximum.shape == x.shape
        assert close(mean, mean_ref), batch_size
        assert close(maximum, max_ref), batch_size
    # the voxel-wise max is not the mean, and bounds it from above
    assert not torch.allclose(maximum, mean, atol=1e-6)
    assert bool((maximum >= mean - 1e-6).all())
    # past the forward's graph budget (here one window for two), max takes the replica batches
    replicas = SegmentationForward(model.network, model.card, SHAPE, forward.target, max_graph_windows=1)
    assert len(replicas.windowed.windows_for(mask)) == 2
    for batch_size in (1, 3, 16):
        maximum = instance_smoothgrad(replicas, x, n_samples=2, aggregation="max", batch_size=batch_size, seed=3)
        assert close(maximum, max_ref), batch_size


def test_max_holds_the_kernels_channels_last_only_during_the_call(unet_case):
    """On the CPU the batched backwards run with the 3-D kernels channels-last (faster oneDNN
    kernels); afterwards, or after a cancel, every parameter is its own tensor again."""
    model, x, mask, forward = unet_case
    channels_last = torch.channels_last_3d
    before = [(p, p.data_ptr(), p.stride(), p.detach().clone()) for p in model.network.parameters()]
    # a 3-D convolution whose kernel is not channels-last already (one input channel would be both)
    conv = next(m for m in model.network.modules()
                if isinstance(m, torch.nn.Conv3d) and not m.weight.is_contiguous(memory_format=channels_last))
    seen: list[bool] = []
    handle = conv.register_forward_hook(
        lambda module, args, output: seen.append(module.weight.is_contiguous(memory_format=channels_last)))
    token = CancelToken()
    try:
        instance_smoothgrad(forward, x, n_samples=1, aggregation="max", batch_size=2, seed=3)
        assert seen and all(seen)
        seen.clear()
        # cancelled between batches (after the first), inside the channels-last stretch
        with pytest.raises(Cancelled):
            instance_smoothgrad(forward, x, n_samples=1, aggregation="max", batch_size=2, seed=3,
                                progress=lambda f, m: token.cancel(), cancel=token)
        assert seen and all(seen)
    finally:
        handle.remove()
    for (parameter, pointer, stride, values), now in zip(before, model.network.parameters()):
        assert now is parameter and now.data_ptr() == pointer and now.stride() == stride
        assert torch.equal(now.detach(), values)


def test_mean_is_smoothgrad_of_the_instance_over_its_size(unet_case):
    _, x, mask, forward = unet_case
    ours = instance_smoothgrad(forward, x, n_samples=3, noise_level=0.2, aggregation="mean", batch_size=2, seed=9)
    theirs = SmoothGrad(forward).attribute(x, n_samples=3, noise_level=0.2, batch_size=3, seed=9) / int(mask.sum())
    assert close(ours, theirs, rtol=1e-5)
    # another seed draws other noise
    other = instance_smoothgrad(forward, x, n_samples=3, noise_level=0.2, aggregation="mean", seed=10)
    assert not torch.allclose(ours, other)


def test_progress_cancel_and_errors(unet_case):
    model, x, mask, forward = unet_case
    seen = []
    instance_smoothgrad(forward, x, n_samples=2, aggregation="max", batch_size=4, progress=lambda f, m: seen.append(f))
    # 2 samples x 5 voxels, 4 voxel gradients per batched backward of each sample's forward
    assert seen == pytest.approx([0.4, 0.5, 0.9, 1.0])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        instance_smoothgrad(forward, x, n_samples=2, aggregation="max", cancel=token)
    with pytest.raises(SegXAIInputError, match="aggregation"):
        instance_smoothgrad(forward, x, aggregation="median")
    with pytest.raises(SegXAIInputError, match="n_samples"):
        instance_smoothgrad(forward, x, n_samples=0)
    threshold = SegmentationForward(model.network, model.card, SHAPE, ClassThresholdTarget(1))
    with pytest.raises(SegXAIInputError, match="region target"):
        instance_smoothgrad(threshold, x)


# ---- the bundled lesion model on a lesion phantom ------------------------------------------------
def test_max_aggregation_on_lesion_phantom_is_comparable_across_sizes(capsys):
    from SegXAILib.models import load_model
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    model = load_model(resolve_model_card("lesions"), "cpu")
    phantom = make_lesion_phantom(load_sample_head(), 0)
    truth_labels, truth = find_instances(phantom.lesions.with_array(phantom.truth.astype(np.uint8)))
    # the smallest lesion and one at least 1.5 times its size
    small = truth[-1]
    large = next(i for i in reversed(truth) if i.voxels >= 1.5 * small.voxels)
    rows = []
    for lesion in (small, large):
        # crop 48 x 48 x 32 input voxels (2 x 2 x 3 mm) around it: one 48 x 32 x 48 model window
        centre = [(a + b) // 2 for a, b in zip(*lesion.bbox)]
        start = [max(0, min(s - n, c - n // 2)) for c, n, s in zip(centre, (48, 48, 32), phantom.image.spatial_shape)]
        crop = phantom.image.crop(start, [a + n for a, n in zip(start, (48, 48, 32))])
        inputs, model_grid, labels, instances = model_grid_instances(model, crop)
        identifier = instance_at(labels, model_grid, lesion.centroid_ras, radius_mm=4.0)
        instance = instances[identifier - 1]
        mask = torch.as_tensor(labels == identifier)
        forward = SegmentationForward(model.network, model.card, inputs.shape[2:], InstanceTarget(1, mask, identifier))
        maximum = instance_smoothgrad(forward, inputs, n_samples=1, aggregation="max", batch_size=16)
        mean = instance_smoothgrad(forward, inputs, n_samples=1, aggregation="mean")
        assert torch.isfinite(maximum).all() and float(maximum.abs().max()) > 0
        rows.append((lesion.voxels, instance.voxels, instance.mean_probability, float(maximum.max()), float(mean.max())))
    with capsys.disabled():
        for row in rows:
            print("\nlesion truth %d voxels, predicted %d voxels (p %.2f): max-agg peak %.4f, mean-agg peak %.4f" % row)
    peaks = [row[3] for row in rows]
    assert min(peaks) > 0 and max(peaks) / min(peaks) < 20
