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

__all__ = ["DEMO_SEED", "DemoSettings", "DemoResult", "demo_case", "run_demo"]

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
        ("guided_gradcam", {"layer": "bottleneck_decoder"}),
        ("pattern_attribution", {}),
    )
    instance_samples: int = 4
    instance_batch: int = 16
    crop_half: Optional[tuple[int, int, int]] = None
    max_instances: Optional[int] = None
    scene: bool = True

    @classmethod
    def reduced(cls) -> "DemoSettings":
        """The test suite's setting: a 48 x 48 x 32 crop, two instance maps, few samples."""
        return cls(
            class_methods=(
                ("smoothgrad", {"n_samples": 2, "noise_level": 0.1, "seed": 0}),
                ("gradcam_plusplus", {"layer": "bottleneck_decoder"}),
                ("guided_gradcam", {"layer": "bottleneck_decoder"}),
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


def demo_case(seed: int = DEMO_SEED, crop_half: Optional[tuple[int, int, int]] = None) -> tuple[Image, Image]:
    """The demo case: ``(image (2, I, J, K) FLAIR + T1, lesion labels (1, I, J, K))``.

    The bundled T1 with lesions inserted by :func:`~SegXAILib.phantoms.make_lesion_phantom`;
    with ``crop_half``, a crop of ``2 * crop_half`` voxels centred on the largest lesion.
    """
    from .phantoms import make_lesion_phantom
    from .sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=seed)
    image, lesions = phantom.image, phantom.lesions
    if crop_half is not None:
        sizes = np.bincount(lesions.array[0].ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        centre = np.argwhere(lesions.array[0] == largest).mean(axis=0).round().astype(int)
        half = np.asarray(crop_half, int)
        start = np.clip(centre - half, 0, np.array(image.spatial_shape) - 2 * half)
        image, lesions = image.crop(start, start + 2 * half), lesions.crop(start, start + 2 * half)
    return image, lesions


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
        image, truth_labels = demo_case(seed, settings.crop_half)
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

    report(progress, 0.9, "drawing the report")
    with clock("report"):
        path = _write_report(out_dir, image, truth, prediction, labels, class_maps, instance_maps, lesion_rows,
                             method_rows, dice, seed, model, segmentation.device, clock.timings, cancel)
    outputs["report"] = path
    report(progress, 1.0, "done")
    return DemoResult(report=path, dice=dice, outputs=outputs, lesions=lesion_rows, timings=clock.timings)


def _write_report(out_dir, image, truth, prediction, labels, class_maps, instance_maps, lesion_rows, method_rows, dice,
                  seed, model, device, timings, cancel) -> Path:
    from .report import HtmlReport, overlay_figure

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
        "model": f"{card.name} {card.version} (held-out Dice {card.metrics.get('dice_heldout_mean')})",
        "device": device,
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

    html.add_table(
        [{"step": k, "seconds": v} for k, v in timings.items()],
        caption=f"Timings on {device} ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__})",
    )
    return html.write("report.html")
