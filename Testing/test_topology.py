"""Euler characteristic curves: vectorised cell counting against GUDHI persistence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from SegXAILib.image import SegXAIInputError
from SegXAILib.topology import (
    betti_curves,
    default_thresholds,
    euler_characteristic_curve,
    euler_characteristic_curve_gudhi,
    persistence_diagram,
)


def smooth_field(shape, seed, sigma=1.2):
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.normal(size=shape), sigma)


def thresholds_for(values, n=41, n_exact=25, seed=0):
    """A grid spanning beyond the range plus thresholds exactly equal to voxel values."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(values.min() - 0.1, values.max() + 0.1, n)
    exact = rng.choice(values.ravel(), size=min(n_exact, values.size), replace=False)
    return np.concatenate([grid, exact, [values.min(), values.max()]])


def assert_matches_gudhi(values, thresholds, mask=None, superlevel=True):
    fast = euler_characteristic_curve(values, thresholds, mask=mask, superlevel=superlevel)
    oracle = euler_characteristic_curve_gudhi(values, thresholds, mask=mask, superlevel=superlevel)
    assert fast.dtype == np.int64 and fast.shape == thresholds.shape
    np.testing.assert_array_equal(fast, oracle)
    return fast


# --- agreement with GUDHI -------------------------------------------------------------


@pytest.mark.parametrize("superlevel", [True, False])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(9, 11, 7), (5, 1, 8), (12, 6, 6)])
def test_matches_gudhi_smooth_fields(shape, seed, superlevel):
    values = smooth_field(shape, seed)
    chi = assert_matches_gudhi(values, thresholds_for(values, seed=seed), superlevel=superlevel)
    assert len(set(chi.tolist())) > 1  # the curve is not trivially constant


@pytest.mark.parametrize("superlevel", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_gudhi_with_blob_mask(seed, superlevel):
    values = smooth_field((9, 11, 7), seed)
    mask = smooth_field((9, 11, 7), seed + 100, sigma=1.5) > 0.0
    assert 0 < mask.sum() < mask.size
    assert_matches_gudhi(values, thresholds_for(values, seed=seed), mask=mask, superlevel=superlevel)


@pytest.mark.parametrize("superlevel", [True, False])
def test_matches_gudhi_with_holey_mask(superlevel):
    values = smooth_field((10, 10, 10), 7)
    mask = np.zeros(values.shape, dtype=bool)
    mask[1:9, 1:9, 1:9] = True
    mask[3:7, 3:7, 3:7] = False  # an enclosed cavity
    mask[:, 4:6, 4:6] = False  # a tunnel through the cube
    assert_matches_gudhi(values, thresholds_for(values), mask=mask, superlevel=superlevel)


@pytest.mark.parametrize("superlevel", [True, False])
@pytest.mark.parametrize("levels", [2, 3, 5])
def test_matches_gudhi_with_plateaus(levels, superlevel):
    values = smooth_field((9, 11, 7), levels)
    values = np.round((values - values.min()) / np.ptp(values) * (levels - 1)) / (levels - 1)
    thresholds = np.concatenate([np.linspace(-0.2, 1.2, 29), np.unique(values)])
    assert_matches_gudhi(values, thresholds, superlevel=superlevel)
    mask = smooth_field(values.shape, 50 + levels) > -0.1
    assert_matches_gudhi(values, thresholds, mask=mask, superlevel=superlevel)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**31 - 1),
    n_levels=st.integers(1, 4),
    use_mask=st.booleans(),
    superlevel=st.booleans(),
)
def test_matches_gudhi_random_small(shape, seed, n_levels, use_mask, superlevel):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, n_levels, size=shape).astype(float) / max(n_levels - 1, 1)
    mask = rng.random(shape) < 0.7 if use_mask else None
    thresholds = np.array([-0.5, 0.0, 1 / 3, 0.5, 2 / 3, 1.0, 1.5])
    assert_matches_gudhi(values, thresholds, mask=mask, superlevel=superlevel)


# --- known values ---------------------------------------------------------------------


def test_single_voxel():
    values = np.array([[[0.4]]])
    t = np.array([0.0, 0.39, 0.4, 0.41, 1.0])
    np.testing.assert_array_equal(euler_characteristic_curve(values, t), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(euler_characteristic_curve(values, t, superlevel=False), [0, 0, 1, 1, 1])
    # an isolated voxel inside a larger zero background
    volume = np.zeros((5, 5, 5))
    volume[2, 3, 1] = 0.7
    np.testing.assert_array_equal(euler_characteristic_curve(volume, np.array([0.5, 0.7, 0.8])), [1, 1, 0])


def test_solid_cube():
    values = np.zeros((7, 7, 7))
    values[1:6, 2:5, 1:4] = 1.0
    np.testing.assert_array_equal(euler_characteristic_curve(values, np.array([0.5, 1.0])), [1, 1])
    # below every value the whole grid is one solid box
    np.testing.assert_array_equal(euler_characteristic_curve(values, np.array([0.0, -1.0])), [1, 1])


def test_hollow_shell_is_a_sphere():
    values = np.ones((3, 3, 3))
    values[1, 1, 1] = 0.0
    t = np.array([0.5, 1.0])
    np.testing.assert_array_equal(euler_characteristic_curve(values, t), [2, 2])
    np.testing.assert_array_equal(betti_curves(values, t)[:, 0], [1, 0, 1, 0])
    # the same shell as a mask on a constant field, embedded in a larger grid
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1:4, 2:5, 1:4] = True
    mask[2, 3, 2] = False
    chi = euler_characteristic_curve(np.full(mask.shape, 0.5), np.array([0.0, 0.5, 0.6]), mask=mask)
    np.testing.assert_array_equal(chi, [2, 2, 0])


def test_ring_is_a_loop():
    values = np.zeros((1, 6, 6))
    values[0, 1:5, 1:5] = 1.0
    values[0, 2:4, 2:4] = 0.0  # square annulus in one plane
    chi = euler_characteristic_curve(values, np.array([0.5]))
    np.testing.assert_array_equal(chi, [0])
    np.testing.assert_array_equal(betti_curves(values, np.array([0.5]))[:, 0], [1, 1, 0, 0])
    # a 3D loop of voxels: a ring in a 5x5 plane of a thicker volume
    volume = np.zeros((3, 7, 7))
    volume[1, 1:6, 1:6] = 1.0
    volume[1, 2:5, 2:5] = 0.0
    np.testing.assert_array_equal(euler_characteristic_curve(volume, np.array([0.5])), [0])
    # a solid torus (thick ring) has chi 0 too
    torus = np.zeros((5, 9, 9))
    torus[1:4, 1:8, 1:8] = 1.0
    torus[:, 3:6, 3:6] = 0.0
    np.testing.assert_array_equal(euler_characteristic_curve(torus, np.array([0.5])), [0])


def test_two_components_and_above_max():
    values = np.zeros((4, 8, 4))
    values[1, 1, 1] = 1.0
    values[2, 5:7, 1:3] = 0.8
    t = np.array([0.9, 0.8, 1.0, 1.0 + 1e-9, 5.0])
    np.testing.assert_array_equal(euler_characteristic_curve(values, t), [1, 2, 1, 0, 0])
    # sublevel: everything below the min is empty
    np.testing.assert_array_equal(euler_characteristic_curve(values, np.array([-1e-9]), superlevel=False), [0])


def test_mask_excludes_voxels():
    values = smooth_field((8, 9, 10), 3)
    mask = smooth_field(values.shape, 4) > 0.05
    t = thresholds_for(values)
    # superlevel: a masked-out voxel behaves like a voxel below every threshold
    low = np.where(mask, values, values.min() - 10.0)
    np.testing.assert_array_equal(
        euler_characteristic_curve(values, t, mask=mask), euler_characteristic_curve(low, t)
    )
    # an all-False mask gives the empty complex
    np.testing.assert_array_equal(
        euler_characteristic_curve(values, t, mask=np.zeros(values.shape, bool)), np.zeros(t.size, np.int64)
    )
    # an integer 0/1 mask is accepted
    np.testing.assert_array_equal(
        euler_characteristic_curve(values, t, mask=mask.astype(np.uint8)), euler_characteristic_curve(values, t, mask=mask)
    )


def test_threshold_order_is_free():
    values = smooth_field((7, 8, 9), 11)
    t = thresholds_for(values)
    order = np.random.default_rng(0).permutation(t.size)
    np.testing.assert_array_equal(euler_characteristic_curve(values, t[order]), euler_characteristic_curve(values, t)[order])


def test_euler_equals_alternating_betti_sum():
    values = smooth_field((9, 9, 9), 21)
    t = thresholds_for(values)
    betti = betti_curves(values, t)
    assert betti.shape == (4, t.size) and np.all(betti >= 0) and np.all(betti[3] == 0)
    np.testing.assert_array_equal(betti[0] - betti[1] + betti[2], euler_characteristic_curve(values, t))


def test_persistence_diagram_convention():
    values = np.zeros((3, 7, 3))
    values[1, 1, 1] = 0.9
    values[1, 5, 1] = 0.6
    diagram = persistence_diagram(values)
    h0 = sorted((b, d) for dim, b, d in diagram if dim == 0)
    # superlevel: the 0.6 component is born at 0.6 and merges at 0; the 0.9 one lives forever
    assert h0 == [(0.6, 0.0), (0.9, -np.inf)]
    sub = persistence_diagram(values, superlevel=False)
    assert [(dim, b, d) for dim, b, d in sub if np.isinf(d)] == [(0, 0.0, np.inf)]
    masked = persistence_diagram(values, mask=values > 0.5)
    assert sorted((b, d) for dim, b, d in masked) == [(0.6, -np.inf), (0.9, -np.inf)]


def test_default_thresholds():
    t = default_thresholds()
    assert t.shape == (100,) and t[0] == 0.0 and t[-1] == 1.0
    np.testing.assert_allclose(np.diff(t), 1 / 99)
    assert default_thresholds(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SegXAIInputError, match="n"):
            default_thresholds(bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(values=np.zeros((3, 3))), "values"),
        (dict(values=np.zeros((0, 3, 3))), "values"),
        (dict(values=np.full((2, 2, 2), np.nan)), "values"),
        (dict(values=np.array([[["a"]]])), "values"),
        (dict(thresholds=np.zeros((2, 2))), "thresholds"),
        (dict(thresholds=np.array([0.1, np.nan])), "thresholds"),
        (dict(mask=np.ones((2, 2, 3), bool)), "mask"),
        (dict(mask=np.full((2, 2, 2), 0.5)), "mask"),
    ],
)
@pytest.mark.parametrize("func", [euler_characteristic_curve, euler_characteristic_curve_gudhi, betti_curves])
def test_bad_input(func, kwargs, name):
    args = dict(values=np.zeros((2, 2, 2)), thresholds=np.array([0.5]), mask=None)
    args.update(kwargs)
    with pytest.raises(SegXAIInputError, match=name):
        func(**args)


def test_large_volume_runs():
    """128^3 with 100 thresholds (speed sanity; no timing assertion)."""
    values = gaussian_filter(np.random.default_rng(0).random((128, 128, 128)), 2.0)
    values = (values - values.min()) / np.ptp(values)
    chi = euler_characteristic_curve(values, default_thresholds(100))
    assert chi.shape == (100,) and chi.dtype == np.int64
    assert chi[0] == 1 and chi[-1] == 1  # the whole box at t = 0; the single maximum voxel at t = 1
