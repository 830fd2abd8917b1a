"""Evaluation metrics of attribution maps for 3D segmentation targets (papers 002, 003;
METHODS section 5).

Every metric works on the model grid: ``inputs`` ``(1, C, D, H, W)`` (preprocessed), an
``attribution`` of the same shape, and, where the model is perturbed, the
:class:`~SegXAILib.attribution.SegmentationForward` that binds the model to the target. A
*voxel* is a spatial position: the channels of a map are reduced by :func:`spatial_map`
(sum of the signed values, or of the absolute values), and masking a voxel sets all its
input channels to the baseline.

``variant`` is ``"signed"`` (rank / threshold the signed values: evidence for the target
first, counter-evidence last) or ``"absolute"`` (rank by magnitude), the two columns of paper
002's tables.

=========================  ======================================================  ==========
metric                     definition                                              better
=========================  ======================================================  ==========
fidelity (002)             area between the LiF and MiF curves, 2.5 % steps        larger
pointing AUC (002)         ROC-AUC of the map against a reference mask             larger
region Dice (002, XRAI)    max Dice of the top-ranked SLIC supervoxels             larger
faithfulness (003)         Pearson(sum_S a, T(x) - T(x_S)) over random subsets S   larger
sensitivity (003)          relative change of the normalised map under noise       smaller
complexity (003)           share of voxels above 0.1 of the max |a|                smaller
efficiency (003)           seconds per map (device, volume size)                   smaller
randomisation (Adebayo)    similarity to the map of a randomised model             smaller
=========================  ======================================================  ==========
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..attribution.base import batched
from ..attribution.forward import SegmentationForward
from ..image import SegXAIInputError
from ..metrics import dice_score
from ..models.inference import activate, class_masks
from ..progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = [
    "VARIANTS",
    "spatial_map",
    "normalise",
    "ranking",
    "FidelityCurves",
    "fidelity",
    "pointing_auc",
    "pointing_roc",
    "slic_regions",
    "RegionDice",
    "region_dice",
    "faithfulness_correlation",
    "sensitivity",
    "noisy_attributions",
    "sensitivity_of",
    "complexity",
    "timed",
    "randomisation_similarity",
    "FIDELITY_FRACTIONS",
    "REGION_FRACTIONS",
]

VARIANTS = ("signed", "absolute")

#: 0 %, 2.5 %, ..., 100 % (paper 002)
FIDELITY_FRACTIONS = np.round(np.arange(41) * 0.025, 6)

#: shares of the volume kept in the region-overlap curve (paper 002 plots 1-100 %, log scale)
REGION_FRACTIONS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)

# numpy >= 2 renamed trapz
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise SegXAIInputError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


def _as_numpy(values: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def spatial_map(attribution: Union[np.ndarray, torch.Tensor], variant: str = "absolute") -> np.ndarray:
    """``(D, H, W)`` from a map ``(1, C, D, H, W)``, ``(C, D, H, W)`` or ``(D, H, W)``: the sum
    over channels of the signed values (``signed``) or of their magnitudes (``absolute``)."""
    _check_variant(variant)
    values = _as_numpy(attribution)
    if values.ndim == 5:
        if values.shape[0] != 1:
            raise SegXAIInputError(f"attribution: expected one map (1, C, D, H, W), got {values.shape}")
        values = values[0]
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4:
        raise SegXAIInputError(f"attribution: expected (C, D, H, W) or (D, H, W), got shape {values.shape}")
    return np.abs(values).sum(0) if variant == "absolute" else values.sum(0)


def normalise(values: np.ndarray, variant: str = "absolute") -> np.ndarray:
    """Onto [0, 1]: ``|a| / max |a|`` (absolute) or ``(a - min) / (max - min)`` (signed);
    a constant map becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    if _check_variant(variant) == "absolute":
        values = np.abs(values)
        peak = values.max() if values.size else 0.0
        return values / peak if peak > 0 else np.zeros_like(values)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def ranking(values: np.ndarray, seed: Optional[int] = 0) -> np.ndarray:
    """Flat voxel indices from the largest value to the smallest; ties in random (seeded)
    order, so that a map with large constant areas (e.g. zero gradient outside the receptive
    field) is not ranked in raster order."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    tie_break = np.random.default_rng(0 if seed is None else int(seed)).random(flat.size)
    return np.lexsort((tie_break, -flat))


# ---- fidelity (002) -----------------------------------------------------------------------------
@dataclass
class FidelityCurves:
    """MiF / LiF curves: the model's score after masking a share of the voxels, most important
    first / least important first; ``area`` = integral of (LiF - MiF) over the share."""

    fractions: np.ndarray
    mif: np.ndarray
    lif: np.ndarray
    score: str
    variant: str

    @property
    def area(self) -> float:
        return float(_trapezoid(self.lif - self.mif, self.fractions))

    def to_dict(self) -> dict[str, Any]:
        return {"area": self.area, "score": self.score, "variant": self.variant,
                "fractions": [float(f) for f in self.fractions], "mif": [float(v) for v in self.mif],
                "lif": [float(v) for v in self.lif]}


def _masked_batch(inputs: torch.Tensor, fill: torch.Tensor, order: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """One volume per count: the first ``count`` voxels of ``order`` (flat spatial indices) at
    the baseline, in every channel."""
    spatial = inputs.shape[2:]
    n = int(np.prod(spatial))
    rank_of = torch.empty(n, dtype=torch.int64, device=inputs.device)
    rank_of[order] = torch.arange(n, device=inputs.device)
    limits = torch.as_tensor(list(counts), device=inputs.device).view(-1, 1)
    masked = (rank_of.view(1, -1) < limits).view(len(counts), 1, *spatial)
    return torch.where(masked, fill, inputs)


class _Scorer:
    """The model's score of perturbed inputs: ``target`` = T normalised so that the clean input
    scores 1 and the fully masked input 0; ``dice`` = Dice of the predicted class mask (every
    window) against the clean prediction's."""

    def __init__(self, forward: SegmentationForward, inputs: torch.Tensor, fill: torch.Tensor, score: str):
        if score not in ("target", "dice"):
            raise SegXAIInputError(f"score: expected target or dice, got {score!r}")
        self.forward, self.score = forward, score
        self.class_index = forward.target.class_index
        with torch.no_grad():
            if score == "dice":
                self.reference = self._masks(inputs)[0]
            else:
                clean, empty = forward(torch.cat([inputs, fill])).double().cpu().numpy()
                self.offset = float(empty)
                self.scale = float(clean - empty) if abs(clean - empty) > 1e-12 else 1.0

    def _masks(self, batch: torch.Tensor) -> np.ndarray:
        logits = self.forward.windowed(batch, None, self.forward.window_batch)
        # the class's predicted mask (probability > 0.5 for a sigmoid model: structures may overlap)
        probabilities = activate(logits, self.forward.card)
        return torch.stack([class_masks(p, self.forward.card)[self.class_index] for p in probabilities]).cpu().numpy()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            if self.score == "dice":
                return np.array([dice_score(mask, self.reference) for mask in self._masks(batch)])
            return (self.forward(batch).double().cpu().numpy() - self.offset) / self.scale


def fidelity(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    attribution: Union[np.ndarray, torch.Tensor],
    variant: str = "absolute",
    baseline: float = 0.0,
    score: str = "target",
    fractions: Sequence[float] = tuple(FIDELITY_FRACTIONS),
    batch_size: int = 8,
    seed: Optional[int] = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> FidelityCurves:
    """Paper 002's fidelity: MiF and LiF perturbation curves and the area between them.

    Voxels are ranked by :func:`spatial_map` (``variant``); for every share q in ``fractions``
    the top (MiF) or bottom (LiF) ``round(q N)`` voxels are set to ``baseline`` and the
    model is scored (``score``: ``target`` or ``dice``, see :class:`_Scorer`). A faithful map
    makes MiF fall fast and LiF stay high: a large positive area. A random ranking gives
    MiF ~ LiF: area ~ 0.
    """
    values = spatial_map(attribution, variant)
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size < 2 or np.any(np.diff(fractions) <= 0) or fractions[0] < 0 or fractions[-1] > 1:
        raise SegXAIInputError("fractions: expected an increasing sequence of shares in [0, 1]")
    n = values.size
    order = torch.as_tensor(ranking(values, seed), device=inputs.device)
    fill = torch.full_like(inputs, float(baseline))
    scorer = _Scorer(forward, inputs, fill, score)
    counts = [int(round(q * n)) for q in fractions]
    # (curve, step) jobs; the LiF order is the reversed ranking
    jobs = [(0, k) for k in range(len(counts))] + [(1, k) for k in range(len(counts))]
    results = np.zeros((2, len(counts)))
    orders = (order, torch.flip(order, dims=(0,)))
    for chunk in batched(len(jobs), batch_size, progress, cancel, "fidelity"):
        parts = [_masked_batch(inputs, fill, orders[jobs[j][0]], [counts[jobs[j][1]]]) for j in chunk]
        scores = scorer(torch.cat(parts))
        for j, value in zip(chunk, scores):
            results[jobs[j]] = value
    return FidelityCurves(fractions, results[0], results[1], score, variant)


# ---- pointing (002) -----------------------------------------------------------------------------
def _reference_mask(reference, shape) -> np.ndarray:
    mask = _as_numpy(reference) > 0
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != tuple(shape):
        raise SegXAIInputError(f"reference: mask shape {mask.shape} differs from the map's {tuple(shape)}")
    if not mask.any() or mask.all():
        raise SegXAIInputError("reference: the mask must contain both relevant and other voxels")
    return mask


def pointing_auc(attribution, reference, variant: str = "absolute") -> float:
    """ROC-AUC of the voxel map as a detector of the ``reference`` mask's voxels
    (:func:`sklearn.metrics.roc_auc_score`): the probability that a reference voxel outranks an
    outside voxel (ties count one half), i.e. the Mann-Whitney U / (n1 n0).

    Raises :class:`SegXAIInputError` when the mask holds one class only (the AUC is undefined;
    scikit-learn would raise a ``ValueError``)."""
    from sklearn.metrics import roc_auc_score

    values = spatial_map(attribution, variant)
    mask = _reference_mask(reference, values.shape)
    return float(roc_auc_score(mask.ravel(), values.ravel()))


def pointing_roc(attribution, reference, variant: str = "absolute", thresholds: int = 101
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paper 002's ROC: at thresholds ``t`` in ``linspace(0, 1, thresholds)`` on the
    normalised map (:func:`normalise`), TPR and FPR of ``map >= t`` against the reference.
    Returns ``(thresholds, fpr, tpr)``, each shape ``(thresholds,)``; average TPR / FPR over
    cases, then integrate (:func:`roc_area`).

    The points are read off :func:`sklearn.metrics.roc_curve` (one point per distinct value):
    the point of ``t`` is that of the smallest value ``>= t``, which flags the same voxels."""
    from sklearn.metrics import roc_curve

    values = normalise(spatial_map(attribution, variant), variant)
    mask = _reference_mask(reference, values.shape)
    steps = np.linspace(0.0, 1.0, int(thresholds))
    fpr, tpr, cuts = roc_curve(mask.ravel(), values.ravel(), drop_intermediate=False)
    # cuts decrease from +inf (nothing flagged): the last cut >= t; never before index 0
    index = np.searchsorted(-cuts, -steps, side="right") - 1
    return steps, fpr[index], tpr[index]


def roc_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area (:func:`sklearn.metrics.auc`) under a ROC given at any order of FPR
    (e.g. a threshold sweep, FPR decreasing), closed at (0, 0) and (1, 1)."""
    from sklearn.metrics import auc

    order = np.argsort(fpr, kind="stable")
    x = np.concatenate([[0.0], np.asarray(fpr, dtype=np.float64)[order], [1.0]])
    y = np.concatenate([[0.0], np.asarray(tpr, dtype=np.float64)[order], [1.0]])
    return float(auc(x, y))


# ---- region overlap (002, XRAI-style) ----------------------------------------------------------
def slic_regions(image: Union[np.ndarray, torch.Tensor], n_segments: int = 200, compactness: float = 0.1,
                 spacing: Optional[Sequence[float]] = None, seed: Optional[int] = 0) -> np.ndarray:
    """SLIC supervoxels ``(D, H, W)`` (labels 0..R-1) of an image ``(C, D, H, W)`` or
    ``(1, C, D, H, W)`` with scikit-image's 3D ``slic`` (channels as features; each channel
    scaled to [0, 1] so that ``compactness`` means the same for every modality)."""
    from skimage.segmentation import slic

    volume = _as_numpy(image)
    if volume.ndim == 5:
        volume = volume[0]
    if volume.ndim == 3:
        volume = volume[None]
    low = volume.reshape(volume.shape[0], -1).min(1)[:, None, None, None]
    high = volume.reshape(volume.shape[0], -1).max(1)[:, None, None, None]
    scaled = (volume - low) / np.where(high > low, high - low, 1.0)
    del seed  # slic is deterministic (grid seeding); kept for a uniform signature
    labels = slic(np.moveaxis(scaled, 0, -1), n_segments=int(n_segments), compactness=float(compactness),
                  channel_axis=-1, start_label=0, spacing=None if spacing is None else np.asarray(spacing, float),
                  enforce_connectivity=True)
    _, relabelled = np.unique(labels, return_inverse=True)
    return relabelled.reshape(labels.shape)


@dataclass
class RegionDice:
    """Dice of the top-ranked regions against the reference, per kept share of the volume."""

    fractions: np.ndarray
    dice: np.ndarray
    n_regions: int
    variant: str

    @property
    def maximum(self) -> float:
        return float(self.dice.max())

    @property
    def best_fraction(self) -> float:
        return float(self.fractions[int(np.argmax(self.dice))])

    def to_dict(self) -> dict[str, Any]:
        return {"max": self.maximum, "best_fraction": self.best_fraction, "n_regions": self.n_regions,
                "variant": self.variant, "fractions": [float(f) for f in self.fractions],
                "dice": [float(d) for d in self.dice]}


def region_dice(attribution, reference, regions: np.ndarray, variant: str = "absolute",
                fractions: Sequence[float] = REGION_FRACTIONS) -> RegionDice:
    """Paper 002's XRAI-style overlap: rank ``regions`` (a label map, e.g. :func:`slic_regions`)
    by their mean :func:`spatial_map` value; for each share q keep the smallest prefix of
    the ranking covering at least q of the volume; Dice of that set against ``reference``."""
    values = spatial_map(attribution, variant)
    mask = _reference_mask(reference, values.shape)
    regions = np.asarray(regions)
    if regions.shape != values.shape:
        raise SegXAIInputError(f"regions: shape {regions.shape} differs from the map's {values.shape}")
    _, flat = np.unique(regions.ravel(), return_inverse=True)
    count = flat.max() + 1
    sizes = np.bincount(flat, minlength=count)
    means = np.bincount(flat, weights=values.ravel(), minlength=count) / sizes
    order = np.lexsort((np.arange(count), -means))
    cumulative = np.cumsum(sizes[order])
    dice = []
    for q in fractions:
        kept = order[: int(np.searchsorted(cumulative, q * values.size - 1e-9)) + 1]
        selected = np.isin(flat, kept).reshape(values.shape)
        dice.append(dice_score(selected, mask))
    return RegionDice(np.asarray(fractions, float), np.asarray(dice), int(count), variant)


# ---- faithfulness correlation (003) ------------------------------------------------------------
def faithfulness_correlation(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    attribution,
    variant: str = "signed",
    n_subsets: int = 100,
    subset_fraction: float = 0.01,
    baseline: float = 0.0,
    batch_size: int = 8,
    seed: Optional[int] = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> float:
    """Pearson correlation over ``n_subsets`` random voxel subsets S (each ``subset_fraction``
    of the volume) between ``sum_{i in S} a_i`` and ``T(x) - T(x with S at the baseline)``
    (paper 003, eq. 8). A constant attribution sum (e.g. an all-zero map) scores 0."""
    values = spatial_map(attribution, variant).ravel()
    n = values.size
    size = max(1, int(round(subset_fraction * n)))
    if n_subsets < 2:
        raise SegXAIInputError(f"n_subsets must be >= 2, got {n_subsets}")
    rng = np.random.default_rng(0 if seed is None else int(seed))
    subsets = [rng.choice(n, size=size, replace=False) for _ in range(n_subsets)]
    sums = np.array([values[s].sum() for s in subsets])
    fill = torch.full_like(inputs, float(baseline))
    spatial = inputs.shape[2:]
    with torch.no_grad():
        clean = float(forward(inputs)[0])
        drops = np.zeros(n_subsets)
        for chunk in batched(n_subsets, batch_size, progress, cancel, "faithfulness"):
            masks = torch.zeros((len(chunk), n), dtype=torch.bool, device=inputs.device)
            for row, k in enumerate(chunk):
                masks[row, torch.as_tensor(subsets[k], device=inputs.device)] = True
            batch = torch.where(masks.view(len(chunk), 1, *spatial), fill, inputs)
            drops[chunk.start:chunk.stop] = clean - forward(batch).double().cpu().numpy()
    return _pearson(sums, drops)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (:func:`scipy.stats.pearsonr`); 0 when either input is constant
    (undefined there: SciPy returns NaN with a warning)."""
    from scipy.stats import pearsonr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(pearsonr(a, b).statistic)


# ---- sensitivity, complexity (003) -------------------------------------------------------------
def noisy_attributions(
    explain: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    n_samples: int = 3,
    noise_level: float = 0.05,
    seed: Optional[int] = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[torch.Tensor]:
    """The maps of ``x + e_k``, k = 1..n, ``e_k ~ N(0, sigma^2)`` with ``sigma = noise_level
    (max x - min x)`` (:func:`~SegXAILib.attribution.gradient.seeded_normal`: the same draws on every device)."""
    sigma = float(noise_level) * float(inputs.max() - inputs.min())
    from ..attribution.gradient import seeded_normal

    maps = []
    for k in range(int(n_samples)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        noisy = inputs + sigma * seeded_normal(inputs.shape, seed, k, inputs.device, inputs.dtype)
        maps.append(explain(noisy))
        report(progress, (k + 1) / n_samples, "sensitivity")
    return maps


def sensitivity_of(attribution, noisy_maps: Sequence, variant: str = "signed") -> dict[str, float]:
    """Distances ``||n(g(x)) - n(g(x + e_k))||_2 / ||n(g(x))||_2`` (:func:`normalise`) between a map
    and the maps of noisy inputs: their ``mean`` and ``max``."""
    reference = normalise(spatial_map(attribution, variant), variant)
    norm = float(np.linalg.norm(reference))
    distances = []
    for other in noisy_maps:
        other = normalise(spatial_map(other, variant), variant)
        distances.append(float(np.linalg.norm(other - reference)) / norm if norm > 0 else float(np.linalg.norm(other)))
    return {"mean": float(np.mean(distances)), "max": float(np.max(distances))}


def sensitivity(
    explain: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    attribution,
    variant: str = "signed",
    n_samples: int = 3,
    noise_level: float = 0.05,
    seed: Optional[int] = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, float]:
    """Change of the map under small input noise (paper 003, eq. 9).

    For k = 1..n the map of ``x + e_k`` (``e_k ~ N(0, sigma^2)``, ``sigma = noise_level
    (max x - min x)``, seeded) is computed with ``explain`` (the same method and parameters);
    distance ``||n(g(x)) - n(g(x + e_k))||_2 / ||n(g(x))||_2`` with :func:`normalise`. Returns
    the ``mean`` and the ``max`` over k. An input-independent map (a fixed-seed random map)
    scores 0: sensitivity alone does not rank methods.
    """
    maps = noisy_attributions(explain, inputs, n_samples, noise_level, seed, progress, cancel)
    return {**sensitivity_of(attribution, maps, variant), "n_samples": int(n_samples), "noise_level": float(noise_level)}


def complexity(attribution, variant: str = "absolute", threshold: float = 0.1) -> float:
    """Share of voxels whose value exceeds ``threshold`` times the map's largest magnitude
    (paper 003, eq. 10): ``|a| > t max|a|`` (absolute) or ``a > t max|a|`` (signed: only
    positive evidence counts). A one-hot map scores 1/N; an all-zero map 0."""
    values = spatial_map(attribution, variant)
    peak = float(np.abs(values).max())
    if peak == 0:
        return 0.0
    subject = np.abs(values) if variant == "absolute" else values
    return float((subject > threshold * peak).mean())


def timed(function: Callable[[], torch.Tensor], device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, dict]:
    """Run ``function`` and return its map and the efficiency record: ``seconds``, ``device``,
    ``shape`` (spatial, model grid) and ``voxels``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    shape = [int(s) for s in result.shape[2:]]
    return result, {"seconds": seconds, "device": str(device), "shape": shape, "voxels": int(np.prod(shape))}


# ---- model randomisation (Adebayo 2018) --------------------------------------------------------
def randomisation_similarity(
    network: torch.nn.Module,
    card,
    inputs: torch.Tensor,
    target,
    method: str,
    params: Optional[dict[str, Any]] = None,
    attribution: Optional[torch.Tensor] = None,
    seed: int = 0,
    cascading: bool = False,
    window_batch: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, float]:
    """Similarity (:func:`SegXAILib.attribution.sanity.similarity`) between the map and the map
    of the model with every parameterised layer randomised
    (:func:`~SegXAILib.attribution.sanity.randomise_module`, ``"normal"`` init). A faithful
    method scores low. ``cascading=True`` runs Adebayo's full layer-by-layer cascade
    (:func:`~SegXAILib.attribution.sanity.model_randomisation`, one map per layer) and also
    reports the mean over its steps; the default randomises all layers at once (its end
    point, one extra map)."""
    from ..attribution.registry import get_method
    from ..attribution.sanity import model_randomisation, parameterised_layers, randomise_module, similarity

    params = dict(params or {})
    method_class = get_method(method)
    if method_class.stochastic:
        params.setdefault("seed", seed)
    if cascading:
        steps = model_randomisation(network, card, inputs, target, method, params, seed=seed, window_batch=window_batch,
                                    progress=progress, cancel=cancel)
        last = steps[-1]
        return {"spearman_abs": last["spearman_abs"], "spearman": last["spearman"], "pearson": last["pearson"],
                "mean_spearman_abs": float(np.mean([s["spearman_abs"] for s in steps[1:]])), "layers": len(steps) - 1}
    spatial = tuple(inputs.shape[2:])

    def attribute(net, step_progress):
        forward = SegmentationForward(net, card, spatial, target, window_batch=window_batch)
        return method_class(forward).attribute(inputs, progress=step_progress, cancel=cancel, **params).detach()

    original = attribution if attribution is not None else attribute(network, sub_progress(progress, 0.0, 0.5))
    randomised = copy.deepcopy(network)
    device = next(iter(randomised.parameters()), torch.zeros(())).device
    example = torch.zeros((1, inputs.shape[1], *card.patch_size), device=device, dtype=inputs.dtype)
    layers = parameterised_layers(randomised, example)
    modules = dict(randomised.named_modules())
    generator = torch.Generator().manual_seed(int(seed))
    for name in layers:
        randomise_module(modules[name], generator, "normal")
    current = attribute(randomised, sub_progress(progress, 0.5, 1.0))
    report(progress, 1.0, "randomisation")
    return {**similarity(original, current), "layers": len(layers)}
