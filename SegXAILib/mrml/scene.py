"""Scenes: a headless scene with Slicer's module logics, and ``.mrb`` bundles (save / load).

Inside 3D Slicer the application owns ``slicer.mrmlScene`` and its logics; headless (the
``slicer-core`` wheel) :func:`headless_scene` builds the same set-up without Qt: an
application logic, the colour, volumes, markups, segmentations, subject-hierarchy, tables
and plots logics (they register storage nodes, e.g. markups JSON, and keep the subject
hierarchy), and the three slice views' slice and composite nodes (Red, Yellow, Green).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..image import SegXAIInputError

__all__ = ["headless_scene", "application_logic", "save_scene_bundle", "load_scene_bundle", "SLICE_VIEWS"]

log = logging.getLogger(__name__)

#: slice view name -> orientation, as in Slicer's default layouts
SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

#: module logics a headless scene gets (name in the application logic -> class in ``slicer``)
_MODULE_LOGICS = (
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Plots", "vtkSlicerPlotsLogic"),
)


def _attach_logics(scene) -> None:
    """Give ``scene`` an application logic and the module logics (kept alive on the scene)."""
    import slicer
    import vtk

    if getattr(scene, "_segxai_application_logic", None) is not None:
        return
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.GetColorLogic().SetMRMLScene(scene)
    application.GetColorLogic().AddDefaultColorNodes()
    application.SetSliceLogics(vtk.vtkCollection())
    application.SetViewLogics(vtk.vtkCollection())
    logics = []
    for name, class_name in _MODULE_LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
        logics.append(logic)
    # the wrappers would be collected with the Python objects; the scene keeps them
    scene._segxai_application_logic = application
    scene._segxai_module_logics = logics


def _add_slice_views(scene) -> None:
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    for name, orientation in SLICE_VIEWS.items():
        slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        slice_node.SetName(name)
        slice_node.SetLayoutName(name)
        slice_node.SetSingletonTag(name)
        slice_node.SetDefaultOrientation(orientation)
        slice_node.SetOrientation(orientation)
        scene.AddNode(slice_node)
        composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetName(f"{name}Composite")
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)


def headless_scene(slice_views: bool = True):
    """A new ``vtkMRMLScene`` set up as Slicer's application sets up ``slicer.mrmlScene``.

    Parameters
    ----------
    slice_views : bool
        Also add the Red / Yellow / Green slice and slice composite nodes (what a layout
        creates in Slicer), so overlays can be set on them.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    _attach_logics(scene)
    if slice_views:
        _add_slice_views(scene)
    return scene


def application_logic(scene):
    """The application logic of ``scene``: Slicer's own inside Slicer, else the headless one."""
    try:
        import slicer

        if getattr(slicer, "mrmlScene", None) is scene and getattr(slicer, "app", None) is not None:
            return slicer.app.applicationLogic()
    except ImportError:  # pragma: no cover - slicer is needed to have a scene at all
        pass
    _attach_logics(scene)
    return scene._segxai_application_logic


def save_scene_bundle(scene, path: str | os.PathLike) -> Path:
    """Save ``scene`` with all its data as a Slicer data bundle (``.mrb``), atomically.

    Slicer's own writer (``vtkMRMLScene::WriteToMRB``, the one File > Save uses) writes the
    bundle into a temporary folder beside ``path``; it is renamed onto ``path`` once complete.
    Returns ``path``.

    Note: as in Slicer, the storage nodes then point at the bundle's files; the nodes' data in
    memory are unchanged.
    """
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise SegXAIInputError(f"scene bundle {path}: expected a .mrb file name")
    if not path.parent.is_dir():
        raise SegXAIInputError(f"scene bundle {path}: folder {path.parent} does not exist")
    application_logic(scene)  # headless: the module logics register the storage nodes
    # a temporary folder beside it, the bundle under its own name inside (Slicer names the
    # bundle's top folder after the file), then one rename
    from vtkmodules.vtkCommonCore import vtkOutputWindow, vtkStringOutputWindow

    work = Path(tempfile.mkdtemp(prefix=".segxai-mrb-", dir=path.parent.resolve()))
    # the zip writer reports every file it adds: keep VTK's messages, shown only on failure
    previous, messages = vtkOutputWindow.GetInstance(), vtkStringOutputWindow()
    vtkOutputWindow.SetInstance(messages)
    try:
        written = work / path.name
        written_ok = scene.WriteToMRB(str(written))
        vtkOutputWindow.SetInstance(previous)
        if not written_ok or not zipfile.is_zipfile(written):
            detail = " ".join(messages.GetOutput().split())[-500:]
            raise SegXAIInputError(f"scene bundle {path}: Slicer could not write the scene ({detail})")
        os.replace(written, path)
    finally:
        vtkOutputWindow.SetInstance(previous)
        shutil.rmtree(work, ignore_errors=True)
    return path


def load_scene_bundle(path: str | os.PathLike, scene=None):
    """Load a ``.mrb`` bundle into ``scene`` (a new :func:`headless_scene` when omitted); returns the scene.

    The data are read into memory; the unpacked files are removed afterwards.
    """
    path = Path(path)
    if not path.is_file():
        raise SegXAIInputError(f"scene bundle {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise SegXAIInputError(f"scene bundle {path}: not a .mrb (zip) file")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith(".mrml") for name in archive.namelist()):
            raise SegXAIInputError(f"scene bundle {path}: holds no .mrml scene file")
    if scene is None:
        scene = headless_scene(slice_views=False)
    logic = application_logic(scene)
    work = tempfile.mkdtemp(prefix="segxai-mrb-")
    try:
        if not logic.OpenSlicerDataBundle(str(path), work):
            raise SegXAIInputError(f"scene bundle {path}: Slicer could not load it (see the log)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return scene
