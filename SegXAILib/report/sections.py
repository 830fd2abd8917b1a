"""Sections of a case's HTML report, shared by the demo's report (:mod:`SegXAILib.demo`) and the
generic case report (:func:`~SegXAILib.report.case_report.write_case_report`).

Each ``add_*`` function appends one section of a :class:`~SegXAILib.pipeline.Case` to an
:class:`~SegXAILib.report.HtmlReport`; the caller chooses the outlines drawn on every overlay
(:class:`Outlines`: the demo adds the inserted lesions the model missed) and the point the views
go through, and keeps its own summary and wording.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..image import Image, SegXAIInputError
from ..progress import CancelToken
from .figures import _window, overlay_figure
from .html import HtmlReport

if TYPE_CHECKING:
    from ..pipeline import Case
    from ..uncertainty import RegionUncertainty

__all__ = ["OVERLAY_THRESHOLD", "ENTROPY_FLOOR", "MUTUAL_INFORMATION_FLOOR", "REPORT_UNCERTAINTY_COLUMNS", "Outlines",
           "prediction_outlines", "view_point", "lesion_report_rows", "structure_uncertainty", "describe_sources",
           "add_class_maps_section", "add_lesion_section", "add_qa_section", "add_contour_qa_section",
           "contour_review_rows", "add_agg2exp_section",
           "add_uncertainty_section", "add_counterfactual_section", "counterfactual_report_rows", "add_timings"]

#: share of a map's max |value| below which overlays are transparent (paper 000 used 17 %)
OVERLAY_THRESHOLD = 0.17

#: predictive entropy (nats) below which the report's entropy overlay is transparent: the
#: entropy of a 95 % / 5 % two-class vote, -0.95 ln 0.95 - 0.05 ln 0.05 = 0.199 nats
ENTROPY_FLOOR = float(-0.95 * np.log(0.95) - 0.05 * np.log(0.05))

#: mutual information (nats) below which the report's overlay is transparent: about what half
#: the samples at 40 % and half at 60 % give (ln 2 - h(0.4) = 0.020 nats), a mild disagreement
MUTUAL_INFORMATION_FLOOR = 0.02

#: per-lesion uncertainty columns of the report's lesion table: key of the lesion row's
#: ``uncertainty`` (``lesions.json``) -> column title
REPORT_UNCERTAINTY_COLUMNS = {
    "mean_entropy": "mean entropy (nats)",
    "boundary_entropy": "boundary entropy (nats)",
    "pairwise_dice": "pairwise Dice",
    "soft_dice_confidence": "soft Dice confidence",
}

#: colour of the model's outline (label 1 of :func:`prediction_outlines`)
MODEL_COLOR = (230, 60, 50)


@dataclass
class Outlines:
    """The label outlines drawn on every overlay of a report.

    Attributes
    ----------
    labels : Image
        ``(1, I, J, K)`` integer label map on the case's grid.
    colors, names : dict
        Label value -> RGB (0-255) and legend name.
    """

    labels: Image
    colors: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)


def prediction_outlines(case: "Case") -> Outlines:
    """The predicted structure as label 1 (red, ``model``)."""
    return Outlines(case.image.with_array(case.mask.astype(np.uint8)[None], ("outline",)), {1: MODEL_COLOR},
                    {1: "model"})


def view_point(case: "Case") -> tuple[np.ndarray, str]:
    """``(RAS point (3,), what it is)``: the centroid of the largest instance (id 1), else of the
    predicted structure, else the image's centre."""
    image = case.image
    if case.instance_labels is not None and (case.instance_labels.array[0] == 1).any():
        voxels, where = np.argwhere(case.instance_labels.array[0] == 1), "instance 1 (the largest)"
    elif case.mask.any():
        voxels, where = np.argwhere(case.mask), f"the {case.structure}'s centre"
    else:
        return image.ijk_to_ras_points((np.array(image.spatial_shape) - 1) / 2.0)[0], "the image's centre"
    return image.ijk_to_ras_points(voxels.mean(axis=0))[0], where


def _check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def lesion_report_rows(case: "Case") -> list[dict]:
    """The lesion table as the report shows it (the lesions with an instance map): the local peak of each channel's instance map
    (over the lesion and its shell), the share of the first channel's positive mass inside and,
    when the case has uncertainty, the lesion's :data:`REPORT_UNCERTAINTY_COLUMNS`."""
    first = case.image.channel_names[0]
    aggregation = case.settings.instances.aggregations[0]
    rows = []
    for row in case.lesions:
        if row["id"] not in case.instance_maps:
            continue
        saliency = (row.get("saliency") or {}).get(aggregation, {})
        uncertainty = row.get("uncertainty")  # absent without uncertainty: no columns
        rows.append({
            "id": row["id"], "group": row["group"], "volume_mm3": row["volume_mm3"],
            "centroid_ras": [round(float(v), 1) for v in row["centroid_ras"]],
            "mean_probability": row["mean_probability"],
            **{f"local peak {c}": saliency[c]["peak_positive_local"] for c in case.image.channel_names if c in saliency},
            **({f"share inside {first}": saliency[first]["share_inside"]} if first in saliency else {}),
            **({title: uncertainty.get(key) for key, title in REPORT_UNCERTAINTY_COLUMNS.items()}
               if uncertainty is not None else {}),
        })
    return rows


def structure_uncertainty(case: "Case") -> Optional["RegionUncertainty"]:
    """The structure's :class:`~SegXAILib.uncertainty.RegionUncertainty` row, or None without uncertainty."""
    if case.uncertainty is None:
        return None
    return next((row for row in case.uncertainty.structures if row.class_index == case.class_index), None)


def _uncertainty_channel(case: "Case", values: Image) -> Image:
    """The structure's channel of an entropy map: softmax models have one (``entropy``),
    sigmoid models one per foreground class."""
    name = case.structure if case.structure in values.channel_names else values.channel_names[0]
    return values.channel(name)


def _floor_share(values: Image, floor: float) -> tuple[float, float]:
    """``(threshold share, max)`` that hides values below the absolute ``floor`` in
    :func:`~SegXAILib.report.overlay_figure`, whose threshold is a share of the map's max."""
    largest = float(np.nanmax(values.array)) if values.array.size else 0.0
    return (min(1.0, floor / largest) if largest > 0 else 1.0), largest


#: the anatomical direction of a model-grid axis by its orientation code letter
_AXIS_DIRECTIONS = {"R": "left-right", "L": "left-right", "A": "front-back", "P": "front-back",
                    "S": "up-down", "I": "up-down"}


def describe_sources(sources: dict[str, dict[str, Any]], orientation: Optional[str]) -> str:
    """``flips (axes 0 = left-right), noise (std 0.05)``: the sample sources with their
    parameters; flip axes named by the card's orientation code (e.g. ``RAS``) when it has one."""
    def value(key: str, item: Any) -> str:
        if key == "axes" and isinstance(item, (list, tuple)):
            named = orientation is not None and len(orientation) == 3
            return ", ".join(f"{axis} = {_AXIS_DIRECTIONS.get(orientation[axis].upper(), '?')}" if named else str(axis)
                             for axis in item)
        return ", ".join(str(v) for v in item) if isinstance(item, (list, tuple)) else str(item)

    return ", ".join(f"{name} ({', '.join(f'{k} {value(k, v)}' for k, v in params.items())})" if params else name
                     for name, params in sources.items())


def add_class_maps_section(html: HtmlReport, case: "Case", point: np.ndarray, outlines: Outlines, where: str,
                           cancel: Optional[CancelToken] = None) -> None:
    """"Class-level maps": each map's first channel through ``point`` (``where`` names it), and
    the table of the methods (parameters, seconds, device)."""
    image = case.image
    first = image.channel_names[0]
    html.add_heading(f"Class-level maps ({case.structure} class)")
    for method, result in case.maps.items():
        _check(cancel)
        signed = method in ("smoothgrad",)
        figure = overlay_figure(image.channel(first), point, labels=outlines.labels, saliency=result.maps.channel(first),
                                threshold=OVERLAY_THRESHOLD, signed=signed, label_colors=outlines.colors,
                                label_names=outlines.names, title=f"{method} ({first}), through {where}")
        html.add_figure(figure, caption=f"{method} of the {case.structure} class, {first} channel"
                        + (" (signed: red positive, blue negative)" if signed else ""), name=f"class_{method}")
    rows = [{"method": name, "parameters": ", ".join(f"{k}={v}" for k, v in
                                                     case.settings.method(name).params.items()) or "defaults",
             "seconds": case.timings.get(f"map {name}"), "device": result.device}
            for name, result in case.maps.items()]
    html.add_table(rows, caption="Class-level methods")


def add_lesion_section(html: HtmlReport, case: "Case", rows: list[dict], outlines: Outlines,
                       cancel: Optional[CancelToken] = None) -> None:
    """"Lesions: instance saliency": the lesion table with a thumbnail of each lesion's instance
    map (``rows``: :func:`lesion_report_rows`), then three planes through each lesion."""
    image = case.image
    first = image.channel_names[0]
    labels = case.instance_labels.array[0]
    aggregation = case.settings.instances.aggregations[0]
    instance_maps = {identifier: maps[aggregation] for identifier, maps in case.instance_maps.items()}
    html.add_heading(f"Lesions: instance saliency ({aggregation} aggregation)")
    how = ("the element-wise maximum over the lesion's voxels of their SmoothGrad gradients" if aggregation == "max"
           else "the SmoothGrad gradient of the mean of the lesion's logits")
    html.add_paragraph(
        f"Each predicted lesion explained on its own (paper 001): {how}, signed (red: raises the lesion's logits, "
        "blue: lowers them). Values are comparable across lesions of different size."
    )
    rows_with_views = []
    for row in rows:
        _check(cancel)
        identifier = row["id"]
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        thumbnail = overlay_figure(image.channel(first), point, labels=outlines.labels,
                                   saliency=instance_maps[identifier].channel(first), threshold=OVERLAY_THRESHOLD,
                                   signed=True, label_colors=outlines.colors, colorbar=False, width_inches=4.8,
                                   height_inches=1.9)
        view = html.image_cell(thumbnail, alt=f"lesion {identifier}", name=f"lesion{identifier}_thumb")
        rows_with_views.append({"view": view, **row})
    html.add_table(rows_with_views, caption="Lesion table (peaks within the lesion and a "
                   f"{case.settings.instances.shell_mm:g} mm shell"
                   + ("; entropy, pairwise Dice and soft Dice confidence: see 'Where the model is unsure')"
                      if case.uncertainty is not None else ")"))
    for row in rows:
        _check(cancel)
        identifier = row["id"]
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        figure = overlay_figure(image.channel(first), point, labels=outlines.labels,
                                saliency=instance_maps[identifier].channel(first), threshold=OVERLAY_THRESHOLD,
                                signed=True, label_colors=outlines.colors, label_names=outlines.names,
                                title=f"Lesion {identifier} ({row['group'] or 'unmatched'}): instance saliency, {first}")
        html.add_figure(figure, caption=f"Lesion {identifier}: three planes through its centroid", name=f"lesion{identifier}")


def add_qa_section(html: HtmlReport, case: "Case", paragraph: str, extra: Optional[dict] = None) -> None:
    """"Quality assurance": ``paragraph``, the QA key-values (``extra`` appended) and the EC curve
    (over the calibration cohort's spread when the risk model can be read; alone otherwise)."""
    from ..pipeline import resolve_risk_model
    from .risk_plots import curve_figure, ec_curve_figure

    qa = case.qa
    document = {**qa.to_dict(), **(extra or {})}
    html.add_heading(f"Quality assurance: risk band of the {case.structure} contour")
    html.add_paragraph(paragraph)
    keys = ("structure", "method", "band", "pc1", "estimated_dice", "insufficient_probability", "risk_model",
            *(extra or {}))
    html.add_key_values({k: document[k] for k in keys if k in document}, caption="QA")
    risk_model = None
    if qa.risk is not None:
        try:
            risk_model, _ = resolve_risk_model(qa.risk_model)
        except SegXAIInputError:  # a risk model moved since the run: the case's curve is still shown
            risk_model = None
    if risk_model is not None:
        figure = ec_curve_figure(risk_model, qa.curve, band=qa.band,
                                 title="EC curve of this case and the calibration cohort")
        caption = "The case's EC curve against the calibration cohort's spread"
    else:
        figure = curve_figure(qa.thresholds, qa.curve, title=f"EC curve of this case ({qa.method})")
        caption = "The case's EC curve" + (" (the risk model could not be read)" if qa.risk is not None else
                                           " (no risk model: no band)")
    html.add_figure(figure, caption=caption, name="qa_ec_curve")


def contour_review_rows(case: "Case") -> list[dict]:
    """The review list of ``case.contour_qa`` as table rows (most suspicious first), the columns
    every front end shows: rank, structure, model class, suspicion and its key, Dice / volume
    ratio / surface distances with the prediction, the model's probability and entropy inside
    the contour and along its border, the samples' agreement, the risk band and P(insufficient);
    [] without a contour QA."""
    review = getattr(case, "contour_qa", None)
    if review is None:
        return []
    rows = []
    for rank, row in enumerate(review.rows, start=1):
        scores, risk = row["scores"], row.get("risk") or {}
        uncertainty = row.get("uncertainty") or {}
        rows.append({
            "rank": rank, "structure": row["structure"], "class": row["class_name"],
            "suspicion": row["suspicion"], "sort_key": row["sort_key"],
            "dice_with_prediction": scores.get("dice_with_prediction"), "volume_ratio": scores.get("volume_ratio"),
            "mean_surface_distance_mm": scores.get("mean_surface_distance_mm"), "hd95_mm": scores.get("hd95_mm"),
            "mean_probability_inside": scores.get("mean_probability_inside"),
            "mean_probability_boundary": scores.get("mean_probability_boundary"),
            "mean_entropy_inside": scores.get("mean_entropy_foreground"),
            "mean_entropy_boundary": scores.get("mean_entropy_boundary"),
            "sample_frequency_inside": uncertainty.get("sample_frequency_inside"),
            "risk_band": risk.get("band"), "insufficient_probability": risk.get("insufficient_probability"),
            "ec_method": (row.get("saliency") or {}).get("method"),
        })
    return rows


def add_contour_qa_section(html: HtmlReport, case: "Case") -> None:
    """"Contour review": the review list of given contours (``case.contour_qa``), most suspicious
    first, its sort key explained, and the notes of the step."""
    review = case.contour_qa
    html.add_heading("Contour review: given contours against the model")
    html.add_paragraph(
        "Contours the model did not draw (a clinician's edit, another tool's output), each compared with the model's "
        "own prediction of its class (Dice, volume ratio, mean and 95 % surface distance), with the model's "
        "probability and entropy inside the contour and along its border, the prediction samples' agreement inside "
        "it when the case has uncertainty, and the Euler characteristic curve of the class's saliency inside it. "
        "Most suspicious first: suspicion is the risk model's P(insufficient) where a risk model of this model and "
        "class scored the curve, else 1 - Dice with the model's prediction. A low Dice says the contour and the "
        "model disagree, not which of them is wrong.")
    rows = contour_review_rows(case)
    columns = [c for c in rows[0] if any(row[c] is not None for row in rows)] if rows else None
    html.add_table(rows, columns=columns, caption="Review list (most suspicious first)")
    if review.notes:
        html.add_paragraph("Notes: " + "; ".join(review.notes))


def add_agg2exp_section(html: HtmlReport, case: "Case") -> None:
    """"Agg2Exp": paper 003's RoI importance matrix of the case."""
    from ..evaluation import matrix_figure

    html.add_heading("Agg2Exp: where each class's attribution lies")
    html.add_paragraph(
        "Paper 003's RoI importance: each row is a class explained with its class target "
        f"({case.settings.agg2exp.method}), each cell the share of the row's {case.agg2exp.variant} attribution mass "
        "inside a region; the diagonal is the class's use of itself, the other columns its use of context."
    )
    html.add_figure(matrix_figure(case.agg2exp, title=f"Agg2Exp importance ({case.agg2exp.variant} mass)"),
                    caption="Agg2Exp matrix", name="agg2exp_matrix")


def add_uncertainty_section(html: HtmlReport, case: "Case", structure: Optional["RegionUncertainty"],
                            point: np.ndarray, outlines: Outlines, where: str) -> None:
    """"Where the model is unsure": how the samples were drawn, the predictive entropy and
    mutual information through ``point`` (absolute floors, see :data:`ENTROPY_FLOOR`), the
    structure's uncertainty."""
    uncertainty = case.uncertainty
    first = case.image.channel_names[0]
    html.add_heading("Where the model is unsure")
    notes = [note for source, note in (("flips", "flips act on the model's grid"),
                                       ("noise", "the noise's std is a share of each input channel's std"))
             if source in uncertainty.sources]
    html.add_paragraph(
        f"The prediction was repeated {uncertainty.samples} times with the sample sources "
        f"{describe_sources(uncertainty.sources, case.card.orientation)}, seed {uncertainty.seed}"
        + (f" ({'; '.join(notes)})" if notes else "") + "; each sample is a full prediction. "
        "The predictive entropy of the samples' mean probability is the total uncertainty (nats; at most "
        f"ln 2 = {np.log(2):.3f} for two classes), the mutual information the part that comes from the samples "
        "disagreeing. Per lesion: the mean entropy inside it, the mean entropy in a "
        f"{uncertainty.settings.get('band_width', case.settings.uncertainty.band_width_mm):g} mm band around its "
        "boundary, the pooled pairwise Dice of the samples' versions of it and the soft Dice confidence of the "
        "prediction against the mean probability. Test-time augmentation measures how stable the prediction is "
        "under these changes, not whether it is right: read it beside the QA band."
    )
    for key, floor, title, meaning in (
            ("predictive_entropy", ENTROPY_FLOOR, "Predictive entropy",
             "a 95 % / 5 % vote"),
            ("mutual_information", MUTUAL_INFORMATION_FLOOR, "Mutual information",
             "half the samples at 40 % and half at 60 %")):
        values = _uncertainty_channel(case, getattr(uncertainty, key))
        share, largest = _floor_share(values, floor)
        figure = overlay_figure(case.image.channel(first), point, labels=outlines.labels, saliency=values,
                                threshold=share, signed=False, label_colors=outlines.colors,
                                label_names=outlines.names, title=f"{title} (nats), through {where}")
        shown = (f"transparent below {floor:.3f} nats (about {meaning})" if largest > floor
                 else f"nowhere above {floor:.3f} nats (about {meaning}); only its maximum is drawn")
        html.add_figure(figure, caption=f"{title} of the {uncertainty.samples} samples, {shown}; colour scale from 0 "
                        f"to the map's maximum, {largest:.3f} nats", name=f"uncertainty_{key}")
    if structure is not None:
        html.add_key_values({
            "structure": structure.structure,
            "samples": uncertainty.samples,
            "mean confidence (max mean probability)": structure.mean_confidence,
            "mean entropy inside (nats)": structure.mean_entropy,
            "mean mutual information inside (nats)": structure.mean_mutual_information,
            "boundary entropy (nats)": structure.boundary_entropy,
            "boundary band voxels": structure.boundary_voxels,
            "pairwise Dice of the samples": structure.pairwise_dice,
            "volume (mm^3): prediction / mean of the samples": (structure.volume_mm3, structure.volume_mean_mm3),
            "volume coefficient of variation": structure.volume_cv,
            "soft Dice confidence": structure.soft_dice_confidence,
        }, caption=f"Uncertainty of the {structure.structure} class")


def counterfactual_report_rows(case: "Case") -> list[dict]:
    """One row per instance with a counterfactual: the model's score (mean lesion logit over the
    generators' central region, ``counterfactual.json``'s ``scores``) of x, G+(x) and G-(x), the
    rewritten patch's voxels and the extremes of R (first channel)."""
    first = case.image.channel_names[0]
    rows = []
    for identifier, result in case.counterfactuals.items():
        relevance = result.relevance.channel(first).array[0]
        rows.append({"lesion": int(identifier), "x": result.scores.get("original"), "G+(x)": result.scores.get("plus"),
                     "G-(x)": result.scores.get("minus"), "patch voxels": int(np.count_nonzero(result.patch.array)),
                     f"max R ({first})": float(relevance.max()), f"min R ({first})": float(relevance.min())})
    return rows


def add_counterfactual_section(html: HtmlReport, case: "Case", outlines: Outlines,
                               cancel: Optional[CancelToken] = None) -> None:
    """"Counterfactual relevance": what R means, the scores table (:func:`counterfactual_report_rows`)
    and, per instance, G+(x), G-(x) and the signed R over x through the instance's centroid
    (first channel)."""
    image = case.image
    first = image.channel_names[0]
    generators = case.counterfactual_generators or {}
    html.add_heading("Counterfactual relevance")
    html.add_paragraph(
        "Paper 004: two generators, trained on the model's own predictions, rewrite a patch around each lesion so "
        f"that the frozen model sees more {case.structure} (G+) or less (G-). R = G+(x) - G-(x) is signed: red is "
        "what G+ adds (what the model would need to see more of), blue what it removes (what it would need to see "
        "less of). Outside the patch G+(x) and G-(x) equal the image and R is 0. The scores are the model's mean "
        f"{case.structure} logit over the patch's central region; values are in the model's normalised intensity "
        "units." + (f" Generators: {generators['path']} (SHA-256 {str(generators.get('sha256', ''))[:12]}...)."
                    if generators.get("path") else ""))
    html.add_table(counterfactual_report_rows(case), caption="Counterfactual scores (model score of x, G+(x), G-(x))")
    labels = case.instance_labels.array[0] if case.instance_labels is not None else None
    for identifier, result in case.counterfactuals.items():
        inside = np.argwhere(labels == identifier) if labels is not None else np.empty((0, 3))
        if not len(inside):  # the instance's voxels are unknown: the patch's centre
            inside = np.argwhere(result.patch.array[0] > 0)
        point = image.ijk_to_ras_points(inside.mean(axis=0))[0]
        # one grey scale for x, G+(x) and G-(x): what the generators change stays visible
        window = _window(np.concatenate([v.channel(first).array[0].ravel().astype(float)
                                         for v in (image, result.plus, result.minus)]))
        for kind, values, title in (("plus", result.plus, "G+(x): more lesion"),
                                    ("minus", result.minus, "G-(x): less lesion")):
            _check(cancel)
            figure = overlay_figure(values.channel(first), point, labels=outlines.labels, label_colors=outlines.colors,
                                    label_names=outlines.names, title=f"Lesion {identifier}: {title} ({first})",
                                    window=window)
            score, original = (result.scores.get(key, float("nan")) for key in (kind, "original"))
            html.add_figure(figure, caption=f"Lesion {identifier}: {title}, model score {score:.3f} (x: "
                            f"{original:.3f}); the grey scale of x, G+(x) and G-(x) is the same", name=f"counterfactual{identifier}_{kind}")
        _check(cancel)
        figure = overlay_figure(image.channel(first), point, labels=outlines.labels,
                                saliency=result.relevance.channel(first), threshold=OVERLAY_THRESHOLD, signed=True,
                                label_colors=outlines.colors, label_names=outlines.names,
                                title=f"Lesion {identifier}: R = G+(x) - G-(x) over x ({first})", window=window)
        html.add_figure(figure, caption=f"Lesion {identifier}: R over the image (red: what G+ adds, blue: what it "
                        f"removes; transparent below {OVERLAY_THRESHOLD:.0%} of max |R|)",
                        name=f"counterfactual{identifier}_relevance")


def add_timings(html: HtmlReport, timings: dict[str, float], device: str) -> None:
    """The timings table, with the machine it ran on."""
    import platform

    import torch

    html.add_table(
        [{"step": k, "seconds": v} for k, v in timings.items()],
        caption=f"Timings on {device} ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__})",
    )
