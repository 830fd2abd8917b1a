"""Topology of saliency maps: Euler characteristic curves and persistent homology.

See METHODS.md section 6 (QA risk from persistent homology).
"""

from .euler import (
    betti_curves,
    default_thresholds,
    euler_characteristic_curve,
    euler_characteristic_curve_gudhi,
    persistence_diagram,
)
from .risk import RiskModel, calibrate_risk_model, saliency_curve

__all__ = [
    "betti_curves",
    "default_thresholds",
    "euler_characteristic_curve",
    "euler_characteristic_curve_gudhi",
    "persistence_diagram",
    "RiskModel",
    "calibrate_risk_model",
    "saliency_curve",
]
