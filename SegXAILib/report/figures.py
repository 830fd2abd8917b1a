"""Static figures for reports: axial / coronal / sagittal views with label outlines and saliency.

Display convention
------------------
Every view is drawn the way 3D Slicer shows it, in radiological convention, whatever the
acquisition orientation of the scan (the image is first brought to RAS with
:meth:`~SegXAILib.image.Image.reoriented`, an exact permutation/flip of the voxel axes):

* axial: anterior at the top, the patient's right on the left of the screen;
* coronal: superior at the top, the patient's right on the left of the screen;
* sagittal: superior at the top, anterior on the left of the screen.

Pixels keep their physical proportions: each view carries the aspect ratio (pixel height
over pixel width, in mm) given by the voxel spacing.

Only :class:`matplotlib.figure.Figure` with an Agg canvas is used, never ``pyplot``: no
global state, no GUI backend, safe in threads and on headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..image import Image, SegXAIInputError

__all__ = [
    "PLANES",
    "PlaneSlices",
    "plane_slices",
    "saliency_rgba",
    "default_label_color",
    "overlay_figure",
    "save_figure",
]

#: The three views, in the order they are drawn.
PLANES = ("axial", "coronal", "sagittal")

#: Screen-edge orientation letters of each view: (left, right, top, bottom).
_EDGE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}

#: Qualitative palette for label outlines (colour-blind friendly, Okabe-Ito order + extras).
_PALETTE = (
    (0.902, 0.624, 0.000),  # orange
    (0.337, 0.706, 0.914),  # sky blue
    (0.000, 0.620, 0.451),  # bluish green
    (0.941, 0.894, 0.259),  # yellow
    (0.835, 0.369, 0.000),  # vermillion
    (0.800, 0.475, 0.655),  # reddish purple
    (0.000, 0.447, 0.698),  # blue
    (0.600, 0.900, 0.300),  # light green
    (1.000, 0.400, 0.400),  # salmon
    (0.700, 0.700, 1.000),  # lavender
)


class PlaneSlices(dict):
    """The three display-ready 2D views (``"axial"``, ``"coronal"``, ``"sagittal"``) through a point.

    A ``dict`` of plane name to 2D array (rows top to bottom, columns left to right on the
    screen), with:

    ``aspect``
        plane name -> pixel height / pixel width in mm (pass it to ``imshow(aspect=...)``).
    ``crossing``
        plane name -> ``(row, column)`` of the point in that view.
    ``index``
        ``(i, j, k)`` voxel of the point on the RAS-reoriented grid.
    ``spacing``
        plane name -> ``(row spacing, column spacing)`` in mm.
    """

    def __init__(self, slices, aspect, crossing, index, spacing):
        super().__init__(slices)
        self.aspect: dict[str, float] = aspect
        self.crossing: dict[str, tuple[int, int]] = crossing
        self.index: tuple[int, int, int] = index
        self.spacing: dict[str, tuple[float, float]] = spacing


def _voxel_of_point(image: Image, ras_point) -> tuple[int, int, int]:
    point = np.asarray(ras_point, dtype=float).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise SegXAIInputError(f"ras_point must be 3 finite RAS coordinates in mm, got {ras_point!r}")
    ijk = image.ras_to_ijk_points(point)[0]
    shape = np.array(image.spatial_shape)
    if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
        raise SegXAIInputError(
            f"ras_point {tuple(round(float(p), 2) for p in point)} mm lies outside the image "
            f"(voxel {tuple(round(float(v), 2) for v in ijk)} of a {tuple(int(s) for s in shape)} grid)"
        )
    ijk = np.clip(np.rint(ijk), 0, shape - 1).astype(int)
    return int(ijk[0]), int(ijk[1]), int(ijk[2])


def plane_slices(image: Image, ras_point, channel: int = 0) -> PlaneSlices:
    """The axial, coronal and sagittal slices of ``image`` through the RAS point ``ras_point``.

    The image is reoriented to RAS first, so the views show the same thing for a scan stored
    in any orientation (axial, coronal, flipped...). Each view is oriented for display as in
    3D Slicer (radiological convention, see the module notes): ``ax.imshow(slices["axial"],
    aspect=slices.aspect["axial"])`` draws it right. The point is snapped to the nearest voxel;
    :class:`SegXAIInputError` if it lies outside the image.
    """
    if not isinstance(image, Image):
        raise SegXAIInputError(f"plane_slices: expected an Image, got {type(image).__name__}")
    if not -image.num_channels <= channel < image.num_channels:
        raise SegXAIInputError(f"plane_slices: channel {channel} out of range ({image.num_channels} channels)")
    ras = image.reoriented("RAS")
    i, j, k = _voxel_of_point(ras, ras_point)
    volume = ras.array[channel]  # [i (->R), j (->A), k (->S)]
    size_i, size_j, size_k = ras.spatial_shape
    si, sj, sk = (float(s) for s in ras.spacing)
    # Row 0 is the top of the screen, column 0 its left edge.
    slices = {
        # rows: anterior -> posterior (j descending); columns: right -> left (i descending)
        "axial": volume[::-1, ::-1, k].T,
        # rows: superior -> inferior (k descending); columns: right -> left (i descending)
        "coronal": volume[::-1, j, ::-1].T,
        # rows: superior -> inferior (k descending); columns: anterior -> posterior (j descending)
        "sagittal": volume[i, ::-1, ::-1].T,
    }
    slices = {name: np.ascontiguousarray(view) for name, view in slices.items()}
    crossing = {
        "axial": (size_j - 1 - j, size_i - 1 - i),
        "coronal": (size_k - 1 - k, size_i - 1 - i),
        "sagittal": (size_k - 1 - k, size_j - 1 - j),
    }
    spacing = {"axial": (sj, si), "coronal": (sk, si), "sagittal": (sk, sj)}
    aspect = {name: rows / columns for name, (rows, columns) in spacing.items()}
    return PlaneSlices(slices, aspect, crossing, (i, j, k), spacing)


def default_label_color(label: int) -> tuple[float, float, float]:
    """The outline colour of a label value when none is given (a fixed qualitative palette)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def _to_rgb(color, label) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    if isinstance(color, str):
        try:
            return to_rgba(color)
        except ValueError:
            raise SegXAIInputError(f"label_colors[{label}]: {color!r} is not a colour") from None
    values = np.asarray(color, dtype=float).reshape(-1)
    if values.size not in (3, 4) or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise SegXAIInputError(f"label_colors[{label}]: expected an RGB(A) tuple, got {color!r}")
    if np.any(values > 1):  # 0-255 components
        values = values / 255.0
    if np.any(values > 1):
        raise SegXAIInputError(f"label_colors[{label}]: components must be 0-1 or 0-255, got {color!r}")
    return tuple(float(v) for v in values) if values.size == 4 else (*map(float, values), 1.0)


def saliency_rgba(
    values: np.ndarray,
    vmax: float,
    threshold: float = 0.17,
    signed: bool = False,
    alpha: float = 0.6,
    cmap: str | None = None,
) -> np.ndarray:
    """The RGBA overlay ``(..., 4)`` of saliency ``values`` scaled by ``vmax`` (the map's max |value|).

    Pixels with ``|value| < threshold * vmax`` are fully transparent (alpha 0), so the
    background shows through untouched; the others get opacity ``alpha``. ``signed=False``
    colours the magnitude (``"inferno"``, 0 to ``vmax``); ``signed=True`` keeps the sign on a
    diverging scale symmetric around 0 (``"RdBu_r"``: negative blue, positive red).
    """
    from matplotlib import colormaps

    if not 0 <= threshold <= 1:
        raise SegXAIInputError(f"threshold must be between 0 and 1 (a share of the max |saliency|), got {threshold}")
    if not 0 <= alpha <= 1:
        raise SegXAIInputError(f"alpha must be between 0 and 1, got {alpha}")
    values = np.nan_to_num(np.asarray(values, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
    vmax = float(vmax)
    if not np.isfinite(vmax) or vmax <= 0:
        return np.zeros(values.shape + (4,))
    if signed:
        scaled = np.clip(0.5 + 0.5 * values / vmax, 0.0, 1.0)
        colormap = colormaps[cmap or "RdBu_r"]
    else:
        scaled = np.clip(np.abs(values) / vmax, 0.0, 1.0)
        colormap = colormaps[cmap or "inferno"]
    rgba = np.asarray(colormap(scaled), dtype=float)
    visible = np.abs(values) >= threshold * vmax
    rgba[..., 3] = np.where(visible, alpha, 0.0)
    return rgba


def _check_grid(background: Image, other: Image | None, name: str) -> None:
    if other is None:
        return
    if not isinstance(other, Image):
        raise SegXAIInputError(f"overlay_figure: {name} must be an Image, got {type(other).__name__}")
    if not background.same_grid(other):
        raise SegXAIInputError(
            f"overlay_figure: {name} {other!r} is not on the background's grid {background!r}; "
            "resample it first (SegXAILib.io.resample_to, nearest for labels)"
        )


def _window(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1, 99]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return low, high


def overlay_figure(
    background: Image,
    ras_point,
    labels: Image | None = None,
    saliency: Image | None = None,
    threshold: float = 0.17,
    signed: bool = False,
    label_colors: Mapping[int, tuple] | None = None,
    title: str = "",
    *,
    crosshair: bool = False,
    colorbar: bool = True,
    saliency_alpha: float = 0.6,
    label_names: Mapping[int, str] | None = None,
    width_inches: float = 12.0,
    height_inches: float = 4.6,
    window: tuple[float, float] | None = None,
):
    """Axial, coronal and sagittal views through ``ras_point`` with label outlines and saliency.

    Parameters
    ----------
    background : Image
        Channel 0 is drawn in grey, windowed to its 1st-99th percentile over the volume.
    ras_point : sequence of 3 floats
        The RAS point (mm) the three views go through.
    labels : Image, optional
        Integer label map on the background's grid; each non-zero value is drawn as a
        coloured outline (``label_colors`` or a fixed palette).
    saliency : Image, optional
        Saliency map (channel 0) on the background's grid; drawn above the background,
        transparent where ``|value| < threshold * max|value|`` (max over the whole volume).
    threshold : float
        Share (0-1) of the map's max |value| below which the overlay is transparent.
    signed : bool
        ``True``: diverging blue (negative) / red (positive) scale symmetric around 0;
        ``False``: the magnitude on a sequential scale.
    label_colors : dict, optional
        Label value -> RGB(A) tuple (0-1 or 0-255) or a matplotlib colour name.
    title : str
        Figure title.
    crosshair : bool
        Draw dashed lines through the point.
    colorbar : bool
        Draw a colour bar for the saliency scale (at the right, outside the views).
    label_names : dict, optional
        Label value -> name for the legend (default ``"label <value>"``).
    window : (float, float), optional
        The grey window ``(low, high)`` of the background (default: its 1st-99th percentile),
        so that figures of related images (an image and its counterfactuals) share one scale.

    Returns
    -------
    matplotlib.figure.Figure
        With an Agg canvas (``fig.canvas.draw()``; ``fig.canvas.buffer_rgba()``); the three
        views are ``fig.axes[0:3]`` (axial, coronal, sagittal).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import matplotlib.patheffects as patheffects

    if not isinstance(background, Image):
        raise SegXAIInputError(f"overlay_figure: background must be an Image, got {type(background).__name__}")
    _check_grid(background, labels, "labels")
    _check_grid(background, saliency, "saliency")

    views = plane_slices(background, ras_point)
    if window is not None:
        low, high = (float(v) for v in window)
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise SegXAIInputError(f"overlay_figure: window must be two finite values, low < high, got {window!r}")
    else:
        low, high = _window(np.asarray(background.array[0], dtype=float))

    label_views = label_values = None
    colors: dict[int, tuple] = {}
    if labels is not None:
        label_volume = labels.array[0]
        if not (np.issubdtype(label_volume.dtype, np.integer) or np.issubdtype(label_volume.dtype, np.bool_)):
            if not np.all(np.isfinite(label_volume)) or not np.array_equal(label_volume, np.rint(label_volume)):
                raise SegXAIInputError("overlay_figure: labels must hold integer values (a label map)")
        label_views = plane_slices(labels, ras_point)
        label_values = [int(v) for v in np.unique(label_volume) if v != 0]
        label_colors = dict(label_colors or {})
        for value in label_values:
            color = label_colors.get(value)
            colors[value] = _to_rgb(color, value) if color is not None else (*default_label_color(value), 1.0)

    saliency_views = None
    vmax = 0.0
    if saliency is not None:
        saliency_volume = np.asarray(saliency.array[0], dtype=float)
        finite = np.isfinite(saliency_volume)
        vmax = float(np.abs(saliency_volume[finite]).max()) if finite.any() else 0.0
        saliency_views = plane_slices(saliency.with_array(saliency_volume[None]), ras_point)

    fig = Figure(figsize=(width_inches, height_inches), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    # Fixed panel rectangles: adding a colour bar or legend never moves the views.
    panel_width, gap, left = 0.295, 0.01, 0.01
    bottom, height = 0.12, 0.76
    axes = []
    for position, plane in enumerate(PLANES):
        ax = fig.add_axes((left + position * (panel_width + gap), bottom, panel_width, height))
        ax.set_facecolor("black")
        axes.append(ax)

    outline = [patheffects.withStroke(linewidth=2.0, foreground="black")]
    for ax, plane in zip(axes, PLANES):
        view = views[plane]
        rows, columns = view.shape
        aspect = views.aspect[plane]
        ax.imshow(view, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest", origin="upper")
        if saliency_views is not None:
            overlay = saliency_rgba(saliency_views[plane], vmax, threshold, signed, alpha=saliency_alpha)
            ax.imshow(overlay, aspect=aspect, interpolation="nearest", origin="upper")
        if label_views is not None:
            label_view = label_views[plane]
            # pad with background so labels touching the edge get closed outlines
            ys = np.arange(-1, rows + 1)
            xs = np.arange(-1, columns + 1)
            for value in label_values:
                mask = np.pad((label_view == value).astype(float), 1)
                if mask.max() == 0:
                    continue
                ax.contour(xs, ys, mask, levels=[0.5], colors=[colors[value]], linewidths=1.2)
        if crosshair:
            row, column = views.crossing[plane]
            style = dict(color=(1.0, 0.85, 0.1), linewidth=0.7, linestyle=(0, (4, 4)), alpha=0.9)
            ax.axhline(row, **style)
            ax.axvline(column, **style)
        ax.set_xlim(-0.5, columns - 0.5)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(plane.capitalize(), fontsize=11)
        left_letter, right_letter, top_letter, bottom_letter = _EDGE_LETTERS[plane]
        text_style = dict(color="white", fontsize=9, fontweight="bold", path_effects=outline)
        ax.text(0.01 * columns, rows / 2, left_letter, ha="left", va="center", **text_style)
        ax.text(columns - 1 - 0.01 * columns, rows / 2, right_letter, ha="right", va="center", **text_style)
        ax.text(columns / 2, 0.01 * rows, top_letter, ha="center", va="top", **text_style)
        ax.text(columns / 2, rows - 1 - 0.01 * rows, bottom_letter, ha="center", va="bottom", **text_style)

    if saliency_views is not None and colorbar and vmax > 0:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        scale_axes = fig.add_axes((0.935, bottom + 0.08, 0.012, height - 0.16))
        if signed:
            mappable = ScalarMappable(Normalize(-vmax, vmax), colormaps["RdBu_r"])
        else:
            mappable = ScalarMappable(Normalize(0.0, vmax), colormaps["inferno"])
        bar = fig.colorbar(mappable, cax=scale_axes)
        bar.ax.tick_params(labelsize=8)
        bar.set_label(
            f"saliency{' (signed)' if signed else ' |value|'}; hidden below {threshold:g} x max", fontsize=8
        )

    if label_values:
        names = dict(label_names or {})
        handles = [
            Line2D([], [], color=colors[value], linewidth=2, label=str(names.get(value, f"label {value}")))
            for value in label_values[:20]
        ]
        fig.legend(
            handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False,
            bbox_to_anchor=(0.47, 0.0),
        )
    if title:
        fig.suptitle(str(title), fontsize=12, y=0.985)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (the folder is created if needed); returns the path."""
    from matplotlib.figure import Figure

    from ..io import atomic_path, check_writable_dir

    if not isinstance(fig, Figure):
        raise SegXAIInputError(f"save_figure: expected a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SegXAIInputError(f"save_figure: {path} must end in .png")
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    if fig.canvas is None or type(fig.canvas).__name__ == "FigureCanvasBase":
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return path
