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

__all__ = [
    "betti_curves",
    "default_thresholds",
    "euler_characteristic_curve",
    "euler_characteristic_curve_gudhi",
    "persistence_diagram",
]
