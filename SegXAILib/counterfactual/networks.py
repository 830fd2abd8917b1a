"""Generators and discriminators of the counterfactual CycleGAN (paper 004, section 2).

Intensities. The frozen model sees normalised intensities (z-scores, windowed CT, ...) that are
not in [-1, 1] and differ per channel. Both networks therefore work in a per-channel frame
``u = (x - shift) / scale`` (:class:`IntensityFrame`) fitted to the training patches of both
domains (the 0.5 and 99.5 percentiles map to -1 and 1), and a generator returns, in the
model's own units,

    ``G(x) = x + scale * tanh(delta(u))``

(a residual: each voxel moves by at most half the domains' intensity range, enough to draw or
erase a lesion, never off to an intensity the model never saw). The last layer of ``delta`` starts
at zero, so a new generator is exactly the identity. The frame is stored with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..image import SegXAIInputError

__all__ = ["IntensityFrame", "ResidualGenerator", "PairDiscriminator"]


@dataclass(frozen=True)
class IntensityFrame:
    """Per-channel ``shift`` and ``scale`` (C,): ``u = (x - shift) / scale``."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shift) != len(self.scale) or not self.shift:
            raise SegXAIInputError("frame: shift and scale need one value per channel")
        if not all(s > 0 and s < float("inf") for s in self.scale):
            raise SegXAIInputError(f"frame.scale {self.scale}: expected finite values > 0")

    @property
    def channels(self) -> int:
        return len(self.scale)

    @classmethod
    def fit(cls, patches: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> "IntensityFrame":
        """The frame that maps the ``lower`` / ``upper`` percentiles of ``patches``
        ``(N, C, *spatial)`` (per channel) to -1 / 1; a constant channel gets scale 1."""
        values = patches.detach().float().transpose(0, 1).reshape(patches.shape[1], -1)
        low = torch.quantile(values, lower / 100, dim=1)
        high = torch.quantile(values, upper / 100, dim=1)
        half = (high - low) / 2
        scale = torch.where(half > 1e-6, half, torch.ones_like(half))
        return cls(tuple(float(v) for v in (high + low) / 2), tuple(float(v) for v in scale))


def _conv(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(spatial_dims: int):
    return nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d


class _Framed(nn.Module):
    def _register_frame(self, frame: IntensityFrame, spatial_dims: int) -> None:
        view = (1, frame.channels) + (1,) * spatial_dims
        self.register_buffer("shift", torch.tensor(frame.shift, dtype=torch.float32).view(view))
        self.register_buffer("scale", torch.tensor(frame.scale, dtype=torch.float32).view(view))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class ResidualGenerator(_Framed):
    """``G(x) = x + scale * tanh(delta((x - shift) / scale))``, ``delta`` a MONAI UNet.

    Parameters
    ----------
    spatial_dims : int
        2 (slices) or 3 (patches).
    frame : IntensityFrame
        Per-channel intensity frame; its channel count is the image's.
    features : sequence of int
        UNet channels per stage (the paper: 48, 96, 192, 384).
    strides : sequence of int
        ``len(features) - 1`` downsampling factors; patch sizes must divide by their product.
    num_res_units : int
        Residual units per UNet block (MONAI).

    Input and output ``(B, C, *patch)`` in the model's intensity units.
    """

    def __init__(self, spatial_dims: int, frame: IntensityFrame, features: Sequence[int] = (32, 64, 128, 256),
                 strides: Sequence[int] = (2, 2, 2), num_res_units: int = 1) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        if spatial_dims not in (2, 3):
            raise SegXAIInputError(f"spatial_dims {spatial_dims}: expected 2 or 3")
        if len(features) < 2 or len(strides) != len(features) - 1:
            raise SegXAIInputError(f"generator features {list(features)} and strides {list(strides)}: "
                                   "expected at least two stages and one stride fewer than stages")
        self._register_frame(frame, spatial_dims)
        hidden = max(4, int(features[0]) // 2)
        self.body = UNet(spatial_dims=spatial_dims, in_channels=frame.channels, out_channels=hidden,
                         channels=tuple(int(f) for f in features), strides=tuple(int(s) for s in strides),
                         num_res_units=num_res_units, norm="instance", act="leakyrelu")
        self.head = _conv(spatial_dims)(hidden, frame.channels, kernel_size=1)
        # the identity at the start: similarity and cycle losses start at zero, and the
        # generators learn only the changes the model's score asks for
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The bounded change ``scale * tanh(delta)`` added to ``x``."""
        return self.scale * torch.tanh(self.head(self.body(self.normalise(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


class PairDiscriminator(_Framed):
    """A PatchGAN that judges a pair (one real, one generated patch; paper section 2.3).

    One feature extractor (strided convolutions, instance norm, leaky ReLU) runs on both images
    (weight sharing); at the last two stages the two feature maps are concatenated and a 1x1
    convolution gives a likelihood map, each unit judging "the first image of the pair is the
    real one" for its receptive field (multi-scale, as the paper's stages 2 and 3).

    Parameters
    ----------
    spatial_dims : int
    frame : IntensityFrame
    features : sequence of int
        Channels of the stride-2 stages (at least two).

    ``forward(first, second)`` with ``(B, C, *patch)`` each returns a list of
    ``(B, 1, *patch / 2^s)`` maps (unbounded scores, trained towards 0 / 1 by least squares).
    """

    def __init__(self, spatial_dims: int, frame: IntensityFrame, features: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise SegXAIInputError(f"spatial_dims {spatial_dims}: expected 2 or 3")
        if len(features) < 2:
            raise SegXAIInputError(f"discriminator features {list(features)}: expected at least two stages")
        self._register_frame(frame, spatial_dims)
        conv, norm = _conv(spatial_dims), _norm(spatial_dims)
        stages, previous = [], frame.channels
        for index, width in enumerate(features):
            layers = [conv(previous, int(width), kernel_size=3, stride=2, padding=1)]
            if index > 0:  # no norm on the first stage (as PatchGAN)
                layers.append(norm(int(width), affine=True))
            layers.append(nn.LeakyReLU(0.2))
            stages.append(nn.Sequential(*layers))
            previous = int(width)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList([conv(2 * int(w), 1, kernel_size=1) for w in features[-2:]])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, h = [], self.normalise(x)
        for stage in self.stages:
            h = stage(h)
            outputs.append(h)
        return outputs[-2:]

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> list[torch.Tensor]:
        both = self.features(torch.cat([first, second]))  # shared weights, one pass
        count = first.shape[0]
        return [head(torch.cat([f[:count], f[count:]], dim=1)) for head, f in zip(self.heads, both)]
