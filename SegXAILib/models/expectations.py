"""Is this the scan the model was made for? The input compared with its model card.

A card may record what its model expects in ``"input_expectations"``: the modality and
anatomy it was made for, and statistics of its training inputs (per channel intensity
percentiles, voxel spacing and physical extent), computed from the training data
(``Utilities/card_expectations.py`` for the bundled models)::

    "input_expectations": {
      "modality": "MR", "anatomy": "head (brain)", "cases": 48,
      "channels": {"T1": {"min": 0.0, "percentile_00_5": 0.0, "median": 12.0, "percentile_99_5": 180.0,
                          "max": 240.0, "mean": 40.1, "std": 50.2, "negative_fraction": 0.0}},
      "spacing_mm": {"min": [2.0, 2.0, 3.0], "max": [2.0, 2.0, 3.0]},
      "extent_mm": {"min": [186.0, 256.0, 256.0], "max": [186.0, 256.0, 256.0]}
    }

Spacings and extents are sorted ascending (orientation-free). :func:`check_input` is the one
comparison every front end runs (through :func:`SegXAILib.pipeline.start_case` and, before
any output is made, the command-line front ends): each mismatch is one sentence in
``case.warnings`` (``case.json``, the report's banner, the Slicer panel, the viewer), or a
:class:`~SegXAILib.image.SegXAIInputError` with ``strict``. The block is not part of the
card's :meth:`~SegXAILib.models.card.ModelCard.checksum`: it describes the inputs, not the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError

__all__ = ["input_statistics", "check_input", "compare_with_card", "EXPECTATIONS_KEY", "INPUT_WARNING_TITLE", "SPACING_FACTOR",
           "EXTENT_FACTOR", "OUTSIDE_FRACTION", "RANGE_MARGIN", "NEGATIVE_FRACTION", "AIR_FRACTION", "AIR_HU"]

#: the card key of the block
EXPECTATIONS_KEY = "input_expectations"
#: the heading of a case's input warnings in the report, the Slicer panel and the viewer
INPUT_WARNING_TITLE = "This input may not be what the model was made for; check the results with care:"
#: an input spacing more than this factor finer or coarser than every training spacing (per
#: sorted axis) is flagged: the model then sees structures at twice or half the scale it learnt
SPACING_FACTOR = 2.0
#: an input extent more than this factor larger or smaller than the training extents (per
#: sorted axis) is flagged: another body region, or a crop of one
EXTENT_FACTOR = 1.5
#: flagged when more than this share of the input's voxels lies outside the training range
#: (for models whose normalisation keeps absolute intensities); the training inputs have 1 %
#: outside their 0.5-99.5 percentile range by definition
OUTSIDE_FRACTION = 0.10
#: the training 0.5-99.5 percentile range widened by this share of its width on each side
RANGE_MARGIN = 0.25
#: a channel whose training inputs had (almost) no negative voxel is flagged when more than
#: this share of the input's voxels is negative (e.g. CT in Hounsfield units into an MR model)
NEGATIVE_FRACTION = 0.05
#: a CT in Hounsfield units has air at about -1000: more than this share of voxels at or
#: below :data:`AIR_HU` makes an input look like CT
AIR_FRACTION = 0.05
AIR_HU = -900.0
#: voxels sampled for the intensity statistics of a large input (every n-th voxel): the
#: percentiles of a regular sub-grid of a million voxels differ from the full image's by far
#: less than the margins above
SAMPLE_VOXELS = 1_000_000
_PERCENTILES = (0.5, 50.0, 99.5)


def _sample(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(-1)
    step = max(1, flat.size // SAMPLE_VOXELS)
    return flat[::step].astype(np.float64)


def _channel_statistics(values: np.ndarray) -> dict[str, float]:
    low, median, high = np.percentile(values, _PERCENTILES)
    return {"min": float(values.min()), "percentile_00_5": float(low), "median": float(median),
            "percentile_99_5": float(high), "max": float(values.max()), "mean": float(values.mean()),
            "std": float(values.std()), "negative_fraction": float(np.mean(values < 0))}


def _extent(image: Image) -> np.ndarray:
    """Physical extent (mm) of the grid along its three axes, sorted ascending."""
    return np.sort(np.asarray(image.spatial_shape, dtype=float) * image.spacing)


def input_statistics(images: Sequence[Image], modality: str = "", anatomy: str = "",
                     source: str = "") -> dict[str, Any]:
    """The ``input_expectations`` block of a card from its training inputs.

    Parameters
    ----------
    images : sequence of Image
        The training inputs, each ``(C, I, J, K)`` with the card's channels in order (their
        ``channel_names`` name the channels).
    modality, anatomy, source : str
        What the model was made for (e.g. ``"MR"``, ``"head (brain)"``) and where the data came from.

    Returns
    -------
    dict
        JSON-ready: intensity statistics per channel over every training voxel, and the
        sorted spacing and extent ranges (mm) over the cases.
    """
    if not images:
        raise SegXAIInputError("images: no training inputs given")
    names = images[0].channel_names
    channels = {}
    for index, name in enumerate(names):
        # every voxel of every case (sampled alike), as the input is measured
        values = np.concatenate([_sample(image.array[index]) for image in images])
        channels[name] = {k: round(v, 6) for k, v in _channel_statistics(values).items()}
    spacings = np.array([np.sort(image.spacing) for image in images])
    extents = np.array([_extent(image) for image in images])
    block: dict[str, Any] = {"modality": modality, "anatomy": anatomy, "cases": len(images), "channels": channels,
                             "spacing_mm": {"min": np.round(spacings.min(0), 4).tolist(),
                                            "max": np.round(spacings.max(0), 4).tolist()},
                             "extent_mm": {"min": np.round(extents.min(0), 3).tolist(),
                                           "max": np.round(extents.max(0), 3).tolist()}}
    if source:
        block["source"] = source
    return block


def _scale_free_channels(card) -> set[int]:
    """Channels whose normalisation removes the intensity scale (z-score, percentiles): their
    absolute range is not compared, only the sign of the voxels."""
    if card.format == "nnunetv2":
        schemes = _nnunet_schemes(card)
        return {i for i, scheme in enumerate(schemes) if scheme != "CTNormalization"}
    free: set[int] = set()
    for step in card.preprocessing.get("intensity", []) or []:
        if step.get("kind") in ("zscore", "percentile"):
            channels = step.get("channels")
            free.update(range(len(card.input_channels)) if channels is None else channels)
    return free


def _nnunet_schemes(card) -> list[str]:
    import json

    try:
        plans = json.loads((card.resolve(card.architecture["results_folder"]) / "plans.json").read_text("utf-8"))
        configuration = plans["configurations"][card.architecture.get("configuration", "3d_fullres")]
        return list(configuration.get("normalization_schemes", []))
    except (OSError, KeyError, ValueError):
        return []


def compare_with_card(image: Image, card) -> list[str]:
    """Every way ``image`` differs from what ``card`` expects, one sentence each.

    Parameters
    ----------
    image : Image
        The input ``(C, I, J, K)``, one channel per card input in the card's order.
    card : ModelCard

    Returns
    -------
    list of str
        Empty when the input fits; each sentence names the check, the input's value and the
        model's. A card without expectations still gets a constant channel flagged.
    """
    expected: dict[str, Any] = getattr(card, "input_expectations", {}) or {}
    findings: list[str] = []
    made_for = " ".join(part for part in (expected.get("anatomy", ""), expected.get("modality", "")) if part)
    what = f"model {card.name!r}" + (f" (made for {made_for})" if made_for else "")
    free = _scale_free_channels(card) if expected else set()
    modality = str(expected.get("modality", "")).upper()
    for index in range(min(image.num_channels, len(card.input_channels))):
        channel = card.input_channels[index]
        values = _sample(image.array[index])
        # the whole channel (not the sample): one bright voxel makes a volume non-constant
        low, high = float(image.array[index].min()), float(image.array[index].max())
        if low == high:
            findings.append(f"input channel {channel!r} is constant ({low:g}): it holds no image")
            continue
        stats = (expected.get("channels") or {}).get(channel)
        air = float(np.mean(values <= AIR_HU))
        # (CT padding outside the field of view, -2048 or -3024, counts as air too)
        if modality and modality != "CT" and air > AIR_FRACTION:
            findings.append(f"input channel {channel!r} looks like a CT in Hounsfield units ({air:.0%} of voxels at "
                            f"air, <= {AIR_HU:g}); the {what} expects {modality}")
        if not stats:
            continue
        if index in free:
            negative = float(np.mean(values < 0))
            if stats.get("negative_fraction", 0.0) < 0.001 and negative > NEGATIVE_FRACTION:
                findings.append(f"input channel {channel!r}: {negative:.0%} of voxels are negative (down to {low:g}); "
                                f"the {what} was trained on non-negative intensities")
        else:
            width = stats["percentile_99_5"] - stats["percentile_00_5"]
            lower = stats["percentile_00_5"] - RANGE_MARGIN * width
            upper = stats["percentile_99_5"] + RANGE_MARGIN * width
            outside = float(np.mean((values < lower) | (values > upper)))
            if outside > OUTSIDE_FRACTION:
                median = float(np.median(values))
                findings.append(f"input channel {channel!r}: {outside:.0%} of voxels lie outside the training "
                                f"intensities [{lower:.4g}, {upper:.4g}] (input median {median:.4g}, training median "
                                f"{stats['median']:.4g}) of the {what}")
    for key, factor, label, unit in (("spacing_mm", SPACING_FACTOR, "voxel spacing", "mm"),
                                     ("extent_mm", EXTENT_FACTOR, "physical extent", "mm")):
        bounds = expected.get(key)
        if not bounds:
            continue
        value = np.sort(image.spacing) if key == "spacing_mm" else _extent(image)
        smallest, largest = np.asarray(bounds["min"], float), np.asarray(bounds["max"], float)
        if np.any(value > largest * factor) or np.any(value < smallest / factor):
            findings.append(f"input {label} {_mm(value)} {unit} is outside the training range {_mm(smallest)} - "
                            f"{_mm(largest)} {unit} (by more than {factor:g}x) of the {what}")
    return findings


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def check_input(image: Image, card, strict: bool = False) -> list[str]:
    """:func:`compare_with_card`, refusing a mismatched input with ``strict``.

    Returns
    -------
    list of str
        The warnings (empty when the input fits).

    Raises
    ------
    SegXAIInputError
        With ``strict``, when there is any warning; the message lists them.
    """
    findings = compare_with_card(image, card)
    if strict and findings:
        raise SegXAIInputError("strict: the input does not fit the model: " + "; ".join(findings))
    return findings
