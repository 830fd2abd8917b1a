"""Failure makers for QA calibration cohorts (QA_PROTOCOL.md, "Cohorts"): artefacts and
geometric changes that make a segmentation wrong without giving its quality away through the
predicted volume.

* :func:`kspace_ghosting`: Nyquist (N/2) ghosting, a false copy half a field of view away and
  a weaker original, total signal energy unchanged.
* :func:`kspace_spikes`: a herringbone pattern from a few high-energy k-space points.
* :func:`misregister_channel`: one input channel shifted (physical mm) against the others.
* :func:`similarity_matrix`, :func:`random_similarity`, :func:`transform_case`: scale, rotate
  and translate image and reference together, so the true structure volume changes (by
  ``scale ** 3``) and the reference stays right.
* :func:`perturb_contour`: a given contour shifted, rotated or warped at exactly its voxel
  count, so its volume says nothing about its quality.

Arrays are indexed ``(I, J, K)`` as :class:`~SegXAILib.image.Image` voxels (``(D, H, W)`` in
MONAI's words). Everything random comes from ``seed`` (an int, or a
:class:`numpy.random.Generator` where stated); the same seed gives bit-identical output.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..image import Image, SegXAIInputError
from .lesions import _upsample

__all__ = [
    "kspace_ghosting",
    "kspace_spikes",
    "misregister_channel",
    "similarity_matrix",
    "random_similarity",
    "transform_case",
    "perturb_contour",
    "PERTURBATIONS",
]

#: Kinds of :func:`perturb_contour`.
PERTURBATIONS = ("shift", "rotate", "warp")

#: Control-point spacing (mm) of :func:`perturb_contour`'s smooth warp.
_WARP_CONTROL_MM = 20.0


# ---- validation --------------------------------------------------------------------------------
def _rng(seed: Union[int, np.random.Generator, None], name: str = "seed") -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegXAIInputError(f"{name} must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 1:
        raise SegXAIInputError(f"{name} must be a 3D array (I, J, K), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == bool):
        raise SegXAIInputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise SegXAIInputError(f"{name} must be finite")
    return array


def _number(value: float, name: str, low: float = 0.0, high: float = np.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SegXAIInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and low <= value <= high):
        raise SegXAIInputError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return value


def _axis(axis: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis <= 2:
        raise SegXAIInputError(f"{name} must be 0, 1 or 2, got {axis!r}")
    return int(axis)


def _vector(value: Sequence[float], name: str, unit: bool = False) -> np.ndarray:
    try:
        vector = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"{name} must be 3 numbers, got {value!r}") from None
    if vector.shape != (3,) or not np.all(np.isfinite(vector)):
        raise SegXAIInputError(f"{name} must be 3 finite numbers, got {value!r}")
    if unit:
        length = float(np.linalg.norm(vector))
        if length == 0:
            raise SegXAIInputError(f"{name} must not be the zero vector")
        vector = vector / length
    return vector


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    vector = _vector(spacing, "spacing")
    if np.any(vector <= 0):
        raise SegXAIInputError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return vector


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    # uniform on the sphere: an isotropic Gaussian, normalised
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _output_dtype(array: np.ndarray) -> np.dtype:
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)


# ---- k-space artefacts -------------------------------------------------------------------------
def kspace_ghosting(
    volume: np.ndarray, axis: Optional[int] = None, intensity: float = 0.5, seed: Optional[int] = None
) -> np.ndarray:
    """Nyquist (N/2) ghosting: every other k-space line along ``axis`` gets a phase error.

    The k-space lines with an odd (signed) frequency index along ``axis`` are multiplied by
    ``exp(i phi)`` with ``phi = intensity * pi / 2`` (the odd/even echo mismatch of EPI).
    Multiplying by ``(-1) ** k`` shifts an image by half its field of view, so the complex
    image becomes ``a x + b g`` with ``g`` the volume rolled by ``N / 2`` along ``axis``,
    ``|a| = cos(phi / 2)`` and ``|b| = sin(phi / 2)``, ``a`` and ``b`` a quarter turn apart in
    phase. The returned magnitude image is therefore exactly

    ``sqrt(cos(phi/2)**2 * x**2 + sin(phi/2)**2 * g**2)``

    for a non-negative volume: a false copy with the energy fraction ``sin(phi/2)**2`` (1/2
    at ``intensity=1``, original and ghost equally strong) and a weaker original
    (``cos(phi/2)**2``). The phase error has modulus 1, so the total k-space energy (and by
    Parseval the image energy) is unchanged. For an odd ``N`` the ghost is the band-limited
    (sinc-interpolated) half-voxel shift by ``N / 2``.

    Parameters
    ----------
    volume : ndarray, shape (I, J, K)
        Real intensities. A volume with negative values is ghosted above its minimum (the
        minimum taken as no signal) and shifted back.
    axis : int, optional
        The phase-encoding axis 0, 1 or 2; drawn from ``seed`` when omitted.
    intensity : float
        In [0, 1]; 0 returns a copy.
    seed : int, optional
        Needed only to draw ``axis``.

    Returns
    -------
    ndarray, shape (I, J, K)
        The magnitude image, float (the volume's float dtype, else float64).
    """
    array = _volume(volume)
    intensity = _number(intensity, "intensity", 0.0, 1.0)
    if axis is None:
        if seed is None:
            raise SegXAIInputError("kspace_ghosting: give axis, or a seed to draw it from")
        axis = int(_rng(seed).integers(3))
    axis = _axis(axis)
    dtype = _output_dtype(array)
    if intensity == 0:
        return array.astype(dtype, copy=True)
    data = array.astype(np.float64)
    offset = min(float(data.min()), 0.0)
    data = data - offset
    n = data.shape[axis]
    # signed frequency index: k and -k have the same parity, so the modulation keeps the
    # Hermitian symmetry of a real volume (a real ghost, at a half-voxel shift for odd N)
    k = np.rint(np.fft.fftfreq(n) * n).astype(int)
    phase = np.where(k % 2 == 1, np.exp(1j * intensity * np.pi / 2.0), 1.0)
    shape = [1, 1, 1]
    shape[axis] = n
    spectrum = np.fft.fft(data, axis=axis) * phase.reshape(shape)
    ghosted = np.abs(np.fft.ifft(spectrum, axis=axis)) + offset
    return ghosted.astype(dtype)


def kspace_spikes(volume: np.ndarray, n_spikes: int, intensity: float, seed: int) -> np.ndarray:
    """Herringbone artefact: ``n_spikes`` k-space points of high energy.

    The k-space of a real volume is its half spectrum (:func:`numpy.fft.rfftn`; the other half
    is its complex conjugate). ``n_spikes`` distinct points of it, drawn from ``seed`` away from
    the centre (not all three frequency indices within 1 of 0) and off the planes that are
    their own mirror (last-axis index 0 and N/2), each get ``intensity * max|F|`` added with a
    random phase: each one a plane-wave stripe pattern of amplitude
    ``2 * intensity * max|F| / volume.size`` (``max|F|`` is usually the DC term, the sum of the
    volume, so the stripes are ``2 * intensity`` times the mean). Nothing else in the half
    spectrum changes.

    Parameters
    ----------
    volume : ndarray, shape (I, J, K)
        Real intensities; the last axis needs at least 3 voxels.
    n_spikes : int
        Number of spikes, >= 0; 0 returns a copy.
    intensity : float
        Spike magnitude relative to the largest k-space magnitude, >= 0.
    seed : int
        Seed of the spike positions and phases.

    Returns
    -------
    ndarray, shape (I, J, K)
        Float (the volume's float dtype, else float64).
    """
    array = _volume(volume)
    if isinstance(n_spikes, bool) or not isinstance(n_spikes, (int, np.integer)) or n_spikes < 0:
        raise SegXAIInputError(f"n_spikes must be a non-negative integer, got {n_spikes!r}")
    intensity = _number(intensity, "intensity")
    rng = _rng(seed)
    dtype = _output_dtype(array)
    if n_spikes == 0 or intensity == 0:
        return array.astype(dtype, copy=True)
    spectrum = np.fft.rfftn(array.astype(np.float64))
    shape = array.shape
    last = spectrum.shape[2]
    # candidates: last-axis index strictly between 0 and the Nyquist/self-mirrored plane, so a
    # change there is not altered by irfftn's Hermitian projection
    top = last - 1 if shape[2] % 2 == 0 else last
    ii, jj, kk = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(1, top), indexing="ij")
    signed_i = np.rint(np.fft.fftfreq(shape[0]) * shape[0])[ii]
    signed_j = np.rint(np.fft.fftfreq(shape[1]) * shape[1])[jj]
    far = (np.abs(signed_i) > 1) | (np.abs(signed_j) > 1) | (kk > 1)
    candidates = np.stack([ii[far], jj[far], kk[far]], axis=1)
    if n_spikes > len(candidates):
        raise SegXAIInputError(
            f"n_spikes must be at most {len(candidates)} for a volume of shape {shape}, got {n_spikes}"
        )
    chosen = candidates[rng.choice(len(candidates), size=int(n_spikes), replace=False)]
    phases = np.exp(2j * np.pi * rng.random(int(n_spikes)))
    amplitude = intensity * float(np.abs(spectrum).max())
    spectrum[tuple(chosen.T)] += amplitude * phases
    return np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2)).astype(dtype)


# ---- channel misregistration -------------------------------------------------------------------
def misregister_channel(
    image: Image,
    channel: Union[int, str],
    shift_mm: float,
    seed: int,
    direction: Optional[Sequence[float]] = None,
) -> Image:
    """Shift one channel of ``image`` by ``shift_mm`` against the others (linear interpolation).

    The channel's content moves by ``shift_mm`` along a physical (RAS) direction, uniform on
    the sphere from ``seed`` unless ``direction`` is given; the grid's spacing and direction
    matrix turn it into voxels, so the shift is in mm on any grid. Voxels whose source lies
    outside the grid take the nearest edge value. The other channels are returned
    bit-identical.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``.
    channel : int or str
        The channel to shift, by position or name.
    shift_mm : float
        Length of the shift in mm, >= 0; 0 returns a copy.
    seed : int
        Seed of the direction.
    direction : (3,) float, optional
        RAS direction of the shift (normalised here); overrides the random one.

    Returns
    -------
    Image
        Same grid, channel names and dtype (an integer channel is rounded).
    """
    if not isinstance(image, Image):
        raise SegXAIInputError(f"image must be an Image, got {type(image).__name__}")
    if isinstance(channel, str):
        if channel not in image.channel_names:
            raise SegXAIInputError(f"channel {channel!r} is not one of {image.channel_names}")
        channel = image.channel_names.index(channel)
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < image.num_channels:
        raise SegXAIInputError(f"channel must be a channel index below {image.num_channels} or a name, got {channel!r}")
    shift_mm = _number(shift_mm, "shift_mm")
    rng = _rng(seed)
    unit = _unit_vector(rng) if direction is None else _vector(direction, "direction", unit=True)
    array = image.array.copy()
    if shift_mm > 0:
        # content moves by d (RAS mm): new(p) = old(p - d); in voxels the shift is A^-1 d
        shift_ijk = np.linalg.solve(image.ijk_to_ras[:3, :3], shift_mm * unit)
        moved = ndimage.shift(image.array[channel].astype(np.float64), shift_ijk, order=1, mode="nearest")
        if not np.issubdtype(array.dtype, np.floating):
            moved = np.rint(moved)
        array[channel] = moved.astype(array.dtype)
    return image.with_array(array, image.channel_names)


# ---- similarity transforms ---------------------------------------------------------------------
def similarity_matrix(
    scale: float,
    rotation_deg: float = 0.0,
    axis: Optional[Sequence[float]] = None,
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    seed: Optional[int] = None,
) -> np.ndarray:
    """The 4x4 similarity ``[[scale * R, t], [0, 1]]`` in physical (RAS) mm.

    It maps a point, relative to a centre (:func:`transform_case` uses the volume's centre),
    to where its content goes: scaled by ``scale``, rotated by ``rotation_deg`` about
    ``axis`` (right-handed), then translated by ``translation_mm``.

    Parameters
    ----------
    scale : float
        > 0; volumes change by ``scale ** 3``.
    rotation_deg : float
        Rotation angle in degrees.
    axis : (3,) float, optional
        RAS rotation axis (normalised here); drawn uniformly on the sphere from ``seed`` when
        omitted and the angle is not 0.
    translation_mm : (3,) float
        RAS translation in mm.
    seed : int, optional
        Needed only to draw ``axis``.

    Returns
    -------
    ndarray, shape (4, 4)
    """
    scale = _number(scale, "scale")
    if scale == 0:
        raise SegXAIInputError("scale must be > 0, got 0")
    rotation_deg = _number(rotation_deg, "rotation_deg", -np.inf, np.inf)
    translation = _vector(translation_mm, "translation_mm")
    if axis is None:
        if rotation_deg != 0 and seed is None:
            raise SegXAIInputError("similarity_matrix: give axis, or a seed to draw it from")
        unit = _unit_vector(_rng(seed)) if rotation_deg != 0 else np.array([0.0, 0.0, 1.0])
    else:
        unit = _vector(axis, "axis", unit=True)
    matrix = np.eye(4)
    matrix[:3, :3] = scale * Rotation.from_rotvec(np.deg2rad(rotation_deg) * unit).as_matrix()
    matrix[:3, 3] = translation
    return matrix


def random_similarity(
    rng: Union[np.random.Generator, int],
    scale_range: tuple[float, float] = (0.75, 1.35),
    max_rotation_deg: float = 30.0,
    max_translation_mm: float = 0.0,
) -> np.ndarray:
    """A random :func:`similarity_matrix`.

    The scale is log-uniform on ``scale_range`` (shrinking and growing equally likely for a
    range symmetric in log), the rotation axis uniform on the sphere and the angle uniform on
    ``[-max_rotation_deg, max_rotation_deg]``, the translation uniform in the ball of radius
    ``max_translation_mm``.

    Parameters
    ----------
    rng : numpy.random.Generator or int
        Generator (advanced) or seed.
    scale_range : (float, float)
        ``0 < low <= high``.
    max_rotation_deg : float
        In [0, 180].
    max_translation_mm : float
        >= 0.

    Returns
    -------
    ndarray, shape (4, 4)
    """
    generator = _rng(rng, "rng")
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"scale_range must be two numbers (low, high), got {scale_range!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high):
        raise SegXAIInputError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    max_rotation_deg = _number(max_rotation_deg, "max_rotation_deg", 0.0, 180.0)
    max_translation_mm = _number(max_translation_mm, "max_translation_mm")
    scale = float(np.exp(generator.uniform(np.log(low), np.log(high))))
    axis = _unit_vector(generator)
    angle = float(generator.uniform(-max_rotation_deg, max_rotation_deg))
    # uniform in the ball: radius ~ R * U^(1/3)
    translation = _unit_vector(generator) * max_translation_mm * float(generator.random()) ** (1.0 / 3.0)
    return similarity_matrix(scale, angle, axis, translation)


def _check_similarity(matrix: np.ndarray) -> np.ndarray:
    try:
        matrix = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        raise SegXAIInputError("matrix must be a 4x4 array of numbers") from None
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise SegXAIInputError(f"matrix must be a finite 4x4 array, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise SegXAIInputError("matrix must be an invertible affine matrix (last row 0, 0, 0, 1)")
    return matrix


def transform_case(image: Image, reference: np.ndarray, matrix: np.ndarray) -> tuple[Image, np.ndarray]:
    """Move the content of ``image`` and ``reference`` by ``matrix`` about the volume centre.

    The content at RAS point ``p`` goes to ``c + L (p - c) + t`` (``matrix = [[L, t], [0, 1]]``,
    ``c`` the physical centre of the grid). Both are resampled on the SAME grid (spacing,
    origin, direction unchanged) through the same index mapping, which includes the
    direction matrix: the image with linear interpolation (outside the grid: each channel's
    minimum), the reference as the linear interpolation of its 0/1 occupancy, kept where
    >= 0.5 (outside: 0). A similarity of scale ``s`` changes the true structure volume by
    ``s ** 3`` and leaves image and reference aligned.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``.
    reference : ndarray of bool, shape (I, J, K)
        The true structure on the image's grid (nonzero = inside).
    matrix : ndarray, shape (4, 4)
        Affine map in RAS mm about the centre, e.g. from :func:`similarity_matrix`.

    Returns
    -------
    (Image, ndarray of bool (I, J, K))
        The moved image (same grid, channel names, float dtype; float64 for integer input) and
        reference.
    """
    if not isinstance(image, Image):
        raise SegXAIInputError(f"image must be an Image, got {type(image).__name__}")
    reference = _volume(reference, "reference")
    if reference.shape != image.spatial_shape:
        raise SegXAIInputError(
            f"reference has shape {reference.shape}, the image's grid is {image.spatial_shape}"
        )
    matrix = _check_similarity(matrix)
    grid = image.ijk_to_ras[:3, :3]  # A: index -> RAS, without the origin
    middle = (np.asarray(image.spatial_shape, dtype=float) - 1.0) / 2.0  # centre in voxels
    inverse = np.linalg.inv(matrix[:3, :3])
    # output index i sits at p = A i + o; its source is q = c + L^-1 (p - c - t), c = A m + o,
    # so the source index is A^-1 L^-1 A (i - m) + m - A^-1 L^-1 t
    index_matrix = np.linalg.solve(grid, inverse @ grid)
    index_offset = middle - index_matrix @ middle - np.linalg.solve(grid, inverse @ matrix[:3, 3])

    def resample(volume: np.ndarray, fill: float) -> np.ndarray:
        return ndimage.affine_transform(
            volume, index_matrix, offset=index_offset, order=1, mode="constant", cval=fill, output=np.float64
        )

    dtype = _output_dtype(image.array)
    channels = [resample(c.astype(np.float64), float(c.min())).astype(dtype) for c in image.array]
    occupancy = resample((reference != 0).astype(np.float64), 0.0)
    return image.with_array(np.stack(channels), image.channel_names), occupancy >= 0.5


# ---- contours at constant volume ---------------------------------------------------------------
def _top_n(occupancy: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` voxels of largest ``occupancy``; ties go to the larger smoothed occupancy
    (inside rather than beside the shape), then to the smaller flat index."""
    smooth = ndimage.gaussian_filter(occupancy, sigma=1.0, mode="constant")
    order = np.lexsort((np.arange(occupancy.size), -smooth.ravel(), -occupancy.ravel()))
    keep = np.zeros(occupancy.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(occupancy.shape)


def perturb_contour(
    mask: np.ndarray,
    spacing: Sequence[float],
    kind: str,
    magnitude: float,
    seed: int,
) -> np.ndarray:
    """A wrong contour of exactly the same voxel count: ``mask`` shifted, rotated or warped.

    The mask's 0/1 occupancy is moved (linear interpolation, 0 outside the grid) and the
    ``N = mask.sum()`` voxels of largest moved occupancy are kept, ties broken
    deterministically (by a Gaussian-smoothed occupancy, sigma 1 voxel, then by flat index).
    The voxel count, and so the volume, is therefore exactly preserved; ``magnitude=0``
    returns the mask unchanged. Content moved out of the grid comes back as the voxels next
    to what stays.

    ``"shift"``
        Translation by ``magnitude`` mm along a random direction (uniform on the sphere).
    ``"rotate"``
        Rotation by ``magnitude`` degrees about a random axis through the mask's centroid.
    ``"warp"``
        A smooth random displacement field (Gaussian values on control points every 20 mm,
        cubic-spline upsampled), scaled so that its longest displacement over the mask is
        ``magnitude`` mm.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
        The clean contour (nonzero = inside), not empty.
    spacing : (3,) float
        Voxel size in mm along i, j, k (the moves are in physical mm and degrees).
    kind : str
        ``"shift"``, ``"rotate"`` or ``"warp"``.
    magnitude : float
        mm (shift, warp) or degrees (rotate), >= 0.
    seed : int
        Seed of the direction, axis or field.

    Returns
    -------
    ndarray of bool, shape (I, J, K)
        With exactly ``mask.sum()`` voxels set.
    """
    mask = _volume(mask, "mask") != 0
    spacing_arr = _spacing(spacing)
    if kind not in PERTURBATIONS:
        raise SegXAIInputError(f"kind must be one of {PERTURBATIONS}, got {kind!r}")
    magnitude = _number(magnitude, "magnitude")
    rng = _rng(seed)
    count = int(mask.sum())
    if count == 0:
        raise SegXAIInputError("mask is empty: nothing to perturb")
    if magnitude == 0:
        return mask.copy()
    occupancy = mask.astype(np.float64)
    shape = mask.shape
    if kind == "shift":
        shift_vox = magnitude * _unit_vector(rng) / spacing_arr
        moved = ndimage.shift(occupancy, shift_vox, order=1, mode="constant", cval=0.0)
    elif kind == "rotate":
        rotation = Rotation.from_rotvec(np.deg2rad(magnitude) * _unit_vector(rng)).as_matrix()
        centre = np.argwhere(mask).mean(axis=0)
        # rotation in mm about the centroid, in voxels: source = c + S^-1 R^-1 S (i - c)
        index_matrix = np.diag(1.0 / spacing_arr) @ rotation.T @ np.diag(spacing_arr)
        moved = ndimage.affine_transform(
            occupancy, index_matrix, offset=centre - index_matrix @ centre, order=1, mode="constant", cval=0.0
        )
    else:
        control = tuple(max(3, int(np.ceil(n * s / _WARP_CONTROL_MM)) + 1) for n, s in zip(shape, spacing_arr))
        field_mm = np.stack([_upsample(c, shape) for c in rng.standard_normal((3,) + control)])
        longest = float(np.sqrt((field_mm[:, mask] ** 2).sum(axis=0)).max())
        if longest > 0:
            field_mm *= magnitude / longest
        # backward map: the occupancy at i comes from i - u(i) (u in voxels)
        coordinates = np.indices(shape, dtype=np.float64) - field_mm / spacing_arr[:, None, None, None]
        moved = ndimage.map_coordinates(occupancy, coordinates, order=1, mode="constant", cval=0.0)
    return _top_n(moved, count)
