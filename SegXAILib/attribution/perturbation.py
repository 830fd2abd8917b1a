"""Perturbation baselines (METHODS section 2): occlusion and the random baseline.

:class:`Occlusion` needs only forward passes (no gradients): it slides a cube of a baseline
value over the model-grid input and records the drop of the target, ``T(x) - T(x_occluded)``;
each voxel's value is the mean drop over the cubes that cover it (Captum's definition, with
Captum's cube placement). :class:`RandomBaseline` ignores the model: i.i.d. uniform noise,
the floor every benchmark reports (paper 002).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Union

import torch

from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report
from .base import Attribution, Parameter, batched, check_inputs
from .forward import SegmentationForward
from .gradient import sample_generator

__all__ = ["Occlusion", "RandomBaseline", "occlusion_starts", "read_region"]


def occlusion_starts(size: int, window: int, stride: int) -> list[int]:
    """Start indices of the cubes along one axis of ``size`` voxels, as Captum's ``Occlusion``:
    ``0, stride, 2 stride, ...`` for ``ceil((size - window) / stride) + 1`` positions; the last
    cube may run past the end and is then cut off (smaller). ``window`` is clipped to ``size``."""
    window = min(window, size)
    return [k * stride for k in range(math.ceil((size - window) / stride) + 1)]


def read_region(forward: SegmentationForward) -> list[tuple[int, int]]:
    """Per spatial axis, the inclusive-exclusive bounding range ``(lo, hi)`` of the input voxels
    that the target's sliding windows read (replicate padding folds padded positions onto the
    border voxels). A perturbation wholly outside this box cannot change ``T``."""
    windowed = forward.windowed
    selected = windowed.windows_for(forward.target.support)
    before = (windowed.pad[4], windowed.pad[2], windowed.pad[0])
    bounds = []
    for axis, size in enumerate(windowed.spatial_shape):
        starts = [windowed.windows[i][axis].start for i in selected]
        stops = [windowed.windows[i][axis].stop for i in selected]
        lo = min(max(s - before[axis], 0) for s in starts)
        hi = max(min(s - before[axis], size) for s in stops)
        bounds.append((min(lo, size - 1), max(hi, 1)))
    return bounds


class Occlusion(Attribution):
    """Occlusion (Zeiler & Fergus 2014): the mean drop ``T(x) - T(x with a cube at baseline)``
    over the cubes covering each voxel.

    Cubes of ``window`` voxels per side start every ``stride`` voxels from index 0 along each
    axis (the last one cut off at the border), exactly as ``captum.attr.Occlusion`` with
    ``sliding_window_shapes=(C, w, w, w)``, ``strides=(C, s, s, s)``. All input channels are
    occluded together by default, and the one map is returned in every channel (the map says
    where, not which channel); ``per_channel=True`` occludes each channel on its own (Captum's
    ``(1, w, w, w)`` windows) and gives one map per channel, at C times the cost.

    Cost: one forward per cube (``batch_size`` cubes per call, no gradients). Cubes wholly
    outside the input region the target's sliding windows read are skipped: their drop is
    exactly 0. The baseline is a value on the model-grid (preprocessed) input, e.g. 0 = the mean
    intensity after z-scoring; ``attribute`` also takes a tensor of the input's shape.
    """

    name = "occlusion"
    summary = "mean drop of the target when a sliding cube is set to a baseline value (no gradients)"
    parameters = (
        Parameter("window", "int", 8, "cube side in model-grid voxels", minimum=1),
        Parameter("stride", "int", 8, "step between cubes in voxels (<= window, so every voxel is covered)", minimum=1),
        Parameter("baseline", "float", 0.0, "value of the occluded voxels (model-grid intensities; from Python also "
                  "a tensor of the input's shape)", objects=(torch.Tensor,)),
        Parameter("per_channel", "bool", False, "occlude each input channel separately (one map per channel)"),
        Parameter("batch_size", "int", 8, "occluded volumes per forward pass", minimum=1),
    )

    def attribute(
        self,
        inputs: torch.Tensor,
        window: int = 8,
        stride: int = 8,
        baseline: Union[float, torch.Tensor] = 0.0,
        per_channel: bool = False,
        batch_size: int = 8,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if window < 1 or stride < 1:
            raise SegXAIInputError(f"occlusion: window and stride must be >= 1, got {window} and {stride}")
        spatial = tuple(inputs.shape[2:])
        if stride > window and any(s > window for s in spatial):
            raise SegXAIInputError(f"occlusion: stride {stride} > window {window} would leave voxels uncovered")
        if isinstance(baseline, torch.Tensor):
            fill = baseline.to(inputs.device, inputs.dtype)
            if fill.shape != inputs.shape:
                raise SegXAIInputError(f"occlusion: baseline shape {tuple(fill.shape)} differs from the input's {tuple(inputs.shape)}")
        else:
            fill = torch.full_like(inputs, float(baseline))

        box = read_region(self.forward)
        cubes = [
            tuple(slice(s, min(s + window, n)) for s, n in zip(starts, spatial))
            for starts in itertools.product(*(occlusion_starts(n, window, stride) for n in spatial))
        ]
        # exact skip: a cube outside the read box leaves T unchanged (drop 0)
        active = [c for c in cubes if all(sl.start < hi and sl.stop > lo for sl, (lo, hi) in zip(c, box))]
        channels = list(range(inputs.shape[1])) if per_channel else [None]
        features = [(channel, cube) for channel in channels for cube in active]

        total = torch.zeros_like(inputs)
        # cubes covering each voxel: a product of per-axis counts (the cube grid is separable)
        per_axis = []
        for n in spatial:
            count = torch.zeros(n, dtype=inputs.dtype, device=inputs.device)
            for start in occlusion_starts(n, window, stride):
                count[start : start + window] += 1
            per_axis.append(count)
        counts = per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]
        if cancel is not None:
            cancel.raise_if_cancelled()
        with torch.no_grad():
            reference = self.forward(inputs)[0]
            if not features:
                report(progress, 1.0, self.name)
            for chunk in batched(len(features), batch_size, progress, cancel, self.name):
                batch = inputs.repeat(len(chunk), 1, 1, 1, 1)
                for row, k in enumerate(chunk):
                    channel, cube = features[k]
                    where = slice(None) if channel is None else slice(channel, channel + 1)
                    index = (row, where, *cube)
                    batch[index] = fill[(0, where, *cube)]
                drops = reference - self.forward(batch)
                for row, k in enumerate(chunk):
                    channel, cube = features[k]
                    where = slice(None) if channel is None else slice(channel, channel + 1)
                    total[(slice(None), where, *cube)] += drops[row]
        return total / counts


class RandomBaseline(Attribution):
    """I.i.d. uniform noise on [0, 1) of the input's shape (paper 002's random baseline): the
    score every faithful method must beat. Seeded (``sample_generator(seed, 0)``); the model is
    not run."""

    name = "random"
    summary = "i.i.d. uniform noise: the random baseline every benchmark reports"
    stochastic = True
    parameters = (Parameter("seed", "int", 0, "seed of the noise (same seed, same map)"),)

    def attribute(
        self,
        inputs: torch.Tensor,
        seed: Optional[int] = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = torch.rand(inputs.shape, generator=sample_generator(seed, 0), dtype=inputs.dtype).to(inputs.device)
        report(progress, 1.0, self.name)
        return result
