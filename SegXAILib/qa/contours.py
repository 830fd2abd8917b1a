"""QA of a given contour (one the model did not draw: a clinician's edit, another tool's output):
its agreement with the model's own prediction of the same class, the model's confidence inside
it and along its border, and the agreement of the prediction samples inside it
(shared/QA_PROTOCOL.md, cohort C4: the fair baseline of a given contour is its Dice with the
model's own prediction).

Plain numpy arrays of one case on one grid ``(D, H, W)``; ``spacing`` in mm along those axes.
The pipeline step (:func:`SegXAILib.pipeline.add_contour_qa`) adds the saliency EC curve inside
the contour and orders the structures with :func:`review_order`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..metrics import dice_score
from ..uncertainty.statistics import boundary_band
from .scores import _as_mask, _as_spacing, _mean_over, probability_scores

__all__ = ["surface_distances", "contour_scores", "uncertainty_agreement", "review_order", "SORT_KEYS"]

_NAN = float("nan")

#: the review list's sort keys, most suspicious first (descending): the risk model's
#: P(insufficient) when the structure has one, else ``1 - Dice`` with the model's prediction
SORT_KEYS = ("insufficient_probability", "1 - dice_with_prediction")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the grid's border counts as outside)."""
    from scipy import ndimage

    padded = np.pad(mask, 1)
    eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Symmetric surface distances between two masks.

    The surface of a mask is its voxels with a face neighbour outside it; each surface voxel
    of ``a`` gets its Euclidean distance (voxel centres, mm) to the nearest surface voxel of
    ``b`` and vice versa, and both sets are pooled.

    Parameters
    ----------
    a, b : ndarray of bool (or 0/1), shape (D, H, W)
    spacing : sequence of 3 floats
        Voxel size in mm.

    Returns
    -------
    distances : dict of str to float
        ``mean_surface_distance_mm`` (the average symmetric surface distance) and
        ``hd95_mm`` (the 95th percentile of the pooled distances, linear interpolation); 0 for
        equal masks, nan when either mask is empty.
    """
    from scipy import ndimage

    a = _as_mask(a, "a")
    b = _as_mask(b, "b", shape=a.shape)
    spacing = _as_spacing(spacing)
    if not a.any() or not b.any():
        return {"mean_surface_distance_mm": _NAN, "hd95_mm": _NAN}
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    pooled = np.concatenate([to_b[surface_a], to_a[surface_b]])
    return {"mean_surface_distance_mm": float(pooled.mean()), "hd95_mm": float(np.percentile(pooled, 95))}


def uncertainty_agreement(mask_frequency: np.ndarray, mutual_information: Optional[np.ndarray],
                          contour: np.ndarray) -> dict[str, float]:
    """How far the prediction samples agree with a contour.

    Parameters
    ----------
    mask_frequency : ndarray, shape (D, H, W)
        Fraction of samples whose mask holds each voxel, for the contour's class (values in [0, 1]).
    mutual_information : ndarray, shape (D, H, W), optional
        Mutual information (nats) of the samples, for the contour's class (one channel of a
        softmax model).
    contour : ndarray of bool, shape (D, H, W)

    Returns
    -------
    scores : dict of str to float
        ``sample_frequency_inside``: the mean sample frequency over the contour (1 when every
        sample holds every contour voxel); ``sample_soft_dice``:
        ``2 sum(f * c) / (sum(f) + sum(c))``, the soft Dice of the contour with the frequency
        map (1 when every sample equals the contour); ``mean_mutual_information_inside`` (nats,
        nan without the map). nan where undefined.
    """
    contour = _as_mask(contour, "contour")
    frequency = np.asarray(mask_frequency, dtype=np.float64)
    if frequency.shape != contour.shape:
        raise SegXAIInputError(f"mask_frequency must have the shape {contour.shape}, got {frequency.shape}")
    denominator = float(frequency.sum()) + float(contour.sum())
    scores = {"sample_frequency_inside": _mean_over(frequency, contour),
              "sample_soft_dice": 2.0 * float(frequency[contour].sum()) / denominator if denominator > 0 else _NAN,
              "mean_mutual_information_inside": _NAN}
    if mutual_information is not None:
        information = np.asarray(mutual_information, dtype=np.float64)
        if information.shape != contour.shape:
            raise SegXAIInputError(f"mutual_information must have the shape {contour.shape}, got {information.shape}")
        scores["mean_mutual_information_inside"] = _mean_over(information, contour)
    return scores


def contour_scores(
    contour: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    probabilities: Optional[np.ndarray] = None,
    class_index: int = 1,
    band_mm: Optional[float] = None,
) -> dict[str, float]:
    """A given contour against the model's prediction of its class, and the model's confidence in it.

    Parameters
    ----------
    contour : ndarray of bool (or 0/1), shape (D, H, W)
        The given contour; at least one voxel.
    prediction : ndarray of bool (or 0/1), shape (D, H, W)
        The model's mask of the same class.
    spacing : sequence of 3 floats
        Voxel size in mm.
    probabilities : ndarray, shape (C, D, H, W) or (D, H, W), optional
        Softmax class probabilities, or the class's sigmoid probability
        (:func:`~SegXAILib.qa.probability_scores`).
    class_index : int
        The class's channel of a ``(C, D, H, W)`` input.
    band_mm : float, optional
        Width of the contour's boundary band (:func:`~SegXAILib.uncertainty.boundary_band`,
        both sides of the border); by default the largest voxel size, so that the band holds at
        least the voxels either side of every face of the border.

    Returns
    -------
    scores : dict of str to float
        ``contour_voxels``, ``contour_volume_ml``, ``predicted_voxels``;
        ``dice_with_prediction`` (1 when equal; 0 when the model predicts none of the class);
        ``volume_ratio`` (contour / prediction volume; nan for an empty prediction);
        ``mean_surface_distance_mm`` and ``hd95_mm`` (:func:`surface_distances`). With
        probabilities: ``mean_probability_inside`` / ``mean_probability_boundary`` (the class's
        mean probability over the contour / its boundary band), and of
        :func:`~SegXAILib.qa.probability_scores` of the contour: ``mean_entropy_foreground``
        (inside), ``mean_entropy_boundary``, ``mean_max_softmax_mask`` and
        ``soft_dice_confidence`` (the contour against the class probability).
    """
    contour = _as_mask(contour, "contour")
    prediction = _as_mask(prediction, "prediction", shape=contour.shape)
    spacing_mm = _as_spacing(spacing)
    if not contour.any():
        raise SegXAIInputError("contour is empty: nothing to score")
    voxels, predicted = int(contour.sum()), int(prediction.sum())
    scores: dict[str, float] = {
        "contour_voxels": float(voxels),
        "contour_volume_ml": voxels * float(np.prod(spacing_mm)) / 1000.0,
        "predicted_voxels": float(predicted),
        "dice_with_prediction": dice_score(contour, prediction),
        "volume_ratio": voxels / predicted if predicted else _NAN,
    }
    scores.update(surface_distances(contour, prediction, spacing_mm))
    if probabilities is not None:
        band_mm = float(spacing_mm.max()) if band_mm is None else band_mm
        found = probability_scores(probabilities, contour, spacing_mm, band_mm=band_mm, class_index=class_index)
        p_all = np.asarray(probabilities, dtype=np.float64)
        p = p_all[class_index] if p_all.ndim == 4 else p_all
        band = boundary_band(contour, float(band_mm), spacing_mm)
        scores["mean_probability_inside"] = _mean_over(p, contour)
        scores["mean_probability_boundary"] = _mean_over(p, band)
        scores.update({key: found[key] for key in ("mean_entropy_foreground", "mean_entropy_boundary",
                                                   "mean_max_softmax_mask", "soft_dice_confidence")})
    return scores


def _suspicion(row: Mapping[str, Any]) -> tuple[str, float]:
    risk = row.get("risk")
    if risk is not None and risk.get("insufficient_probability") is not None:
        return SORT_KEYS[0], float(risk["insufficient_probability"])
    dice = row.get("scores", {}).get("dice_with_prediction")
    value = 1.0 - float(dice) if dice is not None and math.isfinite(float(dice)) else 1.0
    return SORT_KEYS[1], value


def review_order(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The review list: ``rows`` (one per structure) most suspicious first.

    Each row gets ``suspicion`` and ``sort_key``: the risk model's P(insufficient)
    (``row["risk"]["insufficient_probability"]``) when the row has a risk result, else
    ``1 - dice_with_prediction`` (``row["scores"]``; 1 when undefined). Both lie in [0, 1] and
    rise with the chance that the contour is wrong. Sorted by ``suspicion`` descending; ties keep
    the given order.
    """
    ordered = []
    for row in rows:
        key, value = _suspicion(row)
        ordered.append({**row, "sort_key": key, "suspicion": value})
    # a stable sort: equal suspicions keep the order the structures were given in
    return sorted(ordered, key=lambda row: -row["suspicion"])
