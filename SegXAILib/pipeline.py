"""Case pipelines shared by the CLI, the Slicer logic and the demo.

At this stage: segmenting a case and writing its outputs (:func:`segment_case`,
:func:`write_segmentation`), and the demo (:func:`run_demo`): the bundled T1 with inserted
lesions, segmented by the bundled lesion model, with an HTML report.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .image import Image, SegXAIInputError
from .io import atomic_path, check_writable_dir, read_channels, write_image
from .metrics import dice_score
from .models import LoadedModel, Segmentation, load_model, load_model_card, segment
from .models.card import ModelCard
from .progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = ["resolve_model_card", "segment_case", "write_segmentation", "run_demo", "DemoResult", "DEMO_SEED"]

#: Seed of the demo's lesion phantom: outside the lesion model's training and held-out seeds.
DEMO_SEED = 2026


def resolve_model_card(model: str | Path) -> ModelCard:
    """A model given on the command line: a bundled name (``lesions``), a card file or its folder."""
    from .sample_data import BUNDLED_MODELS, bundled_model_card

    if str(model) in BUNDLED_MODELS:
        return load_model_card(bundled_model_card(str(model)))
    return load_model_card(model)


def segment_case(
    images: Sequence[str | Path],
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[Image, Segmentation]:
    """Read one file per input channel (in the card's channel order) and segment them."""
    card = model.card
    if len(images) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} image(s) "
            f"({', '.join(card.input_channels)}), got {len(images)}"
        )
    report(progress, 0.0, "reading images")
    image = read_channels(images, card.input_channels)
    return image, segment(image, model, progress=sub_progress(progress, 0.05, 1.0), cancel=cancel)


def write_segmentation(segmentation: Segmentation, out_dir: str | Path, suffix: str = ".nii.gz") -> dict[str, Path]:
    """Write the label map, one probability map per class and a JSON summary into ``out_dir``.

    Every file is written atomically. Returns the written paths by role.
    """
    out_dir = check_writable_dir(out_dir)
    card = segmentation.card
    written = {"labels": write_image(segmentation.labels, out_dir / f"labels{suffix}")}
    for index, name in enumerate(card.class_names):
        if index == 0:
            continue
        written[f"probability_{name}"] = write_image(
            segmentation.probabilities.channel(index), out_dir / f"probability_{name}{suffix}"
        )
    labels = segmentation.labels
    summary = {
        "model": card.name,
        "model_version": card.version,
        "model_checksum": card.checksum(),
        "device": segmentation.device,
        "timings_s": {k: round(v, 3) for k, v in segmentation.timings.items()},
        "grid": {
            "shape": list(labels.spatial_shape),
            "spacing_mm": [float(s) for s in labels.spacing],
            "ijk_to_ras": labels.ijk_to_ras.tolist(),
        },
        "classes": [
            {
                "index": index,
                "name": info.name,
                "color": list(info.color),
                "voxels": int(np.count_nonzero(labels.array[0] == index)),
                "volume_mm3": float(np.count_nonzero(labels.array[0] == index) * labels.voxel_volume),
            }
            for index, info in enumerate(card.classes)
        ],
        "files": {role: path.name for role, path in written.items()},
    }
    with atomic_path(out_dir / "segmentation.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written["summary"] = out_dir / "segmentation.json"
    return written


@dataclass
class DemoResult:
    report: Path
    dice: float
    lesion_dice: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _lesion_rows(truth_labels: np.ndarray, prediction: np.ndarray, image: Image) -> list[dict]:
    """One row per inserted lesion: volume, centroid (RAS), whether it was found, its Dice."""
    from scipy.ndimage import binary_dilation

    rows = []
    for lesion in range(1, int(truth_labels.max()) + 1):
        mask = truth_labels == lesion
        if not mask.any():
            continue
        centroid = image.ijk_to_ras_points(np.argwhere(mask).mean(axis=0))[0]
        # Dice of the predicted voxels within two voxels of this lesion
        near = binary_dilation(mask, iterations=2)
        rows.append(
            {
                "lesion": lesion,
                "volume_mm3": float(mask.sum() * image.voxel_volume),
                "centroid_RAS_mm": ", ".join(f"{c:.1f}" for c in centroid),
                "detected": bool((prediction & mask).any()),
                "dice": dice_score(prediction & near, mask),
            }
        )
    return rows


def run_demo(
    out_dir: str | Path,
    seed: int = DEMO_SEED,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DemoResult:
    """The demo: the bundled T1 with inserted lesions, segmented by the bundled lesion model.

    Writes the input channels, the inserted truth, the segmentation outputs and
    ``report.html`` (overlays on axial / coronal / sagittal slices through each lesion,
    Dice against the inserted truth, timings) into ``out_dir``.
    """
    from .phantoms import make_lesion_phantom
    from .report import HtmlReport, overlay_figure
    from .sample_data import load_sample_head

    out_dir = check_writable_dir(out_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report(progress, 0.0, "inserting lesions into the sample T1")
    head = load_sample_head()
    phantom = make_lesion_phantom(head, seed=seed)
    timings["phantom"] = time.perf_counter() - start
    if cancel is not None:
        cancel.raise_if_cancelled()

    start = time.perf_counter()
    report(progress, 0.1, "loading the lesion model")
    model = load_model(resolve_model_card("lesions"), device=device)
    timings["load_model"] = time.perf_counter() - start

    segmentation = segment(phantom.image, model, progress=sub_progress(progress, 0.15, 0.7), cancel=cancel)
    timings.update({f"segment_{k}": v for k, v in segmentation.timings.items()})

    start = time.perf_counter()
    report(progress, 0.7, "writing images")
    for name in phantom.image.channel_names:
        write_image(phantom.image.channel(name), out_dir / f"input_{name}.nii.gz")
    write_image(phantom.lesions, out_dir / "truth_lesions.nii.gz")
    write_segmentation(segmentation, out_dir)
    prediction = segmentation.mask(1)
    truth = phantom.truth
    dice = dice_score(prediction, truth)
    rows = _lesion_rows(phantom.lesions.array[0], prediction, phantom.image)
    timings["write"] = time.perf_counter() - start

    start = time.perf_counter()
    report(progress, 0.75, "drawing the report")
    html = HtmlReport("SegXAI demo: lesion segmentation of the sample T1", out_dir)
    html.add_paragraph(
        "The bundled head T1 MRI (ITK example data) with synthetic white-matter lesions inserted "
        f"(seed {seed}), as a two-channel FLAIR-like + T1 case, segmented by the bundled demo lesion "
        "model. Outlines: red = the model's lesions, green = inserted lesion voxels the model missed. "
        "The model is trained on phantoms; "
        "this is a demonstration, not a clinical result."
    )
    html.add_key_values(
        {
            "Dice (all lesions)": dice,
            "inserted lesions": len(rows),
            "detected lesions": sum(r["detected"] for r in rows),
            "predicted lesion volume (mm^3)": float(prediction.sum() * phantom.image.voxel_volume),
            "inserted lesion volume (mm^3)": float(truth.sum() * phantom.image.voxel_volume),
            "model": f"{model.card.name} {model.card.version}",
            "held-out Dice in the model card": model.card.metrics.get("dice_heldout_mean"),
            "device": segmentation.device,
        },
        caption="Summary",
    )
    html.add_table(rows, caption="Inserted lesions")
    outlines = phantom.image.with_array(
        (prediction.astype(np.uint8) + 2 * truth.astype(np.uint8) * (~prediction)).astype(np.uint8)[None], ("outline",)
    )
    colors = {1: (230, 60, 50), 2: (60, 200, 90)}
    names = {1: "model", 2: "truth (missed)"}
    for row in rows:
        mask = phantom.lesions.array[0] == row["lesion"]
        point = phantom.image.ijk_to_ras_points(np.argwhere(mask).mean(axis=0))[0]
        for channel in phantom.image.channel_names:
            figure = overlay_figure(
                phantom.image.channel(channel),
                point,
                labels=outlines,
                label_colors=colors,
                label_names=names,
                title=f"Lesion {row['lesion']} — {channel}",
            )
            html.add_figure(figure, caption=f"Lesion {row['lesion']} on {channel}", name=f"lesion{row['lesion']}_{channel}")
        if cancel is not None:
            cancel.raise_if_cancelled()
    timings["report"] = time.perf_counter() - start
    html.add_table(
        [{"step": k, "seconds": v} for k, v in timings.items()],
        caption=f"Timings on {segmentation.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
    )
    path = html.write("report.html")
    report(progress, 1.0, "done")
    return DemoResult(report=path, dice=dice, lesion_dice=rows, timings=timings)
