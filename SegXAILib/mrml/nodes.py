"""Volumes, segmentations and markups <-> SegXAI images, with exact geometry.

Arrays: a Slicer volume's ``vtkImageData`` scalars are ``[k, j, i]`` in numpy (what
``slicer.util.arrayFromVolume`` returns); an :class:`~SegXAILib.image.Image` is
``[c, i, j, k]``; the node's IJK-to-RAS matrix is the image's ``ijk_to_ras``.

Parent transforms: an image made from a node is in world RAS: a linear parent transform
(and its parents) is applied to the geometry, as Slicer's "Harden transform" does for a
linear transform, without resampling any voxel. A non-linear transform is refused (harden it
in Slicer first, which resamples). Nodes made from images under a ``parent_transform`` get
the local geometry ``inverse(to_world) @ ijk_to_ras``, so their voxels stay at the image's
world positions, and they move with the input when the user edits the transform.
"""

from __future__ import annotations

import colorsys
import logging
from typing import Mapping, Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError

__all__ = [
    "volume_node_to_image",
    "image_to_volume_node",
    "channel_image_from_volume_nodes",
    "segmentation_node_from_labels",
    "instances_segmentation_node",
    "segment_mask",
    "set_segment_risk",
    "segment_risk_tags",
    "markup_point_ras",
    "instance_from_markup",
    "place_under",
    "RISK_TAGS",
    "instance_color",
]

log = logging.getLogger(__name__)

#: segment tags the risk result is stored in (key in RiskModel.score's result -> tag)
RISK_TAGS = {
    "band": "SegXAI.RiskBand",
    "pc1": "SegXAI.RiskPC1",
    "estimated_dice": "SegXAI.EstimatedDice",
    "insufficient_probability": "SegXAI.InsufficientProbability",
}


# ---------------------------------------------------------------------------- helpers


def _numpy_support():
    from vtkmodules.util import numpy_support

    return numpy_support


def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _to_world(node) -> np.ndarray:
    """4x4 node-to-world matrix of ``node``'s parent transforms (identity without one)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise SegXAIInputError(
            f"node {node.GetName()!r}: its parent transform {transform.GetName()!r} is not linear; "
            "harden it (Data module, right-click, Harden transform) before using the node"
        )
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _matrix_to_numpy(matrix)


def _kji(array: np.ndarray) -> np.ndarray:
    """``(I, J, K)`` -> contiguous ``(K, J, I)``, the order of vtkImageData scalars."""
    return np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))


def _image_data(array_ijk: np.ndarray):
    """A vtkImageData holding a copy of ``array_ijk`` ``(I, J, K)`` (origin 0, spacing 1: the
    geometry lives in the node's IJK-to-RAS matrix)."""
    import vtk

    array = np.asarray(array_ijk)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*(int(s) for s in array.shape))
    scalars = _numpy_support().numpy_to_vtk(_kji(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def _array_from_image_data(image_data) -> np.ndarray:
    """``(I, J, K)`` copy of a single-component vtkImageData's scalars."""
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise SegXAIInputError("volume has no voxels (no image data)")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise SegXAIInputError(
            f"volume has {image_data.GetNumberOfScalarComponents()} components per voxel; expected a scalar volume"
        )
    i, j, k = image_data.GetDimensions()
    flat = _numpy_support().vtk_to_numpy(image_data.GetPointData().GetScalars())
    return np.ascontiguousarray(flat.reshape(k, j, i).transpose(2, 1, 0))


def _check_scene(scene) -> None:
    if scene is None or not hasattr(scene, "AddNewNodeByClass"):
        raise SegXAIInputError("scene: expected a vtkMRMLScene (slicer.mrmlScene inside Slicer)")


def place_under(scene, node, parent_node) -> None:
    """Put ``node``'s subject-hierarchy item under ``parent_node``'s (both created if missing)."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return

    def item_of(data_node) -> int:
        item = hierarchy.GetItemByDataNode(data_node)
        if not item:
            # Slicer's Qt plugins create items on NodeAdded; headless we do it here
            item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), data_node)
        return item

    hierarchy.SetItemParent(item_of(node), item_of(parent_node))


# ---------------------------------------------------------------------------- volumes


def volume_node_to_image(node, channel_name: Optional[str] = None, apply_transform: bool = True) -> Image:
    """A scalar volume node as a single-channel :class:`Image` ``(1, I, J, K)`` (a copy).

    Parameters
    ----------
    node : vtkMRMLScalarVolumeNode
    channel_name : str, optional
        Defaults to the node's name.
    apply_transform : bool
        Put the node's linear parent transform into the geometry (world RAS; the default,
        what Slicer displays). False gives the node's own IJK-to-RAS matrix.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise SegXAIInputError(f"volume: expected a scalar volume node, got {node!r:.80}")
    import vtk

    array = _array_from_image_data(node.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix_to_numpy(matrix)
    if apply_transform:
        ijk_to_ras = _to_world(node) @ ijk_to_ras
    try:
        return Image(array[None], ijk_to_ras, (channel_name or node.GetName() or "ch0",))
    except SegXAIInputError as error:
        raise SegXAIInputError(f"volume {node.GetName()!r}: {error}") from None


def image_to_volume_node(
    image: Image,
    scene,
    name: str = "",
    channel: int | str = 0,
    node=None,
    parent_transform=None,
    class_name: str = "vtkMRMLScalarVolumeNode",
):
    """Write one channel of ``image`` into a (new or given) scalar volume node.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, geometry in world RAS.
    scene : vtkMRMLScene
    name : str
        Node name (a new node); defaults to the channel's name.
    channel : int or str
    node : vtkMRMLScalarVolumeNode, optional
        Update this node instead of adding one (its parent transform is kept and undone).
    parent_transform : vtkMRMLTransformNode, optional
        Put the new node under this transform (e.g. the input volume's), local geometry
        ``inverse(to_world) @ image.ijk_to_ras``.
    class_name : str
        ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLLabelMapVolumeNode``.
    """
    _check_scene(scene)
    single = image.channel(channel)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name or single.channel_names[0])
        if parent_transform is not None:
            node.SetAndObserveTransformNodeID(parent_transform.GetID())
    local = np.linalg.inv(_to_world(node)) @ single.ijk_to_ras
    node.SetIJKToRASMatrix(_numpy_to_matrix(local))
    node.SetAndObserveImageData(_image_data(single.array[0]))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def channel_image_from_volume_nodes(nodes: Sequence, channel_names: Optional[Sequence[str]] = None) -> Image:
    """Several scalar volume nodes as one multi-channel :class:`Image` (the model's channels).

    Channels not on the first node's grid (world geometry, parent transforms applied) are
    resampled onto it (linear) with a warning, as :func:`SegXAILib.io.read_channels` does
    for files; mixed voxel types become float32.
    """
    from ..io import resample_to

    nodes = list(nodes)
    if not nodes or any(n is None for n in nodes):
        raise SegXAIInputError("input volumes: one volume node per model input channel is needed")
    if channel_names is not None and len(channel_names) != len(nodes):
        raise SegXAIInputError(f"input volumes: {len(nodes)} volumes for {len(channel_names)} channel names")
    names = list(channel_names) if channel_names is not None else [None] * len(nodes)
    images = [volume_node_to_image(node, name) for node, name in zip(nodes, names)]
    reference = images[0]
    aligned = [reference]
    for node, image in zip(nodes[1:], images[1:]):
        if not image.same_grid(reference):
            log.warning("volume %s is not on the grid of %s: resampled onto it (linear)", node.GetName(), nodes[0].GetName())
            image = resample_to(image, reference)
        aligned.append(image)
    if len(aligned) > 1:
        dtype = np.result_type(*[image.array.dtype for image in aligned], np.float32)
        aligned = [image.with_array(image.array.astype(dtype)) for image in aligned]
    return Image.stack(aligned)


# ---------------------------------------------------------------------------- segmentations


def _oriented_labelmap(mask: np.ndarray, ijk_to_ras: np.ndarray):
    import slicer

    labelmap = slicer.vtkOrientedImageData()
    source = _image_data(np.asarray(mask, dtype=np.uint8))
    labelmap.ShallowCopy(source)
    labelmap.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return labelmap


def _new_segmentation_node(scene, name: str, reference_volume, parent_transform):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    transform = parent_transform
    if transform is None and reference_volume is not None:
        transform = reference_volume.GetParentTransformNode()
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        place_under(scene, node, reference_volume)
    return node


def segmentation_node_from_labels(
    labels: Image,
    scene,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
    name: str = "SegXAI segmentation",
    reference_volume=None,
    parent_transform=None,
    include_empty: bool = True,
):
    """A segmentation node with one segment per foreground class of a label map.

    Parameters
    ----------
    labels : Image
        ``(1, I, J, K)`` class indices on the input grid (world RAS), e.g.
        ``Segmentation.labels``.
    class_names, class_colors : sequences
        From the model card (``card.class_names``, ``[c.color for c in card.classes]``, RGB
        0-255); index 0 is the background and gets no segment.
    reference_volume : vtkMRMLScalarVolumeNode, optional
        The input volume: its geometry becomes the segmentation's reference geometry, its
        parent transform the segmentation's, and the segmentation is placed under it in the
        subject hierarchy.
    include_empty : bool
        Also add segments for classes with no voxel (so every class is listed).

    Returns
    -------
    vtkMRMLSegmentationNode
        Segment ids are the class names; each segment carries the tag
        ``SegXAI.ClassIndex``.
    """
    _check_scene(scene)
    if labels.num_channels != 1:
        raise SegXAIInputError(f"labels: expected one channel, got {labels.num_channels}")
    if len(class_names) != len(class_colors):
        raise SegXAIInputError(f"{len(class_names)} class names for {len(class_colors)} colours")
    node = _new_segmentation_node(scene, name, reference_volume, parent_transform)
    local = np.linalg.inv(_to_world(node)) @ labels.ijk_to_ras
    values = labels.array[0]
    segmentation = node.GetSegmentation()
    for index in range(1, len(class_names)):
        mask = values == index
        if not include_empty and not mask.any():
            continue
        color = [float(c) / 255.0 for c in class_colors[index]]
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(
            _oriented_labelmap(mask, local), str(class_names[index]), color
        )
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag("SegXAI.ClassIndex", str(index))
    return node


def instance_color(instance_id: int) -> tuple[float, float, float]:
    """A distinct colour per instance (golden-angle hues), RGB in [0, 1]."""
    hue = (0.618033988749895 * instance_id) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95)


def instances_segmentation_node(
    instance_labels: Image,
    scene,
    name: str = "SegXAI instances",
    reference_volume=None,
    parent_transform=None,
    prefix: str = "Lesion",
    risk_bands: Optional[Mapping[int, str]] = None,
):
    """Instance ids ``(1, I, J, K)`` (0 = background, 1.. by decreasing size, from
    :func:`SegXAILib.instances.find_instances`) as a segmentation: one segment per instance
    named ``"<prefix> <id>"``, tagged ``SegXAI.InstanceId`` (and ``SegXAI.RiskBand`` when
    ``risk_bands`` gives one)."""
    _check_scene(scene)
    values = np.asarray(instance_labels.array[0])
    if not np.issubdtype(values.dtype, np.integer):
        raise SegXAIInputError(f"instance labels: expected integer ids, got {values.dtype}")
    node = _new_segmentation_node(scene, name, reference_volume, parent_transform)
    local = np.linalg.inv(_to_world(node)) @ instance_labels.ijk_to_ras
    segmentation = node.GetSegmentation()
    for identifier in [int(i) for i in np.unique(values) if i > 0]:
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(
            _oriented_labelmap(values == identifier, local), f"{prefix} {identifier}", list(instance_color(identifier))
        )
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag("SegXAI.InstanceId", str(identifier))
        if risk_bands and identifier in risk_bands:
            segment.SetTag(RISK_TAGS["band"], str(risk_bands[identifier]))
    return node


def segment_mask(segmentation_node, segment_name: str, reference: Image) -> np.ndarray:
    """Boolean ``(I, J, K)`` mask of one segment on ``reference``'s grid (world RAS).

    Uses Slicer's own export (``ExportSegmentsToLabelmapNode``) onto a temporary volume on
    the reference grid: an independent way back from the segment to voxels.
    """
    import slicer
    import vtk

    scene = segmentation_node.GetScene()
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise SegXAIInputError(f"segmentation {segmentation_node.GetName()!r}: no segment named {segment_name!r}")
    reference_node = image_to_volume_node(reference.with_array(np.zeros((1, *reference.spatial_shape), np.uint8)),
                                          scene, "SegXAI temporary reference")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SegXAI temporary labelmap")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_node
        ):
            raise SegXAIInputError(f"segment {segment_name!r}: Slicer could not export it")
        return volume_node_to_image(labelmap).array[0] > 0
    finally:
        for temporary in (labelmap, reference_node):
            display = temporary.GetDisplayNode()
            scene.RemoveNode(temporary)
            if display is not None:
                scene.RemoveNode(display)


def set_segment_risk(segmentation_node, segment_name: str, risk: Mapping[str, object]) -> None:
    """Store a risk result (:meth:`SegXAILib.topology.RiskModel.score`) as segment tags:
    ``SegXAI.RiskBand`` and, when present, PC1, estimated Dice, insufficient probability."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(segment_name) or "")
    if segment is None:
        raise SegXAIInputError(f"segmentation {segmentation_node.GetName()!r}: no segment named {segment_name!r}")
    if "band" not in risk:
        raise SegXAIInputError("risk: expected a RiskModel.score result with a 'band'")
    for key, tag in RISK_TAGS.items():
        if key in risk and risk[key] is not None:
            value = risk[key]
            segment.SetTag(tag, f"{value:.6g}" if isinstance(value, float) else str(value))


def segment_risk_tags(segmentation_node, segment_name: str) -> dict[str, str]:
    """The risk tags of one segment (key as in :data:`RISK_TAGS` -> text); empty when none."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(segment_name) or "")
    if segment is None:
        raise SegXAIInputError(f"segmentation {segmentation_node.GetName()!r}: no segment named {segment_name!r}")
    tags = {}
    for key, tag in RISK_TAGS.items():
        value = vtk.reference("")
        if segment.GetTag(tag, value):
            tags[key] = str(value)
    return tags


# ---------------------------------------------------------------------------- markups


def markup_point_ras(markups_node, index: int = -1) -> np.ndarray:
    """World RAS ``(3,)`` of control point ``index`` (the last placed by default) of a
    markups node (a click in a slice view); parent transforms are applied."""
    if markups_node is None or not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise SegXAIInputError("click: expected a markups node")
    count = markups_node.GetNumberOfControlPoints()
    if count == 0:
        raise SegXAIInputError(f"click: markups node {markups_node.GetName()!r} has no point")
    if index < 0:
        index += count
    if not 0 <= index < count:
        raise SegXAIInputError(f"click: point {index} of {count}")
    point = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, point)
    return np.asarray(point, dtype=float)


def instance_from_markup(markups_node, instance_labels: Image, radius_mm: float = 5.0, index: int = -1) -> int:
    """The instance under a click: the markups point -> world RAS ->
    :func:`SegXAILib.instances.instance_at` on ``instance_labels`` ``(1, I, J, K)``."""
    from ..instances import instance_at

    return instance_at(instance_labels, instance_labels, markup_point_ras(markups_node, index), radius_mm=radius_mm)
