"""White-matter lesion phantoms built on the bundled head T1 (METHODS.md section 8, paper 001).

A phantom is the sample head, randomly and smoothly deformed, with ellipsoidal "MS lesions"
placed inside its white matter: hyperintense on a FLAIR-like channel synthesised from the
tissue map, hypointense on the T1. Lesions carry partial volume (supersampled occupancy) and
the images can be degraded (bias field, noise, blur, coarser resolution) to build cohorts of
varied difficulty. Everything random comes from ``seed``; the same seed gives bit-identical
output.

Independent random streams
--------------------------
``seed`` is split (:class:`numpy.random.SeedSequence`) into one stream per component:
deformation, lesions, bias field and noise. Changing a lesion parameter therefore leaves the
deformation, the bias field and the noise of a case unchanged, and ``lesion_contrast=0`` gives
exactly the image of the same case without lesions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from ..image import Image, SegXAIInputError
from ..sample_data import WHITE_MATTER_LABEL, SampleHead

__all__ = [
    "LesionPhantom",
    "make_lesion_phantom",
    "FLAIR_TISSUE_INTENSITY",
    "T1_LESION_FACTOR",
    "FLAIR_LESION_FACTOR",
]

#: FLAIR-like intensity (0..255 scale, as the T1) of each class of the sample's k-means tissue
#: map: 1 air, 2 and 3 extra-cerebral tissue, 4 CSF (suppressed, dark), 5 grey matter,
#: 6 white matter (darker than grey matter on FLAIR), 0 a few CSF-like voxels.
FLAIR_TISSUE_INTENSITY = {0: 30.0, 1: 0.0, 2: 60.0, 3: 130.0, 4: 25.0, 5: 125.0, 6: 100.0}

#: Lesion intensity relative to the tissue it replaces at ``lesion_contrast=1``:
#: T1 multiplied by ``exp(-0.5 c)`` (white matter ~101 -> ~61, between CSF and grey matter),
#: FLAIR by ``exp(0.7 c)`` (white matter ~100 -> ~200, brighter than any brain tissue).
T1_LESION_FACTOR = -0.5
FLAIR_LESION_FACTOR = 0.7

#: Sub-samples per axis used for the partial-volume occupancy of a lesion.
_SUPERSAMPLING = 4
#: Smallest fraction of a lesion's occupancy that must lie in white matter.
_MIN_WM_FRACTION = 0.6
#: Control-point spacing (mm) of the random deformation and of the bias field.
_DEFORMATION_CONTROL_MM = 40.0
_BIAS_CONTROL_POINTS = 3


@dataclass(frozen=True)
class LesionPhantom:
    """A synthetic lesion case on the grid of the head T1 it was made from.

    Attributes
    ----------
    image : Image
        Two float32 channels ``("FLAIR", "T1")``.
    lesions : Image
        One uint16 channel of lesion instance labels ``1..n`` (0 = background).
    brain : Image
        One uint8 channel, the brain mask deformed as the image.
    tissue : Image or None
        The k-means tissue map deformed as the image (6 = white matter, 5 = grey matter).
    """

    image: Image
    lesions: Image
    brain: Image
    tissue: Optional[Image] = None

    @property
    def truth(self) -> np.ndarray:
        """Boolean lesion mask ``(I, J, K)``."""
        return self.lesions.array[0] > 0

    @property
    def num_lesions(self) -> int:
        """Number of lesion instances."""
        return int(self.lesions.array.max())

    @property
    def white_matter(self) -> np.ndarray:
        """Boolean (deformed) white-matter mask ``(I, J, K)`` inside the brain."""
        if self.tissue is None:
            raise SegXAIInputError("white_matter: this phantom carries no tissue map")
        return (self.tissue.array[0] == WHITE_MATTER_LABEL) & (self.brain.array[0] > 0)


# ---- parameter checks ------------------------------------------------------------------------
def _check_range(name: str, value, integer: bool, minimum: float, strict: bool) -> tuple:
    try:
        low, high = value
        numbers = (float(low), float(high))
    except (TypeError, ValueError):
        raise SegXAIInputError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    for v in numbers:
        is_bool = isinstance(low, bool) or isinstance(high, bool)
        if integer and (is_bool or not (np.isfinite(v) and v.is_integer())):
            raise SegXAIInputError(f"{name} must hold integers, got {value!r}")
        if not np.isfinite(v):
            raise SegXAIInputError(f"{name} must be finite, got {value!r}")
        if (strict and v <= minimum) or (not strict and v < minimum):
            bound = ">" if strict else ">="
            raise SegXAIInputError(f"{name} must be {bound} {minimum:g}, got {value!r}")
    if numbers[0] > numbers[1]:
        raise SegXAIInputError(f"{name}: min must not exceed max, got {value!r}")
    if integer:
        return int(numbers[0]), int(numbers[1])
    return numbers


def _check_scalar(name: str, value: float, minimum: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(value) or value < minimum:
        raise SegXAIInputError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return value


# ---- random smooth fields --------------------------------------------------------------------
def _upsampling_matrix(size: int, control: int) -> np.ndarray:
    """``(size, control)`` weights of natural cubic-spline interpolation from ``control``
    evenly spaced points spanning ``size`` samples."""
    nodes = np.linspace(0.0, size - 1.0, control)
    return CubicSpline(nodes, np.eye(control), bc_type="natural")(np.arange(size, dtype=float))


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable cubic-spline upsampling of a coarse 3D grid of values to ``shape``."""
    wi, wj, wk = (_upsampling_matrix(n, c) for n, c in zip(shape, coarse.shape))
    return np.einsum("ia,jb,kc,abc->ijk", wi, wj, wk, coarse, optimize=True)


def _smooth_random_field(
    rng: np.random.Generator, shape: tuple[int, int, int], control: tuple[int, int, int]
) -> np.ndarray:
    """A smooth random field on ``shape``: Gaussian values on a ``control`` grid, cubic-upsampled,
    scaled to a maximum absolute value of 1."""
    field = _upsample(rng.standard_normal(control), shape)
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def _random_displacement(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, magnitude_mm: float
) -> np.ndarray:
    """Smooth displacement ``(3, I, J, K)`` in voxels, at most ``magnitude_mm`` long anywhere."""
    control = tuple(max(3, int(np.ceil(n * s / _DEFORMATION_CONTROL_MM)) + 1) for n, s in zip(shape, spacing))
    field_mm = np.stack([_upsample(c, shape) for c in rng.standard_normal((3,) + control)])
    length = np.sqrt((field_mm**2).sum(axis=0)).max()
    if length > 0:
        field_mm *= magnitude_mm / length
    return field_mm / spacing[:, None, None, None]


def _warp(volume: np.ndarray, coordinates: Optional[np.ndarray], order: int) -> np.ndarray:
    if coordinates is None:
        return volume.copy()
    return ndimage.map_coordinates(volume, coordinates, order=order, mode="nearest")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _ellipsoid_occupancy(
    spacing: np.ndarray, half: np.ndarray, radii: np.ndarray, rotation: np.ndarray, samples: int = _SUPERSAMPLING
) -> np.ndarray:
    """Fraction of each voxel of a box ``2 * half + 1`` inside an ellipsoid centred on the box's
    central voxel centre, by ``samples**3`` sub-samples per voxel (physical mm)."""
    sub = (np.arange(samples) + 0.5) / samples - 0.5
    axes = [((np.arange(-h, h + 1)[:, None] + sub[None, :]).ravel() * sp) for h, sp in zip(half, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (I*s, J*s, K*s, 3) in mm
    local = grid @ rotation  # coordinates along the ellipsoid's axes
    inside = ((local / radii) ** 2).sum(axis=-1) <= 1.0
    shape = tuple(int(2 * h + 1) for h in half)
    return inside.reshape(shape[0], samples, shape[1], samples, shape[2], samples).mean(axis=(1, 3, 5))


def _place_lesions(
    rng: np.random.Generator,
    white_matter: np.ndarray,
    brain: np.ndarray,
    spacing: np.ndarray,
    count: int,
    radius_mm: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy (float, 0..1) and instance labels (uint16) of ``count`` non-touching lesions."""
    shape = white_matter.shape
    occupancy = np.zeros(shape, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.uint16)
    reserved = np.zeros(shape, dtype=bool)  # lesion supports dilated by one voxel
    if count == 0:
        return occupancy, labels
    candidates = np.argwhere(white_matter)
    wm_volume = len(candidates) * float(np.prod(spacing))
    if count * 4.0 / 3.0 * np.pi * radius_mm[0] ** 3 > 0.5 * wm_volume:
        raise SegXAIInputError(
            f"{count} lesions of radius_mm={radius_mm} cannot fit into {wm_volume / 1000:.0f} ml of white "
            "matter; lower n_lesions or radius_mm"
        )
    half = np.ceil(radius_mm[1] / spacing).astype(int) + 1
    structure = ndimage.generate_binary_structure(3, 3)
    placed, attempts, max_attempts = 0, 0, 100 * count + 100
    while placed < count:
        attempts += 1
        if attempts > max_attempts:
            raise SegXAIInputError(
                f"could not fit {count} non-overlapping lesions of radius_mm={radius_mm} into the "
                "white matter; lower n_lesions or radius_mm"
            )
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(radius_mm[0], radius_mm[1], size=3)
        rotation = _random_rotation(rng)
        low, high = centre - half, centre + half + 1
        if reserved[tuple(centre)] or np.any(low < 0) or np.any(high > np.asarray(shape)):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        # cheap screen on voxel centres, then the supersampled occupancy
        rough = _ellipsoid_occupancy(spacing, half, radii, rotation, samples=1) > 0
        if np.any(rough & reserved[box]) or not np.all(brain[box][rough]):
            continue
        if white_matter[box][rough].mean() < _MIN_WM_FRACTION:
            continue
        occ = _ellipsoid_occupancy(spacing, half, radii, rotation)
        support, label = occ > 0, occ >= 0.5
        if not label.any() or np.any(support & reserved[box]) or not np.all(brain[box][support]):
            continue
        if (occ * white_matter[box]).sum() < _MIN_WM_FRACTION * occ.sum():
            continue
        placed += 1
        occupancy[box] += occ
        labels[box][label] = placed
        reserved[box] |= ndimage.binary_dilation(support, structure=structure)
    return np.clip(occupancy, 0.0, 1.0), labels


# ---- image degradations ----------------------------------------------------------------------
def _coarsen(volume: np.ndarray, factor: float) -> np.ndarray:
    """Resample ``volume`` onto a grid ``factor`` times coarser (anti-aliased) and back (linear)."""
    if factor <= 1.0:
        return volume
    smoothed = ndimage.gaussian_filter(volume, sigma=(factor - 1.0) / 2.0, mode="nearest")
    shape = np.asarray(volume.shape)
    low_shape = np.maximum(1, np.ceil((shape - 1) / factor).astype(int) + 1)
    low = ndimage.map_coordinates(
        smoothed, np.meshgrid(*[np.arange(n) * factor for n in low_shape], indexing="ij"), order=1, mode="nearest"
    )
    return ndimage.map_coordinates(
        low, np.meshgrid(*[np.arange(n) / factor for n in shape], indexing="ij"), order=1, mode="nearest"
    )


def make_lesion_phantom(
    head: SampleHead,
    seed: int,
    n_lesions: tuple[int, int] = (3, 8),
    radius_mm: tuple[float, float] = (3.0, 8.0),
    lesion_contrast: float = 1.0,
    noise: float = 0.03,
    bias_field: float = 0.2,
    deformation_mm: float = 3.0,
    blur_mm: float = 0.0,
    resolution_factor: float = 1.0,
) -> LesionPhantom:
    """Make a two-channel (FLAIR, T1) white-matter lesion case from the sample head.

    Steps: (1) a smooth random displacement field (cubic B-spline-like upsampling of Gaussian
    control points every ~40 mm, longest displacement ``deformation_mm``) warps the T1 and the
    FLAIR-like channel (linear) and the tissue map and brain mask (nearest); (2) ellipsoidal
    lesions with three semi-axes drawn uniformly from ``radius_mm`` (physical mm, so the
    2 x 2 x 3 mm voxels are respected) and a random orientation are centred on white-matter
    voxels, each with at least 60 % of its volume in white matter, fully inside the brain and
    not touching the others; (3) each lesion's partial-volume occupancy ``p`` (4 x 4 x 4
    sub-samples per voxel) mixes the intensities, ``I * (1 + p * (exp(a c) - 1))`` with
    ``a = 0.7`` on FLAIR and ``a = -0.5`` on T1, ``c = lesion_contrast``, and the label is
    ``p >= 0.5``; (4) degradations: per-channel multiplicative bias field, coarser resolution,
    blur, then Gaussian noise.

    Parameters
    ----------
    head : SampleHead
        The head to start from (:func:`SegXAILib.sample_data.load_sample_head`).
    seed : int
        Seed of every random draw; the same seed gives bit-identical output.
    n_lesions : (int, int)
        Inclusive range of the number of lesions; ``(0, 0)`` gives a lesion-free case.
    radius_mm : (float, float)
        Range of the lesion semi-axes in mm (each of the three drawn independently).
    lesion_contrast : float
        Lesion contrast scale, >= 0: 1 clear, 0 invisible (image identical to no lesions).
    noise : float
        Standard deviation of the Gaussian noise as a fraction of each channel's intensity
        range (max - min of the lesion-free, noise-free channel).
    bias_field : float
        Strength of the smooth multiplicative bias field ``exp(bias_field * s)``, ``|s| <= 1``.
    deformation_mm : float
        Longest displacement of the random smooth deformation; 0 keeps the head's anatomy.
    blur_mm : float
        Standard deviation (mm) of an extra Gaussian blur of the image; 0 for none.
    resolution_factor : float
        >= 1; values above 1 resample the image onto a grid that many times coarser and back.

    Returns
    -------
    LesionPhantom
        Image, lesion instances, brain mask and tissue map, all on ``head.t1``'s grid
        (identical ``ijk_to_ras``).

    Raises
    ------
    SegXAIInputError
        For a bad parameter (the message names it), or lesions that cannot be fitted.
    """
    if not isinstance(head, SampleHead):
        raise SegXAIInputError(f"head must be a SampleHead (load_sample_head()), got {type(head).__name__}")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise SegXAIInputError(f"seed must be a non-negative integer, got {seed}")
    n_lesions = _check_range("n_lesions", n_lesions, integer=True, minimum=0, strict=False)
    radius_mm = _check_range("radius_mm", radius_mm, integer=False, minimum=0.0, strict=True)
    lesion_contrast = _check_scalar("lesion_contrast", lesion_contrast, 0.0)
    noise = _check_scalar("noise", noise, 0.0)
    bias_field = _check_scalar("bias_field", bias_field, 0.0)
    deformation_mm = _check_scalar("deformation_mm", deformation_mm, 0.0)
    blur_mm = _check_scalar("blur_mm", blur_mm, 0.0)
    resolution_factor = _check_scalar("resolution_factor", resolution_factor, 1.0)

    deform_rng, lesion_rng, bias_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    grid = head.t1
    shape = grid.spatial_shape
    spacing = grid.spacing

    # ---- clean channels on the undeformed head
    t1 = head.t1.array[0].astype(np.float64)
    tissue = head.tissue.array[0]
    lookup = np.zeros(int(max(tissue.max(), max(FLAIR_TISSUE_INTENSITY))) + 1)
    for label, value in FLAIR_TISSUE_INTENSITY.items():
        lookup[label] = value
    flair = ndimage.gaussian_filter(lookup[tissue.astype(np.intp)], sigma=0.7, mode="nearest")

    # ---- (1) smooth random deformation
    coordinates = None
    if deformation_mm > 0:
        displacement = _random_displacement(deform_rng, shape, spacing, deformation_mm)
        coordinates = np.indices(shape, dtype=np.float64) + displacement
    t1 = _warp(t1, coordinates, order=1)
    flair = _warp(flair, coordinates, order=1)
    tissue = _warp(tissue, coordinates, order=0)
    brain = _warp(head.brain.array[0], coordinates, order=0) > 0
    white_matter = (tissue == WHITE_MATTER_LABEL) & brain

    # ---- (2) lesions
    count = int(lesion_rng.integers(n_lesions[0], n_lesions[1], endpoint=True))
    occupancy, labels = _place_lesions(lesion_rng, white_matter, brain, spacing, count, radius_mm)

    # ---- (3) intensities
    channels = []
    for clean, exponent in ((flair, FLAIR_LESION_FACTOR), (t1, T1_LESION_FACTOR)):
        value_range = float(clean.max() - clean.min())
        factor = np.exp(exponent * lesion_contrast) - 1.0
        image = clean * (1.0 + occupancy * factor) if factor != 0.0 else clean.copy()
        # ---- (4) degradations
        if bias_field > 0:
            image = image * np.exp(bias_field * _smooth_random_field(bias_rng, shape, (_BIAS_CONTROL_POINTS,) * 3))
        image = _coarsen(image, resolution_factor)
        if blur_mm > 0:
            image = ndimage.gaussian_filter(image, sigma=blur_mm / spacing, mode="nearest")
        if noise > 0:
            image = image + noise_rng.normal(0.0, noise * value_range, size=shape)
        channels.append(image.astype(np.float32))

    return LesionPhantom(
        image=grid.with_array(np.stack(channels), ("FLAIR", "T1")),
        lesions=grid.with_array(labels[None], ("lesions",)),
        brain=grid.with_array(brain.astype(np.uint8)[None], ("brain",)),
        tissue=grid.with_array(tissue.astype(head.tissue.array.dtype)[None], ("tissue",)),
    )
