"""Attribution for 3D segmentation: targets, the window-exact forward, methods, the registry.

Use :func:`explain` for a whole case, or a method class directly on a
:class:`SegmentationForward` for model-grid tensors.
"""

from .api import AttributionResult, TargetSpec, explain, instance_labels
from .base import Attribution, Parameter
from .forward import SegmentationForward
from .postprocess import POSTPROCESSING, normalise_000, postprocess
from .registry import available_methods, check_params, get_method, method_specs, parse_params
from .targets import ClassTarget, ClassThresholdTarget, InstanceTarget, RegionTarget, Target, VoxelTarget

__all__ = [
    "AttributionResult",
    "TargetSpec",
    "explain",
    "instance_labels",
    "Attribution",
    "Parameter",
    "SegmentationForward",
    "POSTPROCESSING",
    "normalise_000",
    "postprocess",
    "available_methods",
    "get_method",
    "method_specs",
    "check_params",
    "parse_params",
    "Target",
    "ClassTarget",
    "ClassThresholdTarget",
    "InstanceTarget",
    "RegionTarget",
    "VoxelTarget",
]
