"""Context and transplant experiments (paper 001, METHODS section 3).

The oracle is the voxel-wise TorchScript model of ``conftest`` (class-1 logit ``x_0 - t``,
class 0: 0, softmax): its class-1 probability is ``sigmoid(x_0 - t)`` voxel by voxel, so every
recorded probability is known in closed form. The bundled lesion model runs on a cropped
lesion phantom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import model_grid_instances, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.instances.experiments import (
    background_values,
    context_experiment,
    context_figure,
    context_image,
    context_regions,
    transplant_experiment,
)
from SegXAILib.models import load_model
from SegXAILib.models.inference import segment
from SegXAILib.progress import CancelToken, Cancelled

THRESHOLD = 0.5
SPACING = (1.0, 1.0, 2.0)
SHAPE = (14, 12, 10)


def sigmoid(values):
    return 1.0 / (1.0 + np.exp(-np.asarray(values, np.float64)))


@pytest.fixture(scope="module")
def voxelwise(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voxelwise")
    card = write_voxelwise_card(folder, threshold=THRESHOLD, patch=(8, 8, 8), in_channels=2)
    return load_model(card, "cpu")


@pytest.fixture(scope="module")
def case():
    """Two channels; channel 0 in [-1, 1] (below the threshold) with a bright blob (3.0..4.0)."""
    rng = np.random.default_rng(0)
    array = rng.uniform(-1.0, 1.0, (2, *SHAPE)).astype(np.float32)
    array[1] += 5.0  # channel 1 in [4, 6]: its own minimum, far from channel 0's
    lesion = np.zeros(SHAPE, bool)
    lesion[3:6, 3:5, 2:4] = True
    array[0, lesion] = rng.uniform(3.0, 4.0, int(lesion.sum()))
    image = Image(array, np.diag([*SPACING, 1.0]), ("FLAIR", "T1"))
    return image, lesion


# ---- building blocks -------------------------------------------------------------------------------
def test_regions_are_repeated_full_dilations_and_ring_distance_is_physical():
    lesion = np.zeros((9, 9, 9), bool)
    lesion[4, 4, 4] = True
    regions = context_regions(lesion, 6)
    assert len(regions) == 7 and np.array_equal(regions[0], lesion)
    for step, region in enumerate(regions[1:], start=1):
        oracle = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3)), iterations=step)
        assert np.array_equal(region, oracle), step
    assert regions[1].sum() == 27 and regions[4].all() and regions[6].all()  # saturates at the grid
    with pytest.raises(SegXAIInputError, match="steps"):
        context_regions(lesion, -1)


def test_context_image_puts_the_background_per_channel(case):
    image, lesion = case
    region = context_regions(lesion, 1)[1]
    minimum = image.array.reshape(2, -1).min(axis=1)
    for background, expected in (("zero", [0.0, 0.0]), ("min", minimum), (-2.5, [-2.5, -2.5])):
        values = background_values(image, background)
        assert np.allclose(values, expected)
        built = context_image(image, region, background)
        assert built.same_grid(image) and built.channel_names == image.channel_names
        assert np.array_equal(built.array[:, region], image.array[:, region])
        for channel in range(2):
            assert np.all(built.array[channel][~region] == np.float32(expected[channel])), (background, channel)
    assert minimum[1] > 3.0  # "min" really is per channel
    with pytest.raises(SegXAIInputError, match="background"):
        background_values(image, "median")
    with pytest.raises(SegXAIInputError, match="finite"):
        background_values(image, float("nan"))


# ---- context experiment on the voxel-wise oracle ------------------------------------------------------
@pytest.mark.parametrize("background", ["zero", "min", 2.0])
def test_context_experiment_known_probabilities(voxelwise, case, background):
    image, lesion = case
    steps = 12  # enough to cover the 14 x 12 x 10 grid from the blob
    rows = context_experiment(image, lesion, voxelwise, background=background, steps=steps)
    assert [row["step"] for row in rows] == list(range(steps + 1))
    restored = [row["restored_voxels"] for row in rows]
    rings = [row["ring_mm"] for row in rows]
    assert restored[0] == lesion.sum() and rings[0] == 0.0
    assert all(b >= a for a, b in zip(restored, restored[1:]))
    full = restored.index(lesion.size)  # the step that first restores everything
    assert 0 < full < steps
    assert all(b > a for a, b in zip(restored[: full + 1], restored[1 : full + 1]))  # strictly, until full
    assert all(b > a for a, b in zip(rings[: full + 1], rings[1 : full + 1]))
    assert rings[1] == pytest.approx(math.sqrt(sum(s * s for s in SPACING)))  # one 26-neighbour step
    distance = ndimage.distance_transform_edt(~lesion, sampling=SPACING)
    assert rings[-1] == pytest.approx(distance.max())

    # the voxel-wise model: the lesion's probability is context-free, sigmoid(x - t)
    lesion_probability = sigmoid(image.array[0][lesion] - THRESHOLD).mean()
    outside_value = background_values(image, background)[0]
    for row in rows:
        assert row["mean_probability"] == pytest.approx(lesion_probability, abs=1e-6)
        assert row["detected"]
        if row["restored_voxels"] < lesion.size:
            # the constructed image reaches the model: background seen outside the region
            assert row["outside_mean_probability"] == pytest.approx(sigmoid(outside_value - THRESHOLD), abs=1e-6)
            bright_background = outside_value > THRESHOLD
            inside = lesion.sum() if row["step"] == 0 else None
            if bright_background:
                assert row["predicted_voxels"] >= lesion.size - row["restored_voxels"]
            elif inside is not None:
                assert row["predicted_voxels"] == inside
        else:
            assert math.isnan(row["outside_mean_probability"])

    # last step = the original image: exactly what segment gives on it
    original = segment(image, voxelwise)
    assert rows[-1]["mean_probability"] == float(original.probabilities.array[1][lesion].mean())
    assert rows[-1]["predicted_voxels"] == int((original.labels.array[0] == 1).sum())


def test_context_not_detected_when_the_lesion_is_dim(voxelwise, case):
    image, lesion = case
    array = image.array.copy()
    array[0, lesion] = 0.2  # below the threshold: never detected, p = sigmoid(-0.3)
    rows = context_experiment(image.with_array(array), lesion, voxelwise, steps=2)
    assert not any(row["detected"] for row in rows)
    assert all(row["mean_probability"] == pytest.approx(sigmoid(0.2 - THRESHOLD), abs=1e-6) for row in rows)


def test_context_progress_cancel_and_errors(voxelwise, case):
    image, lesion = case
    seen = []
    context_experiment(image, lesion, voxelwise, steps=2, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        context_experiment(image, lesion, voxelwise, steps=2, cancel=token)
    with pytest.raises(SegXAIInputError, match="empty"):
        context_experiment(image, np.zeros(SHAPE, bool), voxelwise, steps=1)
    with pytest.raises(SegXAIInputError, match="shape"):
        context_experiment(image, lesion[:-1], voxelwise, steps=1)
    with pytest.raises(SegXAIInputError, match="background"):
        context_experiment(image, lesion, voxelwise, background="mean", steps=1)


def test_context_figure(tmp_path, voxelwise, case):
    from matplotlib.figure import Figure

    from SegXAILib.report.figures import save_figure

    image, lesion = case
    rows = context_experiment(image, lesion, voxelwise, steps=3)
    rows[1] = {**rows[1], "detected": False}  # one undetected step: two marker groups
    fig = context_figure(rows)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.collections) == 2 and len(ax.lines) == 1
    assert np.allclose(ax.lines[0].get_xdata(), [row["ring_mm"] for row in rows])
    path = save_figure(fig, tmp_path / "context.png")
    assert path.stat().st_size > 1000
    with pytest.raises(SegXAIInputError):
        context_figure([])


# ---- transplant experiment on the voxel-wise oracle -------------------------------------------------
def test_transplant_bright_blob_is_detected_at_the_new_place(voxelwise):
    array = np.zeros((2, *SHAPE), np.float32)
    lesion = np.zeros(SHAPE, bool)
    lesion[2:5, 2:4, 2:4] = True  # centroid (3, 2.5, 2.5)
    array[0, lesion] = 3.0
    array[0, 1, 2:4, 2:4] = 0.25  # perilesional rim, below the threshold
    image = Image(array, np.diag([*SPACING, 1.0]), ("FLAIR", "T1"))
    result = transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(10, 8.5, 6.5))
    assert result["offset_ijk"] == (7, 6, 4)
    moved = np.zeros(SHAPE, bool)
    moved[9:12, 8:10, 6:8] = True
    assert np.array_equal(result["transplanted_mask"], moved)
    assert result["detected"] and result["original_detected"] and result["source_detected_after"]
    assert result["mean_probability"] == pytest.approx(sigmoid(3.0 - THRESHOLD), abs=1e-6)
    assert result["original_mean_probability"] == pytest.approx(sigmoid(3.0 - THRESHOLD), abs=1e-6)
    assert result["copied_voxels"] == lesion.sum() and not result["overlaps_source"]

    # with a 1 mm margin the rim travels along (and nothing above the threshold appears there)
    margin = transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(10, 8.5, 6.5), margin_mm=1.0)
    rim = ndimage.distance_transform_edt(~lesion, sampling=SPACING) <= 1.0
    assert margin["copied_voxels"] == rim.sum() > lesion.sum()
    assert margin["detected"] and margin["mean_probability"] == pytest.approx(result["mean_probability"], abs=1e-7)

    # a dim lesion moved elsewhere stays undetected
    dim = array.copy()
    dim[0, lesion] = 0.1
    faint = transplant_experiment(image.with_array(dim), lesion, voxelwise, target_centre_ijk=(10, 8.5, 6.5))
    assert not faint["detected"] and faint["mean_probability"] == pytest.approx(sigmoid(0.1 - THRESHOLD), abs=1e-6)


def test_transplant_refuses_to_leave_the_grid(voxelwise, case):
    image, lesion = case
    for target in ((13, 6, 5), (0, 6, 5), (7, 6, 9.4)):
        with pytest.raises(SegXAIInputError, match="leave the grid"):
            transplant_experiment(image, lesion, voxelwise, target_centre_ijk=target)
    # the margin makes a fitting lesion not fit
    transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(11, 6, 5))
    with pytest.raises(SegXAIInputError, match="leave the grid"):
        transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(11, 6, 5), margin_mm=2.0)
    with pytest.raises(SegXAIInputError, match="margin"):
        transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(7, 6, 5), margin_mm=-1)
    with pytest.raises(SegXAIInputError, match="target_centre_ijk"):
        transplant_experiment(image, lesion, voxelwise, target_centre_ijk=(7, 6))


# ---- the bundled lesion model on a lesion phantom ---------------------------------------------------
@pytest.fixture(scope="module")
def lesion_crop():
    from SegXAILib.instances import find_instances
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    model = load_model(resolve_model_card("lesions"), "cpu")
    phantom = make_lesion_phantom(load_sample_head(), 0)
    truth_labels, truth = find_instances(phantom.lesions.with_array(phantom.truth.astype(np.uint8)))
    lesion = truth[0]  # the largest
    centre = [(a + b) // 2 for a, b in zip(*lesion.bbox)]
    size = (48, 48, 32)
    start = [max(0, min(s - n, c - n // 2)) for c, n, s in zip(centre, size, phantom.image.spatial_shape)]
    stop = [a + n for a, n in zip(start, size)]
    crop = phantom.image.crop(start, stop)
    mask = truth_labels[tuple(slice(a, b) for a, b in zip(start, stop))] == lesion.id
    assert mask.sum() == lesion.voxels  # the whole lesion is inside the crop
    return model, crop, mask, lesion


def test_context_experiment_on_lesion_phantom(lesion_crop, capsys):
    model, crop, mask, _ = lesion_crop
    rows = context_experiment(crop, mask, model, steps=5)
    assert len(rows) == 6
    assert all(math.isfinite(row["mean_probability"]) and 0.0 <= row["mean_probability"] <= 1.0 for row in rows)
    assert all(b["restored_voxels"] > a["restored_voxels"] for a, b in zip(rows, rows[1:]))
    with capsys.disabled():
        print("\ncontext experiment, largest lesion of phantom seed 0 (%d voxels):" % mask.sum())
        for row in rows:
            print("  step %d ring %5.2f mm restored %5d p %.3f detected %s"
                  % (row["step"], row["ring_mm"], row["restored_voxels"], row["mean_probability"], row["detected"]))
    # recorded: step 0 (lesion alone) vs the last step
    assert rows[0]["restored_voxels"] == mask.sum() and rows[-1]["ring_mm"] > rows[0]["ring_mm"]


def test_flair_carries_more_instance_saliency_than_t1(lesion_crop, capsys):
    """Paper 001: FLAIR dominates the saliency near a lesion (in our phantom, lesions are
    hyperintense in FLAIR and only mildly hypointense in T1)."""
    from SegXAILib.attribution import InstanceTarget, SegmentationForward
    from SegXAILib.instances import instance_at, instance_smoothgrad

    model, crop, _, lesion = lesion_crop
    inputs, grid, labels, _ = model_grid_instances(model, crop)
    identifier = instance_at(labels, grid, lesion.centroid_ras, radius_mm=4.0)
    assert identifier > 0, "the model should find the phantom's largest lesion"
    instance = labels == identifier
    forward = SegmentationForward(model.network, model.card, inputs.shape[2:],
                                  InstanceTarget(1, torch.as_tensor(instance), identifier))
    saliency = instance_smoothgrad(forward, inputs, n_samples=2, aggregation="mean")[0].abs().numpy()
    near = ndimage.distance_transform_edt(~instance, sampling=grid.spacing) <= 5.0
    mass = saliency[:, near].sum(axis=1)
    assert np.all(np.isfinite(mass)) and mass.min() > 0
    flair, t1 = (model.card.input_channels.index(name) for name in ("FLAIR", "T1"))
    ratio = float(mass[flair] / mass[t1])
    with capsys.disabled():
        print(f"\nsaliency mass within 5 mm: FLAIR {mass[flair]:.3f} T1 {mass[t1]:.3f} ratio {ratio:.2f}")
    # measured 1.81 for this lesion (1.8 - 2.1 over the six lesions of phantom seed 0)
    assert ratio > 1.3
