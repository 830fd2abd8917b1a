"""Post-processing of attribution maps (METHODS end of section 2): signed, absolute, positive
part, and paper 000's normalisation (subtract the median, clip negatives, divide by the max)."""

from __future__ import annotations

import numpy as np

from ..image import SegXAIInputError

__all__ = ["postprocess", "normalise_000", "POSTPROCESSING"]

POSTPROCESSING = ("signed", "absolute", "positive", "normalised")


def normalise_000(values: np.ndarray) -> np.ndarray:
    """``max(v - median(v), 0) / max(...)`` per channel of ``(C, ...)``; range [0, 1]
    (all zeros when the map is constant)."""
    values = np.asarray(values, dtype=np.float32)
    result = np.empty_like(values)
    for channel, map_ in enumerate(values):
        shifted = np.maximum(map_ - np.median(map_), 0.0)
        peak = shifted.max()
        result[channel] = shifted / peak if peak > 0 else 0.0
    return result


def postprocess(values: np.ndarray, mode: str = "signed") -> np.ndarray:
    """Apply one of :data:`POSTPROCESSING` to a map ``(C, D, H, W)``."""
    values = np.asarray(values, dtype=np.float32)
    if mode == "signed":
        return values
    if mode == "absolute":
        return np.abs(values)
    if mode == "positive":
        return np.maximum(values, 0.0)
    if mode == "normalised":
        return normalise_000(values)
    raise SegXAIInputError(f"postprocessing must be one of {POSTPROCESSING}, got {mode!r}")
