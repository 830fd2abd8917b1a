"""Calibration cohorts for the QA risk model (METHODS.md section 6): degraded cases with a
reference, their predicted masks, saliency maps and Dice.

A cohort folder holds, per case, the predicted mask and one saliency map per attribution
method (NIfTI, on the case's input grid), and ``cohort.json`` / ``cohort.csv`` with each
case's Dice against its reference and how it was made (seed, degradation, method
parameters, model checksum). :func:`calibrate_cohort` (``segxai qa calibrate``) reads it.

Two sources of cases are built in:

* ``lesions``: lesion phantoms (:func:`SegXAILib.phantoms.make_lesion_phantom`) with graded
  degradations and phantom seeds from :data:`COHORT_SEED_BASE` on, disjoint from the bundled
  lesion model's training / held-out seeds and the demo's seed; reference = the phantom's
  lesions.
* ``deepbet``: the bundled real head T1 with graded degradations (:func:`degrade_image`);
  reference = deepbet's own brain mask on the undegraded T1.

Saliency: what ``explain(image, model, method, target="class:<first foreground class>")``
computes (:func:`case_saliency`, one prediction for all methods), its per-channel maps
summed into one map (the voxel's total attribution; a channel sum does
not change single-channel maps). Guided methods run with ``aggregation="target"`` (one
modified backward of the summed target) unless asked otherwise: paper 000's per-voxel sum is
exact but costs one backward per predicted voxel (minutes per case on a CPU).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..image import Image, SegXAIInputError
from ..io import atomic_path, check_writable_dir, read_image, write_image
from ..metrics import dice_score
from ..progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = [
    "COHORT_FORMAT",
    "COHORT_VERSION",
    "COHORT_SEED_BASE",
    "COHORT_MODELS",
    "Degradation",
    "DegradationGrid",
    "LESION_GRID",
    "DEEPBET_GRID",
    "CasePlan",
    "plan_cases",
    "motion_blur",
    "degrade_image",
    "MethodSpec",
    "default_methods",
    "method_record",
    "resolve_qa_model",
    "case_saliency",
    "build_cohort",
    "read_cohort",
    "cohort_curves",
    "calibrate_cohort",
    "ScoredCase",
    "score_case",
    "bundled_risk_model",
]

COHORT_FORMAT = "segxai-qa-cohort"
COHORT_VERSION = 1
#: First phantom seed of a cohort: above the lesion model's training (0-47) and held-out
#: (1000-1003) seeds and the demo's seed (2026).
COHORT_SEED_BASE = 10_000
#: Built-in case sources (``--model`` of ``segxai qa cohort``)
COHORT_MODELS = ("lesions", "deepbet")
#: How the per-channel maps become one saliency map
CHANNEL_REDUCTION = "sum"


# ---------------------------------------------------------------------------- degradations


@dataclass(frozen=True)
class Degradation:
    """Image degradations of one case (all 0 / 1 = none).

    Attributes
    ----------
    noise : float
        Gaussian noise sigma as a fraction of each channel's intensity range.
    bias_field : float
        Strength of a smooth multiplicative bias field ``exp(bias_field * s)``, ``|s| <= 1``.
    lesion_contrast : float
        Lesion contrast scale (lesion phantoms only; 1 = clear).
    resolution_factor : float
        >= 1: resampled onto a grid this many times coarser and back.
    blur_mm : float
        Gaussian blur sigma in mm.
    motion_mm : float
        Length in mm of a linear motion smear along one random axis (:func:`motion_blur`).
    """

    noise: float = 0.0
    bias_field: float = 0.0
    lesion_contrast: float = 1.0
    resolution_factor: float = 1.0
    blur_mm: float = 0.0
    motion_mm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise", "bias_field", "lesion_contrast", "blur_mm", "motion_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SegXAIInputError(f"degradation {name} must be a finite number >= 0, got {value!r}")
        value = self.resolution_factor
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise SegXAIInputError(f"degradation resolution_factor must be a finite number >= 1, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


#: Degradation kinds: one parameter graded from the grid's clean to its worst value, or all
DEGRADATION_KINDS = ("noise", "bias_field", "lesion_contrast", "resolution_factor", "blur_mm", "motion_mm", "combined")


@dataclass(frozen=True)
class DegradationGrid:
    """Graded degradations: ``kind`` at ``severity`` in [0, 1] interpolates one parameter
    linearly from ``clean`` to ``worst`` (``combined``: every parameter at
    ``combined_scale * severity``)."""

    clean: Degradation
    worst: Degradation
    kinds: tuple[str, ...]
    combined_scale: float = 0.6

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in DEGRADATION_KINDS]
        if unknown or not self.kinds:
            raise SegXAIInputError(f"degradation kinds must be among {DEGRADATION_KINDS}, got {self.kinds!r}")

    def degradation(self, kind: str, severity: float) -> Degradation:
        if kind not in self.kinds:
            raise SegXAIInputError(f"degradation kind {kind!r} is not in this grid's kinds {self.kinds}")
        if not 0.0 <= severity <= 1.0:
            raise SegXAIInputError(f"severity must be in [0, 1], got {severity!r}")
        clean, worst = self.clean.to_dict(), self.worst.to_dict()
        names = list(clean) if kind == "combined" else [kind]
        weight = severity * (self.combined_scale if kind == "combined" else 1.0)
        changes = {name: clean[name] + weight * (worst[name] - clean[name]) for name in names}
        return replace(self.clean, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"clean": self.clean.to_dict(), "worst": self.worst.to_dict(), "kinds": list(self.kinds),
                "combined_scale": self.combined_scale}


#: Lesion phantoms: clean = make_lesion_phantom's defaults; worst values chosen so that the
#: hardest cases lose most lesions (measured Dice spread in Testing/Benchmarks/results/qa_auroc.md)
LESION_GRID = DegradationGrid(
    clean=Degradation(noise=0.03, bias_field=0.2, lesion_contrast=1.0, resolution_factor=1.0, blur_mm=0.0, motion_mm=0.0),
    worst=Degradation(noise=0.35, bias_field=1.2, lesion_contrast=0.2, resolution_factor=4.0, blur_mm=5.0, motion_mm=24.0),
    kinds=DEGRADATION_KINDS,
    combined_scale=0.35,
)

#: The real T1 for deepbet (no lesions): the scan as it is, up to a heavily degraded one
DEEPBET_GRID = DegradationGrid(
    clean=Degradation(),
    worst=Degradation(noise=1.5, bias_field=2.5, resolution_factor=6.0, blur_mm=10.0, motion_mm=60.0),
    kinds=("noise", "bias_field", "resolution_factor", "blur_mm", "motion_mm", "combined"),
    combined_scale=0.8,
)


@dataclass(frozen=True)
class CasePlan:
    """One cohort case: its id, seed, degradation kind and severity, and the degradation."""

    case_id: str
    seed: int
    kind: str
    severity: float
    degradation: Degradation


def plan_cases(n_cases: int, grid: DegradationGrid, seed: int = 0, seed_base: int = COHORT_SEED_BASE) -> list[CasePlan]:
    """``n_cases`` cases: severities evenly spaced on [0, 1] (shuffled by ``seed``), kinds in turn.

    Case ``i`` gets phantom / noise seed ``seed_base + 1000 * seed + i``, so cohorts built with
    different ``seed`` use disjoint case seeds (for up to 1000 cases).
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise SegXAIInputError(f"n_cases must be a positive integer, got {n_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegXAIInputError(f"seed must be a non-negative integer, got {seed!r}")
    if n_cases > 1000:
        raise SegXAIInputError(f"n_cases must be at most 1000, got {n_cases}")
    severities = np.linspace(0.0, 1.0, n_cases) if n_cases > 1 else np.array([0.5])
    severities = np.random.default_rng(seed).permutation(severities)
    plans = []
    for i in range(n_cases):
        kind = grid.kinds[i % len(grid.kinds)]
        severity = float(round(severities[i], 6))
        plans.append(CasePlan(f"case_{i:03d}", int(seed_base + 1000 * seed + i), kind, severity,
                              grid.degradation(kind, severity)))
    return plans


def motion_blur(volume: np.ndarray, length_mm: float, spacing: Sequence[float], axis: int) -> np.ndarray:
    """Linear motion smear: the mean of the volume shifted uniformly over ``length_mm`` along ``axis``.

    Parameters
    ----------
    volume : ndarray, shape (I, J, K)
    length_mm : float
        Travel of the motion; 0 returns a copy.
    spacing : (3,) mm
    axis : int
        0, 1 or 2.
    """
    if length_mm <= 0:
        return np.array(volume, copy=True)
    size = int(round(length_mm / float(spacing[axis])))
    if size < 2:
        return np.array(volume, copy=True)
    return ndimage.uniform_filter1d(np.asarray(volume, dtype=np.float64), size=size, axis=axis, mode="nearest")


def degrade_image(image: Image, degradation: Degradation, seed: int) -> Image:
    """Degrade every channel of ``image`` (same grid): bias field, coarser resolution, blur,
    motion, then noise (the order of :func:`make_lesion_phantom`, motion after blur).

    ``lesion_contrast`` is ignored (there are no lesions to fade). The bias field, the motion
    axis and the noise come from ``seed`` only.
    """
    from ..phantoms.lesions import _BIAS_CONTROL_POINTS, _coarsen, _smooth_random_field

    bias_rng, motion_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    shape = image.spatial_shape
    spacing = image.spacing
    axis = int(motion_rng.integers(3))
    bias = None
    if degradation.bias_field > 0:
        bias = np.exp(degradation.bias_field * _smooth_random_field(bias_rng, shape, (_BIAS_CONTROL_POINTS,) * 3))
    channels = []
    for clean in image.array.astype(np.float64):
        value_range = float(clean.max() - clean.min())
        volume = clean * bias if bias is not None else clean.copy()
        volume = _coarsen(volume, degradation.resolution_factor)
        if degradation.blur_mm > 0:
            volume = ndimage.gaussian_filter(volume, sigma=degradation.blur_mm / spacing, mode="nearest")
        volume = motion_blur(volume, degradation.motion_mm, spacing, axis)
        if degradation.noise > 0:
            volume = volume + noise_rng.normal(0.0, degradation.noise * value_range, size=shape)
        channels.append(volume.astype(np.float32))
    return image.with_array(np.stack(channels), image.channel_names)


# ---------------------------------------------------------------------------- methods, models


@dataclass(frozen=True)
class MethodSpec:
    """An attribution method and its parameters (as ``explain`` takes them)."""

    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """``NAME`` or ``NAME:k=v,k=v`` (values parsed by the method's parameter types)."""
        from ..attribution import get_method, parse_params

        name, _, rest = text.partition(":")
        get_method(name)  # unknown method: SegXAIInputError naming it
        params = parse_params(name, [p for p in rest.split(",") if p]) if rest else {}
        return cls(name, params)


def default_methods(model: str) -> list[MethodSpec]:
    """The methods a cohort gets by default: guided Grad-CAM first (paper 000's best).

    deepbet is TorchScript: module hooks (Grad-CAM) and backward rules (guided backprop) do
    not run on it, so it gets the gradient family only.
    """
    if model == "deepbet":
        return [MethodSpec("vanilla_gradient"), MethodSpec("gradient_x_input")]
    return [
        MethodSpec("guided_gradcam", {"aggregation": "target"}),
        MethodSpec("gradcam_plusplus"),
        MethodSpec("guided_backprop", {"aggregation": "target"}),
        MethodSpec("smoothgrad", {"n_samples": 3, "seed": 0}),
    ]


def resolve_qa_model(model: str | Path):
    """A model card: ``deepbet`` (its first stage, :func:`deepbet_model_card`), a bundled name
    or a card file / folder (:func:`SegXAILib.pipeline.resolve_model_card`)."""
    if str(model) == "deepbet":
        from ..models.third_party import deepbet_model_card

        return deepbet_model_card()
    from ..pipeline import resolve_model_card

    return resolve_model_card(model)


def method_record(spec: MethodSpec, class_name: str) -> dict[str, Any]:
    """What identifies how a saliency map was made; stored in the cohort and the risk model
    (``method_parameters``) and compared again when a case is scored."""
    from ..attribution import get_method

    method_class = get_method(spec.name)
    defaults = {p.name: p.default for p in method_class.parameters}
    params = {**defaults, **spec.params}
    params = json.loads(json.dumps(params, default=str))
    return {"params": params, "target": f"class:{class_name}", "channel_reduction": CHANNEL_REDUCTION}


def case_saliency(
    image: Image,
    model,
    methods: Sequence[MethodSpec],
    class_name: str,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    timings: Optional[dict[str, float]] = None,
) -> dict[str, np.ndarray]:
    """One-channel saliency maps ``(I, J, K)`` of a case on its input grid, one per method.

    What :func:`SegXAILib.attribution.explain` computes with ``target="class:<class_name>"``
    (the same preprocessing, target and method classes), with the prediction that resolves
    the target run once for all methods; each method's per-channel maps are summed.
    ``timings``, when given, receives each method's seconds.
    """
    import torch

    from ..attribution.api import TargetSpec, _resolve_target
    from ..attribution.forward import SegmentationForward
    from ..attribution.registry import get_method
    from ..models.inference import activate
    from ..models.preprocessing import model_input, to_input_grid
    from ..models.windows import WindowedForward

    card, device = model.card, model.device
    amp = device.type == "cuda"
    x, model_affine = model_input(image, card, device)
    with torch.no_grad():
        logits = WindowedForward(model.network, card, x.shape[2:], amp=amp)(x)
        labels = activate(logits, card)[0].argmax(0).cpu()
    target = _resolve_target(TargetSpec("class", class_name=class_name), image, model, x, model_affine, labels)
    forward = SegmentationForward(model.network, card, x.shape[2:], target, amp=amp)
    maps = {}
    for position, spec in enumerate(methods):
        if cancel is not None:
            cancel.raise_if_cancelled()
        start = time.perf_counter()
        attribution = get_method(spec.name)(forward).attribute(
            x, progress=sub_progress(progress, position / len(methods), (position + 1) / len(methods)),
            cancel=cancel, **dict(spec.params),
        )
        values = attribution[0].detach().float().cpu().numpy()
        mapped = to_input_grid(values, model_affine, image, tuple(image.channel_names))
        maps[spec.name] = mapped.array.astype(np.float64).sum(axis=0).astype(np.float32)
        if timings is not None:
            timings[spec.name] = time.perf_counter() - start
    return maps


# ---------------------------------------------------------------------------- building


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
    methods: Optional[Sequence[MethodSpec]] = None,
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
    methods : sequence of MethodSpec, optional
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
    from ..models import load_model, segment
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
    card = resolve_qa_model(model)
    loaded = load_model(card, device=device)
    class_name = card.class_names[1]
    head = load_sample_head()

    reference_mask = None
    if model == "deepbet":
        report(progress, 0.0, "deepbet on the undegraded T1 (the reference)")
        reference_mask = segment(head.t1, loaded, cancel=cancel).mask(1)
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
            {"kind": "degraded_sample_t1", "function": "SegXAILib.topology.cohort.degrade_image",
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
        segmentation = segment(image, loaded, cancel=cancel)
        prediction = segmentation.mask(1)
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
            maps = case_saliency(image, loaded, methods, class_name, progress=sub_progress(step, 0.2, 1.0),
                                 cancel=cancel, timings=timings)
            for spec in methods:
                name = f"saliency_{spec.name}.nii.gz"
                write_image(image.with_array(maps[spec.name][None], (spec.name,)), case_dir / name)
                entry["files"]["saliency"][spec.name] = f"cases/{plan.case_id}/{name}"
        entry["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        document["cases"].append(entry)
        _write_index(out_dir, document)
        report(step, 1.0, f"{plan.case_id}: Dice {entry['dice']:.3f}")
    document["complete"] = True
    _write_index(out_dir, document)
    report(progress, 1.0, "done")
    return out_dir / "cohort.json"


# ---------------------------------------------------------------------------- reading, calibrating


def read_cohort(cohort_dir: str | Path) -> dict[str, Any]:
    """Read and check ``cohort.json`` of a cohort folder (errors name the file and field)."""
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / "cohort.json"
    if not cohort_dir.is_dir():
        raise SegXAIInputError(f"cohort_dir {cohort_dir}: no such folder")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SegXAIInputError(f"cohort {path}: cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegXAIInputError(f"cohort {path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != COHORT_FORMAT:
        raise SegXAIInputError(f"cohort {path}: field 'format' must be {COHORT_FORMAT!r}")
    if document.get("version") != COHORT_VERSION:
        raise SegXAIInputError(f"cohort {path}: field 'version' must be {COHORT_VERSION}, got {document.get('version')!r}")
    for name, kind in (("model", dict), ("methods", dict), ("cases", list), ("class_name", str)):
        if not isinstance(document.get(name), kind):
            raise SegXAIInputError(f"cohort {path}: field {name!r} is missing or not a {kind.__name__}")
    if not isinstance(document["model"].get("checksum"), str):
        raise SegXAIInputError(f"cohort {path}: field 'model.checksum' is missing")
    for case in document["cases"]:
        if not isinstance(case, dict) or not isinstance(case.get("dice"), (int, float)) or "status" not in case:
            raise SegXAIInputError(f"cohort {path}: every case needs 'dice' and 'status'")
    return document


def cohort_curves(
    cohort_dir: str | Path,
    method: str,
    thresholds: np.ndarray,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """EC curves of every usable case of a cohort for ``method``.

    Returns
    -------
    curves : ndarray, shape (N, T)
    dice : ndarray, shape (N,)
    case_ids : list of str, length N
    document : dict
        The cohort's ``cohort.json``.
    """
    from .risk import saliency_curve

    cohort_dir = Path(cohort_dir)
    document = read_cohort(cohort_dir)
    if method not in document["methods"]:
        raise SegXAIInputError(
            f"method {method!r}: the cohort {cohort_dir} has saliency maps for {sorted(document['methods'])}"
        )
    usable = [c for c in document["cases"] if c["status"] == "ok"]
    curves, dice, ids = [], [], []
    for index, case in enumerate(usable):
        if cancel is not None:
            cancel.raise_if_cancelled()
        try:
            mask_path = cohort_dir / case["files"]["mask"]
            saliency_path = cohort_dir / case["files"]["saliency"][method]
        except (KeyError, TypeError):
            raise SegXAIInputError(f"cohort {cohort_dir}: case {case.get('case_id')!r} lists no {method} map") from None
        mask = read_image(mask_path)
        saliency = read_image(saliency_path)
        if not mask.same_grid(saliency):
            raise SegXAIInputError(f"cohort case {case['case_id']}: {saliency_path.name} is not on the mask's grid")
        curves.append(saliency_curve(saliency.array[0], mask.array[0] > 0, thresholds))
        dice.append(float(case["dice"]))
        ids.append(str(case["case_id"]))
        report(progress, (index + 1) / max(1, len(usable)), f"EC curve {case['case_id']}")
    if not curves:
        raise SegXAIInputError(f"cohort {cohort_dir}: no case with a non-empty prediction")
    return np.asarray(curves, dtype=np.float64), np.asarray(dice), ids, document


def calibrate_cohort(
    cohort_dir: str | Path,
    method: str,
    n_thresholds: int = 100,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    **options: Any,
):
    """Calibrate a :class:`~SegXAILib.topology.risk.RiskModel` from a cohort folder.

    ``options`` go to :func:`~SegXAILib.topology.risk.calibrate_risk_model`
    (``insufficient_quantile``, ``sensitivity_target``, ``specificity_target``, ``cv_folds``,
    ``seed``, ``n_components``). Returns ``(model, curves, dice, case_ids)``.
    """
    from .euler import default_thresholds
    from .risk import calibrate_risk_model

    thresholds = default_thresholds(n_thresholds)
    curves, dice, ids, document = cohort_curves(cohort_dir, method, thresholds, progress, cancel)
    model = calibrate_risk_model(
        curves, dice, thresholds, method, document["methods"][method], document["model"]["checksum"], **options
    )
    return model, curves, dice, ids



# ---------------------------------------------------------------------------- scoring a case


@dataclass
class ScoredCase:
    """A case scored by a risk model.

    Attributes
    ----------
    result : dict
        :meth:`RiskModel.score`'s ``pc1``, ``band``, ``estimated_dice``, ``insufficient_probability``.
    curve : ndarray, shape (T,)
        The case's EC curve on the risk model's grid.
    mask : ndarray of bool, shape (I, J, K)
        The predicted structure on the input grid.
    saliency : ndarray, shape (I, J, K), float32
        The saliency map (channel sum) on the input grid.
    """

    result: dict
    curve: np.ndarray
    mask: np.ndarray
    saliency: np.ndarray


def _risk_class_name(risk, card) -> str:
    target = risk.method_parameters.get("target", "")
    kind, _, name = str(target).partition(":")
    if kind != "class" or not name:
        raise SegXAIInputError(f"risk model: method_parameters.target must be 'class:NAME', got {target!r}")
    if name not in card.class_names[1:]:
        raise SegXAIInputError(f"risk model target class {name!r}: the model's foreground classes are {card.class_names[1:]}")
    return name


def score_case(
    image: Image,
    model,
    risk,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> ScoredCase:
    """Segment ``image`` with ``model``, make the risk model's saliency map and score the contour.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, channels in the card's order.
    model : LoadedModel
        Must be the model the risk model was calibrated for (card checksum).
    risk : RiskModel

    Raises
    ------
    SegXAIInputError
        Another model (checked before any work), a method record that does not match, or an
        empty prediction (nothing to score).
    """
    from ..models import segment
    from .risk import saliency_curve

    card = model.card
    if card.checksum() != risk.model_checksum:
        raise SegXAIInputError(
            f"risk model was calibrated for model checksum {risk.model_checksum!r}, the model "
            f"{card.name!r} has {card.checksum()!r}"
        )
    class_name = _risk_class_name(risk, card)
    params = risk.method_parameters.get("params")
    if not isinstance(params, dict):
        raise SegXAIInputError("risk model: method_parameters.params must be an object")
    spec = MethodSpec(risk.method, dict(params))
    record = method_record(spec, class_name)
    report(progress, 0.0, "segmenting")
    segmentation = segment(image, model, progress=sub_progress(progress, 0.0, 0.2), cancel=cancel)
    mask = segmentation.mask(card.class_names.index(class_name))
    if not mask.any():
        raise SegXAIInputError(f"the model predicts no {class_name!r} voxel in this image: no contour to score")
    saliency = case_saliency(image, model, [spec], class_name, progress=sub_progress(progress, 0.2, 0.95),
                             cancel=cancel)[spec.name]
    curve = saliency_curve(saliency, mask, risk.thresholds)
    result = risk.score(curve, spec.name, card.checksum(), method_parameters=record)
    report(progress, 1.0, f"{result['band']} risk")
    return ScoredCase(result=result, curve=curve, mask=mask, saliency=saliency)


def bundled_risk_model(name: str = "lesions", method: str = "guided_gradcam") -> Path:
    """Path of a shipped risk model, ``Resources/Models/<name>/risk_<method>.json``."""
    from ..sample_data import resources_dir

    path = resources_dir() / "Models" / name / f"risk_{method}.json"
    if not path.is_file():
        raise SegXAIInputError(f"no shipped risk model {path}")
    return path
