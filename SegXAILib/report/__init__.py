"""Reports: static figures (axial/coronal/sagittal overlays) and a self-contained HTML builder."""

from .figures import PLANES, PlaneSlices, overlay_figure, plane_slices, saliency_rgba, save_figure
from .html import HtmlReport, ImageCell, LinkCell, escape, format_value

__all__ = [
    "PLANES",
    "PlaneSlices",
    "plane_slices",
    "overlay_figure",
    "saliency_rgba",
    "save_figure",
    "HtmlReport",
    "ImageCell",
    "LinkCell",
    "escape",
    "format_value",
]
