"""The end-to-end demo (``segxai demo``, ``make demo``): the whole product on the bundled sample.

The bundled real T1 with synthetic lesions inserted (a two-channel FLAIR-like + T1 case) ->
segmentation by the bundled lesion model -> class-level maps of the lesion class -> instance
maps (max aggregation) of every predicted lesion -> the lesion table (TP / FP against the
inserted truth) -> the QA risk band of the lesion class from the shipped risk model -> the
Agg2Exp matrix -> the prediction's uncertainty (test-time left-right flips and mild noise,
when the settings enable it) -> NIfTI outputs on the input grid, a Slicer scene bundle
(``.mrb``) and an HTML report.

:class:`DemoSettings` sizes the work; :meth:`DemoSettings.reduced` is the setting the test
suite runs (a crop around one lesion, fewer samples).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from .image import Image, SegXAIInputError
from .io import check_writable_dir, write_image
from .metrics import dice_score
from .pipeline import Case, CaseSettings
from .progress import CancelToken, ProgressCallback, report, sub_progress

if TYPE_CHECKING:
    from .report import HtmlReport
    from .uncertainty import RegionUncertainty

__all__ = ["DEMO_SEED", "DemoSettings", "DemoResult", "demo_case", "demo_phantom", "run_demo"]

#: seed of the lesions inserted into the sample (the lesion model never saw it in training)
DEMO_SEED = 2026

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


@dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does.

    ``case``: the case run (:class:`~SegXAILib.pipeline.CaseSettings`: class-level methods,
    instance maps, risk model, Agg2Exp); ``crop_half``: when set, the case is cropped to
    ``2 * crop_half`` voxels around the largest inserted lesion; ``scene``: write the Slicer
    scene bundle.
    """

    case: CaseSettings = field(default_factory=CaseSettings.demo)
    crop_half: Optional[tuple[int, int, int]] = None
    scene: bool = True

    @classmethod
    def reduced(cls) -> "DemoSettings":
        """The test suite's setting: a 48 x 48 x 32 crop, two instance maps, few samples."""
        return cls(case=CaseSettings.quick_demo(), crop_half=(24, 24, 16))


@dataclass
class DemoResult:
    report: Path
    dice: float
    case: Case
    manifest: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def demo_phantom(seed: int = DEMO_SEED, crop_half: Optional[tuple[int, int, int]] = None):
    """The demo's :class:`~SegXAILib.phantoms.LesionPhantom`: the bundled T1 with lesions inserted
    by :func:`~SegXAILib.phantoms.make_lesion_phantom`; with ``crop_half``, every image of it
    cropped to ``2 * crop_half`` voxels centred on the largest lesion."""
    from dataclasses import replace

    from .phantoms import make_lesion_phantom
    from .sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=seed)
    if crop_half is None:
        return phantom
    lesions = phantom.lesions.array[0]
    largest = int(np.argmax(np.bincount(lesions.ravel())[1:])) + 1
    centre = np.argwhere(lesions == largest).mean(axis=0).round().astype(int)
    half = np.asarray(crop_half, int)
    start = np.clip(centre - half, 0, np.array(phantom.image.spatial_shape) - 2 * half)
    stop = start + 2 * half
    return replace(phantom, image=phantom.image.crop(start, stop), lesions=phantom.lesions.crop(start, stop),
                   brain=phantom.brain.crop(start, stop),
                   tissue=None if phantom.tissue is None else phantom.tissue.crop(start, stop))


def demo_case(seed: int = DEMO_SEED, crop_half: Optional[tuple[int, int, int]] = None) -> tuple[Image, Image]:
    """The demo case: ``(image (2, I, J, K) FLAIR + T1, lesion labels (1, I, J, K))``, see
    :func:`demo_phantom`."""
    phantom = demo_phantom(seed, crop_half)
    return phantom.image, phantom.lesions


def _anatomy_rois(phantom) -> dict[str, np.ndarray]:
    """Agg2Exp's anatomical columns of the phantom: white and grey matter (without the inserted
    lesions) and everything outside the brain."""
    brain = phantom.brain.array[0] > 0
    rois: dict[str, np.ndarray] = {}
    if phantom.tissue is not None:
        tissue = phantom.tissue.array[0]
        rois["white matter"] = (tissue == 6) & brain & ~phantom.truth
        rois["grey matter"] = (tissue == 5) & brain & ~phantom.truth
    rois["outside the brain"] = ~brain
    return rois


def run_demo(
    out_dir: str | Path,
    seed: int = DEMO_SEED,
    device: str = "auto",
    settings: Optional[DemoSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DemoResult:
    """Run the demo into ``out_dir``: the case pipeline on the demo case, then the report and
    the Slicer scene.

    Outputs: the case folder of :func:`~SegXAILib.pipeline.write_case` (segmentation, maps,
    instance maps, lesion table, QA, Agg2Exp, uncertainty when enabled, ``case.json``), plus
    ``input_<channel>.nii.gz``, ``truth_lesions.nii.gz``, ``scene.mrb`` and ``report.html`` with
    ``figures/``, all listed in the manifest.
    """
    from .pipeline import add_to_manifest, load_case_model, run_case, write_case

    settings = settings or DemoSettings()
    case_settings = CaseSettings.from_dict({**settings.case.to_dict(), "device": device}, "demo settings")
    if not (case_settings.instances.enabled and case_settings.qa.risk_model and case_settings.agg2exp.enabled):
        raise SegXAIInputError("demo settings: the report needs instances, a QA risk model and Agg2Exp enabled")
    out_dir = check_writable_dir(out_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report(progress, 0.0, "inserting lesions into the sample T1")
    phantom = demo_phantom(seed, settings.crop_half)
    image, truth_labels = phantom.image, phantom.lesions
    timings["case"] = time.perf_counter() - start
    if cancel is not None:
        cancel.raise_if_cancelled()
    start = time.perf_counter()
    model = load_case_model(case_settings)
    timings["load model"] = time.perf_counter() - start
    # the reference is the lesion class (the phantom's label map numbers each inserted lesion)
    reference = image.with_array(phantom.truth.astype(np.uint8)[None], ("reference",))
    case = run_case(image, model, case_settings, reference=reference, rois=_anatomy_rois(phantom),
                    progress=sub_progress(progress, 0.02, 0.88), cancel=cancel)
    timings.update(case.timings)
    dice = dice_score(case.mask, phantom.truth)

    start = time.perf_counter()
    report(progress, 0.88, "writing the case")
    extra: dict[str, Path] = {}
    for name in image.channel_names:
        extra[f"input_{name}"] = write_image(image.channel(name), out_dir / f"input_{name}.nii.gz")
    extra["truth"] = write_image(truth_labels, out_dir / "truth_lesions.nii.gz")
    # the inputs recorded: the folder opens again as a case (read_case, the viewer)
    manifest = write_case(case, out_dir, cancel=cancel, extra_files=extra,
                          inputs={name: extra[f"input_{name}"] for name in image.channel_names})
    timings["write case"] = time.perf_counter() - start
    if settings.scene:
        if cancel is not None:
            cancel.raise_if_cancelled()
        start = time.perf_counter()
        extra["scene"] = _write_scene(out_dir / "scene.mrb", case)
        timings["Slicer scene"] = time.perf_counter() - start

    report(progress, 0.95, "drawing the report")
    start = time.perf_counter()
    path = _write_report(out_dir, case, phantom.truth, dice, seed, timings, cancel, scene=extra.get("scene"))
    timings["report"] = time.perf_counter() - start
    extra["report"] = path
    add_to_manifest(out_dir, {k: v for k, v in extra.items() if k in ("scene", "report")})
    report(progress, 1.0, "done")
    return DemoResult(report=path, dice=dice, case=case, manifest=manifest, outputs=extra, timings=timings)


def _write_scene(path: Path, case: Case) -> Path:
    """The case as a Slicer scene bundle: inputs, segmentation (with the risk band as segment
    tags), instances, uncertainty (entropy and mutual-information volumes, its table), class
    and instance saliency volumes (transparent below the threshold), the lesion and QA tables
    and the EC-curve chart."""
    from .mrml import headless_scene, image_to_volume_node, save_scene_bundle
    from .mrml.logic import show_explanations, show_instance_saliency, show_qa, show_segmentation, show_uncertainty

    image = case.image
    scene = headless_scene()
    volumes = [image_to_volume_node(image.channel(name), scene, name=f"SegXAI demo {name}") for name in image.channel_names]
    nodes = show_segmentation(scene, case, reference_volume=volumes[0])
    if case.uncertainty is not None:  # the saliency maps stay the views' foreground
        show_uncertainty(scene, case, nodes, reference_volume=volumes[0], foreground=False)
    show_explanations(scene, case, nodes, reference_volume=volumes[0])
    for identifier in case.instance_maps:
        show_instance_saliency(scene, case, identifier, nodes, reference_volume=volumes[0], display="signed")
    if case.qa is not None:
        show_qa(scene, case, nodes)
    return save_scene_bundle(scene, path)


def _report_rows(case: Case) -> list[dict]:
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


def _structure_uncertainty(case: Case) -> Optional["RegionUncertainty"]:
    """The structure's :class:`~SegXAILib.uncertainty.RegionUncertainty` row, or None without uncertainty."""
    if case.uncertainty is None:
        return None
    return next((row for row in case.uncertainty.structures if row.class_index == case.class_index), None)


def _uncertainty_channel(case: Case, values: Image) -> Image:
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


def _describe_sources(sources: dict[str, dict[str, Any]], orientation: Optional[str]) -> str:
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


def _add_uncertainty_section(html: "HtmlReport", case: Case, structure: Optional["RegionUncertainty"],
                             point: np.ndarray, outlines: Image, colors: dict, names: dict) -> None:
    """"Where the model is unsure": how the samples were drawn, the predictive entropy and
    mutual information through lesion 1 (absolute floors, see :data:`ENTROPY_FLOOR`), the
    structure's uncertainty."""
    from .report import overlay_figure

    uncertainty = case.uncertainty
    flair = case.image.channel_names[0]
    html.add_heading("Where the model is unsure")
    notes = [note for source, note in (("flips", "flips act on the model's grid"),
                                       ("noise", "the noise's std is a share of each input channel's std"))
             if source in uncertainty.sources]
    html.add_paragraph(
        f"The prediction was repeated {uncertainty.samples} times with the sample sources "
        f"{_describe_sources(uncertainty.sources, case.card.orientation)}, seed {uncertainty.seed}"
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
        figure = overlay_figure(case.image.channel(flair), point, labels=outlines, saliency=values, threshold=share,
                                signed=False, label_colors=colors, label_names=names,
                                title=f"{title} (nats), through lesion 1")
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


def _check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def _write_report(out_dir: Path, case: Case, truth: np.ndarray, dice: float, seed: int, timings: dict[str, float],
                  cancel: Optional[CancelToken], scene: Optional[Path]) -> Path:
    from .evaluation import matrix_figure
    from .pipeline import resolve_risk_model
    from .report import HtmlReport, overlay_figure
    from .report.risk_plots import ec_curve_figure

    image, card, device = case.image, case.card, case.device
    prediction = case.mask
    labels = case.instance_labels.array[0]
    class_maps = {name: result.maps for name, result in case.maps.items()}
    aggregation = case.settings.instances.aggregations[0]
    instance_maps = {identifier: maps[aggregation] for identifier, maps in case.instance_maps.items()}
    lesion_rows = _report_rows(case)
    method_rows = [{"method": name, "parameters": ", ".join(f"{k}={v}" for k, v in
                                                             case.settings.method(name).params.items()) or "defaults",
                    "seconds": case.timings.get(f"map {name}"), "device": result.device}
                   for name, result in case.maps.items()]
    risk_model, _ = resolve_risk_model(case.qa.risk_model)
    qa = {**case.qa.to_dict(), "dice_against_truth": dice}
    curve, matrix = case.qa.curve, case.agg2exp
    structure = _structure_uncertainty(case)
    html = HtmlReport("SegXAI demo: why did the model draw these lesions?", out_dir)
    html.add_paragraph(
        "The bundled head T1 MRI (ITK example data) with synthetic white-matter lesions inserted "
        f"(seed {seed}), as a two-channel FLAIR-like + T1 case, segmented by the bundled demo lesion "
        "model, then explained: class-level saliency of the lesion class, the saliency of every "
        "predicted lesion on its own (instance saliency, max aggregation), the lesion table and, when "
        "the run samples predictions, where the model is unsure. "
        "Outlines: red = the model's lesions, green = inserted lesion voxels the model missed. "
        f"Overlays are transparent below {OVERLAY_THRESHOLD:.0%} of the map's maximum. The model is "
        "trained on phantoms; this is a demonstration, not a clinical result."
    )
    html.add_key_values({
        "Dice against the inserted lesions": dice,
        "predicted lesions (instances)": int(labels.max()),
        "true positives / false positives": (f"{sum(r['group'] == 'TP' for r in lesion_rows)} / "
                                             f"{sum(r['group'] == 'FP' for r in lesion_rows)}"),
        "predicted lesion volume (mm^3)": float(prediction.sum() * image.voxel_volume),
        "inserted lesion volume (mm^3)": float(truth.sum() * image.voxel_volume),
        "QA risk band of the lesion contour": f"{qa['band']} (estimated Dice {qa['estimated_dice']:.2f})",
        **({f"lesion uncertainty ({case.uncertainty.samples} samples)":
            f"soft Dice confidence {structure.soft_dice_confidence:.3f}, pairwise Dice {structure.pairwise_dice:.3f}, "
            f"boundary entropy {structure.boundary_entropy:.3f} nats"}
           if structure is not None and None not in (structure.soft_dice_confidence, structure.pairwise_dice,
                                                     structure.boundary_entropy) else {}),
        "model": f"{card.name} {card.version} (held-out Dice {card.metrics.get('dice_heldout_mean')})",
        "device": device,
        "Slicer scene": Path(scene).name if scene is not None else "not written",
    }, caption="Summary")

    outlines = image.with_array(
        (prediction.astype(np.uint8) + 2 * (truth & ~prediction).astype(np.uint8))[None], ("outline",))
    colors, names = {1: (230, 60, 50), 2: (60, 200, 90)}, {1: "model", 2: "truth (missed)"}
    flair = image.channel_names[0]
    largest = np.argwhere(labels == 1).mean(axis=0) if labels.max() > 0 else np.array(image.spatial_shape) / 2
    through_largest = image.ijk_to_ras_points(largest)[0]

    html.add_heading("Class-level maps (lesion class)")
    for method, maps in class_maps.items():
        _check(cancel)
        signed = method in ("smoothgrad",)
        figure = overlay_figure(image.channel(flair), through_largest, labels=outlines, saliency=maps.channel(flair),
                                threshold=OVERLAY_THRESHOLD, signed=signed, label_colors=colors, label_names=names,
                                title=f"{method} ({flair}), through lesion 1")
        html.add_figure(figure, caption=f"{method} of the lesion class, {flair} channel"
                        + (" (signed: red positive, blue negative)" if signed else ""), name=f"class_{method}")
    html.add_table(method_rows, caption="Class-level methods")

    html.add_heading(f"Lesions: instance saliency ({aggregation} aggregation)")
    html.add_paragraph(
        "Each predicted lesion explained on its own (paper 001): the element-wise maximum over the "
        "lesion's voxels of their SmoothGrad gradients, signed (red: raises the lesion's logits, blue: lowers them). "
        "Values are comparable across lesions of different size."
    )
    rows_with_views = []
    for row in lesion_rows:
        _check(cancel)
        identifier = row["id"]
        saliency = instance_maps[identifier].channel(flair)
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        thumbnail = overlay_figure(image.channel(flair), point, labels=outlines, saliency=saliency,
                                   threshold=OVERLAY_THRESHOLD, signed=True, label_colors=colors, colorbar=False,
                                   width_inches=4.8, height_inches=1.9)
        view = html.image_cell(thumbnail, alt=f"lesion {identifier}", name=f"lesion{identifier}_thumb")
        rows_with_views.append({"view": view, **row})
    html.add_table(rows_with_views, caption="Lesion table (peaks within the lesion and a 5 mm shell"
                   + ("; entropy, pairwise Dice and soft Dice confidence: see 'Where the model is unsure')"
                      if case.uncertainty is not None else ")"))
    for row in lesion_rows:
        identifier = row["id"]
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        figure = overlay_figure(image.channel(flair), point, labels=outlines,
                                saliency=instance_maps[identifier].channel(flair), threshold=OVERLAY_THRESHOLD,
                                signed=True, label_colors=colors, label_names=names,
                                title=f"Lesion {identifier} ({row['group'] or 'unmatched'}): instance saliency, {flair}")
        html.add_figure(figure, caption=f"Lesion {identifier}: three planes through its centroid", name=f"lesion{identifier}")

    html.add_heading("Quality assurance: risk band of the lesion contour")
    html.add_paragraph(
        f"Paper 000's risk score without a reference: the Euler characteristic curve of the {qa['method']} map inside "
        "the predicted lesions, projected on the first principal component of a calibration cohort (lesion phantoms "
        f"with graded degradations, cross-validated AUROC {qa['calibration_auroc_cv']:.2f} for insufficient contours), "
        f"gives the band '{qa['band']}' and an estimated Dice of {qa['estimated_dice']:.2f} "
        f"(the Dice against the inserted lesions is {qa['dice_against_truth']:.2f}). The risk model was calibrated "
        "on phantoms: read the band as a demonstration of the method."
    )
    html.add_key_values({k: qa[k] for k in ("structure", "method", "band", "pc1", "estimated_dice",
                                            "insufficient_probability", "risk_model")}, caption="QA")
    html.add_figure(ec_curve_figure(risk_model, curve, band=qa["band"], title="EC curve of this case and the calibration cohort"),
                    caption="The case's EC curve against the calibration cohort's spread", name="qa_ec_curve")

    html.add_heading("Agg2Exp: where each class's attribution lies")
    html.add_paragraph(
        "Paper 003's RoI importance: each row is a class explained with its class target (SmoothGrad), each cell the "
        "share of the row's absolute attribution mass inside a region; the diagonal is the class's use of itself, the "
        "other columns its use of context."
    )
    html.add_figure(matrix_figure(matrix, title="Agg2Exp importance (absolute mass)"), caption="Agg2Exp matrix",
                    name="agg2exp_matrix")

    if case.uncertainty is not None:
        _check(cancel)
        _add_uncertainty_section(html, case, structure, through_largest, outlines, colors, names)

    if scene is not None:
        html.add_paragraph(f"The whole case opens in 3D Slicer from {Path(scene).name} (File > Add Data): inputs, "
                           "segmentation with the risk band as segment tags, saliency overlays, the lesion and QA tables "
                           "and the EC-curve chart.")
    html.add_table(
        [{"step": k, "seconds": v} for k, v in timings.items()],
        caption=f"Timings on {device} ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__})",
    )
    return html.write("report.html")
