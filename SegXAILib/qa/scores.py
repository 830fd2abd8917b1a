"""Reference-free per-case QA scores: the baselines and controls that a saliency-topology score
is judged against (the project's shared/QA_PROTOCOL.md, "Scores compared on the same cases",
rows 1-4 and 6).

Every ``*_scores`` function takes plain numpy arrays of one case and returns a flat
``dict[str, float]`` of named scores; a score that is undefined for the case (e.g. the mean
entropy inside an empty mask) is ``nan``, never missing, so that a cohort's rows share their
columns. :data:`RISK_DIRECTION` says for every score name which way is riskier. The controls
(:func:`shuffled_saliency_curve`, :func:`intensity_curve`) return Euler characteristic curves
like :func:`~SegXAILib.topology.saliency_curve`, not dicts.

Conventions
-----------
* Arrays are ``(D, H, W)`` on one grid; ``spacing`` is the voxel size in mm along those axes.
* Entropies are in nats (natural logarithm), as in :mod:`SegXAILib.uncertainty`.
* Volumes: ``1 mL = 1000 mm^3``.
* Connectivity: a mask's connected components and its Euler characteristic both take the
  voxels as closed unit cubes, so voxels sharing a face, an edge or a corner touch
  (26-connectivity for the foreground, as :func:`skimage.measure.euler_number` with
  ``connectivity=3``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..image import SegXAIInputError
from ..topology.euler import euler_characteristic_curve
from ..topology.risk import saliency_curve
from ..uncertainty.estimate import UncertaintyResult
from ..uncertainty.statistics import bernoulli_entropy, boundary_band, entropy

__all__ = [
    "RISK_DIRECTION",
    "UNCERTAINTY_PREFIXES",
    "mask_shape_scores",
    "probability_scores",
    "uncertainty_scores",
    "image_quality_scores",
    "shuffled_saliency_curve",
    "intensity_curve",
    "case_scores",
    "risk_oriented",
]

#: prefixes of :func:`uncertainty_scores`, by the family of sample sources
UNCERTAINTY_PREFIXES = ("tta", "mc_dropout", "ensemble")
#: sample source (:data:`SegXAILib.uncertainty.SOURCES`) -> prefix family
_SOURCE_FAMILY = {"flips": "tta", "gamma": "tta", "noise": "tta", "intensity_scale": "tta", "spatial": "tta",
                  "mc_dropout": "mc_dropout", "ensemble": "ensemble"}

#: score name -> +1 (higher = riskier), -1 (lower = riskier) or 0 (two-sided: riskier away
#: from the cohort's typical value). A priori orientations, for one-sided AUROC / AURC; the
#: analysis may still test the other side.
RISK_DIRECTION: dict[str, int] = {
    # row 1: predicted volume (over- and under-segmentation both fail)
    "volume_ml": 0,
    "volume_voxels": 0,
    "log_volume": 0,
    # row 2: mask shape
    "component_count": +1,           # fragments, spurious islands
    "largest_component_fraction": -1,
    "compactness": -1,               # ragged, irregular outline
    "euler_characteristic": 0,       # cavities / extra components raise it, tunnels lower it
    # row 3: probabilities
    "mean_max_softmax_mask": -1,
    "mean_entropy_image": +1,
    "mean_entropy_foreground": +1,
    "mean_entropy_boundary": +1,
    "soft_dice_confidence": -1,
    # row 6: image quality
    "noise_sigma": +1,
    "laplacian_variance": -1,        # a sharpness measure: blur lowers it
    "laplacian_variance_mask": -1,
    # QA of a given contour (QA_PROTOCOL.md C4): its Dice with the model's own prediction
    "dice_with_prediction": -1,
}
for _prefix in UNCERTAINTY_PREFIXES:  # row 4: agreement of the samples
    RISK_DIRECTION[f"{_prefix}_pairwise_dice"] = -1
    RISK_DIRECTION[f"{_prefix}_volume_cv"] = +1
del _prefix

_NAN = float("nan")


# --------------------------------------------------------------------------- validation


def _as_mask(mask: Any, name: str = "mask", shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise SegXAIInputError(f"{name} must be a 3D array (D, H, W), got shape {mask.shape}")
    if shape is not None and mask.shape != shape:
        raise SegXAIInputError(f"{name} must have the shape {shape}, got {mask.shape}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
            raise SegXAIInputError(f"{name} must be boolean (or 0/1)")
        mask = mask.astype(bool)
    return mask


def _as_spacing(spacing: Any) -> np.ndarray:
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"spacing must be 3 positive numbers (mm), got {spacing!r}") from None
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise SegXAIInputError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return values


def _as_real(values: Any, name: str, ndim: Union[int, tuple[int, ...]]) -> np.ndarray:
    values = np.asarray(values)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if values.ndim not in dims:
        raise SegXAIInputError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {values.shape}")
    if values.size == 0:
        raise SegXAIInputError(f"{name} must not be empty")
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise SegXAIInputError(f"{name} must be a real numeric array, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise SegXAIInputError(f"{name} must be finite (no NaN or inf)")
    return values


def _mean_over(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else _NAN


# --------------------------------------------------------------------------- row 1-2: mask


def _mesh_volume_and_area(mask: np.ndarray, spacing: np.ndarray, smoothing: float) -> tuple[float, float]:
    """Enclosed volume (mm^3) and area (mm^2) of the marching-cubes surface of ``mask``; nan when
    the (smoothed) mask has no 0.5 level set."""
    from scipy import ndimage
    from skimage import measure

    where = np.nonzero(mask)
    # crop to the bounding box, padded so that the smoothed mask decays to 0 and the surface closes
    pad = int(math.ceil(4 * smoothing)) + 1
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
    field = np.pad(mask[box].astype(np.float32), pad)
    if smoothing > 0:
        field = ndimage.gaussian_filter(field, smoothing, truncate=4.0)
    if not field.max() > 0.5:
        return _NAN, _NAN
    vertices, faces, _, _ = measure.marching_cubes(field, 0.5, spacing=tuple(spacing))
    area = float(measure.mesh_surface_area(vertices, faces))
    # divergence theorem: the signed volumes of the tetrahedra (origin, triangle) add up
    triangles = vertices[faces].astype(np.float64)
    volume = abs(float(np.einsum("ij,ij->i", triangles[:, 0],
                                 np.cross(triangles[:, 1], triangles[:, 2])).sum()) / 6.0)
    return volume, area


def mask_shape_scores(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      smoothing: float = 1.0) -> dict[str, float]:
    """Size and shape of a predicted mask (QA protocol rows 1 and 2).

    Parameters
    ----------
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        The predicted structure.
    spacing : sequence of 3 floats
        Voxel size in mm along (D, H, W).
    smoothing : float
        Standard deviation, in voxels along every axis, of the Gaussian that smooths the mask
        before its surface is meshed (``compactness`` only); 0 meshes the binary mask.

    Returns
    -------
    scores : dict of str to float
        ``volume_voxels``
            Number of mask voxels.
        ``volume_ml``
            ``volume_voxels * prod(spacing) / 1000``.
        ``log_volume``
            ``log(volume_ml)`` (natural log); nan for an empty mask.
        ``component_count``
            Connected components (26-connectivity); 0 for an empty mask.
        ``largest_component_fraction``
            Voxels of the largest component / all mask voxels; nan for an empty mask.
        ``compactness``
            ``36 pi V^2 / A^3`` of the marching-cubes surface
            (:func:`skimage.measure.marching_cubes` at level 0.5 with ``spacing``, area by
            :func:`skimage.measure.mesh_surface_area`, ``V`` the volume the mesh encloses): 1
            for a ball, ``pi / 6`` for a cube, lower for ragged shapes (it is the cube of
            Wadell's sphericity). The binary mask's surface is a staircase whose area does
            not converge to the smooth one (a digitised ball stays near 0.78 however large),
            hence the default smoothing, with which a digitised ball approaches 1 as its
            radius grows; corners and edges are rounded over about ``smoothing`` voxels, and
            structures a few voxels across shrink. nan for an empty mask or one too thin to
            keep a 0.5 level after smoothing.
        ``euler_characteristic``
            ``V - E + F - Q`` of the union of the mask's closed voxels
            (:func:`~SegXAILib.topology.euler_characteristic_curve`, the same cubical complex
            as the saliency curves): components - tunnels + cavities, e.g. 1 for a solid
            ball, 2 for a hollow sphere, 0 for a solid torus; 0 for an empty mask.
    """
    from scipy import ndimage

    mask = _as_mask(mask)
    spacing = _as_spacing(spacing)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not (
            math.isfinite(smoothing) and smoothing >= 0):
        raise SegXAIInputError(f"smoothing must be a finite number >= 0 (voxels), got {smoothing!r}")
    voxels = int(mask.sum())
    volume_ml = voxels * float(np.prod(spacing)) / 1000.0
    scores = {"volume_voxels": float(voxels), "volume_ml": volume_ml,
              "log_volume": math.log(volume_ml) if voxels else _NAN}
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    scores["component_count"] = float(count)
    scores["largest_component_fraction"] = (
        float(np.bincount(labels.ravel())[1:].max()) / voxels if voxels else _NAN)
    if voxels:
        volume, area = _mesh_volume_and_area(mask, spacing, float(smoothing))
        scores["compactness"] = 36.0 * math.pi * volume ** 2 / area ** 3 if area > 0 else _NAN
    else:
        scores["compactness"] = _NAN
    # one threshold: the superlevel set {mask >= 1} is the mask itself
    chi = euler_characteristic_curve(mask.astype(np.float64), np.array([1.0]), mask=mask, superlevel=True)
    scores["euler_characteristic"] = float(chi[0])
    return scores


# --------------------------------------------------------------------------- row 3: probabilities


def probability_scores(probabilities: np.ndarray, mask: np.ndarray,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0), band_mm: float = 2.0,
                       class_index: int = 1) -> dict[str, float]:
    """Confidence of the model's own probabilities (QA protocol row 3).

    Parameters
    ----------
    probabilities : ndarray, shape (C, D, H, W) or (D, H, W)
        Softmax class probabilities (channels summing to 1, within 1e-3), or the foreground
        probability of a two-class / sigmoid output (then the two classes are ``1 - p``
        and ``p``). Values in [0, 1].
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        The predicted (hard) mask of the structure.
    spacing : sequence of 3 floats
        Voxel size in mm along (D, H, W), for the boundary band.
    band_mm : float
        Width of the boundary band (:func:`~SegXAILib.uncertainty.boundary_band`): mask voxels
        within ``band_mm`` of a voxel outside and outside voxels within ``band_mm`` of a mask
        voxel (Euclidean between voxel centres).
    class_index : int
        The structure's channel of a ``(C, D, H, W)`` input (ignored for ``(D, H, W)``).

    Returns
    -------
    scores : dict of str to float
        ``mean_max_softmax_mask``
            Mean over the mask of ``max_k p_k`` (``max(p, 1 - p)`` for a foreground
            probability); nan for an empty mask.
        ``mean_entropy_image``, ``mean_entropy_foreground``, ``mean_entropy_boundary``
            Mean entropy in nats (``-sum_k p_k log p_k``, or the Bernoulli entropy of ``p``)
            over the whole image, the mask and the boundary band; ``log 2`` is the most a
            two-class voxel can have. nan where the region is empty.
        ``soft_dice_confidence``
            Soft Dice Confidence (Borges, Pacheco and Silva, arXiv:2402.10665):
            ``2 sum(p * yhat) / (sum(p) + sum(yhat))`` with ``p`` the structure's probability
            and ``yhat`` the mask, over the image; nan when both sums are 0.
    """
    p_all = _as_real(probabilities, "probabilities", (3, 4))
    if np.any(p_all < 0) or np.any(p_all > 1):
        raise SegXAIInputError("probabilities must lie in [0, 1]")
    shape = p_all.shape[-3:]
    mask = _as_mask(mask, shape=shape)
    spacing = _as_spacing(spacing)
    if isinstance(band_mm, bool) or not isinstance(band_mm, (int, float)) or not (
            math.isfinite(band_mm) and band_mm >= 0):
        raise SegXAIInputError(f"band_mm must be a finite number >= 0, got {band_mm!r}")
    if p_all.ndim == 4:
        channels = p_all.shape[0]
        if channels < 2:
            raise SegXAIInputError(f"probabilities: a (C, D, H, W) input needs C >= 2 classes, got {channels}")
        # float32 softmax outputs sum to 1 within a few ulp per class; 1e-3 allows any C used here
        if np.max(np.abs(p_all.sum(axis=0) - 1.0)) > 1e-3:
            raise SegXAIInputError("probabilities: the channels of a (C, D, H, W) input must sum to 1 (softmax); "
                                   "pass one class's (D, H, W) probability for sigmoid outputs")
        if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)) or not (
                0 <= class_index < channels):
            raise SegXAIInputError(f"class_index must be an integer in [0, {channels}), got {class_index!r}")
        p = p_all[class_index]
        confidence = p_all.max(axis=0)
        voxel_entropy = entropy(p_all, axis=0)
    else:
        p = p_all
        confidence = np.maximum(p, 1.0 - p)
        voxel_entropy = bernoulli_entropy(p)
    band = boundary_band(mask, float(band_mm), spacing)
    denominator = float(p.sum()) + float(mask.sum())
    return {
        "mean_max_softmax_mask": _mean_over(confidence, mask),
        "mean_entropy_image": float(voxel_entropy.mean()),
        "mean_entropy_foreground": _mean_over(voxel_entropy, mask),
        "mean_entropy_boundary": _mean_over(voxel_entropy, band),
        "soft_dice_confidence": 2.0 * float(p[mask].sum()) / denominator if denominator > 0 else _NAN,
    }


# --------------------------------------------------------------------------- row 4: samples


def _prefix_of(result: UncertaintyResult) -> str:
    families = {_SOURCE_FAMILY.get(name) for name in result.sources}
    if None in families or len(families) != 1:
        raise SegXAIInputError(f"result: its sources {sorted(result.sources)} are not of one family "
                               f"({', '.join(UNCERTAINTY_PREFIXES)}); pass prefix")
    return families.pop()


def uncertainty_scores(result: UncertaintyResult, structure: Union[str, int, None] = None,
                       prefix: Optional[str] = None) -> dict[str, float]:
    """Agreement of the prediction samples of one structure (QA protocol row 4), read from an
    :class:`~SegXAILib.uncertainty.UncertaintyResult` (nothing is recomputed).

    Parameters
    ----------
    result : UncertaintyResult
        From :func:`~SegXAILib.uncertainty.estimate_uncertainty`.
    structure : str or int, optional
        The structure's class name or class index; may be omitted when the result has one
        foreground class.
    prefix : str, optional
        One of :data:`UNCERTAINTY_PREFIXES`. By default from the result's sources: ``tta`` for
        flips, gamma, noise, intensity scale and spatial (alone or together), ``mc_dropout``,
        ``ensemble``; sources of several families need it given.

    Returns
    -------
    scores : dict of str to float
        ``{prefix}_pairwise_dice``
            The pooled pairwise Dice of the samples' masks (the structure row's
            ``pairwise_dice``); nan when no sample has a voxel or there is one sample.
        ``{prefix}_volume_cv``
            Coefficient of variation of the samples' volumes (``volume_cv``); nan when their
            mean is 0.
    """
    if not isinstance(result, UncertaintyResult):
        raise SegXAIInputError(f"result must be an UncertaintyResult, got {type(result).__name__}")
    if prefix is None:
        prefix = _prefix_of(result)
    elif prefix not in UNCERTAINTY_PREFIXES:
        raise SegXAIInputError(f"prefix must be one of {UNCERTAINTY_PREFIXES}, got {prefix!r}")
    rows = result.structure_rows()
    if structure is None:
        if len(rows) != 1:
            raise SegXAIInputError(f"structure: the result has {len(rows)} structures "
                                   f"{[row['structure'] for row in rows]}; name one")
        row = rows[0]
    else:
        key = "class_index" if isinstance(structure, (int, np.integer)) and not isinstance(structure, bool) \
            else "structure"
        found = [row for row in rows if row[key] == structure]
        if not found:
            raise SegXAIInputError(f"structure {structure!r} is not one of {[row['structure'] for row in rows]} "
                                   f"(class indices {[row['class_index'] for row in rows]})")
        row = found[0]

    def number(value: Optional[float]) -> float:
        return _NAN if value is None else float(value)

    return {f"{prefix}_pairwise_dice": number(row["pairwise_dice"]),
            f"{prefix}_volume_cv": number(row["volume_cv"])}


# --------------------------------------------------------------------------- row 6: image


def _haar_noise_sigma(image: np.ndarray) -> float:
    """Donoho and Johnstone's wavelet estimate of Gaussian noise: ``median(|d|) / 0.6745`` of the
    finest diagonal Haar detail ``d`` (of 2x2x2 blocks)."""
    from scipy.stats import norm

    even = image[tuple(slice(0, size - size % 2) for size in image.shape)]
    detail = even
    for axis in range(3):  # orthonormal Haar high-pass along each axis in turn
        lo = np.take(detail, np.arange(0, detail.shape[axis], 2), axis=axis)
        hi = np.take(detail, np.arange(1, detail.shape[axis], 2), axis=axis)
        detail = (lo - hi) / math.sqrt(2.0)
    return float(np.median(np.abs(detail)) / norm.ppf(0.75))


def image_quality_scores(image: np.ndarray, mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """Image-quality controls (QA protocol row 6): noise level and sharpness.

    Parameters
    ----------
    image : ndarray, shape (D, H, W)
        Finite real intensities (the model's input channel, before normalisation).
    mask : ndarray of bool (or 0/1), shape (D, H, W), optional
        The predicted structure, for ``laplacian_variance_mask``.

    Returns
    -------
    scores : dict of str to float
        ``noise_sigma``
            Standard deviation of additive Gaussian noise, estimated as
            :func:`skimage.restoration.estimate_sigma` does (Donoho and Johnstone 1994:
            ``median(|d|) / 0.6745`` of the finest diagonal wavelet detail coefficients),
            with the Haar wavelet, computed here because ``estimate_sigma`` needs PyWavelets,
            which SegXAI does not depend on. The Haar diagonal detail is zero on any sum of
            functions of fewer than three of the axes (ramps, per-axis trends), so smooth
            anatomy adds little. Whole image; at least 2 voxels along every axis.
        ``laplacian_variance``
            Variance of the 7-point Laplacian (:func:`scipy.ndimage.laplace`) over the
            interior voxels (one voxel off every face, where the stencil reads reflected
            values): higher for sharper edges and more noise (``42 sigma^2`` for white noise
            of standard deviation ``sigma``), lower for blur. nan with fewer than 3 voxels
            along an axis.
        ``laplacian_variance_mask``
            The same over the interior voxels of the mask; nan when none or no mask given.
    """
    from scipy import ndimage

    image = _as_real(image, "image", 3)
    if min(image.shape) < 2:
        raise SegXAIInputError(f"image needs at least 2 voxels along every axis, got shape {image.shape}")
    interior = np.zeros(image.shape, dtype=bool)
    interior[1:-1, 1:-1, 1:-1] = True
    laplacian = ndimage.laplace(image)
    scores = {"noise_sigma": _haar_noise_sigma(image),
              "laplacian_variance": float(laplacian[interior].var()) if interior.any() else _NAN}
    if mask is None:
        scores["laplacian_variance_mask"] = _NAN
    else:
        where = _as_mask(mask, shape=image.shape) & interior
        scores["laplacian_variance_mask"] = float(laplacian[where].var()) if where.any() else _NAN
    return scores


# --------------------------------------------------------------------------- row 6: curve controls


def shuffled_saliency_curve(saliency: np.ndarray, mask: np.ndarray, thresholds: np.ndarray,
                            seed: int = 0) -> np.ndarray:
    """EC curve of the saliency permuted at random inside the mask (QA protocol row 6).

    Keeps the mask and the saliency's distribution inside it (so the curve's size effect and
    its ``t = 0`` value, the mask's own Euler characteristic), and destroys the spatial
    arrangement that the topology score claims to read.

    Parameters
    ----------
    saliency : ndarray, shape (D, H, W)
        Finite real saliency values.
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        Predicted structure; at least one voxel.
    thresholds : ndarray, shape (T,)
        Thresholds on the normalised scale, as for :func:`~SegXAILib.topology.saliency_curve`.
    seed : int
        Seed of the :func:`numpy.random.default_rng` that draws the permutation.

    Returns
    -------
    curve : ndarray, shape (T,), int64
        :func:`~SegXAILib.topology.saliency_curve` of the permuted map.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegXAIInputError(f"seed must be a non-negative integer, got {seed!r}")
    saliency = np.asarray(saliency)
    if saliency.ndim != 3:
        raise SegXAIInputError(f"saliency must be a 3D array (D, H, W), got shape {saliency.shape}")
    mask = _as_mask(mask, shape=saliency.shape)
    shuffled = saliency.copy()
    shuffled[mask] = np.random.default_rng(int(seed)).permutation(saliency[mask])
    return saliency_curve(shuffled, mask, thresholds)


def intensity_curve(image: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """EC curve of the image intensity inside the mask (QA protocol row 6): the image takes the
    saliency's place in :func:`~SegXAILib.topology.saliency_curve`, normalised the same way
    (paper 000's ``max(v - median, 0) / max`` over the mask's voxels).

    Parameters
    ----------
    image : ndarray, shape (D, H, W)
        Finite real intensities.
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        Predicted structure; at least one voxel.
    thresholds : ndarray, shape (T,)

    Returns
    -------
    curve : ndarray, shape (T,), int64
    """
    return saliency_curve(image, mask, thresholds)


# --------------------------------------------------------------------------- one case


def case_scores(
    mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    probabilities: Optional[np.ndarray] = None,
    image: Optional[np.ndarray] = None,
    uncertainty: Union[UncertaintyResult, Sequence[UncertaintyResult], None] = None,
    band_mm: float = 2.0,
    class_index: int = 1,
    structure: Union[str, int, None] = None,
    smoothing: float = 1.0,
) -> dict[str, float]:
    """All the per-case scores that the given inputs allow, in one flat dict.

    Parameters
    ----------
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        The predicted structure (always scored: :func:`mask_shape_scores`).
    spacing : sequence of 3 floats
        Voxel size in mm.
    probabilities : ndarray, shape (C, D, H, W) or (D, H, W), optional
        :func:`probability_scores` (with ``band_mm`` and ``class_index``).
    image : ndarray, shape (D, H, W), optional
        :func:`image_quality_scores`.
    uncertainty : UncertaintyResult or sequence of them, optional
        :func:`uncertainty_scores` of each (with ``structure``); two of one prefix are refused.
    smoothing : float
        For :func:`mask_shape_scores`.

    Returns
    -------
    scores : dict of str to float
        Keys of :data:`RISK_DIRECTION`.
    """
    scores = mask_shape_scores(mask, spacing, smoothing=smoothing)
    if probabilities is not None:
        scores.update(probability_scores(probabilities, mask, spacing, band_mm=band_mm, class_index=class_index))
    if image is not None:
        scores.update(image_quality_scores(image, mask))
    if uncertainty is not None:
        results = [uncertainty] if isinstance(uncertainty, UncertaintyResult) else list(uncertainty)
        for result in results:
            found = uncertainty_scores(result, structure=structure)
            clash = sorted(set(found) & set(scores))
            if clash:
                raise SegXAIInputError(f"uncertainty: two results give {clash}; pass one per source family")
            scores.update(found)
    return scores


def risk_oriented(scores: Mapping[str, float]) -> dict[str, float]:
    """The one-sided scores of ``scores`` turned so that higher = riskier (``-x`` where
    :data:`RISK_DIRECTION` is -1); two-sided scores are left out.

    Parameters
    ----------
    scores : mapping of str to float
        Names of :data:`RISK_DIRECTION`.

    Returns
    -------
    oriented : dict of str to float
    """
    unknown = sorted(set(scores) - set(RISK_DIRECTION))
    if unknown:
        raise SegXAIInputError(f"scores: no risk direction for {unknown}")
    return {name: RISK_DIRECTION[name] * float(value) for name, value in scores.items() if RISK_DIRECTION[name]}
