"""Reference-free per-case QA scores (shared/QA_PROTOCOL.md): predicted volume, mask
shape, the model's own probabilities, agreement of prediction samples and image quality, each a
flat dict of named floats with :data:`~.scores.RISK_DIRECTION`, and the control curves that a
saliency Euler characteristic curve is judged against (:mod:`.scores`)."""

from .scores import (RISK_DIRECTION, UNCERTAINTY_PREFIXES, case_scores, image_quality_scores, intensity_curve,
                     mask_shape_scores, probability_scores, risk_oriented, shuffled_saliency_curve,
                     uncertainty_scores)

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
