"""The gradient family (METHODS section 2): vanilla gradient, gradient x input, SmoothGrad
(and squared), integrated gradients, expected gradients.

Every map is ``(1, C, D, H, W)``, the shape of ``inputs``. Samples (noise draws, path steps,
references) run ``batch_size`` at a time through one backward pass (0, the default: the largest
batch that fits in the free memory, at most 4; an explicit batch that cannot fit is refused
with the estimate, :func:`~SegXAILib.attribution.base.memory_batch_size`). Random draws come from
one generator per sample, seeded from ``(seed, sample index)``: the same seed gives the same
map whatever ``batch_size`` is.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report
from .base import Attribution, Parameter, check_inputs, memory_batch_size

__all__ = [
    "VanillaGradient",
    "GradientXInput",
    "SmoothGrad",
    "IntegratedGradients",
    "ExpectedGradients",
    "sample_generator",
    "seeded_normal",
    "noise_sigma",
    "make_baseline",
]

BASELINES = ("zero", "min", "max", "black_white")

_BATCH = Parameter("batch_size", "int", 0, "samples per backward pass (memory vs. speed); 0 or auto: the largest "
                   "that fits in the free memory, at most 4", minimum=0, auto=True)
_SEED = Parameter("seed", "int", 0, "seed of the random draws (same seed, same map)")


def sample_generator(seed: Optional[int], index: int) -> torch.Generator:
    """The (CPU) generator of sample ``index`` under ``seed``: independent of how samples are
    batched, and of the device (draws are made on the CPU and moved, see :func:`seeded_normal`)."""
    state = np.random.SeedSequence([0 if seed is None else int(seed), int(index)]).generate_state(1)[0]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state))
    return generator


def seeded_normal(shape, seed: Optional[int], index: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws of sample ``index`` under ``seed`` on ``device``: the same numbers on
    every device (CUDA's generator would draw others for the same seed)."""
    return torch.randn(tuple(shape), generator=sample_generator(seed, index), dtype=dtype).to(device)


def noise_sigma(inputs: torch.Tensor, noise_level: float) -> float:
    """SmoothGrad's noise standard deviation: ``noise_level * (max(x) - min(x))``."""
    if noise_level < 0:
        raise SegXAIInputError(f"noise_level must be >= 0, got {noise_level}")
    return float(noise_level) * float(inputs.max() - inputs.min())


def _noise(inputs: torch.Tensor, chunk: range, sigma: float, seed: Optional[int]) -> torch.Tensor:
    shape = inputs.shape[1:]
    draws = [seeded_normal(shape, seed, k, inputs.device, inputs.dtype) for k in chunk]
    return torch.stack(draws) * sigma


def make_baseline(inputs: torch.Tensor, baseline: Union[str, float, torch.Tensor]) -> torch.Tensor:
    """A baseline volume ``(1, C, D, H, W)``: ``"zero"``, ``"min"`` / ``"max"`` (the input's
    per-channel minimum / maximum everywhere), a number, or a tensor of the input's shape."""
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.to(inputs.device, inputs.dtype)
        if baseline.shape != inputs.shape:
            raise SegXAIInputError(f"baselines: shape {tuple(baseline.shape)} differs from the input's {tuple(inputs.shape)}")
        return baseline
    if isinstance(baseline, (int, float)):
        return torch.full_like(inputs, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline in ("min", "max"):
        reduce = torch.amin if baseline == "min" else torch.amax
        return reduce(inputs, dim=(2, 3, 4), keepdim=True).expand_as(inputs).clone()
    raise SegXAIInputError(f"baselines: expected one of {BASELINES}, a number or a tensor, got {baseline!r}")


class VanillaGradient(Attribution):
    """``dT/dx`` (Simonyan et al. 2014)."""

    name = "vanilla_gradient"
    summary = "gradient of the target with respect to the input"

    def attribute(self, inputs: torch.Tensor, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if cancel is not None:
            cancel.raise_if_cancelled()
        # one sample: refused with the estimate when it cannot fit (window_batch windows at once)
        memory_batch_size(self.forward, inputs, 1, 1, self.name,
                          name="window_batch" if self.forward.window_batch > 1 else self.name, progress=progress)
        result = self.forward.gradient(inputs)
        report(progress, 1.0, self.name)
        return result


class GradientXInput(Attribution):
    """``x * dT/dx``."""

    name = "gradient_x_input"
    summary = "input times gradient"

    def attribute(self, inputs: torch.Tensor, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> torch.Tensor:
        inputs = check_inputs(inputs)
        return inputs * VanillaGradient(self.forward).attribute(inputs, progress=progress, cancel=cancel)


class SmoothGrad(Attribution):
    """``mean_k dT/dx(x + e_k)``, ``e_k ~ N(0, sigma^2)``, ``sigma = noise_level (max x - min x)``
    (Smilkov et al. 2017); ``squared=True`` averages the squared gradients (SmoothGrad^2)."""

    name = "smoothgrad"
    summary = "mean gradient over noisy copies of the input (SmoothGrad; squared: SmoothGrad^2)"
    stochastic = True
    parameters = (
        Parameter("n_samples", "int", 20, "noisy samples", minimum=1),
        Parameter("noise_level", "float", 0.1, "noise sigma as a share of the input's range", minimum=0.0),
        Parameter("squared", "bool", False, "average squared gradients (SmoothGrad^2)"),
        _BATCH,
        _SEED,
    )

    def attribute(
        self,
        inputs: torch.Tensor,
        n_samples: int = 20,
        noise_level: float = 0.1,
        squared: bool = False,
        batch_size: int = 0,
        seed: Optional[int] = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if n_samples < 1:
            raise SegXAIInputError(f"n_samples must be >= 1, got {n_samples}")
        sigma = noise_sigma(inputs, noise_level)

        def statistic(samples, gradients, chunk):
            return gradients**2 if squared else gradients

        return self._mean_over_samples(
            lambda chunk: inputs + _noise(inputs, chunk, sigma, seed), n_samples, batch_size, statistic, progress, cancel
        )


class IntegratedGradients(Attribution):
    """``(x - x') * mean_{k=1..m} dT/dx(x' + k/m (x - x'))`` (Sundararajan et al. 2017; the
    right Riemann sum). ``baselines="black_white"`` averages IG with the min and max baselines
    (paper 002). Completeness: ``sum(IG) ~= T(x) - T(x')``."""

    name = "integrated_gradients"
    summary = "path integral of gradients from a baseline (zero, min, max, black_white)"
    parameters = (
        Parameter("baselines", "choice", "zero", "baseline volume (from Python also a number or a tensor of the "
                  "input's shape)", choices=BASELINES, objects=(int, float, torch.Tensor)),
        Parameter("n_steps", "int", 25, "Riemann steps along the path", minimum=1),
        _BATCH,
    )

    def attribute(
        self,
        inputs: torch.Tensor,
        baselines: Union[str, float, torch.Tensor] = "zero",
        n_steps: int = 25,
        batch_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if n_steps < 1:
            raise SegXAIInputError(f"n_steps must be >= 1, got {n_steps}")
        if isinstance(baselines, str) and baselines == "black_white":
            from ..progress import sub_progress

            halves = [
                self.attribute(inputs, which, n_steps, batch_size, sub_progress(progress, i / 2, (i + 1) / 2), cancel)
                for i, which in enumerate(("min", "max"))
            ]
            return (halves[0] + halves[1]) / 2
        baseline = make_baseline(inputs, baselines)
        delta = inputs - baseline

        def path(chunk: range) -> torch.Tensor:
            alphas = torch.tensor([(k + 1) / n_steps for k in chunk], device=inputs.device, dtype=inputs.dtype)
            return baseline + alphas.view(-1, 1, 1, 1, 1) * delta

        mean_gradient = self._mean_over_samples(path, n_steps, batch_size, lambda s, g, c: g, progress, cancel)
        return delta * mean_gradient


class ExpectedGradients(Attribution):
    """``E_{x'~D, a~U(0,1)} [(x - x') dT/dx(x' + a (x - x'))]`` with references ``x'`` drawn from
    ``references`` ``(N, C, D, H, W)`` (Erion et al. 2021; paper 002)."""

    name = "expected_gradients"
    summary = "integrated gradients averaged over reference volumes and random path points"
    stochastic = True
    parameters = (
        Parameter("references", "object", None, "reference volumes (N, C, D, H, W) on the model grid (explain: also "
                  "a list of images on the input grid)", objects=(torch.Tensor, list, tuple)),
        Parameter("n_samples", "int", 20, "(reference, alpha) draws", minimum=1),
        _BATCH,
        _SEED,
    )

    def attribute(
        self,
        inputs: torch.Tensor,
        references: Optional[torch.Tensor] = None,
        n_samples: int = 20,
        batch_size: int = 0,
        seed: Optional[int] = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if references is None:
            raise SegXAIInputError("expected_gradients needs references: a set of volumes (N, C, D, H, W)")
        references = references.to(inputs.device, inputs.dtype)
        if references.ndim != 5 or references.shape[1:] != inputs.shape[1:]:
            raise SegXAIInputError(
                f"references must be (N, C, D, H, W) with (C, D, H, W) = {tuple(inputs.shape[1:])}, got {tuple(references.shape)}"
            )
        draws = []
        for k in range(n_samples):
            generator = sample_generator(seed, k)
            index = int(torch.randint(references.shape[0], (1,), generator=generator))
            alpha = float(torch.rand((), generator=generator))
            draws.append((index, alpha))

        def make_batch(chunk: range) -> torch.Tensor:
            return torch.stack([references[i] + a * (inputs[0] - references[i]) for i, a in (draws[k] for k in chunk)])

        def statistic(samples, gradients, chunk):
            deltas = torch.stack([inputs[0] - references[draws[k][0]] for k in chunk])
            return deltas * gradients

        return self._mean_over_samples(make_batch, n_samples, batch_size, statistic, progress, cancel)


def stack_references(volumes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack reference volumes ``(C, D, H, W)`` into ``(N, C, D, H, W)``."""
    return torch.stack([torch.as_tensor(v) for v in volumes])
