#!/usr/bin/env python
"""Render the Extensions Catalog screenshots offscreen, from a real MRML scene, no Slicer GUI.

The bundled sample case (the head T1 with inserted lesions, :func:`SegXAILib.demo.demo_phantom`)
runs through the case pipeline (:func:`SegXAILib.pipeline.run_case`, the bundled ``lesions``
model), is shown in a ``slicer-core`` scene (:func:`SegXAILib.mrml.headless_scene`,
:func:`SegXAILib.mrml.logic.show_case`, as the module's Logic shows it in Slicer), and the
slice views are rendered by Slicer's own slice logic: a ``vtkMRMLSliceLogic`` on the scene's
Red / Yellow / Green slice node reslices the background, foreground and label layers and
blends them into one RGBA image, without a render window.

Segmentation outlines are drawn in Slicer by displayable managers, which need a render
window. Here each lesion's outline is computed (:func:`outline_label_volume`: the voxels just
outside the lesion, in the lesion's segment colour) and shown as the slice views' *label
layer*, which the slice logic blends on top.

Writes into ``Resources/Catalogue/Screenshots/`` (atomically, PNG):

* ``segxai_class_saliency.png``: axial, sagittal and coronal views through the largest lesion:
  the FLAIR channel, the lesion class's SmoothGrad map (paper 000's normalisation, hot colours,
  transparent below 17 %) and the lesions' outlines;
* ``segxai_lesion_saliency.png``: the largest lesion's own (instance) saliency, axial and
  coronal views zoomed on it, with the lesions' outlines;
* ``segxai_qa_ec_curve.png``: the QA figure of the library's plotting (:func:`SegXAILib.report.
  risk_plots.ec_curve_figure`): the case's Euler characteristic curve over the calibration
  cohort's bands, coloured by its risk band.

Run from the repository root::

    PYTHONPATH=$PWD python Utilities/render_screenshots.py [--out DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from SegXAILib.image import SegXAIInputError  # noqa: E402
from SegXAILib.io import atomic_path, check_writable_dir  # noqa: E402

__all__ = [
    "SCREENSHOTS",
    "slice_node",
    "render_slice_view",
    "outline_label_volume",
    "write_png",
    "case_settings",
    "render_case_screenshots",
    "main",
]

#: the screenshots, in the order of EXTENSION_SCREENSHOTURLS
SCREENSHOTS = ("segxai_class_saliency.png", "segxai_lesion_saliency.png", "segxai_qa_ec_curve.png")

#: default output folder (the catalogue's screenshots, committed)
DEFAULT_OUT = ROOT / "Resources" / "Catalogue" / "Screenshots"


def slice_node(scene, view: str):
    """The slice node of the layout view ``view`` (``"Red"``, ``"Yellow"``, ``"Green"``).

    By singleton tag and class: the scene also holds a colour table named "Red".
    """
    node = scene.GetSingletonNode(view, "vtkMRMLSliceNode")
    if node is None:
        raise SegXAIInputError(f"view {view!r}: the scene has no slice node of that name")
    return node


def render_slice_view(
    scene,
    view: str = "Red",
    size: tuple[int, int] = (256, 256),
    through_ras: Optional[Sequence[float]] = None,
    centre: bool = False,
    field_of_view_mm: Optional[float] = None,
    label_outline: bool = False,
) -> np.ndarray:
    """Render one slice view of ``scene`` with Slicer's slice logic (no render window).

    The view shows what the view's slice composite node names (background, foreground with
    its opacity, label layer), resliced and blended by ``vtkMRMLSliceLogic`` exactly as the
    slice view in Slicer would blend them (the displayable managers' overlays, e.g.
    segmentations and markups, are not part of it).

    Parameters
    ----------
    scene : vtkMRMLScene
        With the slice and slice composite nodes (:func:`SegXAILib.mrml.headless_scene`).
    view : str
        Layout name of the slice view.
    size : (int, int)
        ``(width, height)`` in pixels.
    through_ras : sequence of 3 float, optional
        A RAS point (mm) the slice passes through; the volumes' centre (the slice logic's fit)
        by default.
    centre : bool
        Also centre the view on ``through_ras`` (else only the slice moves along its normal).
    field_of_view_mm : float, optional
        Width of the view in mm (the height follows from ``size``, square pixels); fitted to
        the volumes by default.
    label_outline : bool
        Draw the label layer as outlines (Slicer's "outline" label display) instead of filled.

    Returns
    -------
    ndarray, shape (height, width, 3), uint8
        RGB, first row at the top of the view (as a screenshot reads).
    """
    import slicer
    from vtkmodules.util import numpy_support

    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise SegXAIInputError(f"size must be two positive pixel counts, got {size}")
    node = slice_node(scene, view)
    logic = slicer.vtkMRMLSliceLogic()
    try:
        application = getattr(scene, "_segxai_application_logic", None)
        if application is not None:
            logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(node)
        node.SetUseLabelOutline(bool(label_outline))
        node.SetDimensions(width, height, 1)
        logic.FitSliceToAll()
        if field_of_view_mm is not None:
            if not field_of_view_mm > 0:
                raise SegXAIInputError(f"field_of_view_mm must be > 0, got {field_of_view_mm}")
            depth = node.GetFieldOfView()[2]
            node.SetFieldOfView(float(field_of_view_mm), float(field_of_view_mm) * height / width, depth)
        if through_ras is not None:
            point = [float(v) for v in np.asarray(through_ras, dtype=float).reshape(3)]
            if centre:
                node.JumpSliceByCentering(*point)
            else:
                node.JumpSliceByOffsetting(*point)
        node.UpdateMatrices()
        connection = logic.GetImageDataConnection()
        if connection is None:
            raise SegXAIInputError(f"view {view!r}: the slice logic has no image (no volume in the view?)")
        producer = connection.GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(connection.GetIndex())
        columns, rows, _ = image.GetDimensions()
        scalars = image.GetPointData().GetScalars()
        if scalars is None or columns != width or rows != height:
            raise SegXAIInputError(f"view {view!r}: the slice logic produced no {width}x{height} image")
        pixels = numpy_support.vtk_to_numpy(scalars).reshape(rows, columns, -1)
        # VTK's first row is the bottom of the view
        return np.ascontiguousarray(pixels[::-1, :, :3]).astype(np.uint8)
    finally:
        logic.SetMRMLScene(None)


def outline_label_volume(scene, instance_labels, name: str = "SegXAI lesion outlines"):
    """A labelmap volume of each lesion's outline: the voxels just outside it (6-connected
    dilation minus the lesions), labelled with the lesion's id and coloured with its segment
    colour (:func:`SegXAILib.mrml.nodes.instance_color`).

    Outside, so that the saliency inside a small lesion stays visible under the outline (the
    slice node's own label-outline mode draws the lesion's border voxels, which cover most of
    a lesion a few voxels wide).

    Parameters
    ----------
    instance_labels : Image
        ``(1, I, J, K)`` integer ids, 0 = background (``Case.instance_labels``).
    """
    from scipy import ndimage

    from SegXAILib.mrml.nodes import image_to_volume_node, instance_color

    labels = np.asarray(instance_labels.array[0])
    if not np.issubdtype(labels.dtype, np.integer):
        raise SegXAIInputError(f"instance_labels: expected integer ids, got {labels.dtype}")
    cross = ndimage.generate_binary_structure(3, 1)
    # each ring voxel takes the largest neighbouring id (two lesions touching: either is right)
    ring = np.where(labels == 0, ndimage.grey_dilation(labels, footprint=cross), 0).astype(np.int16)
    node = image_to_volume_node(instance_labels.with_array(ring[None]), scene, name,
                                class_name="vtkMRMLLabelMapVolumeNode")
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
    colors.SetTypeToUser()
    count = int(labels.max()) + 1
    colors.SetNumberOfColors(count)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for identifier in range(1, count):
        colors.SetColor(identifier, f"Lesion {identifier}", *instance_color(identifier), 1.0)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return node


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 image (first row at the top) as a PNG, atomically, with VTK's writer."""
    import vtk
    from vtkmodules.util import numpy_support

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SegXAIInputError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    path = Path(path)
    check_writable_dir(path.parent)
    rows, columns = rgb.shape[:2]
    data = vtk.vtkImageData()
    data.SetDimensions(columns, rows, 1)
    # VTK images start at the bottom row
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, 3)
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    with atomic_path(path) as temporary:
        writer = vtk.vtkPNGWriter()
        writer.SetCompressionLevel(9)
        writer.SetFileName(str(temporary))
        writer.SetInputData(data)
        writer.Write()
        if writer.GetErrorCode() != 0:
            raise SegXAIInputError(f"output {path}: VTK could not write the PNG")
    return path


def _row(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Views side by side, separated by a black gap (as Slicer's layouts separate them)."""
    height = max(image.shape[0] for image in images)
    parts = []
    for index, image in enumerate(images):
        if index:
            parts.append(np.zeros((height, gap, 3), np.uint8))
        parts.append(image)
    return np.concatenate(parts, axis=1)


def case_settings(device: str = "auto"):
    """The screenshots' case run: SmoothGrad of the lesion class, the mean instance map of the
    largest lesion (the panel's default aggregation: one SmoothGrad, seconds on a CPU), and the
    QA risk band from the shipped guided Grad-CAM risk model."""
    from SegXAILib.pipeline import CaseSettings
    from SegXAILib.topology import shipped_risk_model

    return CaseSettings.from_dict({
        "model": "lesions",
        "device": device,
        "methods": [{"method": "smoothgrad", "params": {"n_samples": 8, "noise_level": 0.1, "seed": 0}}],
        "instances": {"aggregations": ["mean"], "n_samples": 8, "seed": 0, "max_instances": 1},
        "qa": {"risk_model": shipped_risk_model("lesions")},
    }, "screenshot settings")


def render_case_screenshots(out_dir: str | Path = DEFAULT_OUT, device: str = "auto") -> dict[str, Path]:
    """Run the sample case and write the three screenshots into ``out_dir``; returns name -> path."""
    from SegXAILib.demo import demo_phantom
    from SegXAILib.mrml import headless_scene, image_to_volume_node
    from SegXAILib.mrml.display import show_in_slice_views
    from SegXAILib.mrml.logic import show_case, show_explanations, show_instance_saliency
    from SegXAILib.pipeline import resolve_risk_model, run_case
    from SegXAILib.report.figures import save_figure
    from SegXAILib.report.risk_plots import ec_curve_figure

    out_dir = check_writable_dir(out_dir)
    phantom = demo_phantom()
    case = run_case(phantom.image, None, case_settings(device))
    if not case.instances:
        raise SegXAIInputError("the sample case has no predicted lesion to show")

    scene = headless_scene()
    image = case.image
    flair = image.channel_names[0]
    volumes = [image_to_volume_node(image.channel(name), scene, name=f"SegXAI sample {name}") for name in image.channel_names]
    nodes = show_case(scene, case, reference_volume=volumes[0])
    outlines = outline_label_volume(scene, case.instance_labels)
    lesion = case.instances[0]
    written: dict[str, Path] = {}

    # 1: the class-level map (normalised, hot, 17 % threshold) in the three views through the
    # largest lesion, as the panel shows it after Explain; each lesion outlined in its instance
    # colour (the lesion class's own red would vanish in the hot colours)
    show_explanations(scene, case, nodes, reference_volume=volumes[0], display="normalised", opacity=0.5)
    smoothgrad = nodes.saliency["smoothgrad"][image.channel_names.index(flair)]
    show_in_slice_views(scene, background=volumes[0], foreground=smoothgrad, foreground_opacity=0.5,
                        label=outlines)
    views = [render_slice_view(scene, view, (280, 280), through_ras=lesion.centroid_ras, field_of_view_mm=200.0)
             for view in ("Red", "Yellow", "Green")]
    written[SCREENSHOTS[0]] = write_png(_row(views), out_dir / SCREENSHOTS[0])

    # 2: lesion 1's own (instance) saliency, zoomed on it: axial and coronal
    per_channel = show_instance_saliency(scene, case, lesion.id, nodes, reference_volume=volumes[0],
                                         display="normalised", opacity=0.6)
    show_in_slice_views(scene, background=volumes[0], foreground=per_channel[image.channel_names.index(flair)],
                        foreground_opacity=0.6, label=outlines)
    views = [render_slice_view(scene, view, (300, 300), through_ras=lesion.centroid_ras, centre=True,
                               field_of_view_mm=110.0)
             for view in ("Red", "Green")]
    written[SCREENSHOTS[1]] = write_png(_row(views), out_dir / SCREENSHOTS[1])

    # 3: the QA figure: the case's EC curve against the calibration cohort, coloured by band
    risk_model, _ = resolve_risk_model(case.qa.risk_model)
    figure = ec_curve_figure(risk_model, case.qa.curve, band=case.qa.band,
                             title=f"QA: lesion contour, {case.qa.band} risk "
                                   f"(estimated Dice {case.qa.risk['estimated_dice']:.2f})")
    written[SCREENSHOTS[2]] = save_figure(figure, out_dir / SCREENSHOTS[2], dpi=80)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda:0, mps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = render_case_screenshots(args.out, args.device)
    for name, path in written.items():
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    print(f"rendered in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
