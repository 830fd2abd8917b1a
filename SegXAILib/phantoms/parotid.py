"""Synthetic parotid-gland phantoms S1-S6 (METHODS.md section 8, paper 000, Strijbis et al.).

A head-sized ellipsoid of density ``rho_HN`` in air, with Gaussian noise; a sphere (the
"parotid gland", the label) folded around one end of a rod (the "mandible bone"). The six
variants cross three sphere densities with the rod present or absent; the numbering follows
the paper's results section (S1: no sphere contrast, no rod; S2: no contrast, rod; S3: 5 %
contrast, no rod; S4: 5 % contrast, rod; S5: 5x density, no rod; S6: 5x density, rod).

Densities
---------
The paper gives ``rho_MB = 1.0`` for a present rod and ``rho_MB = 0.1`` for an absent one,
which METHODS.md calls "background-like"; the head density is therefore ``rho_HN = 0.1`` here,
so that an absent rod is exactly indistinguishable from the background. Air is 0.

=======  ======================  =====================  =============
Variant  Sphere density rho_PG   Rod (rho_MB)           Paper's words
=======  ======================  =====================  =============
S1       1.00 x rho_HN  (0.100)  absent (0.1 = rho_HN)  no contrast, no rod
S2       1.00 x rho_HN  (0.100)  present (1.0)          no contrast, rod
S3       1.05 x rho_HN  (0.105)  absent (0.1 = rho_HN)  low contrast, no rod
S4       1.05 x rho_HN  (0.105)  present (1.0)          low contrast, rod
S5       5.00 x rho_HN  (0.500)  absent (0.1 = rho_HN)  high contrast, no rod
S6       5.00 x rho_HN  (0.500)  present (1.0)          high contrast, rod
=======  ======================  =====================  =============

Geometry
--------
Each case draws (all in physical mm, from ``seed``): the head's three semi-axes (72-95 % of the
half field of view along each axis), the sphere's radius (17-27 % of the smallest half field of
view by default; ``sphere_radius_fraction`` widens the range, so that a QA cohort can vary the
true gland size independently of the image quality) and centre (inside the head), the rod's
direction (uniform on the sphere; this is the sphere's orientation too, since a sphere has none
of its own) and radius (1-2 voxel sizes, at most 40 % of the sphere's). The rod starts at the
sphere's centre and runs to the head's surface (as the mandible runs from the gland to the
chin; at least the sphere's radius plus 30 % of the smallest half field of view long), so its
one end inside the head marks the gland, which even without sphere contrast (S2) the image
determines. The label is the sphere minus the rod's voxels (gland and bone do not overlap; a
draw that would cut the gland into pieces is redrawn). Without a rod, nothing is drawn there:
the whole sphere is gland and the rod mask is empty. Sphere and rod lie inside the head, at
least one voxel size from its surface. The geometry does not depend on the variant: one seed
gives the same head, sphere and rod position in S1 .. S6, only the densities differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..image import Image, SegXAIInputError, geometry_matrix

__all__ = [
    "ParotidVariant",
    "ParotidPhantom",
    "PAROTID_VARIANTS",
    "HEAD_DENSITY",
    "ROD_DENSITY",
    "ABSENT_ROD_DENSITY",
    "AIR_DENSITY",
    "make_parotid_phantom",
    "parotid_grid",
]

#: rho_HN, density of the head ellipsoid.
HEAD_DENSITY = 0.1
#: rho_MB of a present rod.
ROD_DENSITY = 1.0
#: rho_MB of an absent rod (the paper's 0.1, equal to rho_HN: background-like).
ABSENT_ROD_DENSITY = 0.1
#: Density outside the head.
AIR_DENSITY = 0.0


@dataclass(frozen=True)
class ParotidVariant:
    """One of the six synthetic situations.

    Attributes
    ----------
    name : str
        ``"S1"`` .. ``"S6"``.
    sphere_ratio : float
        Sphere density over head density, ``rho_PG / rho_HN``: 1.0, 1.05 or 5.0.
    rod : bool
        Whether the rod (density 1.0) is present.
    description : str
        The situation in words.
    """

    name: str
    sphere_ratio: float
    rod: bool
    description: str

    @property
    def sphere_density(self) -> float:
        """rho_PG."""
        return self.sphere_ratio * HEAD_DENSITY

    @property
    def rod_density(self) -> float:
        """rho_MB: 1.0 when present, background-like 0.1 when absent."""
        return ROD_DENSITY if self.rod else ABSENT_ROD_DENSITY


#: The six variants, numbered as in the paper's results (S1 no contrast / no rod ... S6 high / rod).
PAROTID_VARIANTS: dict[str, ParotidVariant] = {
    "S1": ParotidVariant("S1", 1.0, False, "sphere density equal to background, no rod"),
    "S2": ParotidVariant("S2", 1.0, True, "sphere density equal to background, rod present"),
    "S3": ParotidVariant("S3", 1.05, False, "sphere 5 % denser than background, no rod"),
    "S4": ParotidVariant("S4", 1.05, True, "sphere 5 % denser than background, rod present"),
    "S5": ParotidVariant("S5", 5.0, False, "sphere 5x background density, no rod"),
    "S6": ParotidVariant("S6", 5.0, True, "sphere 5x background density, rod present"),
}


@dataclass(frozen=True)
class ParotidPhantom:
    """A synthetic parotid case.

    Attributes
    ----------
    image : Image
        One float32 channel ``("CT",)`` of densities plus noise.
    label : Image
        One uint8 channel, 1 = sphere ("gland").
    rod : Image
        One uint8 channel, 1 = rod ("mandible"); all zeros when the variant has no rod.
    variant : str
        The variant's name.
    """

    image: Image
    label: Image
    rod: Image
    variant: str = ""


def parotid_grid(shape: Sequence[int] = (48, 48, 48), spacing: Sequence[float] = (2.0, 2.0, 2.0)) -> np.ndarray:
    """IJK-to-RAS matrix of an identity-direction grid of ``shape`` and ``spacing`` centred at the origin."""
    shape_arr = np.asarray(shape, dtype=float)
    spacing_arr = np.asarray(spacing, dtype=float)
    return geometry_matrix(spacing_arr, -(shape_arr - 1.0) / 2.0 * spacing_arr, np.eye(3))


def _check_grid(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    try:
        shape_t = tuple(shape)
        spacing_t = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise SegXAIInputError(
            f"shape and spacing must be sequences of 3 numbers, got {shape!r}, {spacing!r}"
        ) from None
    if len(shape_t) != 3 or any(isinstance(n, bool) or not float(n).is_integer() or int(n) < 16 for n in shape_t):
        raise SegXAIInputError(f"shape must be 3 integers >= 16, got {shape!r}")
    if len(spacing_t) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise SegXAIInputError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return tuple(int(n) for n in shape_t), np.asarray(spacing_t)  # type: ignore[return-value]


def _check_radius_fraction(fraction: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(f) for f in fraction)
    except (TypeError, ValueError):
        raise SegXAIInputError(
            f"sphere_radius_fraction must be two numbers (low, high), got {fraction!r}"
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 < low <= high <= 0.4):
        raise SegXAIInputError(
            f"sphere_radius_fraction must satisfy 0 < low <= high <= 0.4, got {fraction!r}"
        )
    return low, high


def _random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def make_parotid_phantom(
    variant: str,
    seed: int,
    shape: Sequence[int] = (48, 48, 48),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    noise: float = 0.02,
    sphere_radius_fraction: tuple[float, float] = (0.17, 0.27),
) -> ParotidPhantom:
    """Make one synthetic parotid case of a variant ``"S1"`` .. ``"S6"``.

    Parameters
    ----------
    variant : str
        Key of :data:`PAROTID_VARIANTS`.
    seed : int
        Seed of every random draw; the same seed gives bit-identical output.
    shape : (int, int, int)
        Grid size in voxels (each >= 16).
    spacing : (float, float, float)
        Voxel size in mm.
    noise : float
        Standard deviation of the additive Gaussian noise (densities: head 0.1, rod 1.0); the
        default 0.02 hides the 5 % sphere contrast (0.005) voxel by voxel. 0 for none.
    sphere_radius_fraction : (float, float)
        ``(low, high)``: the sphere's radius is drawn uniformly from ``[low, high)`` times the
        smallest half field of view, ``0 < low <= high <= 0.4`` (a larger sphere cannot keep
        inside the smallest head with a rod of 30 % of the half field of view beside it). The
        default ``(0.17, 0.27)`` gives the same cases as before the parameter existed.

    Returns
    -------
    ParotidPhantom
        Image, sphere label and rod mask on :func:`parotid_grid` ``(shape, spacing)``.

    Raises
    ------
    SegXAIInputError
        For an unknown ``variant`` or a bad ``seed``, ``shape``, ``spacing``, ``noise`` or
        ``sphere_radius_fraction``.
    """
    if variant not in PAROTID_VARIANTS:
        raise SegXAIInputError(f"variant must be one of {sorted(PAROTID_VARIANTS)}, got {variant!r}")
    spec = PAROTID_VARIANTS[variant]
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise SegXAIInputError(f"seed must be a non-negative integer, got {seed}")
    shape_t, spacing_arr = _check_grid(shape, spacing)
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"noise must be a number, got {noise!r}") from None
    if not np.isfinite(noise) or noise < 0:
        raise SegXAIInputError(f"noise must be a finite number >= 0, got {noise!r}")
    radius_low, radius_high = _check_radius_fraction(sphere_radius_fraction)

    geometry_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    ijk_to_ras = parotid_grid(shape_t, spacing_arr)
    # physical coordinates (mm) of the voxel centres, (I, J, K, 3), centred on the origin
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape_t, spacing_arr)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    half_fov = np.asarray(shape_t) * spacing_arr / 2.0
    scale = float(half_fov.min())

    head_axes = geometry_rng.uniform(0.72, 0.95, size=3) * half_fov
    head = ((points / head_axes) ** 2).sum(axis=-1) <= 1.0
    # sphere and rod must keep one voxel size away from the head's surface
    inner = ndimage.distance_transform_edt(head, sampling=spacing_arr) > float(spacing_arr.max())
    for _attempt in range(1000):
        # uniform(low, high) with the default floats draws exactly what the former constants did
        sphere_radius = geometry_rng.uniform(radius_low, radius_high) * scale
        rod_radius = min(geometry_rng.uniform(1.0, 2.0) * float(spacing_arr.max()), 0.4 * sphere_radius)
        direction = _random_unit_vector(geometry_rng)
        centre = geometry_rng.uniform(-1.0, 1.0, size=3) * head_axes
        if (centre / head_axes) @ (centre / head_axes) > 1.0:
            continue
        offset = points - centre
        distance2 = (offset**2).sum(axis=-1)
        sphere = distance2 <= sphere_radius**2
        # the rod's geometry is drawn for every variant, so that one seed gives the same case
        # (head, sphere, rod position) in all six variants; only the densities differ
        # The rod runs from the sphere's centre to the head's surface (as the mandible runs
        # from the gland to the chin): its end inside the head marks the gland, so even
        # without sphere contrast (S1/S2) the gland is determined by the image.
        along = offset @ direction
        across2 = np.maximum(distance2 - along**2, 0.0)
        rod = (along >= 0.0) & (across2 <= rod_radius**2) & inner
        rod_length = float(along[rod].max()) if rod.any() else 0.0
        # inside the head, long enough to see, and the gland (sphere minus rod) one
        # face-connected piece
        if (
            sphere.any()
            and not np.any(sphere & ~inner)
            and rod_length >= sphere_radius + 0.3 * scale
            and ndimage.label(sphere & ~rod)[1] == 1
            and ndimage.label(rod)[1] == 1  # a thin oblique rod can break into pieces on the grid
        ):
            break
    else:  # pragma: no cover - the ranges above fit within a few attempts
        raise SegXAIInputError(f"shape/spacing {shape_t}/{tuple(spacing_arr)}: could not place sphere and rod")
    if not spec.rod:
        rod = np.zeros(shape_t, dtype=bool)  # absent: background-like, nothing drawn
    gland = sphere & ~rod

    density = np.where(head, HEAD_DENSITY, AIR_DENSITY)
    density[gland] = spec.sphere_density
    density[rod] = spec.rod_density
    if noise > 0:
        density = density + noise_rng.normal(0.0, noise, size=shape_t)

    return ParotidPhantom(
        image=Image(density.astype(np.float32)[None], ijk_to_ras, ("CT",)),
        label=Image(gland.astype(np.uint8)[None], ijk_to_ras.copy(), ("gland",)),
        rod=Image(rod.astype(np.uint8)[None], ijk_to_ras.copy(), ("mandible",)),
        variant=spec.name,
    )
