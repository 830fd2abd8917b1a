"""Quantitative checks of counterfactual generators (paper 004, section 3.3; issue 20).

- **Activation**: on held-out images the model's score of ``G+(x)`` should lie above that of
  ``x`` and the score of ``G-(x)`` below it. :func:`paired_comparison` reports the means with
  bootstrap confidence intervals (:func:`bootstrap_mean_ci`), the paired Wilcoxon signed-rank
  test and the paired t-test (SciPy; two-sided as the paper, or one-sided).
- **Proximity**: :func:`proximity`, the mean absolute difference (L1) and SSIM of ``G(x)`` to
  ``x`` (SSIM in the generators' normalised units, as in training).
- **Locality**: :func:`locality`, the share of ``|R|`` inside the lesion's neighbourhood
  (:func:`neighbourhood`: the lesion mask dilated by a ball).
- **Deletion**: :func:`deletion_curves` runs the project's MiF / LiF perturbation curves
  (:func:`SegXAILib.evaluation.metrics.fidelity`, paper 002) for several maps of the same target,
  each restricted to the same support (the generators' patch), so R and the gradient-family maps
  compete on the same voxels; :func:`deletion_area` is the normalised area under a MiF curve
  (smaller: the map found the voxels the score depends on sooner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..attribution.forward import SegmentationForward
from ..evaluation.metrics import FidelityCurves, fidelity
from ..image import SegXAIInputError
from .losses import dssim
from .networks import IntensityFrame

__all__ = ["bootstrap_mean_ci", "PairedComparison", "paired_comparison", "proximity", "neighbourhood", "locality",
           "restrict", "deletion_curves", "deletion_area", "patch_fractions"]

# numpy >= 2 renamed trapz
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def _sample(values, name: str, minimum: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1) if np.ndim(values) else np.asarray([values], float)
    if array.size < minimum:
        raise SegXAIInputError(f"{name}: expected at least {minimum} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise SegXAIInputError(f"{name}: expected finite values")
    return array


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Parameters
    ----------
    values : array-like
        ``(N,)`` sample, N >= 1.
    confidence : float
        In (0, 1).
    resamples : int
        Bootstrap resamples (with replacement, N each).
    seed : int
        Seeds the resampling (the global RNG is not touched).

    Returns
    -------
    (float, float)
        The ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    """
    sample = _sample(values, "values")
    if not 0 < confidence < 1:
        raise SegXAIInputError(f"confidence {confidence}: expected a number in (0, 1)")
    if isinstance(resamples, bool) or int(resamples) != resamples or resamples < 1:
        raise SegXAIInputError(f"resamples {resamples!r}: expected a positive integer")
    rng = np.random.default_rng(int(seed))
    means = np.empty(int(resamples))
    for start in range(0, int(resamples), 1000):  # chunks: N x 1000 indices at a time
        stop = min(int(resamples), start + 1000)
        means[start:stop] = sample[rng.integers(0, sample.size, (stop - start, sample.size))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass
class PairedComparison:
    """``after`` against ``before`` on the same samples (e.g. score of G+(x) against x).

    Attributes
    ----------
    n : int
    mean_before, mean_after, mean_difference : float
        Means of the two samples and of ``after - before``.
    ci_before, ci_after, ci_difference : (float, float)
        Their bootstrap confidence intervals (:func:`bootstrap_mean_ci`).
    alternative : str
        ``"greater"`` (``after`` expected above ``before``), ``"less"`` or ``"two-sided"``.
    wilcoxon_statistic, wilcoxon_p : float
        :func:`scipy.stats.wilcoxon` of the differences.
    t_statistic, t_p : float
        :func:`scipy.stats.ttest_rel` of ``after`` against ``before``.
    share_greater : float
        Share of samples with ``after > before`` (strictly).
    """

    n: int
    mean_before: float
    mean_after: float
    mean_difference: float
    ci_before: tuple[float, float]
    ci_after: tuple[float, float]
    ci_difference: tuple[float, float]
    alternative: str
    wilcoxon_statistic: float
    wilcoxon_p: float
    t_statistic: float
    t_p: float
    share_greater: float

    def to_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.__dict__.items()}


def paired_comparison(before: Sequence[float] | np.ndarray, after: Sequence[float] | np.ndarray,
                      alternative: str = "two-sided", confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> PairedComparison:
    """Paired Wilcoxon signed-rank and t-tests of ``after`` against ``before`` with bootstrap CIs.

    Parameters
    ----------
    before, after : array-like
        ``(N,)`` paired samples, N >= 2.
    alternative : str
        ``"greater"``: ``after > before`` expected (G+), ``"less"`` (G-), or ``"two-sided"``
        (the paper's two-tailed tests).
    confidence, resamples, seed
        Of :func:`bootstrap_mean_ci`.

    Returns
    -------
    PairedComparison
    """
    from scipy import stats

    before, after = _sample(before, "before", 2), _sample(after, "after", 2)
    if before.shape != after.shape:
        raise SegXAIInputError(f"before, after: {before.size} and {after.size} values; expected pairs")
    if alternative not in ("greater", "less", "two-sided"):
        raise SegXAIInputError(f"alternative {alternative!r}: expected greater, less or two-sided")
    difference = after - before
    if np.all(difference == 0):  # both tests are undefined: no evidence either way
        w_stat, w_p, t_stat, t_p = 0.0, 1.0, 0.0, 1.0
    else:
        wilcoxon = stats.wilcoxon(after, before, alternative=alternative)
        t_test = stats.ttest_rel(after, before, alternative=alternative)
        w_stat, w_p = float(wilcoxon.statistic), float(wilcoxon.pvalue)
        t_stat, t_p = float(t_test.statistic), float(t_test.pvalue)
    ci = lambda values, offset: bootstrap_mean_ci(values, confidence, resamples, seed + offset)  # noqa: E731
    return PairedComparison(int(before.size), float(before.mean()), float(after.mean()), float(difference.mean()),
                            ci(before, 0), ci(after, 1), ci(difference, 2), alternative, w_stat, w_p, t_stat, t_p,
                            float((difference > 0).mean()))


def proximity(x: torch.Tensor, generated: torch.Tensor, frame: Optional[IntensityFrame] = None,
              window: int = 7) -> dict[str, np.ndarray]:
    """How close ``G(x)`` stays to ``x``.

    Parameters
    ----------
    x, generated : torch.Tensor
        ``(B, C, *spatial)`` (2 or 3 spatial axes), the model's units.
    frame : IntensityFrame, optional
        The generators' frame; SSIM is computed in its normalised units (data range 2, as the
        training's DSSIM). Default: the identity frame.
    window : int
        SSIM's Gaussian window side (sigma 1.5).

    Returns
    -------
    dict
        ``{"l1": (B,), "ssim": (B,)}``: mean ``|G(x) - x|`` in the model's units over voxels
        and channels, and SSIM (1: identical).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(generated, torch.Tensor):
        raise SegXAIInputError("x, generated: expected torch tensors (B, C, *spatial)")
    if x.shape != generated.shape:
        raise SegXAIInputError(f"x {tuple(x.shape)} and generated {tuple(generated.shape)}: expected the same shape")
    if x.ndim not in (4, 5):
        raise SegXAIInputError(f"x {tuple(x.shape)}: expected (B, C, H, W) or (B, C, D, H, W)")
    x, generated = x.detach().float().cpu(), generated.detach().float().cpu()
    l1 = (generated - x).abs().flatten(1).mean(1)
    if frame is not None:
        if frame.channels != x.shape[1]:
            raise SegXAIInputError(f"frame: {frame.channels} channel(s), x has {x.shape[1]}")
        view = (1, -1) + (1,) * (x.ndim - 2)
        shift = torch.tensor(frame.shift, dtype=torch.float32).view(view)
        scale = torch.tensor(frame.scale, dtype=torch.float32).view(view)
        x, generated = (x - shift) / scale, (generated - shift) / scale
    with torch.no_grad():
        ssim = 1 - 2 * dssim(x, generated, window)  # dssim = (1 - SSIM) / 2
    return {"l1": l1.numpy().astype(np.float64), "ssim": ssim.numpy().astype(np.float64)}


def neighbourhood(mask: np.ndarray, radius: float, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``mask`` dilated by a ball of ``radius`` (voxels, or mm with ``spacing``).

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean, any number of axes.
    radius : float
        >= 0; 0 returns the mask itself.
    spacing : sequence of float, optional
        Voxel size per axis; the radius is then in the same unit.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    if not radius >= 0:
        raise SegXAIInputError(f"radius {radius}: expected a number >= 0")
    spacing = np.ones(mask.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if spacing.shape != (mask.ndim,) or np.any(spacing <= 0):
        raise SegXAIInputError(f"spacing {spacing.tolist()}: expected {mask.ndim} sizes > 0")
    reach = np.floor(radius / spacing).astype(int)
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(reach, spacing)], indexing="ij")
    ball = sum(g ** 2 for g in grids) <= radius ** 2 + 1e-9
    return ndimage.binary_dilation(mask, structure=ball) if radius > 0 else mask.copy()


def locality(relevance: Union[np.ndarray, torch.Tensor], inside: np.ndarray) -> float:
    """Share of ``sum |R|`` inside ``inside``.

    Parameters
    ----------
    relevance : array-like
        ``(C, *spatial)`` or ``(*spatial)``; channels are summed after taking ``|R|``.
    inside : numpy.ndarray
        Boolean ``(*spatial)``, e.g. :func:`neighbourhood` of the lesion.

    Returns
    -------
    float
        In [0, 1]; NaN when R is zero everywhere.
    """
    values = np.abs(relevance.detach().cpu().numpy() if isinstance(relevance, torch.Tensor) else np.asarray(relevance))
    inside = np.asarray(inside) > 0
    if values.shape != inside.shape:
        if values.ndim != inside.ndim + 1 or values.shape[1:] != inside.shape:
            raise SegXAIInputError(f"relevance {values.shape} and inside {inside.shape}: expected (C, *spatial) "
                                   "and (*spatial)")
        values = values.sum(0)
    total = float(values.sum(dtype=np.float64))
    return float(values[inside].sum(dtype=np.float64)) / total if total > 0 else float("nan")


def restrict(attribution: Union[np.ndarray, torch.Tensor], support: np.ndarray) -> torch.Tensor:
    """``attribution`` ``(1, C, *spatial)`` set to zero outside ``support`` ``(*spatial)``."""
    values = torch.as_tensor(np.asarray(attribution) if not isinstance(attribution, torch.Tensor) else attribution)
    support = torch.as_tensor(np.asarray(support) > 0, device=values.device)
    if values.ndim < 2 or tuple(values.shape[2:]) != tuple(support.shape):
        raise SegXAIInputError(f"attribution {tuple(values.shape)} and support {tuple(support.shape)}: expected "
                               "(1, C, *spatial) and (*spatial)")
    return torch.where(support, values, torch.zeros((), dtype=values.dtype, device=values.device))


def patch_fractions(support: np.ndarray, steps: int = 20) -> np.ndarray:
    """Shares ``0, s/steps, ..., s`` of the volume, ``s`` = the support's share: deletion steps
    that go through the support (the rest of the volume is zero in every restricted map)."""
    support = np.asarray(support) > 0
    if not support.any():
        raise SegXAIInputError("support: the mask is empty")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise SegXAIInputError(f"steps {steps!r}: expected a positive integer")
    share = support.sum() / support.size
    return np.linspace(0.0, share, int(steps) + 1)


def deletion_curves(forward: SegmentationForward, inputs: torch.Tensor,
                    maps: Mapping[str, Union[np.ndarray, torch.Tensor]], support: np.ndarray, variant: str = "signed",
                    baseline: float = 0.0, steps: int = 20, seed: int = 0) -> dict[str, FidelityCurves]:
    """MiF / LiF deletion curves of several maps of one target, on the same support.

    Parameters
    ----------
    forward : SegmentationForward
        The model bound to the target (as in :func:`~SegXAILib.evaluation.metrics.fidelity`).
    inputs : torch.Tensor
        ``(1, C, *spatial)`` on the model grid (e.g. the context crop around a lesion).
    maps : mapping of str to array-like
        ``(1, C, *spatial)`` maps (e.g. ``R``, gradient, gradient x input), one name each.
    support : numpy.ndarray
        Boolean ``(*spatial)``: every map is zeroed outside it (:func:`restrict`) and the curves
        step through its share of the volume (:func:`patch_fractions`).
    variant, baseline, seed
        Of :func:`~SegXAILib.evaluation.metrics.fidelity` (``"signed"``: evidence for the target first).
    steps : int
        Deletion steps across the support.

    Returns
    -------
    dict of str to FidelityCurves
        Scores normalised as in ``fidelity`` (clean input 1, fully masked input 0).
    """
    if not maps:
        raise SegXAIInputError("maps: expected at least one map")
    fractions = patch_fractions(support, steps)
    return {name: fidelity(forward, inputs, restrict(value, support).to(inputs.device), variant, baseline,
                           "target", tuple(fractions), seed=seed)
            for name, value in maps.items()}


def deletion_area(curves: FidelityCurves) -> float:
    """Area under the MiF curve over the deleted share, divided by the share's range (the mean
    normalised score while deleting; smaller: the score fell sooner)."""
    fractions = np.asarray(curves.fractions, dtype=np.float64)
    span = fractions[-1] - fractions[0]
    if span <= 0:
        raise SegXAIInputError("curves: the fractions span no range")
    return float(_trapezoid(np.asarray(curves.mif, dtype=np.float64), fractions) / span)
