"""Euler characteristic curves of cubical filtrations of 3D scalar fields.

The filtration follows GUDHI's ``CubicalComplex(top_dimensional_cells=...)`` convention:
the top-dimensional cells (cubes) are the voxels, and a lower-dimensional cell (square,
edge, vertex) enters the complex together with the first of its adjacent voxels. For
sublevel sets a voxel ``v`` is present at threshold ``t`` when ``values[v] <= t``; for
superlevel sets (the default, METHODS.md section 6) when ``values[v] >= t``, which is the
sublevel filtration of ``-values`` at ``-t``. Voxels outside ``mask`` never enter.

:func:`euler_characteristic_curve` counts cells (``chi = V - E + F - Q``) for all
thresholds at once, without persistence; :func:`euler_characteristic_curve_gudhi`,
:func:`betti_curves` and :func:`persistence_diagram` use GUDHI and are the oracle and the
route to persistence diagrams.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..image import SegXAIInputError

__all__ = [
    "default_thresholds",
    "euler_characteristic_curve",
    "euler_characteristic_curve_gudhi",
    "betti_curves",
    "persistence_diagram",
]


def default_thresholds(n: int = 100) -> np.ndarray:
    """Return ``n`` thresholds evenly spaced on ``[0, 1]`` (the normalised-saliency grid).

    Parameters
    ----------
    n : int
        Number of thresholds, at least 1 (``n == 1`` gives ``[0.0]``).

    Returns
    -------
    thresholds : ndarray, shape (n,), float64
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SegXAIInputError(f"n must be a positive integer, got {n!r}")
    return np.linspace(0.0, 1.0, int(n))


def _validate(
    values: np.ndarray, thresholds: np.ndarray | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    values = np.asarray(values)
    if values.ndim != 3:
        raise SegXAIInputError(f"values must be a 3D array (D, H, W), got shape {values.shape}")
    if values.size == 0:
        raise SegXAIInputError(f"values must not be empty, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool) or np.iscomplexobj(values):
        raise SegXAIInputError(f"values must be a real numeric array, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise SegXAIInputError("values must be finite (no NaN or inf); use mask to exclude voxels")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise SegXAIInputError(f"mask must have the shape of values {values.shape}, got {mask.shape}")
        if mask.dtype != bool:
            if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
                raise SegXAIInputError("mask must be boolean (or 0/1)")
            mask = mask.astype(bool)
    if thresholds is not None:
        thresholds = np.asarray(thresholds)
        if thresholds.ndim != 1:
            raise SegXAIInputError(f"thresholds must be a 1D array (T,), got shape {thresholds.shape}")
        if not np.issubdtype(thresholds.dtype, np.number) or np.iscomplexobj(thresholds):
            raise SegXAIInputError(f"thresholds must be real numbers, got dtype {thresholds.dtype}")
        thresholds = thresholds.astype(np.float64)
        if np.any(np.isnan(thresholds)):
            raise SegXAIInputError("thresholds must not contain NaN")
    return values, thresholds, mask


def _sublevel_view(
    values: np.ndarray, mask: np.ndarray | None, superlevel: bool
) -> np.ndarray:
    """Voxel filtration values as a sublevel filtration; +inf for voxels that never enter."""
    f = -values if superlevel else values.copy()
    if mask is not None:
        f[~mask] = np.inf
    return f


def _to_sublevel_thresholds(thresholds: np.ndarray, superlevel: bool) -> np.ndarray:
    return -thresholds if superlevel else thresholds


def euler_characteristic_curve(
    values: np.ndarray,
    thresholds: np.ndarray,
    mask: np.ndarray | None = None,
    superlevel: bool = True,
) -> np.ndarray:
    """Euler characteristic of the cubical (super/sub)level complex at each threshold.

    Vectorised cell counting: every vertex, edge, square and cube of the voxel grid gets
    the filtration value of the first adjacent voxel to enter; the cells present at each
    threshold are counted with :func:`numpy.searchsorted`, so the cost is
    ``O(cells log cells + T log cells)`` with no loop over thresholds.

    Parameters
    ----------
    values : ndarray, shape (D, H, W)
        Finite real voxel values (e.g. a normalised saliency map).
    thresholds : ndarray, shape (T,)
        Thresholds, in any order. For ``superlevel`` a voxel is present at ``t`` when
        ``values >= t``; otherwise when ``values <= t``.
    mask : ndarray of bool, shape (D, H, W), optional
        Voxels outside the mask never enter the complex.
    superlevel : bool
        Superlevel (default, as in METHODS.md section 6) or sublevel filtration.

    Returns
    -------
    chi : ndarray, shape (T,), int64
        ``V - E + F - Q`` of the complex at each threshold; equals
        ``b0 - b1 + b2`` (see :func:`euler_characteristic_curve_gudhi`).
    """
    values, thresholds, mask = _validate(values, thresholds, mask)
    f = _sublevel_view(values, mask, superlevel)
    t = _to_sublevel_thresholds(thresholds, superlevel)
    padded = np.pad(f, 1, mode="constant", constant_values=np.inf)
    chi = np.zeros(t.shape, dtype=np.int64)
    # A cell is identified by the set of axes along which it has extent: the cube spans
    # all three, a vertex none. Along a spanned axis the cell sits inside one voxel
    # (padded slice 1:-1); along any other axis it sits on the boundary between two
    # voxels (padded index i and i + 1, i = 0..n) and takes the minimum of the two.
    for k in range(4):
        sign = -1 if k % 2 else 1
        for span in itertools.combinations(range(3), k):
            cell = padded
            for axis in range(3):
                if axis in span:
                    continue
                lo = [slice(None)] * 3
                hi = [slice(None)] * 3
                lo[axis] = slice(0, -1)
                hi[axis] = slice(1, None)
                cell = np.minimum(cell[tuple(lo)], cell[tuple(hi)])
            inner = tuple(slice(1, -1) if axis in span else slice(None) for axis in range(3))
            cell_values = cell[inner].ravel()
            cell_values = np.sort(cell_values[np.isfinite(cell_values)])
            chi += sign * np.searchsorted(cell_values, t, side="right").astype(np.int64)
    return chi


def _gudhi_complex(values: np.ndarray, mask: np.ndarray | None, superlevel: bool):
    try:
        import gudhi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the GUDHI-based topology functions need the 'gudhi' package") from exc
    f = _sublevel_view(values, mask, superlevel)
    # An n-d array is taken with its own shape; the EC and Betti numbers do not depend on
    # the axis order anyway (a transpose is an isomorphism of cubical complexes).
    complex_ = gudhi.CubicalComplex(top_dimensional_cells=np.ascontiguousarray(f))
    complex_.compute_persistence(homology_coeff_field=2, min_persistence=0.0)
    return complex_


def persistence_diagram(
    values: np.ndarray, mask: np.ndarray | None = None, superlevel: bool = True
) -> list[tuple[int, float, float]]:
    """Persistence diagram of the cubical filtration, via GUDHI.

    Parameters
    ----------
    values : ndarray, shape (D, H, W)
    mask : ndarray of bool, shape (D, H, W), optional
    superlevel : bool

    Returns
    -------
    diagram : list of (dim, birth, death)
        In the original value scale: for ``superlevel`` a feature is born at the
        (higher) value where it appears and dies at a lower value; essential features
        die at ``-inf`` (superlevel) or ``+inf`` (sublevel). Features involving only
        masked-out voxels are omitted.
    """
    values, _, mask = _validate(values, None, mask)
    complex_ = _gudhi_complex(values, mask, superlevel)
    out = []
    for dim, (birth, death) in complex_.persistence():
        if not np.isfinite(birth):
            continue
        if superlevel:
            birth, death = -birth, -death
        out.append((int(dim), float(birth), float(death)))
    return out


def betti_curves(
    values: np.ndarray,
    thresholds: np.ndarray,
    mask: np.ndarray | None = None,
    superlevel: bool = True,
) -> np.ndarray:
    """Betti numbers ``b0..b3`` of the level complex at each threshold, via GUDHI.

    Parameters
    ----------
    values : ndarray, shape (D, H, W)
    thresholds : ndarray, shape (T,)
    mask : ndarray of bool, shape (D, H, W), optional
    superlevel : bool

    Returns
    -------
    betti : ndarray, shape (4, T), int64
        ``betti[k, i]`` is the number of persistence intervals of dimension ``k`` born at
        or before and dying after ``thresholds[i]`` (in the filtration direction).
        ``b3`` is always 0 for a subset of the 3D grid.
    """
    values, thresholds, mask = _validate(values, thresholds, mask)
    complex_ = _gudhi_complex(values, mask, superlevel)
    t = _to_sublevel_thresholds(thresholds, superlevel)
    betti = np.zeros((4, t.size), dtype=np.int64)
    for dim in range(4):
        intervals = np.asarray(complex_.persistence_intervals_in_dimension(dim), dtype=np.float64)
        if intervals.size == 0:
            continue
        intervals = intervals.reshape(-1, 2)
        births = np.sort(intervals[:, 0])
        deaths = np.sort(intervals[:, 1])
        # alive at t: birth <= t < death  ->  #(birth <= t) - #(death <= t)
        alive = np.searchsorted(births, t, side="right") - np.searchsorted(deaths, t, side="right")
        betti[dim] = alive
    return betti


def euler_characteristic_curve_gudhi(
    values: np.ndarray,
    thresholds: np.ndarray,
    mask: np.ndarray | None = None,
    superlevel: bool = True,
) -> np.ndarray:
    """Euler characteristic curve from GUDHI persistence: ``chi = b0 - b1 + b2 - b3``.

    Same parameters and result as :func:`euler_characteristic_curve` (the oracle it is
    tested against; slower, as it computes persistence).

    Returns
    -------
    chi : ndarray, shape (T,), int64
    """
    betti = betti_curves(values, thresholds, mask=mask, superlevel=superlevel)
    signs = np.array([1, -1, 1, -1], dtype=np.int64)
    return signs @ betti
