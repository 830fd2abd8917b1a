"""The end-to-end demo (``segxai demo``, ``make demo``): the whole product on the bundled sample.

The bundled real T1 with synthetic lesions inserted (a two-channel FLAIR-like + T1 case) ->
segmentation by the bundled lesion model -> class-level maps of the lesion class -> instance
maps (max aggregation) of every predicted lesion -> the lesion table (TP / FP against the
inserted truth) -> the QA risk band of the lesion class from the shipped risk model -> the
Agg2Exp matrix -> the prediction's uncertainty (test-time left-right flips and mild noise,
when the settings enable it) -> NIfTI outputs on the input grid, a Slicer scene bundle
(``.mrb``) and an HTML report; with ``dicom``, the results as DICOM too (:func:`write_demo_dicom`:
the input as DICOM series, SEG + RTSTRUCT + Parametric Maps referencing the first).

:class:`DemoSettings` sizes the work; :meth:`DemoSettings.reduced` is the setting the test
suite runs (a crop around one lesion, fewer samples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .image import Image, SegXAIInputError
from .io import check_writable_dir, write_image
from .metrics import dice_score
from .pipeline import Case, CaseSettings
from .progress import CancelToken, ProgressCallback, report, sub_progress
# the report's thresholds and lesion-table columns live in the report layer (shared with the
# generic case report); re-exported for the demo's callers
from .report.sections import (ENTROPY_FLOOR, MUTUAL_INFORMATION_FLOOR, OVERLAY_THRESHOLD,  # noqa: F401
                              REPORT_UNCERTAINTY_COLUMNS)

__all__ = ["DEMO_SEED", "DemoSettings", "DemoResult", "demo_case", "demo_phantom", "run_demo", "write_demo_dicom",
           "DICOM_FOLDER"]

#: seed of the lesions inserted into the sample (the lesion model never saw it in training)
DEMO_SEED = 2026
#: the demo's DICOM results (``run_demo(dicom=True)``), inside its output folder
DICOM_FOLDER = "dicom"


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
    dicom: bool = False,
) -> DemoResult:
    """Run the demo into ``out_dir``: the case pipeline on the demo case, then the report and
    the Slicer scene.

    Outputs: the case folder of :func:`~SegXAILib.pipeline.write_case` (segmentation, maps,
    instance maps, lesion table, QA, Agg2Exp, uncertainty when enabled, ``case.json``), plus
    ``input_<channel>.nii.gz``, ``truth_lesions.nii.gz``, ``scene.mrb`` and ``report.html`` with
    ``figures/``, all listed in the manifest. With ``dicom``, also ``dicom/``
    (:func:`write_demo_dicom`; its SEG, RTSTRUCT and maps listed in the manifest); it must not
    exist yet (checked before any work).
    """
    from .pipeline import add_to_manifest, load_case_model, run_case, write_case

    settings = settings or DemoSettings()
    case_settings = CaseSettings.from_dict({**settings.case.to_dict(), "device": device}, "demo settings")
    if not (case_settings.instances.enabled and case_settings.qa.risk_model and case_settings.agg2exp.enabled):
        raise SegXAIInputError("demo settings: the report needs instances, a QA risk model and Agg2Exp enabled")
    if dicom and (Path(out_dir) / DICOM_FOLDER).exists():
        raise SegXAIInputError(f"dicom: {Path(out_dir) / DICOM_FOLDER} already exists; DICOM results are written to a "
                               "new folder (remove it, or choose another output folder)")
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
    if dicom:
        start = time.perf_counter()
        report(progress, 0.9, "writing DICOM")
        extra.update(write_demo_dicom(out_dir / DICOM_FOLDER, case))
        timings["DICOM"] = time.perf_counter() - start
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
    add_to_manifest(out_dir, {k: v for k, v in extra.items() if k in ("scene", "report")
                                or (k.startswith("dicom:") and not k.startswith("dicom:series:"))})
    report(progress, 1.0, "done")
    return DemoResult(report=path, dice=dice, case=case, manifest=manifest, outputs=extra, timings=timings)


def write_demo_dicom(folder: str | Path, case: Case) -> dict[str, Path]:
    """A case's input and results as DICOM, into the new ``folder``.

    ``series_<channel>/``: each input channel as an MR series
    (:func:`~SegXAILib.dicom.testdata.write_test_series` on the case's grid; intensities rounded
    to unsigned 16 bits, one frame of reference for all); ``results/``: SEG and RTSTRUCT of every
    foreground class and a Parametric Map of each saliency / uncertainty map
    (:func:`~SegXAILib.dicom.write_dicom_results`), all referencing the first channel's series.
    The folder is written under a temporary name and renamed, so it holds all of this or does not
    exist.

    Returns
    -------
    dict
        ``"dicom:series:<channel>"`` -> series folder, and ``"dicom:seg"``, ``"dicom:rtstruct"``,
        ``"dicom:map:<name>"`` -> file.
    """
    from .dicom import case_dicom_content, read_dicom_series, write_dicom_results
    from .dicom.series import atomic_folder, new_uid
    from .dicom.testdata import write_test_series

    folder = Path(folder)
    frame = new_uid()  # one patient frame of reference: every channel lies on the same grid
    names = [f"series_{channel}" for channel in case.image.channel_names]
    with atomic_folder(folder) as temporary:
        for name, channel in zip(names, case.image.channel_names):
            write_test_series(temporary / name, image=case.image.channel(channel), frame_of_reference_uid=frame)
        series = read_dicom_series(temporary / names[0])
        masks, maps = case_dicom_content(case, series)
        written = write_dicom_results(temporary / "results", series, masks, maps)
    paths: dict[str, Path] = {f"dicom:series:{channel}": folder / name
                              for name, channel in zip(names, case.image.channel_names)}
    paths.update({f"dicom:{role}": folder / "results" / Path(path).name for role, path in written.items()})
    return paths


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


def _check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def qa_agreement(qa, dice: float) -> str:
    """Whether the shown estimate agrees with the demo case's known Dice within the risk
    model's stated error (the 90th percentile of its held-out errors), in words."""
    if qa.risk is None:
        return "no risk model"
    estimate = float(qa.risk["estimated_dice"])
    bound = (qa.risk.get("calibration") or {}).get("estimated_dice_error_q90")
    gap = abs(estimate - dice)
    text = f"estimated Dice {estimate:.2f} against the known {dice:.2f} (off by {gap:.2f})"
    if bound is None:
        return text + "; the risk model states no error"
    if qa.risk.get("outside_calibration"):
        return text + "; the case is outside the risk model's calibration data, so no band is given"
    verdict = "within" if gap <= bound else "NOT within"
    return f"{text}: {verdict} the risk model's stated error ({bound:.2f}, 90 % of its held-out errors)"


def _write_report(out_dir: Path, case: Case, truth: np.ndarray, dice: float, seed: int, timings: dict[str, float],
                  cancel: Optional[CancelToken], scene: Optional[Path]) -> Path:
    """The demo's report: the shared case sections (:mod:`SegXAILib.report.sections`) with the
    demo's own parts, the inserted lesions the model missed outlined and the Dice against them."""
    from .report import HtmlReport
    from .report.sections import (Outlines, add_agg2exp_section, add_class_maps_section, add_lesion_section,
                                  add_qa_section, add_timings, add_uncertainty_section, lesion_report_rows,
                                  structure_uncertainty)

    image, card, device = case.image, case.card, case.device
    prediction = case.mask
    labels = case.instance_labels.array[0]
    lesion_rows = lesion_report_rows(case)
    qa = {**case.qa.to_dict(), "dice_against_truth": dice}
    structure = structure_uncertainty(case)
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
        "QA risk band of the lesion contour": case.qa.summary_text(),
        "QA estimate against the truth": qa_agreement(case.qa, dice),
        **({f"lesion uncertainty ({case.uncertainty.samples} samples)":
            f"soft Dice confidence {structure.soft_dice_confidence:.3f}, pairwise Dice {structure.pairwise_dice:.3f}, "
            f"boundary entropy {structure.boundary_entropy:.3f} nats"}
           if structure is not None and None not in (structure.soft_dice_confidence, structure.pairwise_dice,
                                                     structure.boundary_entropy) else {}),
        "model": f"{card.name} {card.version} (held-out Dice {card.metrics.get('dice_heldout_mean')})",
        "device": device,
        "Slicer scene": Path(scene).name if scene is not None else "not written",
    }, caption="Summary")

    # demo only: the inserted lesions the model missed, outlined beside its own
    outlines = Outlines(image.with_array(
        (prediction.astype(np.uint8) + 2 * (truth & ~prediction).astype(np.uint8))[None], ("outline",)),
        {1: (230, 60, 50), 2: (60, 200, 90)}, {1: "model", 2: "truth (missed)"})
    largest = np.argwhere(labels == 1).mean(axis=0) if labels.max() > 0 else np.array(image.spatial_shape) / 2
    through_largest = image.ijk_to_ras_points(largest)[0]

    add_class_maps_section(html, case, through_largest, outlines, "lesion 1", cancel)
    add_lesion_section(html, case, lesion_rows, outlines, cancel)
    add_qa_section(html, case, (
        f"Risk without a reference ({qa['method']}): {case.qa.summary_text()}. {qa_agreement(case.qa, dice)}. The "
        "risk model was calibrated on phantoms (Testing/Benchmarks/results/qa_benchmark.md judges every detector on "
        "the same cases): read the band as a demonstration of the method."
    ))
    add_agg2exp_section(html, case)
    if case.uncertainty is not None:
        _check(cancel)
        add_uncertainty_section(html, case, structure, through_largest, outlines, "lesion 1")

    if scene is not None:
        html.add_paragraph(f"The whole case opens in 3D Slicer from {Path(scene).name} (File > Add Data): inputs, "
                           "segmentation with the risk band as segment tags, saliency overlays, the lesion and QA tables "
                           "and the EC-curve chart.")
    add_timings(html, timings, device)
    return html.write("report.html")
