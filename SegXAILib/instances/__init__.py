"""Instance-level saliency (METHODS section 3, paper 001): connected-component instances of a
prediction, SmoothGrad aggregated over an instance's voxels (mean, eq. 2; max, eq. 3), instance
Grad-CAM++ (eqs. 8-10), the lesion table and the TP / FP / FN / TN comparison."""

from .aggregation import AGGREGATIONS, instance_saliency, instance_smoothgrad
from .experiments import context_experiment, context_figure, transplant_experiment
from .gradcam import instance_gradcam_plusplus
from .instances import Instance, find_instances, instance_at
from .table import classify_instances, compare_groups, lesion_rows, lesion_table

__all__ = [
    "Instance",
    "find_instances",
    "instance_at",
    "instance_smoothgrad",
    "instance_saliency",
    "AGGREGATIONS",
    "instance_gradcam_plusplus",
    "lesion_table",
    "lesion_rows",
    "classify_instances",
    "compare_groups",
    "context_experiment",
    "context_figure",
    "transplant_experiment",
]
