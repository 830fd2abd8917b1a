"""The pattern backward: every weighted layer's backward with the patterns (PatternNet) or
``w * a`` (PatternAttribution) in place of its weights, normalisations as affine maps at the
forward's statistics, and the map of a target through the sliding windows."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ...image import SegXAIInputError
from ...progress import CancelToken, ProgressCallback
from ..base import check_inputs
from ..forward import SegmentationForward
from .algebra import _NORM_TYPES, _UNSUPPORTED_NORMS, _input_gradient, pattern_layers
from .fit import fit_patterns_on_tensors
from .store import PatternSet, default_patterns_path, load_patterns

__all__ = ["MODES", "STARTS", "norm_scale", "pattern_backward", "pattern_map", "resolve_patterns"]

MODES = ("signal", "attribution")
STARTS = ("value", "ones")


class _PatternRule(torch.autograd.Function):
    """Forward: the layer's output (a copy). Backward: the input gradient with the pattern
    weights (split by the forward's regime for two_component); nothing through the layer's own
    backward."""

    @staticmethod
    def forward(ctx, x, output, module, weights, positive):  # type: ignore[override]
        ctx.module, ctx.weights, ctx.input_shape = module, weights, x.shape
        ctx.save_for_backward(positive)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (positive,) = ctx.saved_tensors
        weights = [w.to(grad_output.dtype) for w in ctx.weights]
        if len(weights) == 1:
            grad_input = _input_gradient(ctx.module, grad_output, weights[0], ctx.input_shape)
        else:
            # where, not a product with the mask: an infinite signal must not become inf * 0 = nan
            zero = torch.zeros((), dtype=grad_output.dtype, device=grad_output.device)
            grad_input = _input_gradient(ctx.module, torch.where(positive, grad_output, zero), weights[0],
                                         ctx.input_shape)
            grad_input = grad_input + _input_gradient(ctx.module, torch.where(positive, zero, grad_output), weights[1],
                                                      ctx.input_shape)
        return grad_input, None, None, None, None


class _AffineRule(torch.autograd.Function):
    """Forward: the norm's output (a copy). Backward: ``g * scale``, the norm as an affine map
    at the forward's (fixed) statistics."""

    @staticmethod
    def forward(ctx, x, output, scale):  # type: ignore[override]
        ctx.save_for_backward(scale)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad_output * scale.to(grad_output.dtype), None, None


def _channel_view(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.reshape(1, -1, *([1] * (x.ndim - 2)))


def norm_scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``weight / sqrt(var + eps)`` of a normalisation at input ``x``, broadcastable to ``x``:
    the derivative of the norm with its mean and variance held fixed."""
    x = x.detach().float()
    if isinstance(module, torch.nn.LayerNorm):
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        scale = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().float()
        return scale
    if isinstance(module, torch.nn.GroupNorm):
        groups = module.num_groups
        var = x.reshape(x.shape[0], groups, -1).var(dim=2, unbiased=False)
        scale = torch.rsqrt(var + module.eps).repeat_interleave(x.shape[1] // groups, dim=1)
        scale = scale.reshape(*x.shape[:2], *([1] * (x.ndim - 2)))
    else:  # instance / batch norm
        instance = isinstance(module, torch.nn.modules.instancenorm._InstanceNorm)
        batch_statistics = module.training or module.running_var is None
        if instance:
            batch_statistics = module.training or not module.track_running_stats
        if batch_statistics:
            dims = tuple(range(2, x.ndim)) if instance else (0, *range(2, x.ndim))
            var = x.var(dim=dims, unbiased=False, keepdim=True)
        else:
            var = _channel_view(module.running_var.detach().float(), x)
        scale = torch.rsqrt(var + module.eps)
    if getattr(module, "weight", None) is not None:
        scale = scale * _channel_view(module.weight.detach().float(), x)
    return scale


@contextlib.contextmanager
def pattern_backward(network: torch.nn.Module, pattern_set: PatternSet, mode: str = "signal") -> Iterator[None]:
    """Within the block, backward passes through ``network`` use the patterns.

    Parameters
    ----------
    network : torch.nn.Module
    pattern_set : PatternSet
        Checked against the network's layers (not its weights: see :meth:`PatternSet.check`).
    mode : str
        ``"signal"`` (PatternNet: ``a`` in place of ``w``) or ``"attribution"``
        (PatternAttribution: ``w * a``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pattern_set.check(network)
    layers = pattern_layers(network)
    for name, module in network.named_modules():
        if isinstance(module, _UNSUPPORTED_NORMS):
            raise SegXAIInputError(f"patterns: no rule for the normalisation {name!r} ({type(module).__name__})")
    keys = ("all",) if pattern_set.estimator == "linear" else ("positive", "negative")
    handles = []

    def layer_hook(weights: tuple[torch.Tensor, ...]):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            positive = (output.detach() > 0) if len(weights) > 1 else torch.empty(0, device=output.device)
            return _PatternRule.apply(args[0], output, module, weights, positive)

        return hook

    def norm_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _AffineRule.apply(args[0], output, norm_scale(module, args[0]))

    try:
        for name, module in layers:
            weight = module.weight.detach()
            patterns = [pattern_set.patterns[name][k].to(device=weight.device, dtype=weight.dtype) for k in keys]
            if mode == "attribution":
                patterns = [weight * p for p in patterns]
            handles.append(module.register_forward_hook(layer_hook(tuple(patterns))))
        for module in network.modules():
            if isinstance(module, _NORM_TYPES):
                handles.append(module.register_forward_hook(norm_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def pattern_map(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    pattern_set: PatternSet,
    mode: str = "signal",
    start: str = "value",
) -> torch.Tensor:
    """PatternNet signal (``mode="signal"``) or PatternAttribution (``"attribution"``) of the
    forward's target at ``inputs`` ``(1, C, D, H, W)``; returns ``(1, C, D, H, W)``.

    The backward starts from ``dT/df * f`` (``start="value"``) or ``dT/df`` (``"ones"``) on the
    blended logits and runs window batch by window batch (memory of one window batch).
    """
    inputs = check_inputs(inputs)
    if start not in STARTS:
        raise SegXAIInputError(f"start must be one of {STARTS}, got {start!r}")
    with torch.no_grad():
        logits = forward.logits(inputs).float()
    logits.requires_grad_(True)
    with torch.enable_grad():
        (cotangent,) = torch.autograd.grad(forward.target(logits).sum(), logits)
    if start == "value":
        cotangent = cotangent * logits.detach()
    with pattern_backward(forward.network, pattern_set, mode):
        result = forward.windowed.vjp(inputs, cotangent, forward.target.support, forward.window_batch)
    if not bool(torch.isfinite(result).all()):
        # PatternNet's signal is not normalised: it grows as the product of the layers' pattern
        # gains (|a| >= 1 / |w| per channel), which a deep network can take past float32
        method = "pattern_net" if mode == "signal" else "pattern_attribution"
        raise SegXAIInputError(
            f"{method}: the backward overflowed ({int((~torch.isfinite(result)).sum())} non-finite values): "
            "the patterns' gains multiply over the network's depth beyond float32's range"
            + ("; pattern_attribution (w * a) stays bounded" if mode == "signal" else "")
        )
    return result


def resolve_patterns(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    estimator: str,
    patterns: Union[str, os.PathLike, PatternSet, None],
    method: str = "patterns",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PatternSet:
    """The pattern set a method uses: a PatternSet, a file, ``"input"`` (fitted on ``inputs``'s
    windows), or the default file beside the model card; checked against the model."""
    if len(forward.networks) > 1:  # patterns are fitted to one network's layers
        raise SegXAIInputError(f"{method}: a fold ensemble of {len(forward.networks)} networks is not supported "
                               "(patterns belong to one network); explain one member's card")
    if isinstance(patterns, PatternSet):
        pattern_set = patterns
    elif str(patterns or "") == "input":
        return fit_patterns_on_tensors(forward.network, forward.card, [inputs], (estimator,),
                                       window_batch=forward.window_batch, progress=progress, cancel=cancel)[estimator]
    else:
        if patterns:
            path = Path(patterns)
            if not path.is_file():
                raise SegXAIInputError(f"{method}: patterns={str(patterns)!r}: no such file")
        else:
            path = default_patterns_path(forward.card, estimator)
            if not path.is_file():
                raise SegXAIInputError(
                    f"{method}: no {estimator} patterns for model {forward.card.name!r} (expected {path}); fit them once "
                    f"with: segxai patterns fit --model {path.parent} --images DIR --estimator {estimator} "
                    "(or pass patterns=PATH, or patterns=input to fit them on the explained volume)"
                )
        pattern_set = load_patterns(path)
    if pattern_set.estimator != estimator:
        raise SegXAIInputError(
            f"{method}: patterns {pattern_set.source or ''} were fitted with the {pattern_set.estimator} estimator, "
            f"but estimator={estimator} was asked; pass estimator={pattern_set.estimator}"
        )
    pattern_set.check(forward.network, forward.card)
    return pattern_set
