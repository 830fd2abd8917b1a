"""Segmentation overlap metrics."""

from __future__ import annotations

import numpy as np

__all__ = ["dice_score"]


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"dice_score: shapes differ, {prediction.shape} vs {reference.shape}")
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(prediction, reference).sum() / total)
