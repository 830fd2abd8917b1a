"""The Slicer panel's job flow, Qt-free: each action an engine process, its results as nodes.

:class:`CaseSession` is what the SegXAI panel drives (and what the browser viewer can drive):

* an action (:meth:`~CaseSession.segment`, :meth:`~CaseSession.explain`,
  :meth:`~CaseSession.instance_map`, :meth:`~CaseSession.qa`) writes what the engine needs into
  a new job folder and launches the engine process (:class:`~SegXAILib.pipeline.EngineJob`);
  one job at a time;
* :meth:`~CaseSession.poll`, called from the GUI's timer (main thread), reports progress with an
  ETA; when the job has ended it reads the case folder back
  (:func:`~SegXAILib.pipeline.read_case`) and makes the nodes with
  :mod:`SegXAILib.mrml.logic`'s ``show_*`` functions, the same ones every front end uses;
* :meth:`~CaseSession.cancel` ends the process tree; :meth:`~CaseSession.close` (the scene is
  closing) cancels and forgets the case.

A failed or cancelled job leaves the session ready for the next action, with the reason in
:attr:`SessionUpdate.error`. Every later action of a case reuses the input files its
segmentation was run on, so each job sees the same voxels and makes the same prediction; a
job whose prediction differs from the case's is refused rather than mixed in. The jobs that need
only the input-grid prediction (an instance map, a counterfactual, the uncertainty) start from the
case folder of the segmentation (or of :meth:`~CaseSession.open`) instead of predicting again
(the engine's ``--case``): a click on a lesion costs its map, not a whole-volume prediction.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..pipeline.job import EngineJob, JobStatus
from .logic import (CaseNodes, case_image, show_case, show_counterfactual, show_explanations, show_instance_saliency,
                    show_qa, show_uncertainty)

__all__ = ["CaseSession", "SessionUpdate", "slicer_python"]

log = logging.getLogger(__name__)



def slicer_python() -> str:
    """The interpreter that runs the engine: ``PythonSlicer`` inside 3D Slicer (Slicer puts it
    on ``PATH``; else beside the application's executable), this interpreter elsewhere."""
    try:
        import slicer

        in_slicer = getattr(slicer, "app", None) is not None
    except ImportError:
        in_slicer = False
    if not in_slicer:
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    if os.path.isfile(beside):
        return beside
    raise SegXAIInputError("PythonSlicer: not found on PATH nor beside the application; cannot start the engine")


@dataclass
class SessionUpdate:
    """One :meth:`CaseSession.poll`.

    Attributes
    ----------
    action : str
        The job's action (``segment``, ``explain``, ``instance`` or ``qa``), empty when no
        job ran.
    status : JobStatus or None
        The job's progress and state.
    finished : bool
        The job ended at this poll (its nodes are made, or it failed / was cancelled).
    error : str
        Why it failed (the engine's message, or why its results could not be shown).
    """

    action: str = ""
    status: Optional[JobStatus] = None
    finished: bool = False
    error: str = ""

    @property
    def state(self) -> str:
        if self.status is None:
            return "idle"
        return "failed" if self.error else self.status.state


def _job_settings(settings, **sections):
    """``settings`` for a job that computes only ``sections`` (settings field -> the values to
    set in it): every other optional step (class maps, QA, Agg2Exp, uncertainty,
    counterfactuals, instance maps) is off, so that an action never recomputes another's
    results. The case's instances are still found (the lesion table)."""
    chosen = settings.to_dict()
    chosen["methods"], chosen["qa"] = [], {}
    for name in ("agg2exp", "uncertainty", "counterfactual"):
        chosen[name] = {**chosen[name], "enabled": False}
    chosen["instances"] = {**chosen["instances"], "ids": [], "click_ras": None}
    for name, values in sections.items():
        chosen[name] = {**chosen[name], **values}
    return type(settings).from_dict(chosen, source="settings")


class CaseSession:
    """One case in a scene, computed by engine processes.

    Parameters
    ----------
    scene : vtkMRMLScene
        Where the nodes go (``slicer.mrmlScene`` in Slicer; a headless scene elsewhere).
    work_dir : path
        Where job folders are made (``<work_dir>/<date-time>-<n>-<action>/``).
    python : str, optional
        The engine's interpreter (:func:`slicer_python` by default).
    env : dict, optional
        Extra environment variables of the engine processes.
    name : str
        Prefix of the nodes' names.

    Attributes
    ----------
    case : Case or None
        The current case: the segmentation job's, with the maps, instance maps and QA of the
        later jobs added.
    nodes : CaseNodes or None
    reference_volume : vtkMRMLScalarVolumeNode or None
        The first input volume: the geometry and background of every node made.
    job : EngineJob or None
        The running (or last) job.
    """

    def __init__(self, scene, work_dir, python: Optional[str] = None, env: Optional[dict] = None,
                 name: str = "SegXAI") -> None:
        self.scene = scene
        self.work_dir = Path(work_dir)
        self.python = python
        self.env = dict(env or {})
        self.name = name
        self.case = None
        self.nodes: Optional[CaseNodes] = None
        self.reference_volume = None
        self.inputs: list[Path] = []
        self._grid: Optional[np.ndarray] = None  # the input image's exact IJK-to-RAS
        self.job: Optional[EngineJob] = None
        self.action = ""
        self._show: dict = {}
        self._handled = True  # the end of the current job was seen (its results imported)
        self._dropped = False  # the scene closed while it ran: its results are not shown
        self._count = 0
        self.saved_case: Optional[Path] = None  # the case folder whose prediction later jobs reuse

    # ---- state ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A job is running (its end not yet seen by :meth:`poll`)."""
        return self.job is not None and not self.job.status.finished

    def forget(self) -> None:
        """Drop the case (the nodes stay in the scene)."""
        self.case, self.nodes, self.reference_volume, self.inputs, self._grid = None, None, None, [], None
        self.saved_case = None

    def close(self) -> None:
        """The scene is closing: cancel a running job and forget the case."""
        if self.busy:
            self.job.cancel()
            self._dropped = True
        self.forget()

    def _require_idle(self) -> None:
        if self.busy:
            raise SegXAIInputError(f"a {self.action} job is running: wait for it or cancel it")

    def _require_case(self):
        if self.case is None:
            raise SegXAIInputError("no case: segment the input volumes first")
        return self.case

    def _require_instance(self, instance_id) -> int:
        case = self.case
        instance_id = int(instance_id)
        if not 1 <= instance_id <= len(case.instances):
            raise SegXAIInputError(f"instance {instance_id}: the prediction has {len(case.instances)} instance(s) "
                                   f"of {case.structure!r}")
        return instance_id

    def _job_dir(self, action: str) -> Path:
        self._count += 1
        return self.work_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self._count:03d}-{action}"

    def _reusable(self, settings) -> Optional[Path]:
        """The case folder whose saved prediction a job of ``settings`` can start from: the
        segmentation's (or the opened one), when it was predicted as ``settings`` would predict
        (model, device, precision, slice resampling); else None (the job predicts again)."""
        case = self.case
        if self.saved_case is None or case is None:
            return None
        before = case.settings
        same = (settings.model == before.model and settings.device == before.device
                and settings.precision.segmentation == before.precision.segmentation
                and settings.resample_slices == before.resample_slices)
        return self.saved_case if same else None

    def _launch(self, action: str, settings, show: dict, job_dir: Optional[Path] = None,
                reuse: bool = False) -> EngineJob:
        """``reuse``: start from the case folder's saved prediction (:meth:`_reusable`)."""
        saved = self._reusable(settings) if reuse else None
        job = EngineJob(settings, self.inputs, job_dir or self._job_dir(action), python=self.python or slicer_python(),
                        image_format=".nrrd", env=self.env, case=saved)
        self.job, self.action, self._show, self._handled, self._dropped = job, action, show, False, False
        job.start()
        log.info("SegXAI: %s job started in %s (pid %s)", action, job.job_dir, job.pid)
        return job

    # ---- actions ------------------------------------------------------------------------------
    def segment(self, input_volumes: Sequence, settings, display: str = "normalised") -> EngineJob:
        """Segment ``input_volumes`` (one per model input, in the card's order) with
        ``settings.model``: the segmentation, instances and lesion table, and whatever else
        ``settings`` asks for (maps, instance maps, QA: a whole case, shown with ``show_case``).

        The volumes are written into the job folder (NRRD: the geometry in float64); every
        later job of this case reads those files.
        """
        from ..io import write_image
        from ..pipeline import resolve_model_card

        self._require_idle()
        volumes = [volume for volume in input_volumes if volume]
        image = case_image(volumes, resolve_model_card(settings.model))
        self.forget()
        job_dir = self._job_dir("segment")
        inputs = job_dir / "inputs"
        inputs.mkdir(parents=True)
        self.inputs = [write_image(image.channel(channel), inputs / f"input{index}.nrrd")
                       for index, channel in enumerate(image.channel_names)]
        self.reference_volume, self._grid = volumes[0], image.ijk_to_ras.copy()
        return self._launch("segment", settings, {"display": display}, job_dir)

    def open(self, case_dir, display: str = "normalised"):
        """Show a saved case folder at once, without computing anything: its input images
        (the manifest's recorded inputs) as volume nodes and every result it holds
        (``show_case``). Later actions run on those input files. Returns the case."""
        from ..pipeline import read_case, read_manifest
        from .display import show_in_slice_views
        from .nodes import image_to_volume_node

        self._require_idle()
        case = read_case(case_dir)
        recorded = read_manifest(case_dir, verify=False)["inputs"]
        channels = list(case.image.channel_names)
        self.forget()
        volumes = [image_to_volume_node(case.image, self.scene, f"{self.name} {channel}", channel=channel)
                   for channel in channels]
        self.case, self.inputs = case, [Path(recorded[channel]) for channel in channels]
        self.saved_case = Path(case_dir).resolve()
        self.reference_volume, self._grid = volumes[0], case.image.ijk_to_ras.copy()
        self.nodes = show_case(self.scene, case, reference_volume=volumes[0], display=display, name=self.name)
        if not case.maps and not case.instance_maps:
            show_in_slice_views(self.scene, background=volumes[0])
        return case

    def _check_model(self, settings) -> None:
        case = self._require_case()
        if settings.model != case.settings.model:
            raise SegXAIInputError(f"model: the case was segmented with {case.settings.model!r}, not "
                                   f"{settings.model!r}: segment again")

    def explain(self, settings, display: str = "normalised", opacity: float = 0.5) -> EngineJob:
        """The class-level maps of ``settings.methods`` (a map shown before is replaced)."""
        self._require_idle()
        self._check_model(settings)
        if not settings.methods:
            raise SegXAIInputError("methods: no attribution method chosen")
        return self._launch("explain", settings, {"display": display, "opacity": opacity,
                                                  "maps": [m.name for m in settings.methods]})

    def instance_map(self, instance_id: int, settings, display: str = "normalised",
                     opacity: float = 0.5) -> EngineJob:
        """The instance map of one lesion (``settings.instances``: samples, aggregation...)."""
        self._require_idle()
        self._check_model(settings)
        instance_id = self._require_instance(instance_id)
        return self._launch("instance", _job_settings(settings, instances={"enabled": True, "ids": [instance_id]}),
                            {"display": display, "opacity": opacity, "instance": instance_id}, reuse=True)

    def qa(self, settings) -> EngineJob:
        """The structure's QA: its risk band with ``settings.qa.risk_model``, else the EC curve
        of the map ``settings.qa.method`` (computed again from ``settings.methods``)."""
        self._require_idle()
        self._check_model(settings)
        if not (settings.qa.risk_model or settings.qa.method):
            raise SegXAIInputError("qa: give a risk model or the map whose EC curve to show")
        return self._launch("qa", settings, {})

    def uncertainty(self, settings, opacity: float = 0.5) -> EngineJob:
        """Where the model is unsure: ``settings.uncertainty``'s samples (it is switched on
        whatever its ``enabled``), shown as entropy and mutual-information volumes, the
        uncertainty table and the lesion table's uncertainty columns."""
        self._require_idle()
        self._check_model(settings)
        return self._launch("uncertainty", _job_settings(settings, uncertainty={"enabled": True}), {"opacity": opacity},
                            reuse=True)

    def counterfactual(self, instance_id: int, settings, opacity: float = 0.5) -> EngineJob:
        """One lesion's counterfactual (paper 004) with ``settings.counterfactual.generators``:
        G+(x), G-(x) and R, R shown as the foreground, centred on the lesion."""
        self._require_idle()
        self._check_model(settings)
        instance_id = self._require_instance(instance_id)
        chosen = _job_settings(settings, instances={"enabled": True},
                               counterfactual={"enabled": True, "ids": [instance_id], "click_ras": None})
        return self._launch("counterfactual", chosen, {"opacity": opacity, "instance": instance_id}, reuse=True)

    def cancel(self) -> None:
        """End the running job's process tree (within :data:`~SegXAILib.pipeline.job.KILL_AFTER_S`)."""
        if self.busy:
            self.job.cancel()

    def instance_at(self, markups_node, radius_mm: float = 5.0) -> int:
        """The instance id under the last point of ``markups_node`` (a click in a slice view)."""
        from .nodes import instance_from_markup

        case = self._require_case()
        if case.instance_labels is None:
            raise SegXAIInputError("the case has no instances (settings.instances.enabled is false)")
        return instance_from_markup(markups_node, case.instance_labels, radius_mm=radius_mm)

    # ---- polling ------------------------------------------------------------------------------
    def poll(self) -> SessionUpdate:
        """The running job's progress; when it has ended, its results shown (main thread)."""
        if self.job is None:
            return SessionUpdate()
        status = self.job.poll()
        update = SessionUpdate(self.action, status)
        if self._handled or not status.finished:
            return update
        self._handled = update.finished = True
        if status.state == "failed":
            update.error = status.error
        elif status.state == "done" and not self._dropped:
            try:
                # on the volumes' own matrix: a file round trip can move its last bit
                self._import(self.job.case(ijk_to_ras=self._grid))
            except SegXAIInputError as error:  # a case folder that cannot be read: say why
                update.error = str(error)
            except Exception as error:  # noqa: BLE001 - reported, the session stays usable
                log.exception("SegXAI: could not show the results of %s", self.job.job_dir)
                update.error = f"could not show the results: {type(error).__name__}: {error}"
        return update

    def wait(self, timeout: float = 3600.0, interval: float = 0.05) -> SessionUpdate:
        """Poll until the running job has ended and its results are shown (scripts, tests)."""
        deadline = time.monotonic() + timeout
        update = self.poll()
        while not update.finished and self.job is not None:
            if time.monotonic() > deadline:
                self.cancel()
            time.sleep(interval)
            update = self.poll()
        return update

    def _same_prediction(self, case) -> None:
        if not np.array_equal(case.segmentation.labels.array, self.case.segmentation.labels.array):
            raise SegXAIInputError(f"job {self.job.job_dir}: its prediction differs from the segmented case "
                                   "(the model or its inputs changed): segment again")

    def _import(self, case) -> None:
        """Merge ``case`` (the finished job's) into the session's case and show its part."""
        show, scene, reference = self._show, self.scene, self.reference_volume
        if self.action == "segment":  # with whatever else its settings asked for
            self.case = case
            self.nodes = show_case(scene, case, reference_volume=reference, display=show.get("display", "normalised"),
                                   name=self.name)
            self.saved_case = self.job.case_dir.resolve()  # later jobs start from its prediction
            return
        self._same_prediction(case)
        current = self.case
        current.maps.update(case.maps)
        current.instance_maps.update(case.instance_maps)
        if self.action == "explain":
            show_explanations(scene, current, self.nodes, reference_volume=reference, display=show["display"],
                              opacity=show["opacity"], maps=show["maps"], name=self.name)
        elif self.action == "instance":
            show_instance_saliency(scene, current, show["instance"], self.nodes, reference_volume=reference,
                                   display=show["display"], opacity=show["opacity"], name=self.name)
        elif self.action == "qa":
            current.qa = case.qa
            show_qa(scene, current, self.nodes, name=self.name)
        elif self.action == "counterfactual":
            current.counterfactuals.update(case.counterfactuals)
            current.counterfactual_generators = case.counterfactual_generators
            show_counterfactual(scene, current, show["instance"], self.nodes, reference_volume=reference,
                                opacity=show["opacity"], name=self.name)
        elif self.action == "uncertainty":
            from ..pipeline import lesion_rows

            current.uncertainty = case.uncertainty
            current.lesions = lesion_rows(current)  # the lesions' own rows, their uncertainty added
            show_uncertainty(scene, current, self.nodes, reference_volume=reference, opacity=show["opacity"],
                             name=self.name)
