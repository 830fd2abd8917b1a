"""Context and transplant experiments of paper 001 (METHODS section 3).

* :func:`context_experiment`: keep only a lesion's voxels (everything else set to a
  background value per channel), then restore the original intensities ring by ring, one 3D
  dilation (26-connectivity) per step, and record per step the mean probability of the class
  inside the lesion and whether the lesion is detected.
* :func:`transplant_experiment`: copy a lesion's intensities (optionally with perilesional
  tissue within ``margin_mm``) to another place and record the probability and detection
  there, next to the values at the original place.
* :func:`context_figure`: probability against the restored distance (mm).

Everything lives on the input image's grid; :func:`~SegXAILib.models.inference.segment`
does the model-grid round trip.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..image import Image, SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = [
    "BACKGROUNDS",
    "background_values",
    "context_regions",
    "context_image",
    "context_experiment",
    "transplant_experiment",
    "context_figure",
]

BACKGROUNDS = ("zero", "min")

_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def _check_mask(image: Image, mask: np.ndarray, name: str = "lesion_mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != image.spatial_shape:
        raise SegXAIInputError(f"{name} has shape {tuple(mask.shape)}, the image grid is {image.spatial_shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise SegXAIInputError(f"{name} is empty")
    return mask


def background_values(image: Image, background: Union[str, float] = "zero") -> np.ndarray:
    """The value per channel ``(C,)`` put outside the restored region.

    Parameters
    ----------
    image : Image
    background : str or float
        ``"zero"`` (0 in every channel), ``"min"`` (each channel's minimum) or a number (the
        same value in every channel).
    """
    channels = image.num_channels
    if isinstance(background, str):
        if background == "zero":
            return np.zeros(channels, np.float64)
        if background == "min":
            return image.array.reshape(channels, -1).min(axis=1).astype(np.float64)
        raise SegXAIInputError(f"background must be one of {BACKGROUNDS} or a number, got {background!r}")
    value = float(background)
    if not math.isfinite(value):
        raise SegXAIInputError(f"background must be finite, got {background!r}")
    return np.full(channels, value, np.float64)


def context_regions(lesion_mask: np.ndarray, steps: int) -> list[np.ndarray]:
    """The restored regions of steps ``0..steps``: the lesion, then one 3D dilation
    (full 3x3x3 structure, 26-connectivity) more per step."""
    if int(steps) != steps or steps < 0:
        raise SegXAIInputError(f"steps must be an integer >= 0, got {steps!r}")
    region = np.asarray(lesion_mask, bool).copy()
    regions = [region]
    for _ in range(int(steps)):
        if region.all():
            regions.append(region)
            continue
        region = ndimage.binary_dilation(region, structure=_FULL)
        regions.append(region)
    return regions


def context_image(image: Image, region: np.ndarray, background: Union[str, float] = "zero") -> Image:
    """``image`` with its original intensities inside ``region`` and the background value
    (per channel, see :func:`background_values`) everywhere else."""
    region = _check_mask(image, region, "region")
    values = background_values(image, background).astype(image.array.dtype if np.issubdtype(image.array.dtype, np.floating) else np.float32)
    array = np.empty(image.array.shape, values.dtype)
    array[...] = values[:, None, None, None]
    array[:, region] = image.array[:, region]
    return image.with_array(array, image.channel_names)


def _outcome(segmentation, lesion: np.ndarray, class_index: int) -> tuple[float, bool, np.ndarray, np.ndarray]:
    probabilities = segmentation.probabilities.array
    if not 0 <= class_index < probabilities.shape[0]:
        raise SegXAIInputError(f"class_index {class_index} out of range for {probabilities.shape[0]} classes")
    probability = probabilities[class_index]
    predicted = segmentation.mask(class_index)  # probability > 0.5 for a sigmoid (multi-label) model
    return float(probability[lesion].mean()), bool((predicted & lesion).any()), probability, predicted


def context_experiment(
    image: Image,
    lesion_mask: np.ndarray,
    model,
    background: Union[str, float] = "zero",
    steps: int = 25,
    class_index: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[dict]:
    """Restore a lesion's context ring by ring and segment after each step.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)`` in the card's channel order.
    lesion_mask : numpy.ndarray
        Boolean ``(I, J, K)`` on the image grid.
    model : LoadedModel
    background : str or float
        Value outside the restored region per channel: ``"zero"``, ``"min"`` (each channel's
        minimum) or a number.
    steps : int
        Dilations; ``steps + 1`` segmentations (step 0 = the lesion alone). Once the region
        covers the whole grid, later steps reuse the last segmentation.
    class_index : int
    progress, cancel
        See :mod:`SegXAILib.progress`.

    Returns
    -------
    list of dict
        One row per step: ``step``, ``ring_mm`` (largest physical distance of a restored voxel
        from the lesion; 0 at step 0), ``mean_probability`` (class probability averaged over
        the lesion), ``detected`` (a voxel predicted as the class overlaps the lesion),
        ``restored_voxels``, ``predicted_voxels`` (voxels of the class in the whole image) and
        ``outside_mean_probability`` (class probability averaged over the voxels not restored;
        NaN once everything is restored).
    """
    from ..models.inference import segment

    lesion = _check_mask(image, lesion_mask)
    background_values(image, background)  # validate before the work
    regions = context_regions(lesion, steps)
    distance = ndimage.distance_transform_edt(~lesion, sampling=image.spacing)
    rows: list[dict] = []
    previous_region: Optional[np.ndarray] = None
    previous: Optional[tuple] = None
    total = len(regions)
    for step, region in enumerate(regions):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if previous_region is not None and np.array_equal(region, previous_region):
            outcome = previous
        else:
            segmentation = segment(
                context_image(image, region, background), model,
                progress=sub_progress(progress, step / total, (step + 1) / total), cancel=cancel,
            )
            outcome = _outcome(segmentation, lesion, class_index)
        assert outcome is not None
        mean_probability, detected, probability, predicted = outcome
        outside = ~region
        rows.append({
            "step": step,
            "ring_mm": float(distance[region].max()),
            "mean_probability": mean_probability,
            "detected": detected,
            "restored_voxels": int(region.sum()),
            "predicted_voxels": int(predicted.sum()),
            "outside_mean_probability": float(probability[outside].mean()) if outside.any() else float("nan"),
        })
        previous_region, previous = region, outcome
        report(progress, (step + 1) / total, f"context step {step}/{total - 1}")
    return rows


def _margin_region(lesion: np.ndarray, spacing: np.ndarray, margin_mm: float) -> np.ndarray:
    if margin_mm <= 0:
        return lesion.copy()
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    return distance <= margin_mm


def _shift(mask: np.ndarray, offset: Sequence[int]) -> Optional[np.ndarray]:
    """``mask`` moved by ``offset`` voxels, or None when a voxel would leave the grid."""
    index = np.nonzero(mask)
    moved = [axis + int(o) for axis, o in zip(index, offset)]
    if any(m.min() < 0 or m.max() >= s for m, s in zip(moved, mask.shape)):
        return None
    out = np.zeros_like(mask, dtype=bool)
    out[tuple(moved)] = True
    return out


def transplant_experiment(
    image: Image,
    lesion_mask: np.ndarray,
    model,
    target_centre_ijk: Sequence[float],
    margin_mm: float = 0.0,
    class_index: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict:
    """Copy a lesion (with perilesional tissue within ``margin_mm``) to another place.

    The copied region is shifted by a whole number of voxels, ``round(target - centroid)``
    with ``centroid`` the lesion's voxel centroid, and pasted over the image there (the
    original lesion stays in place). Both the original and the transplanted image are
    segmented.

    Parameters
    ----------
    image : Image
    lesion_mask : numpy.ndarray
        Boolean ``(I, J, K)``.
    model : LoadedModel
    target_centre_ijk : sequence of 3 floats
        Voxel indices where the lesion's centroid should land.
    margin_mm : float
        Perilesional tissue (physical distance from the lesion) copied along.
    class_index : int
    progress, cancel
        See :mod:`SegXAILib.progress`.

    Returns
    -------
    dict
        ``offset_ijk``, ``margin_mm``, ``copied_voxels``, ``mean_probability`` and ``detected``
        inside the transplanted lesion (in the transplanted image), ``transplanted_mask``
        (boolean ``(I, J, K)``), ``original_mean_probability`` / ``original_detected`` (the
        lesion in the unmodified image), ``source_mean_probability_after`` /
        ``source_detected_after`` (the original lesion in the transplanted image) and
        ``overlaps_source`` (the pasted region touches the copied one).

    Raises
    ------
    SegXAIInputError
        When the shifted region would leave the grid, or for a bad mask or margin.
    """
    from ..models.inference import segment

    lesion = _check_mask(image, lesion_mask)
    target = np.asarray(target_centre_ijk, dtype=float).reshape(-1)
    if target.shape != (3,) or not np.all(np.isfinite(target)):
        raise SegXAIInputError(f"target_centre_ijk must be 3 finite voxel indices, got {target_centre_ijk!r}")
    margin_mm = float(margin_mm)
    if not math.isfinite(margin_mm) or margin_mm < 0:
        raise SegXAIInputError(f"margin_mm must be >= 0, got {margin_mm}")
    copied = _margin_region(lesion, image.spacing, margin_mm)
    centroid = np.array([axis.mean() for axis in np.nonzero(lesion)])
    offset = np.round(target - centroid).astype(int)
    pasted = _shift(copied, offset)
    moved_lesion = _shift(lesion, offset)
    if pasted is None or moved_lesion is None:
        raise SegXAIInputError(
            f"transplant: the lesion (with a {margin_mm:g} mm margin) centred at {np.round(target, 2).tolist()} "
            f"would leave the grid {image.spatial_shape}"
        )
    source_index = np.nonzero(copied)
    target_index = tuple(axis + o for axis, o in zip(source_index, offset))
    array = image.array.copy()
    array[(slice(None), *target_index)] = image.array[(slice(None), *source_index)]
    transplanted = image.with_array(array, image.channel_names)

    if cancel is not None:
        cancel.raise_if_cancelled()
    original = segment(image, model, progress=sub_progress(progress, 0.0, 0.5), cancel=cancel)
    after = segment(transplanted, model, progress=sub_progress(progress, 0.5, 1.0), cancel=cancel)
    original_probability, original_detected, _, _ = _outcome(original, lesion, class_index)
    probability, detected, _, _ = _outcome(after, moved_lesion, class_index)
    source_after, source_detected_after, _, _ = _outcome(after, lesion, class_index)
    report(progress, 1.0, "transplant done")
    return {
        "offset_ijk": tuple(int(o) for o in offset),
        "margin_mm": margin_mm,
        "copied_voxels": int(copied.sum()),
        "mean_probability": probability,
        "detected": detected,
        "transplanted_mask": moved_lesion,
        "original_mean_probability": original_probability,
        "original_detected": original_detected,
        "source_mean_probability_after": source_after,
        "source_detected_after": source_detected_after,
        "overlaps_source": bool((pasted & copied).any()),
    }


def context_figure(rows: Sequence[dict], title: str = "Context experiment"):
    """Mean lesion probability against the restored distance (mm), detected steps filled.

    Parameters
    ----------
    rows : sequence of dict
        The output of :func:`context_experiment`.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if not rows:
        raise SegXAIInputError("context_figure: no rows")
    distance = np.array([row["ring_mm"] for row in rows], float)
    probability = np.array([row["mean_probability"] for row in rows], float)
    detected = np.array([bool(row["detected"]) for row in rows])
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(distance, probability, color="0.4", linewidth=1.2, zorder=1)
    if detected.any():
        ax.scatter(distance[detected], probability[detected], color="tab:red", zorder=2, label="detected")
    if (~detected).any():
        ax.scatter(distance[~detected], probability[~detected], facecolors="white", edgecolors="tab:blue",
                   zorder=2, label="not detected")
    ax.set_xlabel("restored context (mm from the lesion)")
    ax.set_ylabel("mean probability in the lesion")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
