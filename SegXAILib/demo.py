"""The end-to-end demo (``segxai demo``, ``make demo``): the whole product on the bundled sample.

The bundled real T1 with synthetic lesions inserted (a two-channel FLAIR-like + T1 case) ->
segmentation by the bundled lesion model -> class-level maps of the lesion class -> instance
maps (max aggregation) of every predicted lesion -> the lesion table (TP / FP against the
inserted truth) -> the QA risk band of the lesion class from the shipped risk model -> the
Agg2Exp matrix -> NIfTI outputs on the input grid, a Slicer scene bundle (``.mrb``) and an
HTML report.

:class:`DemoSettings` sizes the work; :meth:`DemoSettings.reduced` is the setting the test
suite runs (a crop around one lesion, fewer samples).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .image import Image
from .io import check_writable_dir, write_image
from .metrics import dice_score
from .progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = ["DEMO_SEED", "DemoSettings", "DemoResult", "demo_case", "demo_phantom", "run_demo"]

#: seed of the lesions inserted into the sample (the lesion model never saw it in training)
DEMO_SEED = 2026

#: share of a map's max |value| below which overlays are transparent (paper 000 used 17 %)
OVERLAY_THRESHOLD = 0.17


@dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does.

    ``class_methods``: (registry name, parameters) of the class-level maps;
    ``instance_samples`` / ``instance_batch``: SmoothGrad samples and replicas per backward of
    the instance maps; ``crop_half``: when set, the case is cropped to ``2 * crop_half`` voxels
    around the largest inserted lesion; ``max_instances``: at most this many instance maps
    (largest first); ``scene``: write the Slicer scene bundle.
    """

    class_methods: tuple[tuple[str, dict], ...] = (
        ("smoothgrad", {"n_samples": 8, "noise_level": 0.1, "seed": 0}),
        ("gradcam_plusplus", {"layer": "bottleneck_decoder"}),
        ("guided_gradcam", {"layer": "bottleneck_decoder", "batch_size": 16}),
        ("pattern_attribution", {}),
    )
    instance_samples: int = 4
    instance_batch: int = 4
    crop_half: Optional[tuple[int, int, int]] = None
    max_instances: Optional[int] = None
    scene: bool = True
    risk_method: str = "guided_gradcam"

    @classmethod
    def reduced(cls) -> "DemoSettings":
        """The test suite's setting: a 48 x 48 x 32 crop, two instance maps, few samples."""
        return cls(
            class_methods=(
                ("smoothgrad", {"n_samples": 2, "noise_level": 0.1, "seed": 0}),
                ("gradcam_plusplus", {"layer": "bottleneck_decoder"}),
                # one modified backward instead of paper 000's exact per-voxel sum
                ("guided_gradcam", {"layer": "bottleneck_decoder", "aggregation": "target"}),
                ("pattern_attribution", {}),
            ),
            instance_samples=1,
            crop_half=(24, 24, 16),
            max_instances=2,
        )


@dataclass
class DemoResult:
    report: Path
    dice: float
    outputs: dict[str, Any] = field(default_factory=dict)
    lesions: list[dict] = field(default_factory=list)
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


class _Clock:
    """Wall-clock seconds per named step."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Step:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.timings[name] = clock.timings.get(name, 0.0) + time.perf_counter() - self.start

        return _Step()


def _check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def run_demo(
    out_dir: str | Path,
    seed: int = DEMO_SEED,
    device: str = "auto",
    settings: Optional[DemoSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DemoResult:
    """Run the demo into ``out_dir``; see the module docstring for the steps.

    Outputs (all on the input grid): ``input_<channel>.nii.gz``, ``truth_lesions.nii.gz``,
    the segmentation (``labels.nii.gz``, ``probability_<class>.nii.gz``), ``maps/<method>_<channel>.nii.gz``,
    ``instances.nii.gz`` and ``instances/instance<id>_max_<channel>.nii.gz``, ``lesions.json``,
    ``qa.json``, ``agg2exp.json``, ``scene.mrb`` and ``report.html`` with ``figures/``.
    """
    import json

    from .attribution import TargetSpec, explain
    from .instances import classify_instances, find_instances, instance_saliency, lesion_table
    from .io import atomic_path
    from .models import load_model
    from .models.inference import segment
    from .pipeline import resolve_model_card, write_segmentation

    settings = settings or DemoSettings()
    out_dir = check_writable_dir(out_dir)
    for folder in ("maps", "instances"):
        check_writable_dir(out_dir / folder)
    clock = _Clock()
    outputs: dict[str, Any] = {}

    with clock("case"):
        report(progress, 0.0, "inserting lesions into the sample T1")
        phantom = demo_phantom(seed, settings.crop_half)
        image, truth_labels = phantom.image, phantom.lesions
    _check(cancel)
    with clock("load model"):
        model = load_model(resolve_model_card("lesions"), device=device)
    card = model.card
    with clock("segment"):
        segmentation = segment(image, model, progress=sub_progress(progress, 0.02, 0.08), cancel=cancel)
    prediction = segmentation.mask(1)
    truth = truth_labels.array[0] > 0
    dice = dice_score(prediction, truth)
    with clock("write images"):
        for name in image.channel_names:
            outputs[f"input_{name}"] = write_image(image.channel(name), out_dir / f"input_{name}.nii.gz")
        outputs["truth"] = write_image(truth_labels, out_dir / "truth_lesions.nii.gz")
        outputs.update(write_segmentation(segmentation, out_dir))

    # class-level maps of the lesion class
    target = TargetSpec("class", class_name=card.class_names[1])
    class_maps: dict[str, Image] = {}
    method_rows: list[dict] = []
    for n, (method, params) in enumerate(settings.class_methods):
        _check(cancel)
        share = (0.08 + 0.4 * n / len(settings.class_methods), 0.08 + 0.4 * (n + 1) / len(settings.class_methods))
        start = time.perf_counter()
        result = explain(image, model, method, target=target, params=dict(params),
                         progress=sub_progress(progress, *share), cancel=cancel)
        seconds = time.perf_counter() - start
        clock.timings[f"map {method}"] = seconds
        class_maps[method] = result.maps
        for name in image.channel_names:
            outputs[f"map_{method}_{name}"] = write_image(result.maps.channel(name), out_dir / "maps" / f"{method}_{name}.nii.gz")
        method_rows.append({"method": method, "parameters": ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults",
                            "seconds": seconds, "device": result.device})

    # instances: every predicted lesion, its max-aggregated instance saliency and its table row
    with clock("instances"):
        labels, instances = find_instances(prediction, segmentation.probabilities.array[1], grid=image)
        outputs["instances"] = write_image(image.with_array(labels.astype(np.uint16)[None], ("instances",)),
                                           out_dir / "instances.nii.gz")
        chosen = [i.id for i in instances][: settings.max_instances]
        groups = classify_instances(labels, truth, image, n_tn=0)
        group_of = {i: "TP" for i in groups["TP"]["ids"]} | {i: "FP" for i in groups["FP"]["ids"]}
    _check(cancel)
    with clock("instance maps (max)"):
        instance_maps = instance_saliency(
            image, model, labels, chosen, aggregations=("max",), n_samples=settings.instance_samples,
            batch_size=settings.instance_batch, seed=0, progress=sub_progress(progress, 0.5, 0.85), cancel=cancel,
        )
    for identifier in chosen:
        for name in image.channel_names:
            outputs[f"instance{identifier}_{name}"] = write_image(
                instance_maps[identifier]["max"].channel(name), out_dir / "instances" / f"instance{identifier}_max_{name}.nii.gz")
    by_id = {i.id: i for i in instances}
    table = lesion_table([by_id[i] for i in chosen], labels, {i: instance_maps[i]["max"] for i in chosen}, image)
    lesion_rows = []
    for row in table:
        flair = row["channels"][image.channel_names[0]]
        lesion_rows.append({
            "id": row["id"], "group": group_of.get(row["id"]), "volume_mm3": row["volume_mm3"],
            "centroid_ras": [round(float(v), 1) for v in row["centroid_ras"]],
            "mean_probability": row["mean_probability"],
            **{f"peak_positive_{c}": row["channels"][c]["peak_positive_local"] for c in image.channel_names},
            f"share_inside_{image.channel_names[0]}": flair["share_inside"],
        })
    with atomic_path(out_dir / "lesions.json") as temporary:
        temporary.write_text(json.dumps({"instances": lesion_rows, "false_negatives": groups["FN"]["ids"],
                                         "aggregation": "max", "n_samples": settings.instance_samples},
                                        indent=2, default=float) + "\n", encoding="utf-8")
    outputs["lesions"] = out_dir / "lesions.json"

    # QA: the risk band of the lesion contour from the shipped risk model
    from .topology import RiskModel, bundled_risk_model, score_case

    _check(cancel)
    with clock("QA risk"):
        risk_model = RiskModel.load(bundled_risk_model("lesions", settings.risk_method))
        scored = score_case(image, model, risk_model, progress=sub_progress(progress, 0.85, 0.9), cancel=cancel)
    qa = {"structure": card.class_names[1], "method": risk_model.method, "risk_model": risk_model_name(settings),
          **{k: scored.result[k] for k in ("band", "pc1", "estimated_dice", "insufficient_probability")},
          "calibration_auroc_cv": risk_model.auroc_cv_mean, "dice_against_truth": dice}
    with atomic_path(out_dir / "qa.json") as temporary:
        temporary.write_text(json.dumps({**qa, "curve": [float(v) for v in scored.curve],
                                         "thresholds": [float(v) for v in risk_model.thresholds]},
                                        indent=2, default=float) + "\n", encoding="utf-8")
    outputs["qa"] = out_dir / "qa.json"

    # Agg2Exp: where each class's attribution mass lies (the lesion row reuses the SmoothGrad map)
    _check(cancel)
    with clock("Agg2Exp"):
        matrix = _agg2exp_matrix(image, model, segmentation, phantom, class_maps, settings,
                                 sub_progress(progress, 0.9, 0.93), cancel)
    with atomic_path(out_dir / "agg2exp.json") as temporary:
        temporary.write_text(json.dumps(matrix.to_dict(), indent=2, default=float) + "\n", encoding="utf-8")
    outputs["agg2exp"] = out_dir / "agg2exp.json"

    if settings.scene:
        _check(cancel)
        with clock("Slicer scene"):
            outputs["scene"] = _write_scene(out_dir / "scene.mrb", image, segmentation, labels, instances, class_maps,
                                            instance_maps, chosen, scored, risk_model, card)

    report(progress, 0.95, "drawing the report")
    with clock("report"):
        path = _write_report(out_dir, image, truth, prediction, labels, class_maps, instance_maps, lesion_rows,
                             method_rows, dice, seed, model, segmentation.device, clock.timings, cancel,
                             qa=qa, risk_model=risk_model, curve=scored.curve, matrix=matrix,
                             scene=outputs.get("scene"))
    outputs["report"] = path
    report(progress, 1.0, "done")
    return DemoResult(report=path, dice=dice, outputs=outputs, lesions=lesion_rows, timings=clock.timings)


def risk_model_name(settings: DemoSettings) -> str:
    return f"Resources/Models/lesions/risk_{settings.risk_method}.json"


def _agg2exp_matrix(image, model, segmentation, phantom, class_maps, settings, progress, cancel):
    """The Agg2Exp matrix (absolute mass) of the case: rows background and lesion (SmoothGrad with
    the class target), columns the predicted classes, the inserted lesions and three anatomical
    regions of the phantom."""
    from .attribution import TargetSpec, explain
    from .evaluation import class_rois, local_matrix

    card = model.card
    method, params = settings.class_methods[0]
    background = explain(image, model, method, target=TargetSpec("class", class_name=card.class_names[0]),
                         params=dict(params), progress=progress, cancel=cancel)
    rois = class_rois(segmentation.labels.array[0], card.class_names)
    rois["reference:lesion"] = phantom.truth
    brain = phantom.brain.array[0] > 0
    if phantom.tissue is not None:
        tissue = phantom.tissue.array[0]
        rois["white matter"] = (tissue == 6) & brain & ~phantom.truth
        rois["grey matter"] = (tissue == 5) & brain & ~phantom.truth
    rois["outside the brain"] = ~brain
    return local_matrix({card.class_names[0]: background.maps.array, card.class_names[1]: class_maps[method].array},
                        rois, "absolute")


def _write_scene(path, image, segmentation, labels, instances, class_maps, instance_maps, chosen, scored, risk_model,
                 card) -> Path:
    """The case as a Slicer scene bundle: inputs, segmentation (with the risk band as segment
    tags), instances, class and instance saliency volumes (transparent below the threshold),
    the lesion and QA tables and the EC-curve chart."""
    from .attribution.api import AttributionResult
    from .mrml import headless_scene, image_to_volume_node, save_scene_bundle
    from .mrml.logic import CaseNodes, CaseResult, show_explanations, show_instance_saliency, show_qa, show_segmentation

    scene = headless_scene()
    volumes = [image_to_volume_node(image.channel(name), scene, name=f"SegXAI demo {name}") for name in image.channel_names]
    result = CaseResult(image=image, segmentation=segmentation, class_index=1,
                        instance_labels=image.with_array(labels.astype(np.int32)[None], ("instances",)),
                        instances=list(instances))
    result.explanations = {method: AttributionResult(maps, method, {}, {}, card.name, card.checksum(), "")
                           for method, maps in class_maps.items()}
    nodes = show_segmentation(scene, result, reference_volume=volumes[0], nodes=CaseNodes())
    show_explanations(scene, result, nodes, reference_volume=volumes[0])
    for identifier in chosen:
        result.instance_maps[identifier] = instance_maps[identifier]["max"]
        show_instance_saliency(scene, result, identifier, nodes, reference_volume=volumes[0], display="signed")
    result.thresholds, result.curve = np.asarray(risk_model.thresholds, float), np.asarray(scored.curve, float)
    result.qa_method, result.risk = risk_model.method, dict(scored.result)
    result.risk_reference = np.asarray(risk_model.pca_mean, dtype=float)
    show_qa(scene, result, nodes, risk_model_name=risk_model.method)
    return save_scene_bundle(scene, path)


def _write_report(out_dir, image, truth, prediction, labels, class_maps, instance_maps, lesion_rows, method_rows, dice,
                  seed, model, device, timings, cancel, qa, risk_model, curve, matrix, scene) -> Path:
    from .evaluation import matrix_figure
    from .report import HtmlReport, overlay_figure
    from .topology.plots import ec_curve_figure

    card = model.card
    html = HtmlReport("SegXAI demo: why did the model draw these lesions?", out_dir)
    html.add_paragraph(
        "The bundled head T1 MRI (ITK example data) with synthetic white-matter lesions inserted "
        f"(seed {seed}), as a two-channel FLAIR-like + T1 case, segmented by the bundled demo lesion "
        "model, then explained: class-level saliency of the lesion class, the saliency of every "
        "predicted lesion on its own (instance saliency, max aggregation), and the lesion table. "
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

    html.add_heading("Lesions: instance saliency (max aggregation)")
    html.add_paragraph(
        "Each predicted lesion explained on its own (paper 001): the element-wise maximum over the "
        "lesion's voxels of their SmoothGrad gradients, signed (red: raises the lesion's logits, blue: lowers them). "
        "Values are comparable across lesions of different size."
    )
    rows_with_views = []
    for row in lesion_rows:
        _check(cancel)
        identifier = row["id"]
        saliency = instance_maps[identifier]["max"].channel(flair)
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        thumbnail = overlay_figure(image.channel(flair), point, labels=outlines, saliency=saliency,
                                   threshold=OVERLAY_THRESHOLD, signed=True, label_colors=colors, colorbar=False,
                                   width_inches=4.8, height_inches=1.9)
        view = html.image_cell(thumbnail, alt=f"lesion {identifier}", name=f"lesion{identifier}_thumb")
        rows_with_views.append({"view": view, **row})
    html.add_table(rows_with_views, caption="Lesion table (peaks within the lesion and a 5 mm shell)")
    for row in lesion_rows:
        identifier = row["id"]
        point = image.ijk_to_ras_points(np.argwhere(labels == identifier).mean(axis=0))[0]
        figure = overlay_figure(image.channel(flair), point, labels=outlines,
                                saliency=instance_maps[identifier]["max"].channel(flair), threshold=OVERLAY_THRESHOLD,
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
