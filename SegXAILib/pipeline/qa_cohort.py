"""QA benchmark cohorts (QA_PROTOCOL.md): cases where the predicted volume does not give the
contour's quality away, each scored by every reference-free detector on the same case.

Built-in cohorts (:data:`QA_COHORTS`):

* ``c1_parotid_S2`` / ``c1_parotid_S4`` / ``c1_parotid_S6``: parotid phantoms whose true sphere
  radius is drawn from a wider range than the models were trained on
  (:data:`PAROTID_RADIUS_FRACTION`), independently of everything else; S2 / S4 have (almost) no
  sphere contrast, so the model must guess the size; S6 gets size-keeping degradations (noise,
  blur, k-space ghosting, spikes).
* ``c2_lesions`` (design version 2): lesion phantoms with 1 to 12 lesions
  (:func:`c2_lesion_count`, a stream of its own, so the load is independent of the failure and
  its severity by construction) whose semi-axes are drawn on 2 to 10 mm each, and failures that
  keep the size: k-space ghosting, one channel misregistered by 0 to 10 mm, a similarity
  transform applied to image and reference. Version 1 also had k-space spikes, which remove
  lesions rather than move them: on its 100 cases the spike cases' Dice followed the predicted
  / true volume ratio (Spearman 0.98) and the predicted volume flagged the insufficient cases
  (AUROC 0.80 "smaller"), while the true volume did not (0.49). A per-case lesion radius was
  tried and dropped: lesions of 2 to 3 mm are not found by the model even clean (Dice 0), so
  the load would decide the lowest Dice. Misregistration goes to 10 mm so that failures, not
  lesion size, make the lowest Dice: a shifted FLAIR moves the prediction and shrinks it little
  (median predicted / true volume 0.81, spikes 0.39; a shifted T1 barely matters). A pilot of
  210 cases (prediction only) gave volume AUROCs 0.56 / 0.44 / 0.48 (smaller / larger /
  deviation) with 32 insufficient cases; there are 240 cases for the admission's 30 below the
  15 % Dice quantile.
* ``c3_deepbet``: deepbet on the bundled real T1 under random similarity transforms of image and
  reference (scale 0.75 to 1.35, so the true brain volume varies about 3x; rotation up to 30
  degrees) with degradations that push the mask both ways.
* ``c4_contours``: QA of a given contour at constant volume: clean S6 parotid phantoms whose
  reference is shifted, rotated or warped with its voxel count kept
  (:func:`~SegXAILib.phantoms.perturb_contour`); the model's own prediction gives the fair
  baseline (Dice of the contour with it).

``user`` cohorts take any model the runtime loads with the user's images and references
(:func:`build_user_cohort`).

Every case runs through the case pipeline (:func:`start_case`, :func:`add_maps`, the uncertainty
step); what is stored per case is what the benchmark needs: the Dice of the scored contour
against the reference, every reference-free score (:func:`SegXAILib.qa.case_scores`) and the
Euler characteristic curves of each method's saliency inside the scored contour, with the two
controls (the saliency shuffled inside the contour; the image intensity). The folder is a
``segxai-qa-cohort`` (``segxai qa calibrate`` reads its stored curves). Cases are seeded
(phantom, degradation and transform seeds from the cohort seed and the case index) and a
rerun with the same specification resumes: finished cases are kept.
"""

from __future__ import annotations

import csv
import io as _io
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError
from ..io import atomic_path, check_writable_dir, read_image
from ..metrics import dice_score
from ..progress import CancelToken, ProgressCallback, report
from ..topology.cohort import COHORT_FORMAT, COHORT_VERSION, QA_TTA_SOURCES
from .cohort import method_record
from .run import add_maps, start_case
from .settings import CaseSettings, MethodSettings
from ..qa.cohort_table import CURVES_FILE, save_case_curves
from .steps import case_quality_scores, channel_sum, load_case_model

__all__ = [
    "QA_COHORTS",
    "CohortCase",
    "PAROTID_RADIUS_FRACTION",
    "c2_lesion_count",
    "qa_cohort_spec",
    "make_cohort_case",
    "build_qa_cohort",
    "build_user_cohort",
]

#: seeds of the QA cohorts' cases (disjoint from the models' training seeds and the calibration cohorts')
QA_SEED_BASE = 50_000
#: the wider range of true sphere radii (fraction of the smallest half field of view); the
#: parotid models were trained on (0.17, 0.27)
PAROTID_RADIUS_FRACTION = (0.10, 0.32)
#: c2_lesions: lesions per case (uniform), the range of each lesion semi-axis (mm, uniform), the
#: largest channel shift (mm, times the severity)
C2_LESION_COUNT = (1, 12)
C2_RADIUS_MM = (2.0, 10.0)
C2_MISREGISTRATION_MM = 10.0
#: EC thresholds of the stored curves (``default_thresholds(N_THRESHOLDS)``)
N_THRESHOLDS = 100
#: uncertainty sources a cohort case gets: test-time flips over every axis (8 samples)
TTA_SOURCES = QA_TTA_SOURCES


def _methods(*items: tuple[str, dict]) -> tuple[MethodSettings, ...]:
    return tuple(MethodSettings(method=name, params=params) for name, params in items)


#: paper 000's methods (guided ones with one modified backward of the summed target), SmoothGrad
_EAGER_METHODS = _methods(
    ("guided_gradcam", {"aggregation": "target"}), ("gradcam", {}), ("gradcam_plusplus", {}),
    ("guided_backprop", {"aggregation": "target"}), ("lrp", {}), ("smoothgrad", {"n_samples": 8, "seed": 0}),
)
#: TorchScript (deepbet): the gradient family only
_GRADIENT_METHODS = _methods(("vanilla_gradient", {}), ("gradient_x_input", {}))


@dataclass(frozen=True)
class _Spec:
    model: str
    cases: int
    kinds: tuple[str, ...]
    methods: tuple[MethodSettings, ...]
    source: str
    #: design version: a changed case design bumps it, and it is part of a built folder's identity
    #: (from 2 on; the folders of version-1 designs keep resuming), so old cases are not mixed in
    version: int = 1


QA_COHORTS: dict[str, _Spec] = {
    "c1_parotid_S2": _Spec("parotid-S2", 300, ("clean",), _EAGER_METHODS + _methods(("pattern_attribution", {})),
                           "parotid phantoms S2, true radius varied"),
    "c1_parotid_S4": _Spec("parotid-S4", 300, ("clean",), _EAGER_METHODS + _methods(("pattern_attribution", {})),
                           "parotid phantoms S4, true radius varied"),
    "c1_parotid_S6": _Spec("parotid-S6", 300, ("noise", "blur", "ghosting", "spikes"), _EAGER_METHODS,
                           "parotid phantoms S6, true radius varied, size-keeping degradations"),
    # 240 cases: the admission needs >= 30 below the 15 % Dice quantile
    "c2_lesions": _Spec("lesions", 240, ("ghosting", "misregistration", "affine"),
                        _EAGER_METHODS + _methods(("pattern_attribution", {})),
                        "lesion phantoms, 1-12 lesions of 2-10 mm, size-keeping failures "
                        "(ghosting, misregistration 0-10 mm, similarity transform)", version=2),
    "c3_deepbet": _Spec("deepbet", 200, ("noise", "bias_field", "blur", "ghosting", "contrast"), _GRADIENT_METHODS,
                        "the bundled T1 under random similarity transforms, degradations both ways"),
    "c4_contours": _Spec("parotid-S6", 150, ("shift", "rotate", "warp"), _EAGER_METHODS,
                         "clean S6 parotid phantoms, reference shifted / rotated / warped at constant volume"),
}


def qa_cohort_spec(name: str) -> dict[str, Any]:
    """JSON-ready description of a built-in cohort (model, default size, kinds, methods)."""
    if name not in QA_COHORTS:
        raise SegXAIInputError(f"cohort {name!r}: expected one of {', '.join(QA_COHORTS)}")
    spec = QA_COHORTS[name]
    return {"name": name, "model": spec.model, "cases": spec.cases, "kinds": list(spec.kinds),
            "methods": [m.model_dump() for m in spec.methods], "source": spec.source, "version": spec.version}


@dataclass
class CohortCase:
    """One cohort case before the model sees it.

    ``image``: the model's input; ``reference``: ``(I, J, K)`` bool truth on its grid;
    ``contour``: the contour to score when it is not the model's prediction (C4); ``group``:
    what cross-validation keeps together (the phantom or source scan).
    """

    case_id: str
    group: str
    kind: str
    severity: float
    image: Image
    reference: np.ndarray
    contour: Optional[np.ndarray] = None
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- case makers


def _case_rng(seed: int, index: int) -> tuple[int, np.random.Generator]:
    case_seed = QA_SEED_BASE + 1000 * int(seed) + int(index)
    return case_seed, np.random.default_rng(np.random.SeedSequence([case_seed, 18]))


def _degrade_volume(volume: np.ndarray, spacing: np.ndarray, kind: str, severity: float, scale: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """One size-keeping degradation of one channel; ``scale`` is the channel's intensity scale."""
    from scipy import ndimage

    from ..phantoms import kspace_ghosting, kspace_spikes

    volume = np.asarray(volume, dtype=np.float64)
    if kind == "noise":
        sigma = severity * 1.5 * scale
        return volume + rng.normal(0.0, sigma, volume.shape), {"noise_sigma": sigma}
    if kind == "blur":
        sigma_mm = severity * 8.0
        return ndimage.gaussian_filter(volume, sigma_mm / np.asarray(spacing, float)), {"blur_sigma_mm": sigma_mm}
    if kind == "ghosting":
        axis = int(rng.integers(3))
        return kspace_ghosting(volume, axis=axis, intensity=0.9 * severity), {"axis": axis, "intensity": 0.9 * severity}
    if kind == "spikes":
        n = int(rng.integers(1, 4))
        spike_seed = int(rng.integers(2**31))
        intensity = 2.0 * severity
        return kspace_spikes(volume, n_spikes=n, intensity=intensity, seed=spike_seed), \
            {"n_spikes": n, "intensity": intensity, "spike_seed": spike_seed}
    if kind == "bias_field":
        from ..phantoms.lesions import _BIAS_CONTROL_POINTS, _smooth_random_field

        field_ = np.exp(2.0 * severity * _smooth_random_field(rng, volume.shape, (_BIAS_CONTROL_POINTS,) * 3))
        return volume * field_, {"bias_field": 2.0 * severity}
    if kind == "contrast":
        # intensities pulled towards their mean: the brain / skull edge fades (the mask shrinks)
        mean = float(volume.mean())
        return mean + (1.0 - 0.85 * severity) * (volume - mean), {"contrast": 1.0 - 0.85 * severity}
    raise SegXAIInputError(f"degradation kind {kind!r} is not known")


def _parotid_case(variant: str, index: int, seed: int, kind: str, severity: float) -> CohortCase:
    from ..phantoms import make_parotid_phantom

    case_seed, rng = _case_rng(seed, index)
    phantom = make_parotid_phantom(variant, seed=case_seed, sphere_radius_fraction=PAROTID_RADIUS_FRACTION)
    image = phantom.image
    details: dict[str, Any] = {"phantom_seed": case_seed}
    if kind != "clean":
        volume, details["degradation"] = _degrade_volume(image.array[0], image.spacing, kind, severity, 0.1, rng)
        image = image.with_array(volume.astype(np.float32)[None], image.channel_names)
    return CohortCase(f"case_{index:03d}", f"phantom_{case_seed}", kind, severity, image,
                      phantom.label.array[0] > 0, details=details)


def _contour_case(index: int, seed: int, kind: str, severity: float) -> CohortCase:
    from ..phantoms import make_parotid_phantom, perturb_contour

    case_seed, rng = _case_rng(seed, index)
    phantom = make_parotid_phantom("S6", seed=case_seed)  # the training range: the model's own contour is good
    reference = phantom.label.array[0] > 0
    magnitude = {"shift": 10.0, "rotate": 40.0, "warp": 8.0}[kind] * severity
    contour = perturb_contour(reference, phantom.image.spacing, kind, magnitude, seed=int(rng.integers(2**31)))
    return CohortCase(f"case_{index:03d}", f"phantom_{case_seed}", kind, severity, phantom.image, reference,
                      contour=contour, details={"phantom_seed": case_seed, "magnitude": magnitude})


def c2_lesion_count(seed: int, index: int) -> int:
    """The number of lesions of case ``index`` of ``c2_lesions``, uniform on :data:`C2_LESION_COUNT`.

    Drawn from its own stream of the case seed (the severity has another, the phantom and the
    failure a third and fourth), so the lesion load is independent of the failure kind and
    severity by construction; a plan of more cases extends a smaller one case for case.
    """
    case_seed = QA_SEED_BASE + 1000 * int(seed) + int(index)
    rng = np.random.default_rng(np.random.SeedSequence([case_seed, 1819]))
    return int(rng.integers(C2_LESION_COUNT[0], C2_LESION_COUNT[1], endpoint=True))


def _lesion_case(index: int, seed: int, kind: str, severity: float) -> CohortCase:
    from ..phantoms import make_lesion_phantom, misregister_channel, random_similarity, transform_case
    from ..sample_data import load_sample_head

    case_seed, rng = _case_rng(seed, index)
    count = c2_lesion_count(seed, index)
    phantom = make_lesion_phantom(load_sample_head(), seed=case_seed, n_lesions=(count, count),
                                  radius_mm=C2_RADIUS_MM)
    image, reference = phantom.image, phantom.truth > 0
    details: dict[str, Any] = {"phantom_seed": case_seed, "lesions": int(phantom.num_lesions)}
    if kind == "ghosting":
        scales = [float(np.percentile(c, 99)) for c in image.array]
        channels, info = [], []
        for c, scale in zip(image.array, scales):
            volume, d = _degrade_volume(c, image.spacing, kind, severity, scale, rng)
            channels.append(volume)
            info.append(d)
        image = image.with_array(np.stack(channels).astype(np.float32), image.channel_names)
        details["degradation"] = info
    elif kind == "misregistration":
        channel = int(rng.integers(image.num_channels))
        shift_mm = C2_MISREGISTRATION_MM * severity
        image = misregister_channel(image, channel, shift_mm, seed=int(rng.integers(2**31)))
        details["degradation"] = {"channel": channel, "shift_mm": shift_mm}
    elif kind == "affine":
        matrix = random_similarity(rng, scale_range=(1.0 - 0.25 * severity, 1.0 + 0.25 * severity),
                                   max_rotation_deg=30.0 * severity, max_translation_mm=0.0)
        image, reference = transform_case(image, reference, matrix)
        details["degradation"] = {"matrix": np.asarray(matrix).round(6).tolist()}
    else:
        raise SegXAIInputError(f"c2_lesions: kind {kind!r} is not known")
    return CohortCase(f"case_{index:03d}", f"phantom_{case_seed}", kind, severity, image, reference, details=details)


_DEEPBET_REFERENCE: dict[str, Any] = {}


def _deepbet_reference(loaded, settings: CaseSettings) -> tuple[Image, np.ndarray]:
    """The bundled T1 and deepbet's mask on it undegraded (the reference before each case's transform)."""
    from ..sample_data import load_sample_head
    from .steps import predict

    if "mask" not in _DEEPBET_REFERENCE:
        t1 = load_sample_head().t1
        _DEEPBET_REFERENCE["t1"] = t1
        _DEEPBET_REFERENCE["mask"] = predict(t1, loaded, settings).mask(1)
    return _DEEPBET_REFERENCE["t1"], _DEEPBET_REFERENCE["mask"]


def _deepbet_case(index: int, seed: int, kind: str, severity: float, loaded, settings: CaseSettings) -> CohortCase:
    from ..phantoms import random_similarity, transform_case

    case_seed, rng = _case_rng(seed, index)
    t1, mask = _deepbet_reference(loaded, settings)
    matrix = random_similarity(rng, scale_range=(0.75, 1.35), max_rotation_deg=30.0, max_translation_mm=10.0)
    image, reference = transform_case(t1, mask, matrix)
    scale = float(np.percentile(image.array[0], 99))
    volume, degradation = _degrade_volume(image.array[0], image.spacing, kind, severity, scale * 0.1, rng)
    image = image.with_array(volume.astype(np.float32)[None], image.channel_names)
    return CohortCase(f"case_{index:03d}", f"transform_{case_seed}", kind, severity, image, reference,
                      details={"seed": case_seed, "matrix": np.asarray(matrix).round(6).tolist(),
                               "degradation": degradation, "source_scan": "bundled T1"})


def _plan(name: str, n_cases: int, seed: int) -> list[tuple[int, str, float]]:
    """(index, kind, severity) of each case: kinds in turn, the severity uniform on [0, 1] from
    the case's own seed (independent of the phantom draws), so a larger cohort of the same seed
    extends a smaller one case for case (and a rerun with more cases resumes)."""
    kinds = QA_COHORTS[name].kinds
    plans = []
    for i in range(n_cases):
        case_seed = QA_SEED_BASE + 1000 * int(seed) + i
        severity = float(np.random.default_rng(np.random.SeedSequence([case_seed, 1818])).random())
        plans.append((i, kinds[i % len(kinds)], round(severity, 6)))
    return plans


def make_cohort_case(name: str, index: int, kind: str, severity: float, seed: int = 0, loaded=None,
                     settings: Optional[CaseSettings] = None) -> CohortCase:
    """Case ``index`` of the built-in cohort ``name`` (deepbet needs its ``loaded`` model)."""
    if name.startswith("c1_parotid_"):
        return _parotid_case(name.rsplit("_", 1)[1], index, seed, kind, severity)
    if name == "c4_contours":
        return _contour_case(index, seed, kind, severity)
    if name == "c2_lesions":
        return _lesion_case(index, seed, kind, severity)
    if name == "c3_deepbet":
        return _deepbet_case(index, seed, kind, severity, loaded, settings)
    raise SegXAIInputError(f"cohort {name!r}: expected one of {', '.join(QA_COHORTS)}")


# ---------------------------------------------------------------------------- scoring one case


def _settings(model: str, methods: Sequence[MethodSettings], device: str, trust_code: bool = False) -> CaseSettings:
    return CaseSettings.from_dict({"model": model, "methods": [m.model_dump() for m in methods],
                                   "instances": {"enabled": False}, "device": device, "trust_code": trust_code,
                                   "uncertainty": {"enabled": True, "sources": TTA_SOURCES}}, "cohort settings")


def score_cohort_case(item: CohortCase, loaded, settings: CaseSettings, methods: Sequence[MethodSettings],
                      cancel: Optional[CancelToken] = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run one case through the pipeline; returns its cohort entry and its curves.

    The scored contour is ``item.contour`` when given, else the prediction. Curves: one per
    method (``saliency_curve`` inside the contour, on ``default_thresholds(N_THRESHOLDS)``),
    ``control_shuffled:<method>`` (that map permuted inside the contour) for every method, and
    ``control_intensity`` (the first input channel's intensity).
    """
    from ..qa import intensity_curve, shuffled_saliency_curve
    from ..topology import default_thresholds, saliency_curve

    timings: dict[str, float] = {}
    start = time.perf_counter()
    case = start_case(item.image, loaded, settings, cancel=cancel)
    timings["segment"] = time.perf_counter() - start
    prediction = case.mask
    contour = prediction if item.contour is None else item.contour
    entry: dict[str, Any] = {
        "case_id": item.case_id, "group": item.group, "kind": item.kind, "severity": item.severity,
        "details": item.details, "dice": dice_score(contour, item.reference),
        "predicted_voxels": int(prediction.sum()), "contour_voxels": int(contour.sum()),
        "reference_voxels": int(np.count_nonzero(item.reference)),
        "status": "ok" if contour.any() else "empty_prediction", "files": {}, "notes": [],
    }
    curves: dict[str, np.ndarray] = {}
    if item.contour is not None:
        entry["dice_with_prediction"] = dice_score(contour, prediction)
    if not contour.any():
        entry["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        return entry, curves
    start = time.perf_counter()
    scores, notes = case_quality_scores(case, loaded, contour=contour, cancel=cancel)
    timings["scores"] = time.perf_counter() - start
    entry["notes"].extend(notes)
    if item.contour is not None:
        scores["dice_with_prediction"] = entry["dice_with_prediction"]
    entry["scores"] = scores

    thresholds = default_thresholds(N_THRESHOLDS)
    add_maps(case, loaded, methods, cancel=cancel)
    entry["notes"].extend(case.notes)
    for method in methods:
        if method.name not in case.maps:
            continue
        timings[method.name] = case.timings[f"map {method.name}"]
        saliency = channel_sum(case.maps[method.name].maps)
        curves[method.name] = saliency_curve(saliency, contour, thresholds)
        curves[f"control_shuffled:{method.name}"] = shuffled_saliency_curve(saliency, contour, thresholds, seed=0)
    curves["control_intensity"] = intensity_curve(item.image.array[0], contour, thresholds)
    entry["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return entry, curves


# ---------------------------------------------------------------------------- the folder


CSV_COLUMNS = ("case_id", "group", "kind", "severity", "status", "dice", "predicted_voxels", "contour_voxels",
               "reference_voxels")


def _write_index(out_dir: Path, document: dict) -> None:
    with atomic_path(out_dir / "cohort.json") as temporary:
        temporary.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = sorted({k for c in document["cases"] for k in (c.get("scores") or {})})
    writer.writerow(list(CSV_COLUMNS) + names)
    for case in document["cases"]:
        scores = case.get("scores") or {}
        writer.writerow([case.get(c, "") for c in CSV_COLUMNS] + ["" if scores.get(n) is None else scores[n]
                                                                  for n in names])
    with atomic_path(out_dir / "cohort.csv") as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")


_WORKER: dict[str, Any] = {}


def _worker_init(model: str, methods: list[dict], device: str, trust_code: bool) -> None:
    import torch

    torch.set_num_threads(1)
    settings = _settings(model, [MethodSettings(**m) for m in methods], device, trust_code)
    _WORKER.update(settings=settings, loaded=load_case_model(settings))


def _worker_case(name: str, index: int, kind: str, severity: float, seed: int) -> tuple[dict, dict]:
    settings, loaded = _WORKER["settings"], _WORKER["loaded"]
    start = time.perf_counter()
    item = make_cohort_case(name, index, kind, severity, seed, loaded, settings)
    made = time.perf_counter() - start
    entry, curves = score_cohort_case(item, loaded, settings, settings.methods)
    entry["timings_s"]["case"] = round(made, 3)
    return entry, curves


def _start_document(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The cohort.json to continue: the existing one when it was made with the same
    ``identity`` (resume), else a fresh one."""
    path = out_dir / "cohort.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("identity") == identity:
            return old
    return {"format": COHORT_FORMAT, "version": COHORT_VERSION, "complete": False, "identity": identity, "cases": []}


def _run(out_dir: Path, document: dict, todo: list[tuple], task, workers: int, init_args: tuple,
         progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> None:
    done = {c["case_id"] for c in document["cases"]}
    todo = [t for t in todo if f"case_{t[1]:03d}" not in done]
    total = len(todo) + len(done)
    (out_dir / "cases").mkdir(exist_ok=True)

    def record(entry: dict, curves: dict) -> None:
        case_dir = out_dir / "cases" / entry["case_id"]
        case_dir.mkdir(exist_ok=True)
        if curves:
            save_case_curves(case_dir / CURVES_FILE, curves)
            entry["files"]["curves"] = f"cases/{entry['case_id']}/{CURVES_FILE}"
        document["cases"].append(entry)
        document["cases"].sort(key=lambda c: c["case_id"])
        _write_index(out_dir, document)
        report(progress, len(document["cases"]) / max(1, total), f"{entry['case_id']}: Dice {entry['dice']:.3f}")

    if workers <= 1:
        _worker_init(*init_args)
        for args in todo:
            if cancel is not None:
                cancel.raise_if_cancelled()
            record(*task(*args))
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=init_args) as pool:
        futures = [pool.submit(task, *args) for args in todo]
        try:
            for future in futures:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                record(*future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def build_qa_cohort(
    name: str,
    out_dir: str | Path,
    n_cases: Optional[int] = None,
    seed: int = 0,
    methods: Optional[Sequence[MethodSettings]] = None,
    device: str = "cpu",
    workers: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """Build (or resume) the built-in QA cohort ``name`` into ``out_dir``; returns ``cohort.json``.

    Parameters
    ----------
    name : str
        A key of :data:`QA_COHORTS`.
    n_cases : int, optional
        Default: the cohort's size (:func:`qa_cohort_spec`).
    seed : int
        Cohort seed: case seeds ``QA_SEED_BASE + 1000 * seed + index`` and the severity order.
    methods : sequence of MethodSettings, optional
        Default: the cohort's methods.
    workers : int
        Processes (one torch thread each); cases are independent and seeded, so the result
        does not depend on it.
    """
    from .. import __version__

    if name not in QA_COHORTS:
        raise SegXAIInputError(f"cohort {name!r}: expected one of {', '.join(QA_COHORTS)}")
    spec = QA_COHORTS[name]
    n_cases = spec.cases if n_cases is None else n_cases
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or not 1 <= n_cases <= 1000:
        raise SegXAIInputError(f"n_cases must be an integer in [1, 1000], got {n_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SegXAIInputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SegXAIInputError(f"workers must be a positive integer, got {workers!r}")
    methods = list(spec.methods if methods is None else methods)
    settings = _settings(spec.model, methods, device)
    loaded = load_case_model(settings)
    card = loaded.card
    class_name = card.class_names[1]
    out_dir = check_writable_dir(out_dir)
    identity = {"cohort": name, "seed": seed, "model_checksum": card.checksum(),
                "methods": [m.model_dump() for m in methods], "segxai_version": __version__}
    if spec.version > 1:
        # a changed case design starts a fresh folder instead of resuming the old design's cases
        identity["design_version"] = spec.version
    document = _start_document(out_dir, identity)
    document.update({
        "model": {"name": spec.model, "card_name": card.name, "card_version": card.version,
                  "checksum": card.checksum()},
        "class_name": class_name, "cohort": name, "source": spec.source, "kinds": list(spec.kinds),
        "methods": {m.name: method_record(m, class_name) for m in methods},
        "controls": ["control_intensity"] + [f"control_shuffled:{m.name}" for m in methods],
        "thresholds": N_THRESHOLDS, "seed": seed, "n_cases": n_cases, "device": str(loaded.device),
        "group_by": "phantom" if name != "c3_deepbet" else "transform (one source scan)",
    })
    todo = [(name, index, kind, severity, seed) for index, kind, severity in _plan(name, n_cases, seed)]
    planned = {f"case_{t[1]:03d}" for t in todo}
    document["cases"] = [c for c in document["cases"] if c["case_id"] in planned]
    _run(out_dir, document, todo, _worker_case, workers,
         (spec.model, [m.model_dump() for m in methods], device, False), progress, cancel)
    document["complete"] = True
    _write_index(out_dir, document)
    return out_dir / "cohort.json"


def _user_case(index: int, images: list[str], reference: str) -> tuple[dict, dict]:
    from .steps import read_case_images

    settings, loaded = _WORKER["settings"], _WORKER["loaded"]
    image = read_case_images(images, loaded.card)
    truth = read_image(reference)
    if truth.num_channels != 1 or not truth.same_grid(image):
        raise SegXAIInputError(f"reference {reference}: expected one label map on the grid of {images[0]}")
    class_index = loaded.card.class_names.index(settings.class_name) if settings.class_name else 1
    item = CohortCase(f"case_{index:03d}", f"scan_{index:03d}", "user", float("nan"), image,
                      np.rint(truth.array[0]).astype(np.int64) == class_index,
                      details={"images": images, "reference": reference})
    entry, curves = score_cohort_case(item, loaded, settings, settings.methods)
    entry["severity"] = None
    return entry, curves


def _user_task(_first: int, index: int, images: list[str], reference: str) -> tuple[dict, dict]:
    return _user_case(index, images, reference)


def build_user_cohort(
    out_dir: str | Path,
    model: str,
    images: Sequence[Sequence[str]],
    references: Sequence[str],
    methods: Sequence[MethodSettings],
    device: str = "cpu",
    trust_code: bool = False,
    workers: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """A QA cohort of the user's own cases: any model the runtime loads (card file or folder,
    nnU-Net results folder, bundled name), one image list and one reference label map per case
    (label value = the class index of the model's first foreground class). Each case is its own
    group (one scan each)."""
    from .. import __version__

    if len(images) != len(references) or not images:
        raise SegXAIInputError(f"images / references: expected one reference per case, got {len(images)} case(s) "
                               f"and {len(references)} reference(s)")
    methods = list(methods)
    if not methods:
        raise SegXAIInputError("methods must name at least one attribution method")
    for path in [p for group in images for p in group] + list(references):
        if not Path(path).is_file():
            raise SegXAIInputError(f"{path}: no such file")
    settings = _settings(str(model), methods, device, trust_code)
    loaded = load_case_model(settings)
    card = loaded.card
    class_name = card.class_names[1]
    out_dir = check_writable_dir(out_dir)
    identity = {"cohort": "user", "model_checksum": card.checksum(), "methods": [m.model_dump() for m in methods],
                "images": [[str(Path(p).resolve()) for p in group] for group in images],
                "references": [str(Path(p).resolve()) for p in references], "segxai_version": __version__}
    document = _start_document(out_dir, identity)
    document.update({
        "model": {"name": str(model), "card_name": card.name, "card_version": card.version,
                  "checksum": card.checksum()},
        "class_name": class_name, "cohort": "user", "source": "the user's cases with references",
        "kinds": ["user"], "methods": {m.name: method_record(m, class_name) for m in methods},
        "controls": ["control_intensity"] + [f"control_shuffled:{m.name}" for m in methods],
        "thresholds": N_THRESHOLDS, "n_cases": len(images), "device": str(loaded.device), "group_by": "scan",
    })
    todo = [(index, [str(p) for p in group], str(reference))
            for index, (group, reference) in enumerate(zip(images, references))]
    # the todo rows carry the index second for resuming (see _run)
    todo = [(t[0], t[0], t[1], t[2]) for t in todo]
    _run(out_dir, document, todo, _user_task, workers,
         (str(model), [m.model_dump() for m in methods], device, trust_code), progress, cancel)
    document["complete"] = True
    _write_index(out_dir, document)
    return out_dir / "cohort.json"
