"""Instance-level saliency (METHODS section 3, paper 001): connected-component instances of a
prediction, and SmoothGrad aggregated over an instance's voxels (mean, eq. 2; max, eq. 3)."""

from .aggregation import AGGREGATIONS, instance_smoothgrad
from .instances import Instance, find_instances, instance_at

__all__ = ["Instance", "find_instances", "instance_at", "instance_smoothgrad", "AGGREGATIONS"]
