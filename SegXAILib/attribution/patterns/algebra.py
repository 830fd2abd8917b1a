"""Layers and linear algebra of the patterns: which modules get a pattern, weight-shaped
tensors as one row per output channel, the receptive-field sums as convolution weight
gradients, the input gradient with other weights, and the pattern estimator's solve (see the
package docstring, :mod:`SegXAILib.attribution.patterns`)."""

from __future__ import annotations

import torch

from ...image import SegXAIInputError
from ...models.card import EAGER_HINT

__all__ = ["pattern_layers"]

_CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_TRANSPOSED = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_LAYER_TYPES = _CONVOLUTIONS + _TRANSPOSED + (torch.nn.Linear,)
_NORM_TYPES = (
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)
#: normalisations that are not per-channel affine maps: no rule, so refused
_UNSUPPORTED_NORMS = (torch.nn.LocalResponseNorm, torch.nn.CrossMapLRN2d)

#: relative size below which ``w^T cov`` counts as zero
_DEGENERATE = 1e-6


def _check_eager(network: torch.nn.Module, what: str) -> None:
    if isinstance(network, torch.jit.ScriptModule):
        raise SegXAIInputError(
            f"{what}: the network is TorchScript; patterns need an eager torch.nn.Module whose layers are modules "
            f"({EAGER_HINT})"
        )


def pattern_layers(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers that get a pattern, ``(dotted name, module)`` in module order.

    Raises SegXAIInputError for a TorchScript network or a convolution whose padding is not
    zeros (its statistics would need the padded input).
    """
    _check_eager(network, "patterns")
    layers = []
    for name, module in network.named_modules():
        if not isinstance(module, _LAYER_TYPES):
            continue
        if isinstance(module, _CONVOLUTIONS + _TRANSPOSED) and module.padding_mode != "zeros":
            raise SegXAIInputError(
                f"patterns: layer {name!r} pads with {module.padding_mode!r}; only zero padding is supported"
            )
        layers.append((name, module))
    if not layers:
        raise SegXAIInputError("patterns: the network has no Conv / ConvTranspose / Linear layer")
    return layers


def _padding(module: torch.nn.Module) -> list[int]:
    padding = module.padding
    if isinstance(padding, str):  # "valid" / "same" (stride 1)
        if padding == "valid":
            return [0] * len(module.kernel_size)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise SegXAIInputError(f"patterns: padding='same' with an even kernel is not supported ({module})")
        return [t // 2 for t in total]
    return list(padding)


def _out_channels(module: torch.nn.Module) -> int:
    if isinstance(module, _TRANSPOSED):
        return module.weight.shape[1] * module.groups
    return module.weight.shape[0]


def _rows(tensor: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """A weight-shaped tensor as one row per output channel ``(O, P)``."""
    if isinstance(module, _TRANSPOSED):  # (I, O/g, *k) -> (O, I/g * k)
        g = module.groups
        i, o_g = tensor.shape[0], tensor.shape[1]
        return tensor.reshape(g, i // g, o_g, -1).permute(0, 2, 1, 3).reshape(g * o_g, -1)
    return tensor.reshape(tensor.shape[0], -1)


def _unrows(rows: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Inverse of :func:`_rows`."""
    shape = module.weight.shape
    if isinstance(module, _TRANSPOSED):
        g = module.groups
        i, o_g = shape[0], shape[1]
        return rows.reshape(g, o_g, i // g, -1).permute(0, 2, 1, 3).reshape(shape)
    return rows.reshape(shape)


def _weight_gradient(module: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor, shape: list[int]) -> torch.Tensor:
    placeholder = cotangent.new_empty(1).expand(shape)
    return torch.ops.aten.convolution_backward(
        cotangent, x, placeholder, None, list(module.stride), _padding(module), list(module.dilation),
        isinstance(module, _TRANSPOSED), list(getattr(module, "output_padding", [0] * len(module.stride))),
        module.groups, (False, True, False),
    )[1]


def _conv_weight_sums(module: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> list[torch.Tensor]:
    """``sum_positions x_patch * cotangent_j`` (weight-shaped), the weight gradient, for each of
    the ``n`` cotangents stacked along the channel axis of ``cotangent`` ``(B, n * O, ...)``."""
    outputs = _out_channels(module)
    if module.groups > 1:  # stacking would mix the groups: one call per cotangent
        return [_weight_gradient(module, x, part, list(module.weight.shape)) for part in cotangent.split(outputs, dim=1)]
    # one call for all cotangents (3-5x faster on the CPU than one call each)
    axis = 1 if isinstance(module, _TRANSPOSED) else 0
    shape = list(module.weight.shape)
    shape[axis] *= cotangent.shape[1] // outputs
    return list(_weight_gradient(module, x, cotangent, shape).split(module.weight.shape[axis], dim=axis))


def _input_gradient(module: torch.nn.Module, grad_output: torch.Tensor, weight: torch.Tensor,
                    input_shape: torch.Size) -> torch.Tensor:
    """The layer's input gradient with ``weight`` in place of its own (no bias)."""
    if isinstance(module, torch.nn.Linear):
        return grad_output @ weight
    placeholder = grad_output.new_empty(1).expand(input_shape)
    return torch.ops.aten.convolution_backward(
        grad_output, placeholder, weight, None, list(module.stride), _padding(module), list(module.dilation),
        isinstance(module, _TRANSPOSED), list(getattr(module, "output_padding", [0] * len(module.stride))),
        module.groups, (True, False, False),
    )[0]


def _solve(w: torch.Tensor, sum_x: torch.Tensor, sum_xy: torch.Tensor, count: torch.Tensor,
           mean_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[xy] - E[x] mean_y) / w^T(...)`` per row, and which rows are well defined."""
    n = count.clamp(min=1)[:, None]
    cov = sum_xy / n - (sum_x / n) * mean_y[:, None]
    denominator = (w * cov).sum(1)
    scale = w.norm(dim=1) * cov.norm(dim=1)
    ok = (count >= 2) & (scale > 0) & (denominator.abs() > _DEGENERATE * scale)
    safe = torch.where(ok, denominator, torch.ones_like(denominator))
    return cov / safe[:, None], ok
