"""Saliency maps in the slice views: colour tables with a transparent band, overlays, jumps.

A saliency volume is shown through a colour table whose entries below ``threshold`` of the
map's range are fully transparent (paper 000 hid everything below 17 % of the normalised
map), so only the salient voxels tint the anatomy underneath:

* unsigned maps: the display range is ``[0, peak]`` (``peak`` = the map's maximum, 1 for
  maps normalised as in paper 000); colours run dark red -> red -> yellow -> white ("hot");
* signed maps: the range is ``[-M, M]`` with ``M = max |map|``; negative values are blue,
  positive red, and ``|value| < threshold * M`` is transparent.

The table has ``n_colors`` entries over the range; an entry is transparent when its centre
lies below the threshold, so the cut is exact to one entry (``1 / n_colors`` of the range).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError

__all__ = [
    "SALIENCY_THRESHOLD",
    "saliency_colors",
    "saliency_color_table",
    "saliency_volume_node",
    "slice_composite_nodes",
    "show_in_slice_views",
    "jump_slices_to",
]

#: paper 000's display threshold, as a fraction of the normalised map
SALIENCY_THRESHOLD = 0.17


def saliency_colors(threshold: float = SALIENCY_THRESHOLD, signed: bool = False, n_colors: int = 256) -> np.ndarray:
    """RGBA ``(n_colors, 4)`` in [0, 1] of the saliency colour table (see the module notes)."""
    if not 0.0 <= threshold < 1.0:
        raise SegXAIInputError(f"saliency threshold must be in [0, 1), got {threshold}")
    if n_colors < 2:
        raise SegXAIInputError(f"n_colors must be >= 2, got {n_colors}")
    centres = (np.arange(n_colors) + 0.5) / n_colors  # fraction of the display range
    rgba = np.zeros((n_colors, 4))
    if signed:
        value = 2.0 * centres - 1.0  # in [-1, 1]
        strength = np.abs(value)
        fade = 1.0 - strength
        negative = value < 0
        rgba[negative, :3] = np.stack([0.25 * fade, 0.45 * fade, np.ones_like(fade)], axis=1)[negative]
        rgba[~negative, :3] = np.stack([np.ones_like(fade), 0.45 * fade, 0.25 * fade], axis=1)[~negative]
        rgba[:, 3] = (strength >= threshold).astype(float)
    else:
        rgba[:, 0] = np.clip(3.0 * centres, 0, 1)
        rgba[:, 1] = np.clip(3.0 * centres - 1.0, 0, 1)
        rgba[:, 2] = np.clip(3.0 * centres - 2.0, 0, 1)
        rgba[:, 3] = (centres >= threshold).astype(float)
    return rgba


def saliency_color_table(scene, threshold: float = SALIENCY_THRESHOLD, signed: bool = False, n_colors: int = 256):
    """The colour table node for saliency overlays (shared: one per threshold and kind)."""
    name = f"SegXAI {'signed ' if signed else ''}saliency {threshold:.3g}"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode") and existing.GetNumberOfColors() == n_colors:
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(n_colors)
    node.SetAttribute("SegXAI.Threshold", f"{threshold:.6g}")
    node.SetAttribute("SegXAI.Signed", str(bool(signed)).lower())
    for index, (r, g, b, a) in enumerate(saliency_colors(threshold, signed, n_colors)):
        node.SetColor(index, f"{index}", float(r), float(g), float(b), float(a))
    return node


def saliency_volume_node(
    saliency: Image,
    scene,
    name: str,
    channel: int | str = 0,
    threshold: float = SALIENCY_THRESHOLD,
    signed: Optional[bool] = None,
    peak: Optional[float] = None,
    reference_volume=None,
    parent_transform=None,
):
    """One channel of a saliency map as a scalar volume node with the saliency colour table.

    Parameters
    ----------
    saliency : Image
        Maps on the input grid (world RAS), e.g. ``AttributionResult.maps``.
    signed : bool, optional
        Blue-negative / red-positive display; by default when the channel has negative values.
    peak : float, optional
        Top of the unsigned display range (``M`` for signed); the channel's max (max |v|) by default.
    reference_volume : vtkMRMLScalarVolumeNode, optional
        The input volume: the map gets its parent transform and is placed under it in the
        subject hierarchy.
    """
    from .nodes import image_to_volume_node, place_under

    values = saliency.channel(channel)
    array = values.array[0].astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise SegXAIInputError(f"saliency {name!r}: the map has NaN or Inf voxels")
    if signed is None:
        signed = bool(array.min() < 0)
    top = float(peak) if peak is not None else float(np.abs(array).max() if signed else max(array.max(), 0.0))
    if not top > 0:
        top = 1.0  # an all-zero map: any range shows nothing
    transform = parent_transform
    if transform is None and reference_volume is not None:
        transform = reference_volume.GetParentTransformNode()
    node = image_to_volume_node(values.with_array(array[None]), scene, name, parent_transform=transform)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(saliency_color_table(scene, threshold, signed).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-top if signed else 0.0, top)
    display.SetInterpolate(False)
    node.SetAttribute("SegXAI.Saliency", "signed" if signed else "unsigned")
    node.SetAttribute("SegXAI.Threshold", f"{threshold:.6g}")
    if reference_volume is not None:
        place_under(scene, node, reference_volume)
    return node


def slice_composite_nodes(scene, views: Optional[Sequence[str]] = None) -> list:
    """The slice composite nodes of ``scene`` (one per slice view), optionally only ``views``
    (layout names such as ``"Red"``)."""
    nodes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if views is None or node.GetLayoutName() in views:
            nodes.append(node)
    return nodes


def show_in_slice_views(
    scene,
    background=None,
    foreground=None,
    foreground_opacity: float = 0.5,
    label=None,
    views: Optional[Sequence[str]] = None,
) -> int:
    """Set the slice views' layers: ``background`` / ``foreground`` / ``label`` volume nodes
    (None leaves a layer as it is) and the foreground opacity. Returns the number of views
    changed (0 in a scene without views)."""
    if not 0.0 <= foreground_opacity <= 1.0:
        raise SegXAIInputError(f"foreground opacity must be in [0, 1], got {foreground_opacity}")
    composites = slice_composite_nodes(scene, views)
    for composite in composites:
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
            composite.SetForegroundOpacity(float(foreground_opacity))
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
    return len(composites)


def jump_slices_to(scene, ras: Sequence[float]) -> int:
    """Centre every slice view on the RAS point (e.g. a lesion's centroid). Returns the
    number of slice views moved."""
    point = [float(v) for v in np.asarray(ras, dtype=float).reshape(3)]
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")
    for index in range(count):
        scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByCentering(*point)
    return count
