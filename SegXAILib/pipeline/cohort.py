"""Building a QA calibration cohort (METHODS.md section 6, QA_PROTOCOL.md) through the case pipeline.

Two sources of cases are built in:

* ``lesions``: lesion phantoms (:func:`SegXAILib.phantoms.make_lesion_phantom`) with graded
  degradations and phantom seeds from :data:`~SegXAILib.phantoms.degradations.COHORT_SEED_BASE`
  on, disjoint from the bundled lesion model's training / held-out seeds and the demo's seed;
  reference = the phantom's lesions.
* ``deepbet``: the bundled real head T1 with graded degradations
  (:func:`~SegXAILib.phantoms.degradations.degrade_image`); reference = deepbet's own brain
  mask on the undegraded T1.

Each case runs through the pipeline (:func:`~SegXAILib.pipeline.start_case`,
:func:`~SegXAILib.pipeline.add_maps`): one prediction, the maps of the class target of the
first foreground class in exact float32, each method's per-channel maps summed into one map
(the voxel's total attribution; the QA step scores a case with the same reduction). Guided
methods run with ``aggregation="target"`` by default (one modified backward of the summed
target): paper 000's per-voxel sum is exact but costs one backward per predicted voxel.
:func:`~SegXAILib.topology.cohort.calibrate_cohort` reads the folder.
"""

from __future__ import annotations

import csv
import io as _io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..io import atomic_path, check_writable_dir, write_image
from ..metrics import dice_score
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from ..topology.cohort import CHANNEL_REDUCTION, COHORT_FORMAT, COHORT_MODELS, COHORT_VERSION
from .run import add_maps, start_case
from .settings import CaseSettings, MethodSettings
from .steps import channel_sum, load_case_model, predict

if TYPE_CHECKING:
    from ..phantoms.degradations import DegradationGrid

__all__ = ["default_methods", "method_record", "build_cohort"]


def default_methods(model: str) -> list[MethodSettings]:
    """The methods a cohort gets by default: guided Grad-CAM first (paper 000's best).

    deepbet is TorchScript: module hooks (Grad-CAM) and backward rules (guided backprop) do
    not run on it, so it gets the gradient family only.
    """
    if model == "deepbet":
        return [MethodSettings(method="vanilla_gradient"), MethodSettings(method="gradient_x_input")]
    return [
        MethodSettings(method="guided_gradcam", params={"aggregation": "target"}),
        MethodSettings(method="gradcam_plusplus"),
        MethodSettings(method="guided_backprop", params={"aggregation": "target"}),
        MethodSettings(method="smoothgrad", params={"n_samples": 3, "seed": 0}),
    ]


def method_record(method: MethodSettings, class_name: str) -> dict[str, Any]:
    """What identifies how a saliency map was made; stored in the cohort and the risk model
    (``method_parameters``) and compared again when a case is scored
    (:func:`~SegXAILib.pipeline.score_qa`)."""
    from ..attribution import get_method

    defaults = {p.name: p.default for p in get_method(method.method).parameters}
    params = json.loads(json.dumps({**defaults, **method.params}, default=str))
    return {"params": params, "target": f"class:{class_name}", "channel_reduction": CHANNEL_REDUCTION}




CSV_COLUMNS = ("case_id", "seed", "kind", "severity", "status", "dice", "predicted_voxels", "reference_voxels",
               "noise", "bias_field", "lesion_contrast", "resolution_factor", "blur_mm", "motion_mm")


def _csv_text(cases: list[dict]) -> str:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case in cases:
        row = {**case, **case["degradation"]}
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _write_json(path: Path, document: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _write_index(out_dir: Path, document: dict) -> None:
    _write_json(out_dir / "cohort.json", document)
    with atomic_path(out_dir / "cohort.csv") as temporary:
        temporary.write_text(_csv_text(document["cases"]), encoding="utf-8")


def build_cohort(
    out_dir: str | Path,
    model: str = "lesions",
    n_cases: int = 40,
    methods: Optional[Sequence[MethodSettings]] = None,
    seed: int = 0,
    grid: Optional[DegradationGrid] = None,
    device: str = "cpu",
    phantom_options: Optional[dict] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """Build a calibration cohort into ``out_dir``; returns the path of ``cohort.json``.

    Parameters
    ----------
    out_dir : path
        Cohort folder (created; an existing ``cohort.json`` is replaced).
    model : str
        ``"lesions"`` (the bundled lesion model on lesion phantoms) or ``"deepbet"``
        (deepbet's brain model on the degraded bundled T1).
    n_cases : int
        Number of cases (see :func:`plan_cases`).
    methods : sequence of MethodSettings, optional
        Attribution methods (default :func:`default_methods`).
    seed : int
        Cohort seed: shuffles the severities and offsets every case seed.
    grid : DegradationGrid, optional
        Default :data:`LESION_GRID` / :data:`DEEPBET_GRID`.
    device : str
    phantom_options : dict, optional
        Extra :func:`make_lesion_phantom` arguments (e.g. ``n_lesions``) for ``lesions``.

    Notes
    -----
    A case whose prediction is empty keeps its Dice and ``status = "empty_prediction"`` and
    has no maps: the saliency inside the predicted structure is undefined; calibration skips
    it (and reports how many were skipped). ``cohort.json`` is rewritten after every case,
    so a cancelled build leaves a readable partial cohort (``complete: false``).
    """
    from .. import __version__
    from ..phantoms.degradations import (COHORT_SEED_BASE, DEEPBET_GRID, LESION_GRID, degrade_image, motion_blur,
                                         plan_cases)
    from ..sample_data import load_sample_head

    if model not in COHORT_MODELS:
        raise SegXAIInputError(f"model must be one of {COHORT_MODELS}, got {model!r}")
    grid = grid or (DEEPBET_GRID if model == "deepbet" else LESION_GRID)
    plans = plan_cases(n_cases, grid, seed)
    methods = list(methods) if methods is not None else default_methods(model)
    if not methods:
        raise SegXAIInputError("methods must name at least one attribution method")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SegXAIInputError(f"methods must not repeat a method name, got {names}")
    phantom_options = dict(phantom_options or {})
    out_dir = check_writable_dir(out_dir)
    (out_dir / "cases").mkdir(exist_ok=True)

    report(progress, 0.0, "loading the model")
    settings = CaseSettings.from_dict({"model": model, "methods": [m.model_dump() for m in methods],
                                       "instances": {"enabled": False}, "device": device}, "cohort settings")
    loaded = load_case_model(settings)
    card = loaded.card
    class_name = card.class_names[1]
    head = load_sample_head()

    reference_mask = None
    if model == "deepbet":
        report(progress, 0.0, "deepbet on the undegraded T1 (the reference)")
        reference_mask = predict(head.t1, loaded, settings, cancel=cancel).mask(1)
        write_image(head.t1.with_array(reference_mask.astype(np.uint8)[None], ("reference",)), out_dir / "reference.nii.gz")
        if phantom_options:
            raise SegXAIInputError("phantom_options apply to model='lesions' only")

    document: dict[str, Any] = {
        "format": COHORT_FORMAT,
        "version": COHORT_VERSION,
        "complete": False,
        "model": {"name": model, "card_name": card.name, "card_version": card.version, "checksum": card.checksum()},
        "class_name": class_name,
        "methods": {m.name: method_record(m, class_name) for m in methods},
        "seed": int(seed),
        "n_cases": int(n_cases),
        "grid": grid.to_dict(),
        "source": (
            {"kind": "lesion_phantoms", "function": "SegXAILib.phantoms.make_lesion_phantom",
             "phantom_options": phantom_options, "seed_base": COHORT_SEED_BASE,
             "reference": "the phantom's inserted lesions"}
            if model == "lesions" else
            {"kind": "degraded_sample_t1", "function": "SegXAILib.phantoms.degradations.degrade_image",
             "seed_base": COHORT_SEED_BASE, "reference": "reference.nii.gz: deepbet on the undegraded bundled T1"}
        ),
        "device": str(loaded.device),
        "segxai_version": __version__,
        "cases": [],
    }
    for index, plan in enumerate(plans):
        if cancel is not None:
            cancel.raise_if_cancelled()
        step = sub_progress(progress, index / len(plans), (index + 1) / len(plans))
        report(step, 0.0, f"{plan.case_id}: {plan.kind} {plan.severity:.2f}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if model == "lesions":
            from ..phantoms import make_lesion_phantom

            d = plan.degradation
            phantom = make_lesion_phantom(
                head, seed=plan.seed, noise=d.noise, bias_field=d.bias_field, lesion_contrast=d.lesion_contrast,
                resolution_factor=d.resolution_factor, blur_mm=d.blur_mm, **phantom_options,
            )
            image, reference = phantom.image, phantom.truth
            if d.motion_mm > 0:  # applied after the phantom's noise: it smears the noise too
                axis = int(np.random.default_rng(plan.seed).integers(3))
                image = image.with_array(
                    np.stack([motion_blur(c, d.motion_mm, image.spacing, axis) for c in image.array]).astype(np.float32),
                    image.channel_names,
                )
        else:
            image, reference = degrade_image(head.t1, plan.degradation, plan.seed), reference_mask
        timings["case"] = time.perf_counter() - start

        start = time.perf_counter()
        case = start_case(image, loaded, settings, progress=sub_progress(step, 0.0, 0.2), cancel=cancel)
        prediction = case.mask
        timings["segment"] = time.perf_counter() - start
        case_dir = out_dir / "cases" / plan.case_id
        case_dir.mkdir(exist_ok=True)
        entry: dict[str, Any] = {
            "case_id": plan.case_id, "seed": plan.seed, "kind": plan.kind, "severity": plan.severity,
            "degradation": plan.degradation.to_dict(), "dice": dice_score(prediction, reference),
            "predicted_voxels": int(prediction.sum()), "reference_voxels": int(np.count_nonzero(reference)),
            "status": "ok" if prediction.any() else "empty_prediction", "files": {},
        }
        if prediction.any():
            write_image(image.with_array(prediction.astype(np.uint8)[None], ("mask",)), case_dir / "mask.nii.gz")
            entry["files"]["mask"] = f"cases/{plan.case_id}/mask.nii.gz"
            entry["files"]["saliency"] = {}
            add_maps(case, loaded, progress=sub_progress(step, 0.2, 1.0), cancel=cancel)
            for method in methods:
                timings[method.name] = case.timings[f"map {method.name}"]
                name = f"saliency_{method.name}.nii.gz"
                saliency = channel_sum(case.maps[method.name].maps)
                write_image(image.with_array(saliency[None], (method.name,)), case_dir / name)
                entry["files"]["saliency"][method.name] = f"cases/{plan.case_id}/{name}"
        entry["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        document["cases"].append(entry)
        _write_index(out_dir, document)
        report(step, 1.0, f"{plan.case_id}: Dice {entry['dice']:.3f}")
    document["complete"] = True
    _write_index(out_dir, document)
    report(progress, 1.0, "done")
    return out_dir / "cohort.json"


