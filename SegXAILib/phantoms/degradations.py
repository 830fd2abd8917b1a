"""Image degradations for QA calibration cohorts: graded noise, bias field, lesion contrast,
resolution, blur and motion (METHODS.md section 6), and the plan of a cohort's cases.

The lesion phantoms (:func:`~SegXAILib.phantoms.make_lesion_phantom`) take most of these as
arguments; :func:`degrade_image` applies them to any image (the deepbet cohort's real T1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..image import Image, SegXAIInputError

__all__ = [
    "COHORT_SEED_BASE",
    "Degradation",
    "DegradationGrid",
    "LESION_GRID",
    "DEEPBET_GRID",
    "CasePlan",
    "plan_cases",
    "motion_blur",
    "degrade_image",
]

#: First phantom seed of a cohort: above the lesion model's training (0-47) and held-out
#: (1000-1003) seeds and the demo's seed (2026).
COHORT_SEED_BASE = 10_000


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


