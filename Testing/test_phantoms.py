"""Tests of SegXAILib.phantoms: the lesion phantom on the sample head and the parotid S1-S6."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from SegXAILib.image import SegXAIInputError
from SegXAILib.phantoms import (
    PAROTID_VARIANTS,
    LesionPhantom,
    ParotidPhantom,
    make_lesion_phantom,
    make_parotid_phantom,
    parotid_grid,
)
from SegXAILib.phantoms.lesions import FLAIR_LESION_FACTOR, T1_LESION_FACTOR
from SegXAILib.phantoms.parotid import HEAD_DENSITY, ROD_DENSITY
from SegXAILib.sample_data import load_sample_head

CLEAN = dict(noise=0.0, bias_field=0.0)


@pytest.fixture(scope="module")
def head():
    return load_sample_head()


@pytest.fixture(scope="module")
def phantom(head) -> LesionPhantom:
    return make_lesion_phantom(head, seed=7)


@pytest.fixture(scope="module")
def clean_pair(head):
    """The same case, noise- and bias-free, with lesions at contrast 1 and without lesions."""
    with_lesions = make_lesion_phantom(head, seed=3, **CLEAN)
    without = make_lesion_phantom(head, seed=3, n_lesions=(0, 0), **CLEAN)
    return with_lesions, without


def _surrounding_wm(p: LesionPhantom) -> np.ndarray:
    """White matter in a shell 2..4 voxels around the lesions."""
    truth = p.truth
    near = ndimage.binary_dilation(truth, iterations=4) & ~ndimage.binary_dilation(truth, iterations=2)
    return near & p.white_matter


# ---- lesion phantom: structure and determinism ---------------------------------------------------
def test_lesion_phantom_is_deterministic(head, phantom):
    again = make_lesion_phantom(head, seed=7)
    for a, b in ((phantom.image, again.image), (phantom.lesions, again.lesions), (phantom.brain, again.brain)):
        assert a.array.dtype == b.array.dtype
        assert np.array_equal(a.array, b.array)
    other = make_lesion_phantom(head, seed=8)
    assert not np.array_equal(phantom.image.array, other.image.array)
    assert not np.array_equal(phantom.lesions.array, other.lesions.array)


def test_lesion_phantom_grid_types_and_channels(head, phantom):
    for image in (phantom.image, phantom.lesions, phantom.brain, phantom.tissue):
        assert image.spatial_shape == head.t1.spatial_shape
        assert np.array_equal(image.ijk_to_ras, head.t1.ijk_to_ras)
    assert phantom.image.channel_names == ("FLAIR", "T1")
    assert phantom.image.array.dtype == np.float32
    assert phantom.lesions.array.dtype == np.uint16 and phantom.lesions.num_channels == 1
    assert phantom.brain.array.dtype == np.uint8 and set(np.unique(phantom.brain.array)) <= {0, 1}
    assert phantom.truth.dtype == bool and phantom.truth.shape == head.t1.spatial_shape
    assert np.array_equal(phantom.truth, phantom.lesions.array[0] > 0)
    assert np.all(np.isfinite(phantom.image.array))


@pytest.mark.parametrize("seed, n_lesions", [(0, (3, 8)), (1, (3, 8)), (2, (1, 2)), (4, (5, 5))])
def test_lesion_count_labels_and_placement(head, seed, n_lesions):
    p = make_lesion_phantom(head, seed=seed, n_lesions=n_lesions)
    labels = p.lesions.array[0]
    n = p.num_lesions
    assert n_lesions[0] <= n <= n_lesions[1]
    assert set(np.unique(labels)) == set(range(n + 1))  # consecutive instances 1..n
    wm, brain = p.white_matter, p.brain.array[0] > 0
    for index in range(1, n + 1):
        mask = labels == index
        centroid = np.round(ndimage.center_of_mass(mask)).astype(int)
        assert wm[tuple(centroid)], f"lesion {index} centroid is not in white matter"
        assert np.all(brain[mask])
        assert wm[mask].mean() >= 0.5  # most of it in white matter
        # instances do not touch each other
        grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3)))
        assert not np.any(grown & (labels > 0) & ~mask)


def test_lesions_follow_the_deformation(head):
    fixed = make_lesion_phantom(head, seed=5, deformation_mm=0.0, n_lesions=(0, 0), **CLEAN)
    assert np.array_equal(fixed.brain.array, head.brain.array)
    assert np.array_equal(fixed.tissue.array, head.tissue.array)
    # without deformation, bias and noise the T1 channel is the head's T1
    assert np.array_equal(fixed.image.array[1], head.t1.array[0])
    moved = make_lesion_phantom(head, seed=5, deformation_mm=3.0, **CLEAN)
    assert not np.array_equal(moved.brain.array, head.brain.array)
    # a smooth few-mm deformation keeps the brain's size and position
    before, after = head.brain.array[0] > 0, moved.brain.array[0] > 0
    assert abs(int(after.sum()) - int(before.sum())) < 0.05 * before.sum()
    shift_mm = (np.array(ndimage.center_of_mass(after)) - ndimage.center_of_mass(before)) * head.t1.spacing
    assert np.linalg.norm(shift_mm) < 3.0
    dice = 2 * (before & after).sum() / (before.sum() + after.sum())
    assert 0.85 < dice < 1.0
    # the white-matter lesions are placed in the deformed white matter
    wm = moved.white_matter
    assert wm[moved.truth].mean() > 0.5


# ---- lesion phantom: physical sizes --------------------------------------------------------------
def test_lesion_volumes_in_mm3(head):
    low, high = 3.0, 8.0
    volumes = []
    for seed in (10, 11):
        p = make_lesion_phantom(head, seed=seed, radius_mm=(low, high))
        counts = np.bincount(p.lesions.array[0].ravel())[1:]
        volumes.extend(counts * p.lesions.voxel_volume)
    volumes = np.asarray(volumes)
    assert np.all(volumes >= 0.6 * 4 / 3 * np.pi * low**3)
    assert np.all(volumes <= 1.3 * 4 / 3 * np.pi * high**3)


def test_spherical_lesions_are_round_in_mm_on_anisotropic_voxels(head):
    radius = 6.0
    p = make_lesion_phantom(head, seed=12, n_lesions=(4, 4), radius_mm=(radius, radius), **CLEAN)
    spacing = p.lesions.spacing
    assert spacing[2] != spacing[0]  # the sample head has 2 x 2 x 3 mm voxels
    expected_volume = 4 / 3 * np.pi * radius**3
    labels = p.lesions.array[0]
    for index in range(1, p.num_lesions + 1):
        mask = labels == index
        volume = mask.sum() * p.lesions.voxel_volume
        assert abs(volume - expected_volume) < 0.2 * expected_volume
        # extent along each axis, in mm, is the diameter (to one voxel), not 2 r voxels
        extent_mm = np.array([np.ptp(axis) + 1 for axis in np.nonzero(mask)]) * spacing
        assert np.all(np.abs(extent_mm - 2 * radius) <= spacing + 1e-6), extent_mm


def test_partial_volume_occupancy_and_label_threshold(clean_pair):
    with_lesions, without = clean_pair
    flair, clean = with_lesions.image.array[0].astype(float), without.image.array[0].astype(float)
    bright = clean > 10
    ratio = np.ones_like(flair)
    ratio[bright] = flair[bright] / clean[bright]
    occupancy = (ratio - 1.0) / (np.exp(FLAIR_LESION_FACTOR) - 1.0)
    truth = with_lesions.truth
    assert np.all(occupancy[truth & bright] >= 0.5 - 1e-3)
    assert np.all(occupancy[~truth & bright] < 0.5 + 1e-3)
    partial = bright & (occupancy > 0.01) & (occupancy < 0.99)
    assert partial.sum() > 0.2 * truth.sum()  # a real partial-volume rim, not binary lesions
    assert occupancy.max() <= 1.0 + 1e-3 and occupancy.min() >= -1e-3
    # the T1 carries the same occupancy with its own factor
    t1, t1_clean = with_lesions.image.array[1].astype(float), without.image.array[1].astype(float)
    bright1 = t1_clean > 10
    expected = t1_clean[bright1] * (1.0 + occupancy[bright1] * (np.exp(T1_LESION_FACTOR) - 1.0))
    assert np.allclose(t1[bright1], expected, rtol=1e-3, atol=0.05)


# ---- lesion phantom: contrast --------------------------------------------------------------------
def test_lesions_hyperintense_on_flair_hypointense_on_t1(phantom):
    flair, t1 = phantom.image.array
    truth, around = phantom.truth, _surrounding_wm(phantom)
    assert around.sum() > 100
    assert flair[truth].mean() > 1.3 * flair[around].mean()
    assert t1[truth].mean() < 0.8 * t1[around].mean()


def test_contrast_shrinks_with_lesion_contrast(head):
    gaps = []
    for contrast in (1.0, 0.5, 0.2):
        p = make_lesion_phantom(head, seed=21, lesion_contrast=contrast, **CLEAN)
        flair, t1 = p.image.array
        truth, around = p.truth, _surrounding_wm(p)
        gaps.append((flair[truth].mean() - flair[around].mean(), t1[around].mean() - t1[truth].mean()))
    gaps = np.asarray(gaps)
    assert np.all(gaps > 0)
    assert np.all(np.diff(gaps, axis=0) < 0)


def test_zero_contrast_lesions_are_invisible(head, clean_pair):
    _, without = clean_pair
    invisible = make_lesion_phantom(head, seed=3, lesion_contrast=0.0, **CLEAN)
    assert invisible.truth.any()  # the labels are there ...
    assert np.array_equal(invisible.image.array, without.image.array)  # ... the image shows nothing
    # also with noise and bias: the image is the lesion-free one of the same seed
    noisy = make_lesion_phantom(head, seed=3, lesion_contrast=0.0)
    noisy_free = make_lesion_phantom(head, seed=3, n_lesions=(0, 0))
    assert np.array_equal(noisy.image.array, noisy_free.image.array)


# ---- lesion phantom: degradations ----------------------------------------------------------------
def test_noise_raises_std_in_uniform_region(head):
    clean = make_lesion_phantom(head, seed=4, n_lesions=(0, 0), **CLEAN).image.array[0]
    value_range = clean.max() - clean.min()  # noise is relative to the clean channel's range
    stds = {}
    for noise in (0.0, 0.03, 0.1):
        p = make_lesion_phantom(head, seed=4, noise=noise, n_lesions=(0, 0))
        air = ndimage.binary_erosion(p.tissue.array[0] == 1, structure=np.ones((3, 3, 3)), iterations=4)
        assert air.sum() > 10000
        stds[noise] = p.image.array[0][air].std()  # FLAIR air is exactly 0 before noise
        if noise > 0:
            assert abs(stds[noise] - noise * value_range) < 0.05 * noise * value_range
    assert stds[0.0] < 1e-6 < stds[0.03] < stds[0.1]


def test_bias_field_is_smooth_and_multiplicative(head):
    flat = make_lesion_phantom(head, seed=6, n_lesions=(0, 0), **CLEAN)
    biased = make_lesion_phantom(head, seed=6, n_lesions=(0, 0), noise=0.0, bias_field=0.2)
    brain = (flat.brain.array[0] > 0) & (flat.image.array[1] > 20)
    ratio = biased.image.array[1][brain] / flat.image.array[1][brain]
    assert np.all(ratio > np.exp(-0.2) - 1e-4) and np.all(ratio < np.exp(0.2) + 1e-4)
    assert ratio.std() > 0.01  # it does vary across the brain
    # FLAIR gets its own field
    ratio_flair = biased.image.array[0][brain] / np.maximum(flat.image.array[0][brain], 1e-6)
    assert not np.allclose(ratio, ratio_flair, atol=1e-3)


def _high_frequency_energy(volume: np.ndarray) -> float:
    return float(np.mean(ndimage.laplace(volume.astype(float)) ** 2))


@pytest.mark.parametrize("kwargs", [dict(blur_mm=3.0), dict(resolution_factor=2.0)])
def test_blur_and_coarse_resolution_degrade_detail_on_the_same_grid(head, clean_pair, kwargs):
    with_lesions, _ = clean_pair
    degraded = make_lesion_phantom(head, seed=3, **CLEAN, **kwargs)
    assert degraded.image.same_grid(with_lesions.image)
    assert np.array_equal(degraded.image.ijk_to_ras, head.t1.ijk_to_ras)
    assert np.array_equal(degraded.lesions.array, with_lesions.lesions.array)  # truth unchanged
    for channel in range(2):
        sharp, soft = with_lesions.image.array[channel], degraded.image.array[channel]
        assert _high_frequency_energy(soft) < 0.6 * _high_frequency_energy(sharp)
        assert abs(soft.mean() - sharp.mean()) < 0.05 * sharp.mean()  # same image, less detail


# ---- lesion phantom: bad parameters --------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_lesions=(5, 2)), "n_lesions"),
        (dict(n_lesions=(-1, 2)), "n_lesions"),
        (dict(n_lesions=(1.5, 2)), "n_lesions"),
        (dict(n_lesions=3), "n_lesions"),
        (dict(radius_mm=(-1.0, 3.0)), "radius_mm"),
        (dict(radius_mm=(0.0, 3.0)), "radius_mm"),
        (dict(radius_mm=(6.0, 3.0)), "radius_mm"),
        (dict(lesion_contrast=-0.5), "lesion_contrast"),
        (dict(noise=-0.1), "noise"),
        (dict(bias_field=float("nan")), "bias_field"),
        (dict(deformation_mm=-1.0), "deformation_mm"),
        (dict(blur_mm=-1.0), "blur_mm"),
        (dict(resolution_factor=0.5), "resolution_factor"),
        (dict(seed=-3), "seed"),
    ],
)
def test_lesion_phantom_rejects_bad_parameters(head, kwargs, name):
    arguments = dict(seed=0)
    arguments.update(kwargs)
    with pytest.raises(SegXAIInputError, match=name):
        make_lesion_phantom(head, **arguments)


def test_lesion_phantom_rejects_lesions_that_cannot_fit(head):
    with pytest.raises(SegXAIInputError, match="n_lesions|radius_mm"):
        make_lesion_phantom(head, seed=0, n_lesions=(40, 40), radius_mm=(25.0, 30.0))


def test_lesion_phantom_rejects_other_heads():
    with pytest.raises(SegXAIInputError, match="head"):
        make_lesion_phantom(object(), seed=0)  # type: ignore[arg-type]


# ---- parotid phantom -----------------------------------------------------------------------------
def _assert_gland_at_one_rod_end(p: ParotidPhantom) -> None:
    """The gland is folded around one end of the rod: it touches the rod only within a sphere
    radius of that end, never at the other end, and the end lies near the gland's centre."""
    label, rod = p.label.array[0] > 0, p.rod.array[0] > 0
    spacing = p.rod.spacing
    step = spacing.max()
    coords = np.argwhere(rod) * spacing
    centre = coords.mean(axis=0)
    axis = np.linalg.svd(coords - centre, full_matrices=False)[2][0]  # the rod's long axis
    along = (coords - centre) @ axis
    touching = ndimage.binary_dilation(label)[tuple(np.argwhere(rod).T)]
    assert touching.any()
    first, last = along <= along.min() + step, along >= along.max() - step
    near, far = (first, last) if touching[first].sum() > touching[last].sum() else (last, first)
    assert not touching[far].any()
    end_point = coords[near].mean(axis=0)
    radius = (3 * label.sum() * np.prod(spacing) / (4 * np.pi)) ** (1 / 3)
    assert np.all(np.abs((coords[touching] - end_point) @ axis) <= radius + 2 * step)
    gland_centre = np.argwhere(label).mean(axis=0) * spacing
    assert np.linalg.norm(gland_centre - end_point) < 0.35 * radius + step


def test_variant_table():
    assert list(PAROTID_VARIANTS) == ["S1", "S2", "S3", "S4", "S5", "S6"]
    table = {name: (v.sphere_ratio, v.rod) for name, v in PAROTID_VARIANTS.items()}
    assert table == {
        "S1": (1.0, False),
        "S2": (1.0, True),
        "S3": (1.05, False),
        "S4": (1.05, True),
        "S5": (5.0, False),
        "S6": (5.0, True),
    }
    assert PAROTID_VARIANTS["S2"].rod_density == 1.0
    assert PAROTID_VARIANTS["S1"].rod_density == HEAD_DENSITY  # absent rod is background-like


def test_parotid_grid_is_centred_identity():
    matrix = parotid_grid((48, 40, 32), (2.0, 2.0, 3.0))
    assert np.allclose(matrix[:3, :3], np.diag([2.0, 2.0, 3.0]))
    centre = np.array([47, 39, 31]) / 2.0
    assert np.allclose(matrix[:3, :3] @ centre + matrix[:3, 3], 0.0)
    p = make_parotid_phantom("S4", 0, shape=(48, 40, 32), spacing=(2.0, 2.0, 3.0))
    for image in (p.image, p.label, p.rod):
        assert np.array_equal(image.ijk_to_ras, matrix)
        assert image.spatial_shape == (48, 40, 32)


@pytest.mark.parametrize("variant", list(PAROTID_VARIANTS))
def test_parotid_phantom_structure(variant):
    p = make_parotid_phantom(variant, seed=11)
    assert isinstance(p, ParotidPhantom) and p.variant == variant
    assert p.image.channel_names == ("CT",) and p.image.array.dtype == np.float32
    assert p.label.array.dtype == np.uint8 and p.rod.array.dtype == np.uint8
    label, rod = p.label.array[0] > 0, p.rod.array[0] > 0
    assert ndimage.label(label)[1] == 1
    assert not np.any(label & rod)
    if not PAROTID_VARIANTS[variant].rod:
        assert not rod.any()
        return
    assert ndimage.label(rod)[1] == 1
    _assert_gland_at_one_rod_end(p)


@pytest.mark.parametrize("variant", list(PAROTID_VARIANTS))
def test_parotid_densities_match_the_variant(variant):
    spec = PAROTID_VARIANTS[variant]
    exact = make_parotid_phantom(variant, seed=2, noise=0.0)
    image, label, rod = exact.image.array[0], exact.label.array[0] > 0, exact.rod.array[0] > 0
    head = image > 0
    background = head & ~label & ~rod
    assert np.allclose(image[background], HEAD_DENSITY)
    assert np.allclose(image[label], spec.sphere_ratio * HEAD_DENSITY)
    assert np.all(head[label])  # the sphere lies inside the head
    if spec.rod:
        assert np.allclose(image[rod], ROD_DENSITY)
    assert np.allclose(image[~head], 0.0)
    # with the default noise the means still give the variant's ratio
    noisy = make_parotid_phantom(variant, seed=2)
    ratio = noisy.image.array[0][label].mean() / noisy.image.array[0][background].mean()
    assert abs(ratio - spec.sphere_ratio) < 0.025 * spec.sphere_ratio
    assert abs(noisy.image.array[0][background].std() - 0.02) < 0.002


def test_parotid_is_deterministic_and_seed_dependent():
    a, b = make_parotid_phantom("S6", 5), make_parotid_phantom("S6", 5)
    for x, y in ((a.image, b.image), (a.label, b.label), (a.rod, b.rod)):
        assert np.array_equal(x.array, y.array)
    c = make_parotid_phantom("S6", 6)
    assert not np.array_equal(a.label.array, c.label.array)
    assert not np.array_equal(a.image.array, c.image.array)


def test_parotid_geometry_is_shared_across_variants_and_varies_across_seeds():
    cases = {v: make_parotid_phantom(v, 9, noise=0.0) for v in PAROTID_VARIANTS}
    sphere = cases["S1"].label.array[0] > 0
    rod = cases["S2"].rod.array[0] > 0
    for v in ("S2", "S4", "S6"):
        assert np.array_equal(cases[v].rod.array[0] > 0, rod)
        assert np.array_equal(cases[v].label.array[0] > 0, sphere & ~rod)
    for v in ("S3", "S5"):
        assert np.array_equal(cases[v].label.array[0] > 0, sphere)
    # head size, sphere size/position and rod thickness/orientation vary with the seed
    heads, spheres, rods, axes = set(), set(), set(), []
    for seed in range(6):
        p = make_parotid_phantom("S6", seed, noise=0.0)
        heads.add(int((p.image.array[0] > 0).sum()))
        spheres.add(tuple(np.round(ndimage.center_of_mass(p.label.array[0]), 1)))
        rods.add(int(p.rod.array[0].sum()))
        coords = np.argwhere(p.rod.array[0] > 0).astype(float)
        axes.append(np.linalg.svd(coords - coords.mean(0), full_matrices=False)[2][0])
    assert len(heads) == len(spheres) == len(rods) == 6
    cosines = np.abs(np.array(axes) @ np.array(axes).T)[np.triu_indices(6, 1)]
    assert cosines.min() < 0.9


def test_parotid_sphere_is_round_in_mm_on_anisotropic_grid():
    p = make_parotid_phantom("S5", 3, shape=(48, 48, 32), spacing=(2.0, 2.0, 3.0), noise=0.0)
    mask = p.label.array[0] > 0
    extent_mm = np.array([np.ptp(axis) + 1 for axis in np.nonzero(mask)]) * p.label.spacing
    assert np.ptp(extent_mm) <= 3.0 + 1e-6, extent_mm


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(PAROTID_VARIANTS)), seed=st.integers(0, 2**31 - 1))
def test_parotid_invariants_for_any_seed(variant, seed):
    p = make_parotid_phantom(variant, seed, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0), noise=0.0)
    label, rod = p.label.array[0] > 0, p.rod.array[0] > 0
    head = p.image.array[0] > 0
    assert label.sum() > 20 and ndimage.label(label)[1] == 1
    assert np.all(head[label | rod])
    assert rod.any() == PAROTID_VARIANTS[variant].rod
    if rod.any():
        assert ndimage.label(rod)[1] == 1
        _assert_gland_at_one_rod_end(p)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        (("S7", 0), {}, "variant"),
        (("s1", 0), {}, "variant"),
        (("S1", -1), {}, "seed"),
        (("S1", 0), dict(shape=(8, 48, 48)), "shape"),
        (("S1", 0), dict(shape=(48, 48)), "shape"),
        (("S1", 0), dict(spacing=(2.0, 0.0, 2.0)), "spacing"),
        (("S1", 0), dict(noise=-0.01), "noise"),
    ],
)
def test_parotid_rejects_bad_parameters(args, kwargs, name):
    with pytest.raises(SegXAIInputError, match=name):
        make_parotid_phantom(*args, **kwargs)
