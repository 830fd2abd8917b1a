"""Topology of saliency maps: Euler characteristic curves and persistent homology.

See METHODS.md section 6 (QA risk from persistent homology): :mod:`.euler` (curves),
:mod:`.risk` (the risk model), :mod:`.cohort` (reading and calibrating cohorts),
Risk plots are
in :mod:`SegXAILib.report.risk_plots`; scoring a case is the pipeline's QA step
(:func:`SegXAILib.pipeline.score_qa`); building a cohort is :mod:`SegXAILib.pipeline.cohort`.
"""

from .euler import (
    betti_curves,
    default_thresholds,
    euler_characteristic_curve,
    euler_characteristic_curve_gudhi,
    persistence_diagram,
)
from .risk import RiskModel, bundled_risk_model, calibrate_risk_model, saliency_curve, shipped_risk_model
from .cohort import batch_case_dice, batch_curves, calibrate_cohort, cohort_curves, is_batch_folder, read_cohort

__all__ = [
    "betti_curves",
    "default_thresholds",
    "euler_characteristic_curve",
    "euler_characteristic_curve_gudhi",
    "persistence_diagram",
    "RiskModel",
    "calibrate_risk_model",
    "saliency_curve",
    "bundled_risk_model",
    "shipped_risk_model",
    "calibrate_cohort",
    "cohort_curves",
    "read_cohort",
    "batch_curves",
    "batch_case_dice",
    "is_batch_folder",
]
