"""The losses of CycleGAN activation maximisation (paper 004, METHODS section 7).

All image losses are computed in the generators' normalised units ``u = (x - shift) / scale``
(:class:`~SegXAILib.counterfactual.networks.IntensityFrame`), where a domain's intensities
span about [-1, 1]: the L1 term and SSIM's stabilising constants then mean the same for every
channel and every intensity convention of the model (z-scores, CT windows, [0, 1]).

==================  =====================================================================
loss                definition (per sample, then the batch mean)
==================  =====================================================================
DSSIM               ``(1 - SSIM(x, y)) / 2`` (MONAI's SSIM: Gaussian window, valid
                    positions, ``c1 = (0.01 L)^2``, ``c2 = (0.03 L)^2``, ``L`` = 2)
cycle               ``0.5 (mean |x - x'| + DSSIM(x, x'))`` (paper eq. 2)
similarity          ``DSSIM(x, G(x))``
adversarial (D)     ``mean_heads mean (D(a, b) - t)^2``, t = 1 where ``a`` is the real one
adversarial (G)     the same with the label inverted, ``t -> 1 - t`` (least squares)
activation          ``BCE(sigmoid(s), l) = softplus(-s)`` for l = 1, ``softplus(s)`` for l = 0
==================  =====================================================================

The paper writes DSSIM with a stray factor (its eq. 1 lost its layout in extraction); we use the
usual structural dissimilarity ``(1 - SSIM) / 2``, zero for identical images and at most 1.
Its discriminator is trained with cross-entropy; least squares (LSGAN) is the issue's choice
and the usual CycleGAN one (steadier gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..image import SegXAIInputError

__all__ = ["LossWeights", "dssim", "cycle_loss", "similarity_loss", "discriminator_loss", "generator_adversarial_loss",
           "activation_loss", "SSIM_DATA_RANGE"]

#: SSIM's data range L in normalised units (a domain spans about [-1, 1])
SSIM_DATA_RANGE = 2.0


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator loss terms; the paper's eq. 4 sums them with weight 1 each (the
    cycle term carries its own 0.5)."""

    cycle: float = 1.0
    similarity: float = 1.0
    adversarial: float = 1.0
    activation: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cycle", "similarity", "adversarial", "activation"):
            value = float(getattr(self, name))
            if not value >= 0.0 or value == float("inf"):
                raise SegXAIInputError(f"weights.{name} {value}: expected a finite number >= 0")


def dssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Structural dissimilarity ``(1 - SSIM) / 2`` per sample.

    Parameters
    ----------
    x, y : torch.Tensor
        ``(B, C, *spatial)`` with 2 or 3 spatial axes, in normalised units; every spatial size
        at least ``window``.
    window : int
        Side of the Gaussian SSIM window (sigma 1.5, as MONAI's default).

    Returns
    -------
    torch.Tensor
        ``(B,)``: SSIM averaged over channels and valid window positions.
    """
    from monai.losses import SSIMLoss

    if x.shape != y.shape:
        raise SegXAIInputError(f"dssim: x {tuple(x.shape)} and y {tuple(y.shape)} differ in shape")
    spatial_dims = x.ndim - 2
    if spatial_dims not in (2, 3):
        raise SegXAIInputError(f"dssim: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if min(x.shape[2:]) < window:
        raise SegXAIInputError(f"dssim: window {window} is larger than the image {tuple(x.shape[2:])}")
    loss = SSIMLoss(spatial_dims=spatial_dims, data_range=SSIM_DATA_RANGE, win_size=window, reduction="none")
    return loss(x, y).reshape(-1) / 2  # SSIMLoss is 1 - SSIM


def cycle_loss(x: torch.Tensor, reconstructed: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``0.5 (mean |x - x'| + DSSIM(x, x'))`` per sample ``(B,)`` (paper eq. 2)."""
    l1 = (x - reconstructed).abs().flatten(1).mean(1)
    return 0.5 * (l1 + dssim(x, reconstructed, window))


def similarity_loss(x: torch.Tensor, generated: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``DSSIM(x, G(x))`` per sample ``(B,)``: changes are kept small."""
    return dssim(x, generated, window)


def _pair_maps(discriminator: Callable, real: torch.Tensor, fake: torch.Tensor,
               real_first: torch.Tensor) -> Sequence[torch.Tensor]:
    """The discriminator's likelihood maps of the pairs, real first where ``real_first``."""
    first_is_real = real_first.view(-1, *([1] * (real.ndim - 1))).to(real.dtype)
    first = first_is_real * real + (1 - first_is_real) * fake
    second = first_is_real * fake + (1 - first_is_real) * real
    return discriminator(first, second)


def _least_squares(maps: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``mean over heads of mean((map - target)^2)`` per sample ``(B,)``."""
    total = 0.0
    for output in maps:
        label = target.view(-1, *([1] * (output.ndim - 1))).to(output.dtype)
        total = total + ((output - label) ** 2).flatten(1).mean(1)
    return total / len(maps)


def discriminator_loss(discriminator: Callable, real: torch.Tensor, fake: torch.Tensor,
                       real_first: torch.Tensor) -> torch.Tensor:
    """Least-squares loss of a pair discriminator ``(B,)``: each output should be 1 where the
    first image of the pair is the real one, 0 where it is the generated one.

    Parameters
    ----------
    discriminator : callable
        ``(first, second) -> list of (B, 1, *map)`` likelihood maps
        (:class:`~SegXAILib.counterfactual.networks.PairDiscriminator`).
    real, fake : torch.Tensor
        ``(B, C, *spatial)``; ``fake`` detached by the caller when training the discriminator.
    real_first : torch.Tensor
        ``(B,)`` of 0 / 1: the random order of each pair (so no output unit can learn to be
        the "real" one).
    """
    return _least_squares(_pair_maps(discriminator, real, fake, real_first), real_first)


def generator_adversarial_loss(discriminator: Callable, real: torch.Tensor, fake: torch.Tensor,
                               real_first: torch.Tensor) -> torch.Tensor:
    """The generator's side ``(B,)``: the discriminator's least-squares loss with the labels
    inverted (the generator wins when the pair is judged the other way round)."""
    return _least_squares(_pair_maps(discriminator, real, fake, real_first), 1 - real_first)


def activation_loss(score: torch.Tensor, label: int) -> torch.Tensor:
    """Cross-entropy of ``p = sigmoid(score)`` towards ``label`` (1: G+, 0: G-) per sample ``(B,)``.

    ``score`` is a log-odds: for a classifier ``log p_c - log(1 - p_c)``, so this is the
    class-probability cross-entropy of the paper exactly; for a segmentation the mean class
    logit over the region (:class:`~SegXAILib.counterfactual.scores.SegmentationScore`).
    """
    if label not in (0, 1):
        raise SegXAIInputError(f"label {label!r}: expected 0 or 1")
    return F.softplus(-score) if label == 1 else F.softplus(score)
