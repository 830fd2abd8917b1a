"""Topology of saliency maps: Euler characteristic curves and persistent homology.

See METHODS.md section 6 (QA risk from persistent homology): :mod:`.euler` (curves),
:mod:`.risk` (the risk model), :mod:`.cohort` (calibration cohorts, scoring a case),
:mod:`.plots` (PNG plots).
"""

from .euler import (
    betti_curves,
    default_thresholds,
    euler_characteristic_curve,
    euler_characteristic_curve_gudhi,
    persistence_diagram,
)
from .risk import RiskModel, calibrate_risk_model, saliency_curve
from .cohort import (
    MethodSpec,
    ScoredCase,
    build_cohort,
    bundled_risk_model,
    calibrate_cohort,
    read_cohort,
    score_case,
)

__all__ = [
    "betti_curves",
    "default_thresholds",
    "euler_characteristic_curve",
    "euler_characteristic_curve_gudhi",
    "persistence_diagram",
    "RiskModel",
    "calibrate_risk_model",
    "saliency_curve",
    "MethodSpec",
    "ScoredCase",
    "build_cohort",
    "bundled_risk_model",
    "calibrate_cohort",
    "read_cohort",
    "score_case",
]
