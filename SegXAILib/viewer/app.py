"""The browser viewer (``segxai view``): 3D Slicer's own views in a browser, through trame-slicer.

One trame server, one trame-slicer application (Slicer's MRML scene, slice logics and
displayable managers from the slicer-core wheel, rendered offscreen and streamed to the page)
and one :class:`~SegXAILib.mrml.session.CaseSession`, the same job flow as the Slicer panel:
every computation runs in the engine process, and the nodes are made by
:mod:`SegXAILib.mrml.logic`'s ``show_*`` functions; the viewer only wires state to them.

Views: axial (large), coronal and sagittal (and 3D with ``three_d``). Controls: open a case
folder or an image, a method picker with the method's parameter form (from the registry), a
target picker, Explain, display (normalised with a threshold, or signed) and opacity,
pick-lesion mode (a click in a slice view computes that lesion's instance saliency, mean and
max aggregations), the lesion table (a row click centres the views on the lesion; with
uncertainty, each lesion's entropy and pairwise Dice), QA (risk band and EC-curve plot), the
review list of given contours of a case that has one (``segxai qa score --contour``: most
suspicious first, :func:`contour_review_state`),
uncertainty (a sample-source preset of :data:`UNCERTAINTY_PRESETS`, samples and seed for the
random ones: the predictive entropy overlay and the structure's summary), counterfactual
relevance (paper 004: a generators path; the selected lesion's ``R = G+(x) - G-(x)`` overlay and
the model's scores of x, G+(x) and G-(x)), a progress bar with Cancel and the running
computation's estimate (memory, time, from one measured pass), and the last error. The
selected lesion is the last one clicked in pick-lesion mode or in the lesion table.

A job whose computation is estimated to take longer than the engine's time limit (10 minutes,
``--max-minutes``) is refused before it starts; the page asks (a JavaScript ``confirm`` with the
estimate) and, when the user accepts, the same request runs again with no limit
(:meth:`ViewerApp.confirm_long`).

The state keys and element ids below are the viewer's interface for its end-to-end tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..mrml.logic import UNCERTAINTY_VOLUMES, contour_qa_summary, counterfactual_summary, uncertainty_summary
from ..models.expectations import INPUT_WARNING_TITLE
from ..pipeline.steps import LESION_UNCERTAINTY_KEYS
from ..uncertainty.presets import UNCERTAINTY_PRESETS, preset_settings

__all__ = ["ViewerApp", "parameter_values", "lesion_targets", "contour_review_state"]

log = logging.getLogger(__name__)

#: slice views of the layout: singleton tag -> element id
VIEW_IDS = {"Red": "segxai-view-red", "Green": "segxai-view-green", "Yellow": "segxai-view-yellow"}
#: the instance maps the pick-lesion mode computes
PICK_AGGREGATIONS = ["mean", "max"]
#: seconds between two polls of the running job
POLL_S = 0.1
#: the structure's uncertainty values the summary carries (:class:`~SegXAILib.uncertainty.RegionUncertainty`)


def parameter_values(spec: dict, values: dict) -> dict:
    """The method parameters of the form's ``values`` (text fields give strings) converted to the
    kinds of ``spec`` (:func:`SegXAILib.attribution.method_specs`); empty fields left out.

    Raises
    ------
    SegXAIInputError
        A value that is not of its parameter's kind, naming the parameter.
    """
    converted = {}
    for parameter in spec["parameters"]:
        name, kind = parameter["name"], parameter["kind"]
        value = values.get(name)
        if value is None or value == "":
            continue
        try:
            if kind == "int":
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                converted[name] = int(number)
            elif kind == "float":
                converted[name] = float(value)
            elif kind == "bool":
                converted[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            elif kind in ("choice", "str"):
                converted[name] = str(value)
        except (TypeError, ValueError):
            raise SegXAIInputError(f"method parameter {name!r}: expected {kind}, got {value!r}") from None
    return converted


def lesion_targets(case, xy_to_ras: np.ndarray, dimensions: Sequence[int]) -> list[dict]:
    """Where each lesion is in a slice view: its centroid projected on the view, as fractions of
    the view's width and height from the top-left corner, and whether the view's plane passes
    through the lesion there (a click at that point picks it).

    Parameters
    ----------
    case : Case
        With ``instance_labels`` ``(1, I, J, K)`` and ``instances``.
    xy_to_ras : ndarray, shape (4, 4)
        The slice node's XY (pixels, origin bottom-left) to RAS matrix.
    dimensions : sequence of int
        The view's width and height in pixels.
    """
    if case is None or case.instance_labels is None:
        return []
    labels = case.instance_labels.array[0]
    ras_to_xy = np.linalg.inv(xy_to_ras)
    ras_to_ijk = np.linalg.inv(case.instance_labels.ijk_to_ras)
    width, height = float(dimensions[0]), float(dimensions[1])
    targets = []
    for instance in case.instances:
        x, y = (ras_to_xy @ np.append(instance.centroid_ras, 1.0))[:2]
        on_plane = xy_to_ras @ np.array([x, y, 0.0, 1.0])
        ijk = np.round((ras_to_ijk @ on_plane)[:3]).astype(int)
        inside = bool(np.all(ijk >= 0) and np.all(ijk < labels.shape)) and int(labels[tuple(ijk)]) == instance.id
        if 0.0 <= x < width and 0.0 <= y < height:
            targets.append({"id": int(instance.id), "x": x / width, "y": 1.0 - y / height, "on_slice": inside})
    return targets


def _json_ready(value: Any) -> Any:
    """Table cells for the page: numbers rounded, NaN as None."""
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), 3)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value if isinstance(value, (str, bool)) or value is None else str(value)


#: the review list's columns on the page: row key -> header
CONTOUR_REVIEW_COLUMNS = {"rank": "#", "structure": "structure", "class": "class", "suspicion": "suspicion",
                          "dice_with_prediction": "Dice vs model", "hd95_mm": "HD95 mm",
                          "mean_probability_inside": "p inside", "risk_band": "band"}


def contour_review_state(case) -> list[dict]:
    """The ``contour_review`` state: the review list of given contours
    (:func:`~SegXAILib.mrml.logic.contour_qa_summary`, most suspicious first) with the page's
    columns (:data:`CONTOUR_REVIEW_COLUMNS`), numbers rounded; [] without one."""
    return [{"key": row["rank"], **{key: _json_ready(row.get(key)) for key in CONTOUR_REVIEW_COLUMNS}}
            for row in contour_qa_summary(case)]


class ViewerApp:
    """The viewer: a trame server showing a scene that a :class:`CaseSession` fills.

    Parameters
    ----------
    work_dir : path
        Where the engine jobs' folders go.
    model : str, optional
        The model for images opened without a case (a bundled name or a card path).
    device : str
        The engine's device (``auto``, ``cpu``, ``cuda:N``).
    three_d : bool
        Add a 3D view.
    token : str, optional
        The access token (a new random one by default).
    name : str, optional
        The trame server's name (several viewers in one process need distinct names).
    generators : str, optional
        The counterfactual generators (a ``generators.pt`` or the folder ``segxai counterfactual
        train`` wrote): the generators field's first value.
    max_minutes : float, optional
        The engine jobs' time limit (0: none); None: the engine's default (``SEGXAI_MAX_MINUTES``,
        else 10).
    """

    def __init__(self, work_dir, model: Optional[str] = None, device: str = "auto", three_d: bool = False,
                 token: Optional[str] = None, name: Optional[str] = None, generators: Optional[str] = None,
                 max_minutes: Optional[float] = None) -> None:
        if not os.environ.get("DISPLAY"):  # offscreen without an X server: EGL (Mesa's llvmpipe on a CPU)
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import ViewLayoutDefinition

        from ..mrml.session import CaseSession
        from .security import new_token

        self.token = token or new_token()
        self.server = get_server(name or f"segxai-viewer-{id(self)}", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.server.cli.set_defaults(authKey=self.token)  # the websocket's handshake secret
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        register_rca_factories(self.slicer.view_manager, self.server)
        definitions = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                       ViewLayoutDefinition.sagittal_view()]
        if three_d:
            definitions.append(ViewLayoutDefinition.threed_view())
        for definition in definitions:
            self.slicer.view_manager.create_view(definition)
        self.view_tags = [definition.singleton_tag for definition in definitions]
        self.slicer.view_manager.set_current_view_ids(self.view_tags)
        self.session = CaseSession(self.scene, work_dir)
        if max_minutes is not None:
            from ..progress import MAX_MINUTES_ENV

            if not float(max_minutes) >= 0:
                raise SegXAIInputError(f"max_minutes: expected minutes >= 0 (0: no limit), got {max_minutes}")
            self.session.env[MAX_MINUTES_ENV] = repr(float(max_minutes))  # the engine's default limit
        self._request: tuple = ()  # the last action asked for (what a confirmation runs again)
        self._job_request: tuple = ()  # the action that started the running (or last) job
        self.model = model
        self.device = device
        self.generators = str(generators or "")
        self.volumes: list = []  # image volumes opened without a case (to segment)
        # what the foreground shows: ("map", name), ("instance", id), ("uncertainty", map name) or
        # ("counterfactual", id)
        self._shown: tuple = ()
        self._asked: tuple = ()  # what the running job will show
        self._sources = ""  # the running uncertainty job's sample sources (its error names them)
        self._targets_time = -1
        self._click = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegXAI click")
        self._click.CreateDefaultDisplayNodes()
        self._click.GetDisplayNode().SetVisibility(False)
        from slicer import vtkMRMLMarkupsNode

        self._click.AddObserver(vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_click)
        self._init_state()
        self._build_ui(three_d)
        self.ctrl.on_server_bind.add(self._bind)
        self.ctrl.on_server_ready.add(self._ready)
        self.url = ""

    # ---- state -------------------------------------------------------------------------------
    def _init_state(self) -> None:
        from ..attribution import method_specs

        state = self.state
        self.specs = {spec["name"]: spec for spec in method_specs()}
        state.trame__title = "SegXAI viewer"
        state.update({
            "busy": False, "progress": 0, "status": "", "error": "", "open_path": "", "model": self.model or "",
            "methods": sorted(self.specs), "method": "smoothgrad", "method_form": [], "method_params": {},
            "target": "class", "display": "normalised", "threshold": 0.17, "opacity": 0.5,
            "pick_mode": False, "instance_aggregation": PICK_AGGREGATIONS[0], "lesions": [], "lesion_targets": [],
            "instance_shown": 0, "overlay_version": 0, "qa_band": "", "qa_figure": "", "risk_model": "",
            "has_case": False, "has_volumes": False,
            "uncertainty_presets": [{"value": key, "title": label} for key, (label, _, _) in UNCERTAINTY_PRESETS.items()],
            "uncertainty_source": "flips", "uncertainty_samples": 8, "uncertainty_seed": 0, "uncertainty_random": False,
            "uncertainty_shown": False, "uncertainty_summary": {}, "has_uncertainty": False,
            "lesion_selected": 0, "counterfactual_generators": self.generators, "counterfactual_ids": [],
            "counterfactual_shown": 0, "counterfactual_summary": {}, "input_warnings": [], "contour_review": [],
            "estimate": "", "cost_refusal": "",
        })
        state.change("method")(self._on_method)
        state.change("pick_mode")(self._on_pick_mode)
        state.change("opacity")(self._on_opacity)
        state.change("display", "threshold", "instance_aggregation")(self._on_display)
        state.change("uncertainty_source")(self._on_uncertainty_source)
        self._on_method(state.method)

    def _on_method(self, method, **_) -> None:
        spec = self.specs.get(method)
        form, values = [], {}
        for parameter in (spec or {}).get("parameters", []):
            if parameter["kind"] not in ("int", "float", "bool", "choice", "str"):
                continue  # tensors and lists: the Python API only
            default = parameter["default"]
            form.append({"name": parameter["name"], "kind": parameter["kind"], "help": parameter["help"],
                         "choices": [str(c) for c in parameter.get("choices") or []]})
            values[parameter["name"]] = default if isinstance(default, (bool, int, float, str)) else ""
        self.state.method_form, self.state.method_params = form, values

    def _on_uncertainty_source(self, uncertainty_source, **_) -> None:
        # samples and seed belong to a random source; the others give every combination
        self.state.uncertainty_random = UNCERTAINTY_PRESETS.get(uncertainty_source, ("", {}, False))[2]

    def _on_pick_mode(self, pick_mode, **_) -> None:
        if pick_mode:
            self._click.RemoveAllControlPoints()
            self.slicer.markups_logic.place_node(self._click, persistent=True)
        else:
            self.slicer.markups_logic.disable_place_mode()

    def _on_opacity(self, opacity, **_) -> None:
        from ..mrml import slice_composite_nodes

        for composite in slice_composite_nodes(self.scene):
            composite.SetForegroundOpacity(float(opacity))
        self._render()

    def _on_display(self, **_) -> None:
        """Show the current overlay again with the new display, threshold or aggregation (no
        recomputation: the maps are in the case)."""
        if not self._shown or self.session.case is None:
            return
        self._attempt(self._show_overlay)

    # ---- actions -----------------------------------------------------------------------------
    def _attempt(self, action, *args) -> bool:
        """Run an action; an error goes to ``state.error`` (the app keeps working)."""
        self._request = (action, args)
        try:
            action(*args)
        except SegXAIInputError as error:
            self.state.error = str(error)
            return False
        except Exception as error:  # noqa: BLE001 - shown, never fatal for the server
            log.exception("SegXAI viewer")
            self.state.error = f"{type(error).__name__}: {error}"
            return False
        self.state.error = ""
        return True

    def open(self, path) -> None:
        """Open a case folder (shown at once) or an image file (one volume; with a model, then
        Segment)."""
        from ..io import read_image
        from ..mrml import image_to_volume_node, show_in_slice_views

        path = Path(str(path).strip()).expanduser()
        if not str(path) or not path.exists():
            raise SegXAIInputError(f"open: {path} does not exist")
        if path.is_dir() and (path / "case.json").is_file():
            self.session.open(path, display=self.state.display)
            self.volumes = []
            self._shown = self._first_overlay()
            self._after_case()
            return
        image = read_image(path)
        name = path.name.split(".")[0]
        self.volumes.append(image_to_volume_node(image, self.scene, name))
        show_in_slice_views(self.scene, background=self.volumes[0])
        self._reset_views()
        self.state.has_volumes = True

    def open_paths(self, paths: Sequence) -> None:
        for path in paths:
            self.open(path)

    def _settings(self, **fields):
        from ..pipeline import CaseSettings

        case = self.session.case
        model = case.settings.model if case is not None else (self.state.model or self.model)
        if not model:
            raise SegXAIInputError("model: no model (give --model, or open a case folder)")
        fields.setdefault("instances", {"ids": []})
        return CaseSettings.from_dict({"model": model, "device": self.device, **fields}, source="viewer")

    def segment(self) -> None:
        if not self.volumes:
            raise SegXAIInputError("segment: open the input image(s) first")
        self.session.segment(self.volumes, self._settings(), display=self.state.display)
        self._started()

    def explain(self) -> None:
        method = self.state.method
        if method not in self.specs:
            raise SegXAIInputError(f"method: {method!r} is not a registered method")
        target = "" if self.state.target == "class" else str(self.state.target)
        params = parameter_values(self.specs[method], dict(self.state.method_params or {}))
        self.session.explain(self._settings(methods=[{"method": method, "params": params, "target": target}]),
                             display=self.state.display, opacity=float(self.state.opacity))
        self._asked = ("map", method)
        self._started()

    def instance_map(self, instance_id: int) -> None:
        case = self.session.case
        # the case's own instance settings (samples, noise, seed), with both aggregations
        instances = case.settings.instances.model_dump() if case is not None else {}
        instances.update({"ids": [], "click_ras": None, "aggregations": PICK_AGGREGATIONS})
        self.session.instance_map(instance_id, self._settings(instances=instances),
                                  display=self.state.display, opacity=float(self.state.opacity))
        self._asked = ("instance", int(instance_id))
        self._started()

    def qa(self) -> None:
        risk = str(self.state.risk_model or "").strip()
        if risk:
            settings = self._settings(qa={"risk_model": risk})
        else:
            method = self.state.method
            params = parameter_values(self.specs[method], dict(self.state.method_params or {}))
            settings = self._settings(methods=[{"method": method, "params": params}], qa={"method": method})
        self.session.qa(settings)
        self._started()

    def uncertainty(self) -> None:
        """Where the model is unsure: the chosen preset's samples in the engine; the predictive
        entropy becomes the overlay. The case's own instance and uncertainty settings (band
        widths, members) are kept; the preset, samples and seed replace the sampling."""
        state = self.state
        chosen = preset_settings(state.uncertainty_source, state.uncertainty_samples, state.uncertainty_seed)
        case = self.session.case
        if case is None:
            raise SegXAIInputError("uncertainty: no case: open a case folder or segment first")
        fields = case.settings.uncertainty.model_dump()
        fields.update(chosen)
        if "ensemble" not in chosen["sources"]:
            fields["models"] = []  # more models only count as ensemble members
        instances = {**case.settings.instances.model_dump(), "ids": [], "click_ras": None}
        self._sources = ", ".join(chosen["sources"])
        self.session.uncertainty(self._settings(uncertainty=fields, instances=instances),
                                 opacity=float(state.opacity))
        self._asked = ("uncertainty", UNCERTAINTY_VOLUMES[0])
        self._started()

    def show_uncertainty(self) -> None:
        """The case's predictive entropy in front again (after a saliency map was shown)."""
        case = self.session.case
        if case is None or case.uncertainty is None or not self.session.nodes.uncertainty:
            raise SegXAIInputError("uncertainty: the case has none: run Uncertainty first")
        self._shown = ("uncertainty", UNCERTAINTY_VOLUMES[0])
        self._show_overlay()

    def _counterfactual_lesion(self, instance_id: Optional[int]) -> int:
        """``instance_id``, else the selected lesion (a pick-mode click or a table row)."""
        case = self.session.case
        if case is None:
            raise SegXAIInputError("counterfactual: no case: open a case folder or segment first")
        chosen = int(instance_id or self.state.lesion_selected or 0)
        if chosen == 0:
            raise SegXAIInputError("counterfactual: no lesion selected: click one in pick-lesion mode or in the "
                                   "lesion table")
        if not 1 <= chosen <= len(case.instances):
            raise SegXAIInputError(f"counterfactual: lesion {chosen}: the case has {len(case.instances)} lesion(s)")
        return chosen

    def counterfactual(self, instance_id: Optional[int] = None) -> None:
        """The counterfactual (paper 004) of ``instance_id`` (the selected lesion by default) with
        the generators of ``state.counterfactual_generators``, in the engine; R becomes the
        overlay. The case's own instance settings are kept (the same lesions, the same ids)."""
        from ..pipeline.steps import resolve_generators_path

        instance_id = self._counterfactual_lesion(instance_id)
        generators = str(self.state.counterfactual_generators or "").strip()
        if not generators:
            raise SegXAIInputError("counterfactual.generators: give the generators file (generators.pt) or the "
                                   "folder 'segxai counterfactual train' wrote")
        path = Path(generators).expanduser().resolve()  # the engine's working folder is not the viewer's
        resolve_generators_path(path)  # a missing file: said now, not by the engine
        case = self.session.case
        instances = {**case.settings.instances.model_dump(), "ids": [], "click_ras": None}
        counterfactual = {**case.settings.counterfactual.model_dump(), "generators": str(path), "ids": None,
                          "click_ras": None}
        self.session.counterfactual(instance_id, self._settings(instances=instances, counterfactual=counterfactual),
                                    opacity=float(self.state.opacity))
        self._asked = ("counterfactual", instance_id)
        self._started()

    def show_counterfactual(self, instance_id: Optional[int] = None) -> None:
        """A computed counterfactual's R in front again: ``instance_id``, else the selected
        lesion's when it has one, else the first computed."""
        case = self.session.case
        computed = list(case.counterfactuals) if case is not None else []
        if not computed:
            raise SegXAIInputError("counterfactual: the case has none: run Counterfactual first")
        chosen = int(instance_id or 0) or (int(self.state.lesion_selected or 0)
                                           if int(self.state.lesion_selected or 0) in computed else computed[0])
        if chosen not in computed:
            raise SegXAIInputError(f"counterfactual: lesion {chosen} has none (computed: "
                                   f"{', '.join(map(str, computed))})")
        self._shown = ("counterfactual", chosen)
        self._show_overlay()

    def cancel(self) -> None:
        self.session.cancel()
        self.state.status = "cancelling..."

    def jump_to_lesion(self, instance_id: int) -> None:
        from ..mrml import jump_slices_to

        case = self.session.case
        if case is None or not 1 <= int(instance_id) <= len(case.instances):
            raise SegXAIInputError(f"lesion {instance_id}: no such lesion")
        jump_slices_to(self.scene, case.instances[int(instance_id) - 1].centroid_ras)
        self.state.lesion_selected = int(instance_id)
        self._refresh_targets(force=True)
        self._render()

    def _on_click(self, caller=None, event=None) -> None:
        """A point placed in a slice view in pick-lesion mode: that lesion's instance maps."""
        if not self.state.pick_mode:
            return
        with self.state:
            if self.session.busy:
                self.state.error = "a job is running: wait for it or cancel it before picking a lesion"
                return
            self._attempt(self._picked)

    def _picked(self) -> None:
        instance_id = self.session.instance_at(self._click)
        self.state.lesion_selected = int(instance_id)  # the lesion a Counterfactual then explains
        self.instance_map(instance_id)

    # ---- jobs --------------------------------------------------------------------------------
    def _started(self) -> None:
        self.state.busy, self.state.progress, self.state.error = True, 0, ""
        self.state.estimate, self.state.cost_refusal = "", ""
        self.state.status = f"{self.session.action}: started"
        self._job_request = self._request

    def confirm_long(self) -> None:
        """Run the request whose job was refused for its estimated time again, with no time limit
        (the user confirmed the estimate in the page)."""
        from ..progress import MAX_MINUTES_ENV

        if not self._job_request:
            raise SegXAIInputError("confirm: no refused request to run again")
        if self.session.busy:
            raise SegXAIInputError(f"a {self.session.action} job is running: wait for it or cancel it")
        action, args = self._job_request
        self._request = self._job_request  # what the new job records (not this confirmation)
        env = self.session.env
        before = env.get(MAX_MINUTES_ENV)
        env[MAX_MINUTES_ENV] = "0"  # for this job only
        try:
            action(*args)
        finally:
            if before is None:
                env.pop(MAX_MINUTES_ENV, None)
            else:
                env[MAX_MINUTES_ENV] = before

    def poll(self) -> None:
        """One poll of the running job (the server's loop calls it every :data:`POLL_S` s)."""
        update = self.session.poll()
        if update.status is not None and not update.finished:
            self.state.progress = int(round(100 * update.status.fraction))
            self.state.status = f"{update.action}: {update.status.text()}"
            self.state.estimate = update.status.estimate
        if update.finished:
            self.state.busy = False
            if update.error and update.status.error_kind == "cost":
                # refused before it started, for its estimated time: the page asks (cost_refusal's watcher)
                self.state.error, self.state.status = update.error, f"{update.action}: not started (estimated too long)"
                self.state.cost_refusal = update.error
            elif update.error:
                error = update.error
                if update.action == "uncertainty":  # the engine's message may not say which source failed
                    error = f"uncertainty (sources: {self._sources}): {error}"
                self.state.error, self.state.status = error, f"{update.action}: failed"
            elif update.state == "cancelled":
                self.state.status = f"{update.action}: cancelled"
            else:
                self.state.status = f"{update.action}: done in {update.status.elapsed_s:.1f} s"
                self._attempt(self._after_job, update.action)
        self._refresh_targets()

    def _after_job(self, action: str) -> None:
        case = self.session.case
        if action == "explain":  # the session showed the map
            self._shown = self._asked
            self._overlay_shown(0)
        elif action == "instance":  # shown again with the chosen aggregation
            self._shown = self._asked
            self._show_overlay()
        elif action == "segment":
            self._shown = self._first_overlay()
            self._after_case()
        elif action == "qa":
            self._show_qa()
        elif action == "uncertainty":  # the session showed the entropy in front
            self._shown = self._asked
            self._overlay_shown(0)
            self._show_uncertainty_state()
        elif action == "counterfactual":  # the session showed R in front, centred on the lesion
            self._shown = self._asked
            self.state.lesion_selected = int(self._asked[1])
            self._overlay_shown(0)
            self._show_counterfactual_state()
        self._render()

    def _first_overlay(self) -> tuple:
        """What a new case shows first (as ``show_case``): its first map, else (without
        instance maps) its first counterfactual's R, else its entropy."""
        case = self.session.case
        if case.maps:
            return ("map", next(iter(case.maps)))
        if case.counterfactuals and not case.instance_maps:
            return ("counterfactual", next(iter(case.counterfactuals)))
        if case.uncertainty is not None and self.session.nodes.uncertainty:
            return ("uncertainty", UNCERTAINTY_VOLUMES[0])
        return ()

    def _show_uncertainty_state(self) -> None:
        """The lesion table (with each lesion's uncertainty) and the uncertainty summary."""
        case = self.session.case
        rows = []
        for index, row in enumerate(case.lesions):
            shown = {"key": index, **{key: _json_ready(row.get(key)) for key in ("id", "voxels", "volume_mm3",
                                                                               "mean_probability", "group")}}
            values = row.get("uncertainty") or {}
            shown.update({f"uncertainty_{key}": _json_ready(values.get(key)) for key in LESION_UNCERTAINTY_KEYS})
            rows.append(shown)
        self.state.lesions = rows
        # rounded for the page (3 decimals; NaN as None)
        self.state.uncertainty_summary = {key: _json_ready(value) for key, value in uncertainty_summary(case).items()}
        self.state.has_uncertainty = case.uncertainty is not None

    def _show_counterfactual_state(self) -> None:
        """The lesions with a counterfactual and the summary of the one shown (or, when none is
        in front, of the first computed)."""
        case = self.session.case
        computed = [int(i) for i in case.counterfactuals]
        self.state.counterfactual_ids = computed
        shown = self._shown[1] if self._shown and self._shown[0] == "counterfactual" else (computed[0] if computed
                                                                                           else 0)
        # rounded for the page (3 decimals); the text keeps the summary's own
        summary = counterfactual_summary(case, shown) if shown else {}
        self.state.counterfactual_summary = {"id": shown, **{key: _json_ready(value) for key, value in
                                                             summary.items()}} if summary else {}

    def _after_case(self) -> None:
        """A new case: the lesion table, the views reset and centred on the largest lesion."""
        from ..mrml import jump_slices_to

        case = self.session.case
        self.state.input_warnings = list(case.warnings)  # the banner: the input may not fit the model
        self._show_uncertainty_state()
        self.state.lesion_selected = 0
        self._show_counterfactual_state()
        self.state.contour_review = contour_review_state(case)
        self.state.has_case = True
        # outlines only in the slice views: a filled contour would hide the saliency inside it
        nodes = self.session.nodes
        for segmentation in (nodes.segmentation, nodes.instances):
            if segmentation is not None and segmentation.GetDisplayNode() is not None:
                segmentation.GetDisplayNode().SetOpacity2DFill(0.0)
                segmentation.GetDisplayNode().SetOpacity2DOutline(1.0)
        if nodes.instances is not None and nodes.segmentation is not None:
            nodes.segmentation.GetDisplayNode().SetVisibility(False)  # the lesions' outlines say it all
        self._reset_views()
        if case.instances:
            jump_slices_to(self.scene, case.instances[0].centroid_ras)
        if case.qa is not None:
            self._show_qa()
        if self._shown:  # show_case left the last instance map in front: the class map first
            self._show_overlay()
        else:
            self.state.uncertainty_shown = False
            self.state.counterfactual_shown = 0
        self._refresh_targets(force=True)

    def _show_overlay(self) -> None:
        from ..mrml.logic import show_counterfactual, show_explanations, show_instance_saliency

        session, display = self.session, self.state.display
        if self._shown[0] == "counterfactual":  # R is signed whatever the display; the threshold applies
            show_counterfactual(self.scene, session.case, self._shown[1], session.nodes,
                                reference_volume=session.reference_volume, opacity=float(self.state.opacity),
                                threshold=float(self.state.threshold), name=session.name)
            self._overlay_shown(0)
            self._show_counterfactual_state()
        elif self._shown[0] == "uncertainty":  # fixed [0, log K] nats: display and threshold are the maps'
            from ..mrml import show_in_slice_views

            show_in_slice_views(self.scene, background=session.reference_volume,
                                foreground=session.nodes.uncertainty[self._shown[1]][0],
                                foreground_opacity=float(self.state.opacity))
            self._overlay_shown(0)
        elif self._shown[0] == "map":
            show_explanations(self.scene, session.case, session.nodes, reference_volume=session.reference_volume,
                              display=display, threshold=float(self.state.threshold),
                              opacity=float(self.state.opacity), maps=[self._shown[1]], name=session.name)
            self._overlay_shown(0)
        else:
            instance_id = self._shown[1]
            available = session.case.instance_maps[instance_id]
            aggregation = self.state.instance_aggregation if self.state.instance_aggregation in available else ""
            show_instance_saliency(self.scene, session.case, instance_id, session.nodes,
                                   reference_volume=session.reference_volume, display=display,
                                   threshold=float(self.state.threshold), opacity=float(self.state.opacity),
                                   aggregation=aggregation, name=session.name)
            self._overlay_shown(instance_id)
        self._render()

    def _overlay_shown(self, instance_id: int) -> None:
        self.state.instance_shown = int(instance_id)
        self.state.uncertainty_shown = bool(self._shown) and self._shown[0] == "uncertainty"
        self.state.counterfactual_shown = int(self._shown[1]) if self._shown and self._shown[0] == "counterfactual" \
            else 0
        self.state.overlay_version = int(self.state.overlay_version) + 1

    def _show_qa(self) -> None:
        qa = self.session.case.qa
        self.state.qa_band = qa.summary_text()
        self.state.qa_figure = _qa_figure(qa)

    # ---- views -------------------------------------------------------------------------------
    def _reset_views(self) -> None:
        for view in self.slicer.view_manager.get_slice_views():
            view.reset_view()

    def _render(self) -> None:
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    def _refresh_targets(self, force: bool = False) -> None:
        """``lesion_targets`` of the axial view, when its slice node changed."""
        view = self.slicer.view_manager.get_view("Red")
        if view is None:
            return
        node = view.get_view_node()
        if not force and node.GetMTime() == self._targets_time:
            return
        self._targets_time = node.GetMTime()
        matrix = node.GetXYToRAS()
        xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        self.state.lesion_targets = lesion_targets(self.session.case, xy_to_ras, node.GetDimensions()[:2])

    # ---- page --------------------------------------------------------------------------------
    def _build_ui(self, three_d: bool) -> None:
        from trame.ui.vuetify3 import SinglePageLayout
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v3

        ctrl, server = self.ctrl, self.server

        def act(method):
            def run(*args):
                self._attempt(method, *args)
            return run

        ctrl.open = act(lambda: self.open(self.state.open_path))
        ctrl.segment = act(self.segment)
        ctrl.explain = act(self.explain)
        ctrl.qa = act(self.qa)
        ctrl.uncertainty = act(self.uncertainty)
        ctrl.show_uncertainty = act(self.show_uncertainty)
        ctrl.counterfactual = act(self.counterfactual)
        ctrl.show_counterfactual = act(self.show_counterfactual)
        ctrl.cancel = act(self.cancel)
        ctrl.confirm_long = act(self.confirm_long)
        server.trigger("confirm_long")(ctrl.confirm_long)  # called by the page once the user confirmed
        ctrl.jump_to_lesion = act(self.jump_to_lesion)
        server.trigger("jump_to_lesion")(ctrl.jump_to_lesion)  # called by name from the table's rows

        def view(tag: str, element_id: str, style: str) -> None:
            with html.Div(id=element_id, style=f"display:flex;flex:1;border:1px solid #222;{style}"):
                client.ServerTemplate(name=server.translator.translate_key(tag))

        with SinglePageLayout(server) as layout:
            self.layout = layout  # the page (its .html: what the browser gets)
            layout.title.set_text("SegXAI")
            with layout.toolbar:
                v3.VTextField(v_model=("open_path",), label="case folder or image", density="compact",
                              hide_details=True, id="segxai-open-path", style="max-width:360px")
                v3.VBtn("Open", click=ctrl.open, id="segxai-open", disabled=("busy",))
                v3.VBtn("Segment", click=ctrl.segment, id="segxai-segment", disabled=("busy || !has_volumes",))
                v3.VSpacer()
                v3.VProgressLinear(model_value=("progress",), v_show=("busy",), style="max-width:220px",
                                   classes="mx-2", height=8, id="segxai-progress")
                html.Span("{{ status }}", id="segxai-status", classes="mx-2 text-caption")
                html.Span("{{ estimate }}", v_show=("busy && estimate",), id="segxai-estimate",
                          classes="mx-2 text-caption", style="max-width:360px")
                # a refusal for the estimated time: ask, and run the same request again confirmed
                client.ClientStateChange(
                    value="cost_refusal",
                    change="cost_refusal && utils.get('window').confirm(cost_refusal + ' -- Run it anyway?') "
                           "&& trigger('confirm_long')")
                v3.VBtn("Cancel", click=ctrl.cancel, id="segxai-cancel", disabled=("!busy",))
            with layout.content:
                with html.Div(style="display:flex;height:calc(100vh - 90px);"):
                    with html.Div(style="display:flex;flex-direction:column;width:340px;overflow:auto;padding:8px;"):
                        html.Div("{{ error }}", v_show=("error",), id="segxai-error",
                                 style="color:#b00020;white-space:pre-wrap;margin-bottom:8px;")
                        with html.Div(v_show=("input_warnings.length",), id="segxai-input-warnings", role="alert",
                                      style="background:#fff8c5;color:#3b2300;border:2px solid #bf8700;padding:6px;"
                                            "margin-bottom:8px;font-size:12px;"):
                            html.Strong(INPUT_WARNING_TITLE)
                            with html.Ul(style="margin:0;padding-left:16px;"):
                                html.Li("{{ w }}", v_for="w in input_warnings", key="w")
                        v3.VSelect(v_model=("method",), items=("methods",), label="method", density="compact")
                        with html.Div(v_for="p in method_form", key="p.name"):
                            v3.VSelect(v_if="p.kind === 'choice'", v_model="method_params[p.name]",
                                       items=("p.choices",), label=("p.name",), density="compact",
                                       title=("p.help",))
                            v3.VCheckbox(v_else_if="p.kind === 'bool'", v_model="method_params[p.name]",
                                         label=("p.name",), density="compact", hide_details=True)
                            v3.VTextField(v_else=True, v_model="method_params[p.name]", label=("p.name",),
                                          density="compact", title=("p.help",), hide_details=True)
                        v3.VTextField(v_model=("target",), label="target (class, class:NAME, instance:ID)",
                                      density="compact", hide_details=True)
                        v3.VBtn("Explain", click=ctrl.explain, id="segxai-explain",
                                disabled=("busy || !has_case",), classes="my-2")
                        v3.VSelect(v_model=("display",), items=(["normalised", "signed"],), label="display",
                                   density="compact", hide_details=True)
                        v3.VSlider(v_model=("threshold",), min=0, max=1, step=0.01, label="threshold",
                                   density="compact", hide_details=True)
                        v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, label="opacity",
                                   density="compact", hide_details=True, id="segxai-opacity")
                        v3.VBtn("Pick lesion", click="pick_mode = !pick_mode", id="segxai-pick",
                                color=("pick_mode ? 'primary' : undefined",), disabled=("!has_case",),
                                classes="my-2")
                        v3.VSelect(v_model=("instance_aggregation",), items=(PICK_AGGREGATIONS,),
                                   label="instance aggregation", density="compact", hide_details=True)
                        with html.Table(id="segxai-lesions", style="width:100%;font-size:12px;margin-top:8px;"):
                            with html.Tr():
                                for title in ("lesion", "voxels", "mm3", "p"):
                                    html.Th(title)
                                html.Th("H", v_if=("has_uncertainty",), title="mean predictive entropy (nats)")
                                html.Th("Dice", v_if=("has_uncertainty",), title="mean pairwise Dice of the samples")
                            # rows without an id: reference lesions the prediction missed (FN)
                            with html.Tr(v_for="row in lesions", key="row.key",
                                         id=("row.id ? 'segxai-lesion-' + row.id : undefined",),
                                         style=("(row.id ? 'cursor:pointer' : 'color:grey') + "
                                                "(row.id && row.id === lesion_selected ? ';background:#fff3c4' : '')",),
                                         click="row.id && trigger('jump_to_lesion', [row.id])"):
                                html.Td("{{ row.id }}")
                                html.Td("{{ row.voxels }}")
                                html.Td("{{ row.volume_mm3 }}")
                                html.Td("{{ row.mean_probability }}")
                                html.Td("{{ row.uncertainty_mean_entropy }}", v_if=("has_uncertainty",))
                                html.Td("{{ row.uncertainty_pairwise_dice }}", v_if=("has_uncertainty",))
                        v3.VTextField(v_model=("risk_model",), label="risk model (JSON or bundled:<model>/<method>)",
                                      density="compact", hide_details=True, classes="mt-2")
                        v3.VBtn("QA", click=ctrl.qa, id="segxai-qa", disabled=("busy || !has_case",), classes="my-2")
                        html.Div("{{ qa_band }}", v_show=("qa_band",), id="segxai-qa-band")
                        html.Img(src=("qa_figure",), v_show=("qa_figure",), style="width:100%;")
                        with html.Table(id="segxai-contour-review", v_show=("contour_review.length",),
                                        style="width:100%;font-size:12px;margin-top:8px;",
                                        title="given contours against the model's prediction, most suspicious "
                                              "first (suspicion: the risk model's P(insufficient), else 1 - Dice)"):
                            with html.Tr():
                                for title in CONTOUR_REVIEW_COLUMNS.values():
                                    html.Th(title)
                            with html.Tr(v_for="row in contour_review", key="row.key"):
                                for key in CONTOUR_REVIEW_COLUMNS:
                                    html.Td(f"{{{{ row.{key} }}}}")
                        v3.VSelect(v_model=("uncertainty_source",), items=("uncertainty_presets",),
                                   label="uncertainty samples from", density="compact", hide_details=True,
                                   id="segxai-uncertainty-source", classes="mt-2")
                        with html.Div(style="display:flex;gap:8px;"):
                            v3.VTextField(v_model=("uncertainty_samples",), label="samples", type="number",
                                          density="compact", hide_details=True, disabled=("!uncertainty_random",),
                                          id="segxai-uncertainty-samples")
                            v3.VTextField(v_model=("uncertainty_seed",), label="seed", type="number",
                                          density="compact", hide_details=True, disabled=("!uncertainty_random",),
                                          id="segxai-uncertainty-seed")
                        with html.Div(style="display:flex;gap:8px;"):
                            v3.VBtn("Uncertainty", click=ctrl.uncertainty, id="segxai-uncertainty",
                                    disabled=("busy || !has_case",), classes="my-2")
                            v3.VBtn("Show entropy", click=ctrl.show_uncertainty, id="segxai-uncertainty-show",
                                    disabled=("busy || !has_uncertainty || uncertainty_shown",), classes="my-2")
                        html.Div("{{ uncertainty_summary.text }}", v_show=("has_uncertainty",),
                                 id="segxai-uncertainty-summary", style="font-size:12px;")
                        v3.VTextField(v_model=("counterfactual_generators",),
                                      label="counterfactual generators (generators.pt or its folder)",
                                      density="compact", hide_details=True, id="segxai-counterfactual-generators",
                                      classes="mt-2")
                        html.Div("selected lesion: {{ lesion_selected || 'none (pick one or click a row)' }}",
                                 id="segxai-lesion-selected", style="font-size:12px;")
                        with html.Div(style="display:flex;gap:8px;"):
                            v3.VBtn("Counterfactual", click=ctrl.counterfactual, id="segxai-counterfactual",
                                    disabled=("busy || !has_case || !lesion_selected || !counterfactual_generators",),
                                    classes="my-2")
                            v3.VBtn("Show R", click=ctrl.show_counterfactual, id="segxai-counterfactual-show",
                                    disabled=("busy || !counterfactual_ids.length || (counterfactual_shown && "
                                              "(counterfactual_shown === lesion_selected || "
                                              "!counterfactual_ids.includes(lesion_selected)))",),
                                    classes="my-2")
                        with html.Div(v_show=("counterfactual_summary.text",), id="segxai-counterfactual-summary",
                                      style="font-size:12px;"):
                            with html.Table(style="width:100%;"):
                                with html.Tr():
                                    for title in ("lesion", "x", "G+(x)", "G-(x)"):
                                        html.Th(title)
                                with html.Tr():
                                    html.Td("{{ counterfactual_summary.id }}")
                                    html.Td("{{ counterfactual_summary.original }}")
                                    html.Td("{{ counterfactual_summary.plus }}")
                                    html.Td("{{ counterfactual_summary.minus }}")
                            html.Div("model score (mean lesion logit) of each image. R = G+(x) - G-(x): red what "
                                     "G+ adds, blue what it removes.")
                    with html.Div(style="display:flex;flex:1;flex-direction:row;background:black;"):
                        view("Red", VIEW_IDS["Red"], "flex:2;")
                        with html.Div(style="display:flex;flex:1;flex-direction:column;"):
                            view("Green", VIEW_IDS["Green"], "")
                            view("Yellow", VIEW_IDS["Yellow"], "")
                            if three_d:
                                view("ThreeD", "segxai-view-3d", "")

    # ---- server ------------------------------------------------------------------------------
    def _bind(self, wslink_server) -> None:
        from .security import token_middleware

        wslink_server.app.middlewares.append(token_middleware(self.token))  # before the app is frozen

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                with self.state:
                    self.poll()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("SegXAI viewer: poll")

    def _ready(self, **_) -> None:
        host = self._host if ":" not in self._host else f"[{self._host}]"
        self.url = f"http://{host}:{self.server.port}/index.html?secret={self.token}"
        asyncio.get_event_loop().create_task(self._poll_loop())
        print(f"SegXAI viewer: {self.url}", flush=True)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve until stopped (blocks). ``host`` 127.0.0.1 unless told otherwise; the token is
        always required."""
        import sys

        self._host = host
        argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv: keep segxai's flags from it
        try:
            self.server.start(host=host, port=port, open_browser=False, timeout=0, show_connection_info=False)
        finally:
            sys.argv = argv


def _qa_figure(qa) -> str:
    """The EC curve (with the calibration cohort's when there is one) as a PNG data URL."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 2.8), dpi=90)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(qa.thresholds, qa.curve, color="tab:orange", label=f"this case ({qa.band})")
    if qa.reference_curve is not None:
        axes.plot(qa.thresholds, qa.reference_curve, "--", color="grey", label="calibration mean")
    axes.set_xlabel("normalised saliency threshold")
    axes.set_ylabel("Euler characteristic")
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
