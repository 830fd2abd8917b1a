"""The MRML bridge: SegXAI results as ordinary 3D Slicer nodes.

Qt-free: every function takes the scene (``vtkMRMLScene``) or a node explicitly and imports
``slicer`` only when called, so the same code runs inside 3D Slicer (pass
``slicer.mrmlScene``) and headless with the ``slicer-core`` wheel (make a scene with
:func:`headless_scene`). Geometry follows :mod:`SegXAILib.image`: images in RAS ("world")
coordinates; a node's parent transform is applied to (or undone from) the geometry, see
:func:`volume_node_to_image` and :func:`image_to_volume_node`.
"""

from .display import (
    SALIENCY_THRESHOLD,
    saliency_color_table,
    saliency_volume_node,
    show_in_slice_views,
    slice_composite_nodes,
    jump_slices_to,
)
from .nodes import (
    channel_image_from_volume_nodes,
    image_to_volume_node,
    instance_from_markup,
    instances_segmentation_node,
    markup_point_ras,
    segment_mask,
    segment_risk_tags,
    segmentation_node_from_labels,
    set_segment_risk,
    volume_node_to_image,
)
from .scene import headless_scene, load_scene_bundle, save_scene_bundle
from .tables import (
    ec_curve_chart,
    lesion_centroid_ras,
    lesion_table_node,
    qa_table_node,
    table_node_columns,
    table_row_of_model_row,
)

__all__ = [
    "SALIENCY_THRESHOLD",
    "saliency_color_table",
    "saliency_volume_node",
    "show_in_slice_views",
    "slice_composite_nodes",
    "jump_slices_to",
    "channel_image_from_volume_nodes",
    "image_to_volume_node",
    "instance_from_markup",
    "instances_segmentation_node",
    "markup_point_ras",
    "segment_mask",
    "segment_risk_tags",
    "segmentation_node_from_labels",
    "set_segment_risk",
    "volume_node_to_image",
    "headless_scene",
    "load_scene_bundle",
    "save_scene_bundle",
    "ec_curve_chart",
    "lesion_table_node",
    "qa_table_node",
    "table_node_columns",
    "table_row_of_model_row",
    "lesion_centroid_ras",
]
