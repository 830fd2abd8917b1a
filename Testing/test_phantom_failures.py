"""Tests of SegXAILib.phantoms.failures (QA cohort failures that keep the volume uninformative)
and of make_parotid_phantom's sphere_radius_fraction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from conftest import GRIDS
from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.phantoms import (
    kspace_ghosting,
    kspace_spikes,
    make_parotid_phantom,
    misregister_channel,
    perturb_contour,
    random_similarity,
    similarity_matrix,
    transform_case,
)

# float64 FFT round trips: relative error a few 1e-16 per operation, times log2(N) stages
FFT_RTOL = 1e-10


def _positive_volume(shape=(16, 12, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 100.0, size=shape)


# ---- k-space ghosting --------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("intensity", [0.3, 1.0])
@pytest.mark.parametrize("shape", [(16, 12, 10), (15, 13, 11)])
def test_ghosting_preserves_kspace_energy(axis, intensity, shape):
    x = _positive_volume(shape)
    y = kspace_ghosting(x, axis, intensity)
    # Parseval: sum |F|^2 / N = sum |x|^2; the phase error has modulus 1
    energy_x, energy_y = (np.sum(np.abs(np.fft.fftn(v)) ** 2) / v.size for v in (x, y))
    assert energy_y == pytest.approx(energy_x, rel=FFT_RTOL)
    assert np.sum(y**2) == pytest.approx(np.sum(x**2), rel=FFT_RTOL)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("intensity", [0.5, 1.0])
def test_ghosting_energy_fraction_in_the_half_fov_copy(axis, intensity):
    # phase error phi = intensity * pi / 2 on odd lines: ghost amplitude sin(phi / 2), so the
    # copy shifted by N/2 carries sin(phi/2)^2 of the energy (1/2 at intensity 1)
    x = _positive_volume()
    y = kspace_ghosting(x, axis, intensity)
    phi = intensity * np.pi / 2
    g = np.roll(x, x.shape[axis] // 2, axis=axis)
    expected = np.sqrt(np.cos(phi / 2) ** 2 * x**2 + np.sin(phi / 2) ** 2 * g**2)
    np.testing.assert_allclose(y, expected, rtol=FFT_RTOL, atol=FFT_RTOL * x.max())
    # an image that is zero on the half the copy lands on: the copy is exactly there
    half = x.copy()
    index = [slice(None)] * 3
    index[axis] = slice(x.shape[axis] // 2, None)
    half[tuple(index)] = 0.0
    ghosted = kspace_ghosting(half, axis, intensity)
    ghost_part = ghosted[tuple(index)]
    source = [slice(None)] * 3
    source[axis] = slice(0, x.shape[axis] // 2)
    np.testing.assert_allclose(ghost_part, np.sin(phi / 2) * half[tuple(source)], rtol=1e-9, atol=1e-9 * x.max())
    np.testing.assert_allclose(ghosted[tuple(source)], np.cos(phi / 2) * half[tuple(source)], rtol=1e-9,
                               atol=1e-9 * x.max())
    fraction = np.sum(ghost_part**2) / np.sum(ghosted**2)
    assert fraction == pytest.approx(np.sin(phi / 2) ** 2, rel=1e-9)


def test_ghosting_identity_random_axis_and_signed_volumes():
    x = _positive_volume().astype(np.float32)
    y = kspace_ghosting(x, 1, 0.0)
    assert y.dtype == np.float32 and np.array_equal(y, x)
    # the axis drawn from the seed is one of the three, and seeded
    a, b = kspace_ghosting(x, None, 1.0, seed=3), kspace_ghosting(x, None, 1.0, seed=3)
    assert np.array_equal(a, b)
    assert any(np.allclose(a, kspace_ghosting(x, axis, 1.0)) for axis in range(3))
    # a signed volume is ghosted above its minimum: the same as ghosting x - min and adding it back
    signed = _positive_volume() - 60.0
    np.testing.assert_allclose(kspace_ghosting(signed, 2, 0.7),
                               kspace_ghosting(signed - signed.min(), 2, 0.7) + signed.min(), rtol=1e-12, atol=1e-9)


# ---- k-space spikes ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 12, 10), (15, 13, 11)])
@pytest.mark.parametrize("n_spikes", [1, 3])
def test_spikes_change_exactly_n_kspace_points(shape, n_spikes):
    x = _positive_volume(shape)
    y = kspace_spikes(x, n_spikes, 0.05, seed=7)
    fx, fy = np.fft.rfftn(x), np.fft.rfftn(y)
    amplitude = 0.05 * np.abs(fx).max()
    difference = np.abs(fy - fx)
    changed = difference > 1e-6 * amplitude  # FFT round-off is ~1e-13 of max|F|
    assert changed.sum() == n_spikes
    np.testing.assert_allclose(difference[changed], amplitude, rtol=1e-9)
    # each spike and its Hermitian mirror: a plane wave of energy 2 amplitude^2 / N (Parseval)
    assert np.sum((y - x) ** 2) == pytest.approx(n_spikes * 2 * amplitude**2 / x.size, rel=1e-9)
    assert np.array_equal(y, kspace_spikes(x, n_spikes, 0.05, seed=7))
    assert not np.array_equal(y, kspace_spikes(x, n_spikes, 0.05, seed=8))
    assert np.array_equal(kspace_spikes(x, 0, 0.05, seed=7), x)


# ---- channel misregistration -------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["anisotropic", "oblique", "lps_flipped"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_misregistration_by_whole_voxels_is_a_roll(grid, axis):
    spacing, origin, direction = GRIDS[grid]
    rng = np.random.default_rng(1)
    array = rng.normal(size=(2, 10, 9, 8))
    image = Image(array, geometry_matrix(spacing, origin, direction), ("T1", "FLAIR"))
    steps = 2
    moved = misregister_channel(image, "FLAIR", steps * spacing[axis], seed=0, direction=np.asarray(direction)[:, axis])
    assert moved.same_grid(image) and moved.channel_names == image.channel_names
    assert np.array_equal(moved.array[0], array[0])  # the other channel is bit-identical
    valid = [slice(None)] * 3
    valid[axis] = slice(steps, None)  # voxels whose source is inside the grid
    expected = np.roll(array[1], steps, axis=axis)
    np.testing.assert_allclose(moved.array[1][tuple(valid)], expected[tuple(valid)], rtol=0, atol=1e-12)


def test_misregistration_moves_a_random_direction_by_shift_mm():
    # linear interpolation is exact on affine functions: three ramps along R, A, S measure d
    spacing, origin, direction = GRIDS["oblique"]
    matrix = geometry_matrix(spacing, origin, direction)
    shape = (16, 14, 10)
    ijk = np.indices(shape).reshape(3, -1).T
    ras = ijk @ matrix[:3, :3].T + matrix[:3, 3]
    ramps = ras.T.reshape(3, *shape)
    image = Image(ramps, matrix, ("R", "A", "S"))
    shift_mm = 3.5
    difference = []
    for channel in range(3):
        moved = misregister_channel(image, channel, shift_mm, seed=11)
        others = [c for c in range(3) if c != channel]
        assert np.array_equal(moved.array[others], ramps[others])
        difference.append(ramps[channel] - moved.array[channel])
    difference = np.stack(difference)
    # the source i - A^-1 d must lie inside the grid: |(A^-1 d)_n| <= shift_mm / spacing_n
    margin = [int(np.ceil(shift_mm / s)) for s in spacing]
    inner = difference[(slice(None), *(slice(m, n - m) for m, n in zip(margin, shape)))].reshape(3, -1)
    d = inner[:, 0]
    np.testing.assert_allclose(inner, d[:, None] * np.ones_like(inner), atol=1e-9)  # a pure translation
    assert np.linalg.norm(d) == pytest.approx(shift_mm, rel=1e-9)
    assert np.array_equal(misregister_channel(image, 0, shift_mm, seed=11).array,
                          misregister_channel(image, 0, shift_mm, seed=11).array)


# ---- similarity transforms of image and reference ----------------------------------------------
def _physical_points(image: Image) -> np.ndarray:
    ijk = np.indices(image.spatial_shape).reshape(3, -1).T
    return image.ijk_to_ras_points(ijk)


def _centre(image: Image) -> np.ndarray:
    return image.ijk_to_ras_points((np.asarray(image.spatial_shape) - 1) / 2.0)[0]


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_transform_case_is_physical_on_any_grid(grid, scale):
    # an affine function of the RAS position is reproduced exactly by linear interpolation, so
    # the moved image is known in physical coordinates, whatever the direction matrix
    spacing, origin, direction = GRIDS[grid]
    image = Image(np.zeros((1, 14, 12, 10)), geometry_matrix(spacing, origin, direction))
    points = _physical_points(image)
    a, b = np.array([0.7, -1.3, 2.1]), 5.0
    image = image.with_array((points @ a + b).reshape(1, *image.spatial_shape))
    matrix = similarity_matrix(scale, 23.0, axis=(0.3, -0.5, 0.8), translation_mm=(1.5, -2.0, 0.5))
    moved, _ = transform_case(image, np.zeros(image.spatial_shape, bool), matrix)
    assert moved.same_grid(image)
    c = _centre(image)
    # content at q goes to c + L (q - c) + t: the value at p comes from q = c + L^-1 (p - c - t)
    source = c + (points - c - matrix[:3, 3]) @ np.linalg.inv(matrix[:3, :3]).T
    source_ijk = image.ras_to_ijk_points(source)
    inside = np.all((source_ijk >= 1e-9) & (source_ijk <= np.asarray(image.spatial_shape) - 1 - 1e-9), axis=1)
    assert inside.sum() > 100
    np.testing.assert_allclose(moved.array[0].ravel()[inside], (source @ a + b)[inside], rtol=1e-9, atol=1e-9)


def _ball_case(grid: str, shape=(40, 40, 40), radius_mm=18.0, offset=(4.0, -6.0, 3.0)):
    _, origin, direction = GRIDS[grid]
    spacing = (1.6, 1.4, 1.8)
    image = Image(np.zeros((1, *shape)), geometry_matrix(spacing, origin, direction))
    centre = _centre(image) + np.asarray(offset)
    inside = (np.linalg.norm(_physical_points(image) - centre, axis=1) <= radius_mm).reshape(shape)
    return image.with_array(np.where(inside, 100.0, 10.0)[None]), inside, centre


@pytest.mark.parametrize("grid", ["identity", "oblique", "lps_flipped", "oblique_left_handed"])
@pytest.mark.parametrize("scale", [0.75, 1.3])
def test_transform_case_scales_the_reference_volume_and_keeps_it_aligned(grid, scale):
    radius = 18.0
    image, reference, ball = _ball_case(grid, radius_mm=radius)
    matrix = similarity_matrix(scale, 25.0, axis=(1.0, 2.0, -0.5), translation_mm=(3.0, 2.0, -4.0))
    moved, moved_reference = transform_case(image, reference, matrix)
    assert moved_reference.dtype == bool and moved.same_grid(image)
    c = _centre(image)
    target = c + matrix[:3, :3] @ (ball - c) + matrix[:3, 3]
    # Discretisation bound: the interpolated occupancy at a source point is 1 when its 8 grid
    # corners are inside the ball and 0 when all are outside; the corners lie within one cell
    # diagonal D of the point. So the moved reference holds every voxel centre within
    # s (R - D) of the moved centre and none beyond s (R + D): its count lies between the
    # lattice counts of those two balls (about +-3 D / R = +-25 % of s^3 for R = 18 mm).
    cell_diagonal = float(np.linalg.norm(image.spacing))
    distance = np.linalg.norm(_physical_points(image) - target, axis=1)
    low = int((distance <= scale * (radius - cell_diagonal)).sum())
    high = int((distance <= scale * (radius + cell_diagonal)).sum())
    count = int(moved_reference.sum())
    assert low <= count <= high
    # and hence the count ratio is about s^3 (0.42 or 2.2), well away from 1
    assert (count / reference.sum() - 1.0) * (scale - 1.0) > 0
    # aligned: the reference is exactly the >= 0.5 level of the image's own resampling
    # (the bright ball rescaled to occupancy), and both centroids sit on the moved centre
    occupancy = (moved.array[0] - 10.0) / 90.0
    assert np.array_equal(occupancy >= 0.5 - 1e-12, moved_reference)
    points = _physical_points(image)
    reference_centroid = points[moved_reference.ravel()].mean(axis=0)
    weights = occupancy.ravel()
    image_centroid = (points * weights[:, None]).sum(axis=0) / weights.sum()
    # a symmetric boundary error cancels; a wrong centre or axis would move it by mm
    assert np.linalg.norm(reference_centroid - target) < cell_diagonal / 2
    assert np.linalg.norm(image_centroid - target) < cell_diagonal / 2


def test_transform_case_identity_and_same_physical_result_on_flipped_grids():
    image, reference, _ = _ball_case("identity")
    moved, moved_reference = transform_case(image, reference, np.eye(4))
    np.testing.assert_allclose(moved.array, image.array, rtol=1e-12)
    assert np.array_equal(moved_reference, reference)
    # the same physical ball on an identity grid and on a reoriented (flipped, permuted) copy
    # of it: the moved references are the same voxels in physical space
    flipped = Image(image.array, image.ijk_to_ras).reoriented("LIA")
    flipped_reference = Image(reference[None].astype(np.uint8), image.ijk_to_ras).reoriented("LIA").array[0] > 0
    matrix = similarity_matrix(1.2, 17.0, axis=(0.2, 0.9, 0.1), translation_mm=(2.0, -1.0, 3.0))
    _, a = transform_case(image, reference, matrix)
    moved_flipped, b = transform_case(flipped, flipped_reference, matrix)
    back = Image(b[None].astype(np.uint8), moved_flipped.ijk_to_ras).reoriented("RAS")
    assert np.allclose(back.ijk_to_ras, image.ijk_to_ras)
    assert np.array_equal(back.array[0] > 0, a)


def test_random_similarity_ranges_and_seed():
    rng = np.random.default_rng(0)
    scales, angles = [], []
    for _ in range(200):
        m = random_similarity(rng, (0.75, 1.35), 30.0, 5.0)
        s = np.cbrt(np.linalg.det(m[:3, :3]))
        rotation = m[:3, :3] / s
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.norm(m[:3, 3]) <= 5.0 + 1e-12
        scales.append(s)
        angles.append(np.degrees(Rotation.from_matrix(rotation).magnitude()))
    assert 0.75 <= min(scales) and max(scales) <= 1.35 and max(scales) / min(scales) > 1.6
    assert max(angles) <= 30.0 + 1e-9 and max(angles) > 20.0
    assert np.array_equal(random_similarity(4), random_similarity(4))


# ---- contours at constant volume ---------------------------------------------------------------
def _ellipsoid(shape=(40, 36, 30), spacing=(1.2, 1.0, 1.5), semi_axes=(12.0, 8.0, 7.0)):
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return ((points / np.asarray(semi_axes)) ** 2).sum(axis=-1) <= 1.0, np.asarray(spacing)


@pytest.mark.parametrize("kind, magnitude", [("shift", 4.0), ("rotate", 25.0), ("warp", 4.0)])
def test_perturb_contour_keeps_the_voxel_count_and_is_seeded(kind, magnitude):
    mask, spacing = _ellipsoid()
    out = perturb_contour(mask, spacing, kind, magnitude, seed=5)
    assert out.dtype == bool and out.shape == mask.shape
    assert out.sum() == mask.sum()
    assert not np.array_equal(out, mask)
    assert np.array_equal(out, perturb_contour(mask, spacing, kind, magnitude, seed=5))
    assert not np.array_equal(out, perturb_contour(mask, spacing, kind, magnitude, seed=6))
    assert np.array_equal(perturb_contour(mask, spacing, kind, 0.0, seed=5), mask)


@pytest.mark.parametrize("seed", range(4))
def test_perturb_contour_shift_moves_the_centroid_by_the_shift(seed):
    mask, spacing = _ellipsoid()
    shift = 5.0
    out = perturb_contour(mask, spacing, "shift", shift, seed=seed)
    moved = (np.argwhere(out).mean(axis=0) - np.argwhere(mask).mean(axis=0)) * spacing
    # the shifted occupancy is mask-preserving (partition of unity), its top-N set differs from
    # the exactly shifted shape only in boundary voxels, each within one cell diagonal
    assert abs(np.linalg.norm(moved) - shift) < np.linalg.norm(spacing) / 2
    # every kept voxel has positive occupancy: within shift + one cell diagonal of the mask
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    assert distance[out].max() <= shift + np.linalg.norm(spacing)


def test_perturb_contour_rotation_keeps_the_centroid():
    mask, spacing = _ellipsoid()
    out = perturb_contour(mask, spacing, "rotate", 30.0, seed=2)
    moved = (np.argwhere(out).mean(axis=0) - np.argwhere(mask).mean(axis=0)) * spacing
    assert np.linalg.norm(moved) < np.linalg.norm(spacing) / 2  # rotated about the centroid


# ---- parotid radius range ----------------------------------------------------------------------
def test_parotid_default_radius_range_is_the_former_one():
    a = make_parotid_phantom("S6", 4)
    b = make_parotid_phantom("S6", 4, sphere_radius_fraction=(0.17, 0.27))
    assert np.array_equal(a.image.array, b.image.array) and np.array_equal(a.label.array, b.label.array)


def _equivalent_radius(p) -> float:
    return float((3 * p.label.array.sum() * p.label.voxel_volume / (4 * np.pi)) ** (1 / 3))


def test_parotid_sphere_radius_fraction_sets_the_radius():
    shape, spacing = (64, 64, 64), (1.0, 1.0, 1.0)
    scale = 32.0  # smallest half field of view, mm
    # lattice count of a ball of radius r lies between the volumes of radii r -+ h (h: half
    # the voxel diagonal), so the volume-equivalent radius is within h of the drawn one
    h = np.sqrt(3) / 2
    for fraction in (0.10, 0.32):
        p = make_parotid_phantom("S5", 1, shape, spacing, noise=0.0, sphere_radius_fraction=(fraction, fraction))
        assert abs(_equivalent_radius(p) - fraction * scale) <= h
    radii = [_equivalent_radius(make_parotid_phantom("S5", seed, shape, spacing, noise=0.0,
                                                     sphere_radius_fraction=(0.10, 0.32))) for seed in range(20)]
    assert min(radii) >= 0.10 * scale - h and max(radii) <= 0.32 * scale + h
    # wider than any sample of the default range can be (0.10 * 32 mm + 2 h)
    assert max(radii) - min(radii) > 0.10 * scale + 2 * h


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: kspace_ghosting(np.zeros((4, 4)), 0, 0.5), "volume"),
        (lambda: kspace_ghosting(np.zeros((4, 4, 4)), 3, 0.5), "axis"),
        (lambda: kspace_ghosting(np.zeros((4, 4, 4)), 0, 1.5), "intensity"),
        (lambda: kspace_ghosting(np.zeros((4, 4, 4)), None, 0.5), "axis"),
        (lambda: kspace_spikes(np.zeros((4, 4, 4)), -1, 0.5, 0), "n_spikes"),
        (lambda: kspace_spikes(np.zeros((4, 4, 4)), 1, -0.5, 0), "intensity"),
        (lambda: kspace_spikes(np.zeros((4, 4, 4)), 1, 0.5, -3), "seed"),
        (lambda: misregister_channel(Image(np.zeros((2, 4, 4, 4))), 2, 1.0, 0), "channel"),
        (lambda: misregister_channel(Image(np.zeros((2, 4, 4, 4))), 0, -1.0, 0), "shift_mm"),
        (lambda: similarity_matrix(0.0), "scale"),
        (lambda: similarity_matrix(1.0, 10.0), "axis"),
        (lambda: random_similarity(0, (1.2, 0.8)), "scale_range"),
        (lambda: random_similarity(0, max_rotation_deg=200), "max_rotation_deg"),
        (lambda: transform_case(Image(np.zeros((1, 4, 4, 4))), np.zeros((4, 4, 5), bool), np.eye(4)), "reference"),
        (lambda: transform_case(Image(np.zeros((1, 4, 4, 4))), np.zeros((4, 4, 4), bool), np.eye(3)), "matrix"),
        (lambda: perturb_contour(np.ones((4, 4, 4), bool), (1, 1, 1), "bend", 1.0, 0), "kind"),
        (lambda: perturb_contour(np.zeros((4, 4, 4), bool), (1, 1, 1), "shift", 1.0, 0), "mask"),
        (lambda: perturb_contour(np.ones((4, 4, 4), bool), (1, 0, 1), "shift", 1.0, 0), "spacing"),
        (lambda: perturb_contour(np.ones((4, 4, 4), bool), (1, 1, 1), "shift", -1.0, 0), "magnitude"),
        (lambda: make_parotid_phantom("S1", 0, sphere_radius_fraction=(0.3, 0.2)), "sphere_radius_fraction"),
        (lambda: make_parotid_phantom("S1", 0, sphere_radius_fraction=(0.1, 0.5)), "sphere_radius_fraction"),
        (lambda: make_parotid_phantom("S1", 0, sphere_radius_fraction=0.2), "sphere_radius_fraction"),
    ],
)
def test_bad_input_names_the_parameter(call, name):
    with pytest.raises(SegXAIInputError, match=name):
        call()
