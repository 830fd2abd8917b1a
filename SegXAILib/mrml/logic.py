"""The Qt-free core of the Slicer module's logic: show a :class:`~SegXAILib.pipeline.Case` as nodes.

The case is computed by the pipeline (:func:`~SegXAILib.pipeline.run_case` and its ``add_*``
steps), never here: this module only reads a Case and makes nodes of a scene (main thread).

* :func:`show_segmentation`, :func:`show_explanations`, :func:`show_instance_saliency`,
  :func:`show_qa`, :func:`show_contour_qa`, :func:`show_uncertainty`, :func:`show_counterfactual`,
  :func:`show_case` turn a Case into nodes; :func:`contour_qa_summary` gives the review list's rows.
* :func:`case_image` gathers input volume nodes into the image a case runs on.

The Slicer panel computes in the engine process (:mod:`SegXAILib.mrml.session`) and shows the
case it reads back with these same functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..image import Image, SegXAIInputError

__all__ = [
    "CaseNodes",
    "available_devices",
    "show_segmentation",
    "show_explanations",
    "show_instance_saliency",
    "show_qa",
    "show_contour_qa",
    "contour_qa_summary",
    "show_uncertainty",
    "show_counterfactual",
    "counterfactual_summary",
    "uncertainty_summary",
    "input_warnings_text",
    "INPUT_WARNINGS_ATTRIBUTE",
    "UNCERTAINTY_VOLUMES",
    "UNCERTAINTY_SUMMARY_KEYS",
    "show_case",
    "case_image",
    "DISPLAY_MODES",
]

log = logging.getLogger(__name__)

#: how saliency maps are shown: paper 000's normalisation (unsigned, 17 % threshold) or signed
DISPLAY_MODES = ("normalised", "signed")

#: the uncertainty maps shown as volumes (every map is in the case folder), first = foreground
UNCERTAINTY_VOLUMES = ("predictive_entropy", "mutual_information")
#: the structure's uncertainty values a front end shows beside the maps
UNCERTAINTY_SUMMARY_KEYS = ("mean_entropy", "boundary_entropy", "pairwise_dice", "soft_dice_confidence")


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


# ---------------------------------------------------------------------------- nodes


@dataclass
class CaseNodes:
    """The nodes showing one case."""

    segmentation: Any = None
    instances: Any = None
    saliency: dict = field(default_factory=dict)  # map name -> [volume node per channel]
    instance_saliency: dict = field(default_factory=dict)  # instance id -> [volume node per channel]
    lesion_table: Any = None
    qa_table: Any = None
    contour_qa_table: Any = None  # the review list of given contours
    chart: Any = None
    uncertainty: dict = field(default_factory=dict)  # map name -> [volume node per channel]
    uncertainty_table: Any = None
    # instance id -> {"plus" | "minus" | "relevance": [volume node per channel]}
    counterfactual: dict = field(default_factory=dict)


def _display_maps(maps: Image, display: str) -> Image:
    from ..attribution.postprocess import normalise_000

    if display not in DISPLAY_MODES:
        raise SegXAIInputError(f"display must be one of {DISPLAY_MODES}, got {display!r}")
    return maps.with_array(normalise_000(maps.array)) if display == "normalised" else maps


def _refresh_lesion_table(scene, case, nodes: CaseNodes) -> None:
    from .tables import lesion_table_node

    if nodes.lesion_table is not None:
        lesion_table_node(case.lesions, scene, node=nodes.lesion_table, name=nodes.lesion_table.GetName())


def _saliency_volumes(scene, maps: Image, display: str, prefix: str, threshold: float, reference_volume,
                      previous: Optional[list]) -> list:
    """One saliency volume per channel; the previous ones (same map shown again) are replaced."""
    from .display import saliency_volume_node

    for node in previous or []:
        scene.RemoveNode(node)
    shown = _display_maps(maps, display)
    return [
        saliency_volume_node(shown, scene, f"{prefix} {channel}", channel=channel, threshold=threshold,
                             signed=display == "signed", peak=1.0 if display == "normalised" else None,
                             reference_volume=reference_volume)
        for channel in shown.channel_names
    ]


#: the segmentation node's attribute holding :func:`input_warnings_text` (empty when the input fits)
INPUT_WARNINGS_ATTRIBUTE = "SegXAI.InputWarnings"


def input_warnings_text(case) -> str:
    """The banner text of ``case.warnings`` (the input does not fit what the model card expects),
    the same in the report, the Slicer panel and the viewer; empty when there is none."""
    from ..models.expectations import INPUT_WARNING_TITLE

    if not case.warnings:
        return ""
    return "\n".join([INPUT_WARNING_TITLE, *(f"- {warning}" for warning in case.warnings)])


def show_segmentation(scene, case, reference_volume=None, nodes: Optional[CaseNodes] = None,
                      name: str = "SegXAI") -> CaseNodes:
    """Segmentation (one segment per class), instances and the lesion table as nodes."""
    from .nodes import instances_segmentation_node, segmentation_node_from_labels
    from .tables import lesion_table_node

    nodes = nodes or CaseNodes()
    card = case.card
    nodes.segmentation = segmentation_node_from_labels(
        case.segmentation.labels, scene, card.class_names, [c.color for c in card.classes],
        name=f"{name} segmentation", reference_volume=reference_volume)
    # the scene keeps the warnings with the result they qualify (saved scenes, other modules)
    nodes.segmentation.SetAttribute(INPUT_WARNINGS_ATTRIBUTE, input_warnings_text(case))
    if case.instance_labels is not None:
        nodes.instances = instances_segmentation_node(case.instance_labels, scene, name=f"{name} instances",
                                                      reference_volume=reference_volume)
        nodes.lesion_table = lesion_table_node(case.lesions, scene, name=f"{name} lesions", node=nodes.lesion_table)
    return nodes


def show_explanations(scene, case, nodes: CaseNodes, reference_volume=None, display: str = "normalised",
                      threshold: float = 0.17, opacity: float = 0.5, name: str = "SegXAI",
                      maps: Optional[Sequence[str]] = None) -> CaseNodes:
    """One saliency volume per class-level map (``maps``: their names, all by default) and
    channel; a map shown before is replaced by its new values. The first is set as the slice
    views' foreground over ``reference_volume``."""
    from .display import show_in_slice_views

    first = None
    for method in (list(case.maps) if maps is None else list(maps)):
        nodes.saliency[method] = _saliency_volumes(scene, case.maps[method].maps, display, f"{name} {method}",
                                                   threshold, reference_volume, nodes.saliency.get(method))
        first = first or nodes.saliency[method][0]
    if first is not None:
        show_in_slice_views(scene, background=reference_volume, foreground=first, foreground_opacity=opacity)
    _refresh_lesion_table(scene, case, nodes)
    return nodes


def show_instance_saliency(scene, case, instance_id: int, nodes: CaseNodes, reference_volume=None,
                           display: str = "normalised", threshold: float = 0.17, opacity: float = 0.5,
                           aggregation: str = "", name: str = "SegXAI") -> list:
    """The instance's saliency volumes (one per channel; ``aggregation`` the first computed by
    default) as the foreground, views centred on it."""
    from .display import jump_slices_to, show_in_slice_views

    if instance_id not in case.instance_maps:
        raise SegXAIInputError(f"instance {instance_id}: no instance map computed")
    per_aggregation = case.instance_maps[instance_id]
    aggregation = aggregation or next(iter(per_aggregation))
    volumes = _saliency_volumes(scene, per_aggregation[aggregation], display, f"{name} lesion {instance_id}",
                                threshold, reference_volume, nodes.instance_saliency.get(instance_id))
    nodes.instance_saliency[instance_id] = volumes
    show_in_slice_views(scene, background=reference_volume, foreground=volumes[0], foreground_opacity=opacity)
    jump_slices_to(scene, case.instances[instance_id - 1].centroid_ras)
    _refresh_lesion_table(scene, case, nodes)
    return volumes


def show_qa(scene, case, nodes: CaseNodes, name: str = "SegXAI") -> CaseNodes:
    """The EC curve chart, the QA table and, with a risk result, the structure segment's risk tags."""
    from .nodes import set_segment_risk
    from .tables import ec_curve_chart, qa_table_node

    qa = case.qa
    if qa is None:
        raise SegXAIInputError("QA: the case has no QA result")
    nodes.chart, _ = ec_curve_chart(scene, qa.thresholds, {f"{qa.structure} ({qa.method})": qa.curve},
                                    name=f"{name} EC curves", reference=qa.reference_curve)
    row = qa.table_row()
    if qa.risk is not None:
        if nodes.segmentation is not None:
            set_segment_risk(nodes.segmentation, qa.structure, qa.risk)
    nodes.qa_table = qa_table_node([row], scene, name=f"{name} QA", node=nodes.qa_table)
    return nodes


def contour_qa_summary(case) -> list[dict]:
    """The review list of given contours (``case.contour_qa``) as the rows of the panel's table,
    most suspicious first (:func:`SegXAILib.report.sections.contour_review_rows`: rank, structure,
    model class, suspicion and its sort key, Dice / volume ratio / surface distances with the
    model's prediction, the model's probability and entropy inside and along the border, the
    samples' agreement, risk band and P(insufficient)); [] without one."""
    from ..report.sections import contour_review_rows

    return [] if case is None else contour_review_rows(case)


def show_contour_qa(scene, case, nodes: CaseNodes, name: str = "SegXAI") -> CaseNodes:
    """The review list of given contours as a table node (:func:`contour_qa_summary`'s rows)."""
    from .tables import table_node_from_rows

    rows = contour_qa_summary(case)
    if not rows:
        raise SegXAIInputError("contour QA: the case has no review of given contours")
    nodes.contour_qa_table = table_node_from_rows(rows, scene, f"{name} contour review", node=nodes.contour_qa_table)
    return nodes


def show_uncertainty(scene, case, nodes: CaseNodes, reference_volume=None, opacity: float = 0.5,
                     threshold: float = 0.1, foreground: bool = True, name: str = "SegXAI") -> CaseNodes:
    """The predictive entropy and the mutual information (:data:`UNCERTAINTY_VOLUMES`) as volumes,
    the per-structure uncertainty table, and the lesion table with its uncertainty columns.

    The display range is fixed at ``[0, log K]`` nats (``log 2`` per channel for a sigmoid
    model), the most either map can reach, so that colours mean the same in every case; values
    below ``threshold`` of it are transparent. With ``foreground``, the entropy becomes the
    slice views' foreground over ``reference_volume``. Volumes shown before are replaced.
    """
    from .display import saliency_volume_node, show_in_slice_views
    from .tables import table_node_from_rows

    uncertainty = case.uncertainty
    if uncertainty is None:
        raise SegXAIInputError("uncertainty: the case has no uncertainty result")
    classes = len(case.card.class_names)
    peak = math.log(classes) if uncertainty.activation == "softmax" else math.log(2.0)
    maps = uncertainty.maps()
    for map_name in UNCERTAINTY_VOLUMES:
        for node in nodes.uncertainty.get(map_name, []):
            scene.RemoveNode(node)
        values = maps[map_name]
        label = map_name.replace("_", " ")
        volumes = []
        for channel in values.channel_names:
            node = saliency_volume_node(values, scene, f"{name} {label} {channel}", channel=channel,
                                        threshold=threshold, signed=False, peak=peak,
                                        reference_volume=reference_volume)
            node.SetAttribute("SegXAI.Uncertainty", map_name)
            volumes.append(node)
        nodes.uncertainty[map_name] = volumes
    if foreground:
        show_in_slice_views(scene, background=reference_volume, foreground=nodes.uncertainty[UNCERTAINTY_VOLUMES[0]][0],
                            foreground_opacity=opacity)
    nodes.uncertainty_table = table_node_from_rows(uncertainty.structure_rows(), scene, name=f"{name} uncertainty",
                                                   node=nodes.uncertainty_table)
    _refresh_lesion_table(scene, case, nodes)
    return nodes


def show_counterfactual(scene, case, instance_id: int, nodes: CaseNodes, reference_volume=None, opacity: float = 0.5,
                        threshold: float = 0.17, foreground: bool = True, name: str = "SegXAI") -> dict:
    """One instance's counterfactual (paper 004) as volumes: G+(x) and G-(x) shown like the
    input (its window), and ``R = G+(x) - G-(x)`` as a signed saliency volume (red: what G+
    adds, blue: what it removes; transparent below ``threshold`` of max |R|). With
    ``foreground``, R becomes the slice views' foreground, centred on the instance. Volumes
    shown before for the instance are replaced. Returns ``{"plus", "minus", "relevance"}`` ->
    [volume node per channel]."""
    from .display import jump_slices_to, saliency_volume_node, show_in_slice_views
    from .nodes import image_to_volume_node, place_under

    if instance_id not in case.counterfactuals:
        raise SegXAIInputError(f"instance {instance_id}: no counterfactual computed")
    result = case.counterfactuals[instance_id]
    for node in (n for kind in nodes.counterfactual.get(instance_id, {}).values() for n in kind):
        scene.RemoveNode(node)
    transform = reference_volume.GetParentTransformNode() if reference_volume is not None else None
    shown: dict[str, list] = {"plus": [], "minus": [], "relevance": []}
    for label, image in (("plus", result.plus), ("minus", result.minus)):
        for channel in image.channel_names:
            node = image_to_volume_node(image.channel(channel), scene, f"{name} lesion {instance_id} G{'+' if label == 'plus' else '-'}(x) {channel}",
                                        parent_transform=transform)
            if reference_volume is not None:
                place_under(scene, node, reference_volume)
            node.SetAttribute("SegXAI.Counterfactual", label)
            shown[label].append(node)
    for channel in result.relevance.channel_names:
        node = saliency_volume_node(result.relevance, scene, f"{name} lesion {instance_id} R {channel}", channel=channel,
                                    threshold=threshold, signed=True, reference_volume=reference_volume)
        node.SetAttribute("SegXAI.Counterfactual", "relevance")
        shown["relevance"].append(node)
    nodes.counterfactual[instance_id] = shown
    if foreground:
        show_in_slice_views(scene, background=reference_volume, foreground=shown["relevance"][0],
                            foreground_opacity=opacity)
        jump_slices_to(scene, case.instances[instance_id - 1].centroid_ras)
    return shown


def counterfactual_summary(case, instance_id: int) -> dict:
    """One instance's counterfactual scores for a front end: ``original``, ``plus``, ``minus``
    (the model's mean lesion logit over the region) and a one-line ``text``; {} without one."""
    result = None if case is None else case.counterfactuals.get(int(instance_id))
    if result is None:
        return {}
    scores = {key: float(result.scores[key]) for key in ("original", "plus", "minus") if key in result.scores}
    text = (f"lesion {instance_id}: model score {scores.get('original', float('nan')):.3f} on the image, "
            f"{scores.get('plus', float('nan')):.3f} after G+ (more lesion), {scores.get('minus', float('nan')):.3f} "
            "after G- (less lesion); R = G+(x) - G-(x)")
    return {**scores, "text": text}


def uncertainty_summary(case) -> dict:
    """The case structure's uncertainty as the front ends show it: :data:`UNCERTAINTY_SUMMARY_KEYS`
    (None when the structure has no predicted voxel), ``structure``, ``samples``, ``sources``
    and a one-line ``text``; {} without an uncertainty result."""
    result = None if case is None else case.uncertainty
    if result is None:
        return {}
    rows = [row for row in result.structures if row.class_index == case.class_index]
    values = {key: getattr(rows[0], key) if rows else None for key in UNCERTAINTY_SUMMARY_KEYS}
    sources = ", ".join(result.sources)
    summary = {"structure": case.structure, **values, "samples": int(result.samples), "sources": sources}
    if values["mean_entropy"] is None:
        summary["text"] = f"{result.samples} samples ({sources}): no predicted {case.structure} voxel"
        return summary

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    summary["text"] = (f"{case.structure}: mean entropy {number(values['mean_entropy'])} nats (boundary "
                       f"{number(values['boundary_entropy'])}), pairwise Dice {number(values['pairwise_dice'])}, "
                       f"soft Dice confidence {number(values['soft_dice_confidence'])}; {result.samples} samples "
                       f"({sources})")
    return summary


def show_case(scene, case, reference_volume=None, display: str = "normalised", name: str = "SegXAI") -> CaseNodes:
    """Every result of ``case`` as nodes: segmentation, instances, lesion table, uncertainty,
    class-level and instance maps, counterfactuals, QA (a saliency map, when there is one, is
    the foreground)."""
    nodes = show_segmentation(scene, case, reference_volume=reference_volume, name=name)
    if case.uncertainty is not None:
        show_uncertainty(scene, case, nodes, reference_volume=reference_volume, name=name,
                         foreground=not case.maps and not case.instance_maps)
    if case.maps:
        show_explanations(scene, case, nodes, reference_volume=reference_volume, display=display, name=name)
    for identifier in case.instance_maps:
        show_instance_saliency(scene, case, identifier, nodes, reference_volume=reference_volume, display=display,
                               name=name)
    for identifier in case.counterfactuals:
        show_counterfactual(scene, case, identifier, nodes, reference_volume=reference_volume, name=name,
                            foreground=not case.maps and not case.instance_maps)
    if case.qa is not None:
        show_qa(scene, case, nodes, name=name)
    if case.contour_qa is not None and case.contour_qa.rows:
        show_contour_qa(scene, case, nodes, name=name)
    return nodes


def case_image(input_volumes: Sequence, card) -> Image:
    """The input volume nodes as one ``(C, I, J, K)`` image in the card's channel order."""
    from ..pipeline import check_channels
    from .nodes import channel_image_from_volume_nodes

    volumes = [volume for volume in input_volumes if volume]
    card.check_input_count(len(volumes), "input volume(s)")
    return check_channels(channel_image_from_volume_nodes(volumes, card.input_channels), card)
