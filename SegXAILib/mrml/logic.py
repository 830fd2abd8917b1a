"""The Qt-free core of the Slicer module's logic: compute a case, then show it as nodes.

Two halves, because MRML must only be touched on Slicer's main thread while the model runs
elsewhere:

* :class:`CaseEngine` computes (no MRML): it keeps the model loaded between calls (keyed by
  card and device), segments, explains, finds instances, computes instance saliency and the QA
  curve and risk. The Slicer module runs it in a :class:`Worker` thread.
* :func:`show_segmentation`, :func:`show_explanations`, :func:`show_instance_saliency`,
  :func:`show_qa` turn its results into nodes of a scene (main thread).

:func:`process` chains both for scripts and batch runs (the Slicer console, tests).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..image import Image, SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = [
    "CaseEngine",
    "CaseResult",
    "CaseNodes",
    "Worker",
    "available_devices",
    "show_segmentation",
    "show_explanations",
    "show_instance_saliency",
    "show_qa",
    "process",
    "DISPLAY_MODES",
]

log = logging.getLogger(__name__)

#: how saliency maps are shown: paper 000's normalisation (unsigned, 17 % threshold) or signed
DISPLAY_MODES = ("normalised", "signed")


def available_devices() -> list[tuple[str, str]]:
    """``(device, label)`` pairs for the device menu: auto, cpu, and each CUDA GPU with its
    name and memory (e.g. ``("cuda:0", "CUDA 0: NVIDIA H100 (79.2 GiB)")``)."""
    import torch

    devices = [("auto", "auto (CUDA, then Apple MPS, then CPU)"), ("cpu", "CPU")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append((f"cuda:{index}", f"CUDA {index}: {properties.name} ({properties.total_memory / 2**30:.1f} GiB)"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(("mps", "Apple MPS"))
    return devices


@dataclass
class CaseResult:
    """Everything computed for one case, on the input grid (world RAS).

    ``instance_labels`` ``(1, I, J, K)`` int32 ids of the connected components of class
    ``class_index``; ``explanations`` method -> AttributionResult; ``instance_maps``
    instance id -> instance saliency ``(C, I, J, K)``; ``curve`` / ``thresholds`` the EC
    curve of the QA map; ``risk`` the :meth:`RiskModel.score` result (None without a model).
    """

    image: Image
    segmentation: Any
    class_index: int
    instance_labels: Optional[Image] = None
    instances: list = field(default_factory=list)
    explanations: dict = field(default_factory=dict)
    instance_maps: dict = field(default_factory=dict)
    thresholds: Optional[np.ndarray] = None
    curve: Optional[np.ndarray] = None
    qa_method: str = ""
    risk: Optional[dict] = None
    risk_reference: Optional[np.ndarray] = None

    def lesion_rows(self) -> list[dict]:
        """Lesion table rows: an instance with its own saliency map gets
        :func:`~SegXAILib.instances.lesion_table`'s saliency columns of that map; the others,
        those of the first class-level explanation (when there is one)."""
        from ..instances import lesion_table

        if self.instance_labels is None:
            return []
        labels = self.instance_labels.array[0]
        shared = next(iter(self.explanations.values())).maps if self.explanations else None
        rows = []
        for instance in self.instances:
            own = self.instance_maps.get(instance.id)
            if own is not None:
                row = lesion_table([instance], labels, {instance.id: own}, self.instance_labels)[0]
                row["saliency"] = "instance"
            elif shared is not None:
                row = lesion_table([instance], labels, shared, self.instance_labels)[0]
                row["saliency"] = next(iter(self.explanations))
            else:
                row = instance.to_dict()
                row.pop("bbox_start"), row.pop("bbox_stop")
                row["saliency"] = ""
            rows.append(row)
        return rows


class CaseEngine:
    """Computes cases and keeps the last model loaded (no MRML; one thread at a time)."""

    def __init__(self) -> None:
        self._model = None
        self._key: Optional[tuple] = None
        self.loads = 0  # how many times a network was built (the model stays loaded between calls)

    # ---- model ------------------------------------------------------------------------
    def card(self, model):
        """The model card of a bundled name, a card file or folder, or a ModelCard."""
        from ..models.card import ModelCard
        from ..pipeline import resolve_model_card

        return model if isinstance(model, ModelCard) else resolve_model_card(model)

    def model(self, model, device: str = "auto", trust: bool = False):
        """The loaded model, built once per (card file, card contents, device)."""
        from ..models import load_model, resolve_device

        card = self.card(model)
        resolved = resolve_device(device)
        stamp = card.path.stat().st_mtime_ns if card.path is not None and card.path.exists() else None
        key = (str(card.path), stamp, card.name, str(resolved))
        if self._key != key:
            self._model = None  # release the previous network before building the next
            self._model = load_model(card, device=resolved, trust=trust)
            self._key = key
            self.loads += 1
        return self._model

    # ---- computing --------------------------------------------------------------------
    def segment(self, image: Image, model, device: str = "auto", class_name: str = "", min_voxels: int = 1,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> CaseResult:
        """Segment and find the instances of ``class_name`` (the first foreground class by default)."""
        from ..instances import find_instances
        from ..models import segment

        loaded = self.model(model, device)
        card = loaded.card
        if image.num_channels != len(card.input_channels):
            raise SegXAIInputError(
                f"model {card.name!r} takes {len(card.input_channels)} input volume(s) "
                f"({', '.join(card.input_channels)}), got {image.num_channels}"
            )
        class_index = 1 if not class_name else _class_index(card, class_name)
        segmentation = segment(image, loaded, progress=sub_progress(progress, 0.0, 0.95), cancel=cancel)
        labels, instances = find_instances(segmentation.mask(class_index),
                                           segmentation.probabilities.array[class_index], min_voxels=min_voxels,
                                           grid=image)
        report(progress, 1.0, "segmented")
        return CaseResult(image=image, segmentation=segmentation, class_index=class_index,
                          instance_labels=image.with_array(labels[None], ("instances",)), instances=instances)

    def explain(self, result: CaseResult, model, methods: Sequence[str], params: Optional[Mapping[str, Mapping]] = None,
                target: str = "", device: str = "auto", progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> CaseResult:
        """Run each method (registry names) on ``target`` (``class:NAME``, ``instance:ID``...;
        the segmented class by default); ``params`` method -> parameters."""
        from ..attribution import explain

        loaded = self.model(model, device)
        target = target or f"class:{loaded.card.class_names[result.class_index]}"
        methods = list(methods)
        for step, method in enumerate(methods):
            result.explanations[method] = explain(
                result.image, loaded, method, target=target, params=dict((params or {}).get(method, {})),
                progress=sub_progress(progress, step / len(methods), (step + 1) / len(methods)), cancel=cancel,
            )
        return result

    def instance_saliency(self, result: CaseResult, model, instance_id: int, device: str = "auto",
                          n_samples: int = 20, noise_level: float = 0.1, aggregation: str = "mean", seed: int = 0,
                          batch_size: int = 8, progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> Image:
        """Paper 001's instance saliency (SmoothGrad aggregated over the instance) on the input grid."""
        from ..instances import instance_saliency

        if result.instance_labels is None or not 1 <= instance_id <= len(result.instances):
            raise SegXAIInputError(f"instance {instance_id}: the prediction has {len(result.instances)} instance(s)")
        maps = instance_saliency(
            result.image, self.model(model, device), result.instance_labels.array[0], [instance_id],
            class_index=result.class_index, aggregations=(aggregation,), n_samples=n_samples, noise_level=noise_level,
            batch_size=batch_size, seed=seed, progress=progress, cancel=cancel,
        )[instance_id][aggregation]
        result.instance_maps[instance_id] = maps
        return maps

    def qa(self, result: CaseResult, model, risk_model=None, method: str = "", channel: int = 0,
           device: str = "auto", progress: Optional[ProgressCallback] = None,
           cancel: Optional[CancelToken] = None) -> CaseResult:
        """The EC curve of one saliency map inside the predicted class and, with a risk model
        (a :class:`~SegXAILib.topology.RiskModel` or its JSON file), the risk score.

        With a risk model the map is that of the model's method (computed with its calibration
        parameters when missing); without one, ``method`` or the first explanation.
        ``channel`` is the input channel whose map is used.
        """
        from ..topology import RiskModel, default_thresholds, saliency_curve

        if risk_model is not None and not isinstance(risk_model, RiskModel):
            risk_model = RiskModel.load(risk_model)
        if risk_model is not None:
            method = risk_model.method
            if method not in result.explanations:
                self.explain(result, model, [method], {method: risk_model.method_parameters}, device=device,
                             progress=progress, cancel=cancel)
        method = method or next(iter(result.explanations), "")
        if method not in result.explanations:
            raise SegXAIInputError("QA: explain the case with a method first (or give a risk model)")
        maps = result.explanations[method].maps
        if not 0 <= channel < maps.num_channels:
            raise SegXAIInputError(f"QA channel {channel}: the map has {maps.num_channels} channel(s)")
        mask = result.segmentation.mask(result.class_index)
        thresholds = risk_model.thresholds if risk_model is not None else default_thresholds(100)
        result.thresholds = np.asarray(thresholds, dtype=float)
        result.curve = saliency_curve(maps.array[channel], mask, thresholds)
        result.qa_method = method
        if risk_model is not None:
            loaded = self.model(model, device)
            result.risk = risk_model.score(result.curve, method=method, model_checksum=loaded.card.checksum())
            result.risk_reference = np.asarray(risk_model.pca_mean, dtype=float)
        return result


def _class_index(card, class_name: str) -> int:
    if class_name not in card.class_names[1:]:
        raise SegXAIInputError(f"class {class_name!r}: the model's foreground classes are {card.class_names[1:]}")
    return card.class_names.index(class_name)


# ---------------------------------------------------------------------------- worker


class Worker:
    """One persistent background thread that runs jobs in order (the model stays loaded in
    the engine between them). The GUI thread polls :meth:`poll` from a timer: it returns the
    latest progress and the finished jobs, whose callbacks the GUI then runs on its own thread.
    """

    def __init__(self) -> None:
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._done: "queue.Queue[tuple]" = queue.Queue()
        self._lock = threading.RLock()
        self._progress = (0.0, "")
        self.cancel_token: Optional[CancelToken] = None
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="SegXAI worker", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[ProgressCallback, CancelToken], Any], on_done: Callable[[Any, Optional[BaseException]], None]) -> CancelToken:
        """Queue ``job(progress, cancel)``; ``on_done(result, error)`` is returned by :meth:`poll`."""
        token = CancelToken()
        with self._lock:
            self.busy = True
        self._jobs.put((job, on_done, token))
        return token

    def cancel(self) -> None:
        token = self.cancel_token
        if token is not None:
            token.cancel()

    def _report(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self._progress = (float(fraction), str(message))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, on_done, token = item
            self.cancel_token = token
            self._report(0.0, "starting")
            try:
                value, error = job(self._report, token), None
            except BaseException as caught:  # reported to the GUI thread, never lost
                value, error = None, caught
            self.cancel_token = None
            self._done.put((on_done, value, error))
            with self._lock:
                self.busy = not self._jobs.empty()

    def poll(self) -> tuple[tuple[float, str], list[tuple[Callable, Any, Optional[BaseException]]]]:
        """``((fraction, message), [(on_done, result, error), ...])`` since the last poll."""
        finished = []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            return self._progress, finished

    def wait(self, timeout: float = 60.0) -> list:
        """Block until the queued jobs are done (scripts and tests); returns their poll entries."""
        deadline = time.monotonic() + timeout
        finished = []
        while time.monotonic() < deadline:
            finished.extend(self.poll()[1])
            with self._lock:
                if not self.busy and self._jobs.empty():
                    finished.extend(self.poll()[1])
                    return finished
            time.sleep(0.01)
        raise TimeoutError("SegXAI worker: jobs still running")

    def stop(self) -> None:
        self.cancel()
        self._jobs.put(None)


# ---------------------------------------------------------------------------- nodes


@dataclass
class CaseNodes:
    """The nodes showing one case."""

    segmentation: Any = None
    instances: Any = None
    saliency: dict = field(default_factory=dict)  # method -> [volume node per channel]
    instance_saliency: dict = field(default_factory=dict)  # instance id -> [volume node per channel]
    lesion_table: Any = None
    qa_table: Any = None
    chart: Any = None


def _display_maps(maps: Image, display: str) -> Image:
    from ..attribution.postprocess import normalise_000

    if display not in DISPLAY_MODES:
        raise SegXAIInputError(f"display must be one of {DISPLAY_MODES}, got {display!r}")
    return maps.with_array(normalise_000(maps.array)) if display == "normalised" else maps


def show_segmentation(scene, result: CaseResult, reference_volume=None, nodes: Optional[CaseNodes] = None,
                      name: str = "SegXAI") -> CaseNodes:
    """Segmentation (one segment per class), instances and the lesion table as nodes."""
    from .nodes import instances_segmentation_node, segmentation_node_from_labels
    from .tables import lesion_table_node

    nodes = nodes or CaseNodes()
    card = result.segmentation.card
    nodes.segmentation = segmentation_node_from_labels(
        result.segmentation.labels, scene, card.class_names, [c.color for c in card.classes],
        name=f"{name} segmentation", reference_volume=reference_volume)
    if result.instance_labels is not None:
        nodes.instances = instances_segmentation_node(result.instance_labels, scene, name=f"{name} instances",
                                                      reference_volume=reference_volume)
        nodes.lesion_table = lesion_table_node(result.lesion_rows(), scene, name=f"{name} lesions",
                                               node=nodes.lesion_table)
    return nodes


def show_explanations(scene, result: CaseResult, nodes: CaseNodes, reference_volume=None, display: str = "normalised",
                      threshold: float = 0.17, opacity: float = 0.5, name: str = "SegXAI") -> CaseNodes:
    """One saliency volume per method and channel; the first is set as the slice views'
    foreground over ``reference_volume``. The lesion table is refreshed."""
    from .display import saliency_volume_node, show_in_slice_views
    from .tables import lesion_table_node

    first = None
    for method, explanation in result.explanations.items():
        if method in nodes.saliency:
            continue
        maps = _display_maps(explanation.maps, display)
        nodes.saliency[method] = [
            saliency_volume_node(maps, scene, f"{name} {method} {channel}", channel=channel, threshold=threshold,
                                 signed=display == "signed", peak=1.0 if display == "normalised" else None,
                                 reference_volume=reference_volume)
            for channel in maps.channel_names
        ]
        first = first or nodes.saliency[method][0]
    if first is not None:
        show_in_slice_views(scene, background=reference_volume, foreground=first, foreground_opacity=opacity)
    if nodes.lesion_table is not None:
        lesion_table_node(result.lesion_rows(), scene, node=nodes.lesion_table, name=nodes.lesion_table.GetName())
    return nodes


def show_instance_saliency(scene, result: CaseResult, instance_id: int, nodes: CaseNodes, reference_volume=None,
                           display: str = "normalised", threshold: float = 0.17, opacity: float = 0.5,
                           name: str = "SegXAI") -> list:
    """The instance's saliency volumes (one per channel) as the foreground, views centred on it."""
    from .display import jump_slices_to, saliency_volume_node, show_in_slice_views
    from .tables import lesion_table_node

    maps = _display_maps(result.instance_maps[instance_id], display)
    volumes = [
        saliency_volume_node(maps, scene, f"{name} lesion {instance_id} {channel}", channel=channel,
                             threshold=threshold, signed=display == "signed",
                             peak=1.0 if display == "normalised" else None, reference_volume=reference_volume)
        for channel in maps.channel_names
    ]
    nodes.instance_saliency[instance_id] = volumes
    show_in_slice_views(scene, background=reference_volume, foreground=volumes[0], foreground_opacity=opacity)
    jump_slices_to(scene, result.instances[instance_id - 1].centroid_ras)
    if nodes.lesion_table is not None:
        lesion_table_node(result.lesion_rows(), scene, node=nodes.lesion_table, name=nodes.lesion_table.GetName())
    return volumes


def show_qa(scene, result: CaseResult, nodes: CaseNodes, risk_model_name: str = "", name: str = "SegXAI") -> CaseNodes:
    """The EC curve chart, the QA table and, with a risk result, the class segment's risk tags."""
    from .nodes import set_segment_risk
    from .tables import ec_curve_chart, qa_table_node

    if result.curve is None:
        raise SegXAIInputError("QA: no EC curve computed")
    class_name = result.segmentation.card.class_names[result.class_index]
    nodes.chart, _ = ec_curve_chart(scene, result.thresholds, {f"{class_name} ({result.qa_method})": result.curve},
                                    name=f"{name} EC curves", reference=result.risk_reference)
    row: dict[str, Any] = {"structure": class_name, "method": result.qa_method}
    if result.risk is not None:
        row.update(result.risk)
        row["risk_model"] = risk_model_name
        if nodes.segmentation is not None:
            set_segment_risk(nodes.segmentation, class_name, result.risk)
    else:
        row["band"] = "no risk model"
    nodes.qa_table = qa_table_node([row], scene, name=f"{name} QA", node=nodes.qa_table)
    return nodes


def process(
    scene,
    input_volumes: Sequence,
    model: Union[str, Path] = "lesions",
    methods: Sequence[str] = (),
    params: Optional[Mapping[str, Mapping]] = None,
    target: str = "",
    device: str = "auto",
    risk_model: Union[str, Path, None] = None,
    instances: Sequence[int] = (),
    display: str = "normalised",
    engine: Optional[CaseEngine] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[CaseResult, CaseNodes]:
    """Segment, explain, instance saliency and QA for one case, shown as nodes of ``scene``.

    Parameters
    ----------
    input_volumes : sequence of vtkMRMLScalarVolumeNode
        One per model input channel, in the card's order.
    model : str or path
        A bundled name (``lesions``) or a model card.
    methods : sequence of str
        Attribution methods (registry names); ``params`` method -> parameters.
    target : str
        ``class:NAME`` / ``instance:ID`` ...; the segmented class by default.
    risk_model : path, optional
        A risk model JSON: adds the EC curve, the risk band (segment tag and QA table).
    instances : sequence of int
        Instances whose instance saliency to compute (paper 001, mean aggregation).
    """
    engine = engine or CaseEngine()
    card = engine.card(model)
    from .nodes import channel_image_from_volume_nodes

    if len(input_volumes) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} input volume(s) "
            f"({', '.join(card.input_channels)}), got {len(input_volumes)}"
        )
    image = channel_image_from_volume_nodes(input_volumes, card.input_channels)
    steps = 1 + bool(methods) + len(instances) + (risk_model is not None or bool(methods))
    done = [0]

    def step() -> Optional[ProgressCallback]:
        start = done[0] / steps
        done[0] += 1
        return sub_progress(progress, start, done[0] / steps)

    result = engine.segment(image, card, device, progress=step(), cancel=cancel)
    nodes = show_segmentation(scene, result, reference_volume=input_volumes[0])
    if methods:
        engine.explain(result, card, methods, params, target=target, device=device, progress=step(), cancel=cancel)
        show_explanations(scene, result, nodes, reference_volume=input_volumes[0], display=display)
    for identifier in instances:
        engine.instance_saliency(result, card, int(identifier), device=device, progress=step(), cancel=cancel)
        show_instance_saliency(scene, result, int(identifier), nodes, reference_volume=input_volumes[0], display=display)
    if risk_model is not None or methods:
        engine.qa(result, card, risk_model=risk_model, device=device, progress=step(), cancel=cancel)
        show_qa(scene, result, nodes, risk_model_name=str(risk_model or ""))
    report(progress, 1.0, "done")
    return result, nodes
