"""Canonical form of a segmentation network for relevance propagation (LRP; PatternNet reuses it).

LRP needs a rule for every operation that mixes signals, and module hooks only see modules:
MONAI's UNet nests its normalisation inside ``ADN`` blocks and adds / concatenates inside
``forward`` methods (``cx + res`` in ``ResidualUnit``, ``torch.cat`` in ``SkipConnection``);
nnU-Net's ``PlainConvUNet`` and ``ResidualEncoderUNet`` (``dynamic_network_architectures``)
pass a list of encoder outputs to their decoder, which upsamples and concatenates them in its
``forward``, and the residual encoder's blocks add in theirs (``out += residual``).
:func:`canonicalise` therefore rebuilds the network, as a **copy** (the user's model is never
modified), from a few modules that each do one thing:

=======================  ==============================================  ===========================
canonical module         built from                                      forward
=======================  ==============================================  ===========================
:class:`LinearLayer`     ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``,     ``y = s * (W x + b) + c``
                         ``Linear``; a BatchNorm right after it is
                         merged into ``W, b`` exactly; an InstanceNorm /
                         GroupNorm right after it is *attached*
                         (``s, c``: its frozen affine map, below);
                         the ``AvgPool`` of a residual block's skip
                         (as the depthwise convolution it is)
:class:`FrozenNorm`      a norm that does not follow a linear layer      ``y = s * x + c``
:class:`Activation`      ``ReLU``, ``LeakyReLU``, ``PReLU``              the activation
:class:`Add`             ``ResidualUnit``'s ``cx + res``;                ``y = a + b``
                         ``SkipConnection(mode="add")``; nnU-Net's
                         ``BasicBlockD`` / ``BottleneckD``
                         ``out += residual``
:class:`Concat`          ``SkipConnection(mode="cat")`` (UNet skips);    ``y = cat(a, b)``
                         ``PlainConvUNet``'s ``cat((up, skip), 1)``
:class:`Sequential`,     ``nn.Sequential``, MONAI ``Convolution`` /      the same data flow
:class:`Residual`,       ``ADN``, ``ResidualUnit``, ``SkipConnection``,
:class:`Skip`            MONAI ``UNet`` (its ``model``); nnU-Net
                         ``PlainConvUNet``, ``ResidualEncoderUNet``,
                         ``ResidualUNet``, their blocks (below)
(dropped)                ``Dropout*``, ``Identity`` (eval mode)
=======================  ==============================================  ===========================

nnU-Net's PlainConvUNet
-----------------------
Its ``forward`` is ``decoder(encoder(x))`` with the encoder returning every stage's output
(the skips) and the decoder, stage ``d`` from the bottom, computing ``x = stages[d](cat(
transpconvs[d](x), skip), 1)`` and finally ``seg_layers[-1](x)``. Canonically this is the
nested form MONAI's UNet has: level ``s`` is ``encoder.stages[s]`` followed by
``Skip(level s+1 -> transpconvs[d], Concat)`` (upsampled channels first, then the skip) and
``decoder.stages[d]``, ``d = n - 2 - s``; the innermost level is the bottleneck stage and the
seg head follows level 0. The blocks (``StackedConvBlocks``, ``ConvDropoutNormReLU``: conv,
dropout, norm, nonlinearity, in that order or with ``nonlin_first``) are sequences. Deep
supervision (a list of outputs) and encoders that pool (``pool="max"``) are refused.

nnU-Net's ResidualEncoderUNet
-----------------------------
The same nesting, with the ``ResidualEncoder``'s stem (a ``StackedConvBlocks``) before level 0
(the skips are the stages' outputs, after the stem). Its stages are ``StackedResidualBlocks``:
a sequence of ``BasicBlockD`` (``nonlin2(conv2(conv1(x)) + skip(x))``) or ``BottleneckD``
(three convolutions), each the :class:`Residual` MONAI's ``ResidualUnit`` becomes (the same
:class:`Add`, so the same rule) followed by its activation. The skip is the identity, or, where
the block strides or changes the channel count, ``AvgPool(stride, stride)`` (kept only with
a stride) and a 1x1 convolution with its norm. An average pool is the depthwise convolution
with weights ``1 / prod(kernel)``, so it becomes a :class:`LinearLayer` of that convolution and
gets the rule of a hidden convolution (the pool's channel count, which the pool itself does not
know, is the block's ``input_channels``). ``ResidualUNet`` (``UNetResDecoder``: the same
decoder with residual stages) is the same form. Squeeze-and-excitation blocks (a sigmoid gate)
are refused; stochastic depth is the identity in eval mode.

Frozen normalisation
--------------------
InstanceNorm and GroupNorm normalise with statistics of their own input ``z``:
``y = gamma (z - mu(z)) / sqrt(var(z) + eps) + beta`` (``mu``, ``var`` per sample and channel,
or per sample and group). At fixed statistics this is a per-(sample, channel) affine map
``y = s z + c`` with ``s = gamma / sqrt(var + eps)``, ``c = beta - s mu``. Canonical modules
compute ``s`` and ``c`` from the statistics observed in the *current* forward (so their output
equals the network's, to rounding) and **detach** them: the backward pass, and every rule,
sees an affine layer at those statistics, merged into the preceding linear layer when there is
one (weights ``s W``, bias ``s b + c``, per sample). BatchNorm in eval mode (running
statistics) is the same map with constant ``s, c`` and is merged into the weights exactly, as
zennit's ``SequentialMergeBatchNorm`` does. Consequence: the plain gradient of a canonical
network is the gradient at frozen statistics, not the network's own gradient.

Rules
-----
Every leaf (:class:`CanonicalLeaf`) has a ``rule`` attribute, ``None`` outside
:func:`attach_rules`. With a rule, the leaf's backward is ``rule.backward(...)`` (see
:class:`Rule`) instead of autograd's; the rule is told which of the leaf's inputs is the
network's input (its backward then returns *relevance* for that input; elsewhere it returns
the signal ``g`` with ``relevance = value * g``; see :mod:`.lrp`).

Anything else (attention, LayerNorm, GELU, pooling, a custom ``forward``, TorchScript) raises
:class:`~SegXAILib.image.SegXAIInputError` "not supported", naming the first layer without a
rule.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..image import SegXAIInputError
from ..models.card import EAGER_HINT

__all__ = [
    "canonicalise",
    "attach_rules",
    "Rule",
    "CanonicalNetwork",
    "CanonicalLeaf",
    "LinearLayer",
    "NormStatistics",
    "FrozenNorm",
    "Activation",
    "Add",
    "Concat",
    "Sequential",
    "Residual",
    "Skip",
    "input_layers",
]

_nn = torch.nn
_CONVOLUTIONS = (_nn.Conv1d, _nn.Conv2d, _nn.Conv3d)
_TRANSPOSED = (_nn.ConvTranspose1d, _nn.ConvTranspose2d, _nn.ConvTranspose3d)
_BATCH_NORMS = (_nn.BatchNorm1d, _nn.BatchNorm2d, _nn.BatchNorm3d, _nn.SyncBatchNorm)
_INSTANCE_NORMS = (_nn.InstanceNorm1d, _nn.InstanceNorm2d, _nn.InstanceNorm3d)
_NORMS = _BATCH_NORMS + _INSTANCE_NORMS + (_nn.GroupNorm,)
_ACTIVATIONS = (_nn.ReLU, _nn.LeakyReLU, _nn.PReLU)
_DROPPED = (_nn.Identity, _nn.Dropout, _nn.Dropout1d, _nn.Dropout2d, _nn.Dropout3d, _nn.AlphaDropout)
_AVERAGE_POOLS = (_nn.AvgPool1d, _nn.AvgPool2d, _nn.AvgPool3d)
_SUPPORTED_LEAVES = _CONVOLUTIONS + _TRANSPOSED + (_nn.Linear,) + _NORMS + _ACTIVATIONS + _DROPPED

_SUPPORTED_TEXT = (
    "supported: MONAI UNet (ResidualUnit, SkipConnection), nnU-Net's PlainConvUNet, ResidualEncoderUNet and "
    "ResidualUNet (deep supervision off, no squeeze-and-excitation) and "
    "nn.Sequential networks of Conv/ConvTranspose/Linear, "
    "BatchNorm/InstanceNorm/GroupNorm, ReLU/LeakyReLU/PReLU and Dropout; attention and transformer networks "
    "(SwinUNETR, UNETR) are not supported"
)


# ---- rules: the extension point -------------------------------------------------------------------

class Rule:
    """How a canonical leaf passes the backward signal (a relevance rule, a PatternNet rule).

    ``backward(module, inputs, output, state, grad_output, is_input)`` gets the leaf, its
    inputs (a tuple), its output, the ``state`` its ``compute`` saved (e.g. a frozen norm's
    ``(s, c)``), the incoming signal ``grad_output`` (shape of ``output``) and one flag per
    input telling whether that input is the canonical network's input. It returns one tensor
    (or None) per input. It runs under ``torch.enable_grad()``.
    """

    def backward(self, module: "CanonicalLeaf", inputs: tuple, output: torch.Tensor, state: tuple,
                 grad_output: torch.Tensor, is_input: tuple) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError


class _Shared:
    """State shared by the leaves of one canonical network: the tensor it is running on."""

    def __init__(self) -> None:
        self.input: Optional[torch.Tensor] = None


class _RuleFunction(torch.autograd.Function):
    """Forward: the leaf's ``compute``. Backward: the leaf's rule."""

    @staticmethod
    def forward(ctx, module, rule, flags, *inputs):  # type: ignore[override]
        output, state = module.compute(*inputs)
        ctx.module, ctx.rule, ctx.flags, ctx.state = module, rule, flags, state
        ctx.save_for_backward(*inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        *inputs, output = ctx.saved_tensors
        with torch.enable_grad():
            grads = ctx.rule.backward(ctx.module, tuple(inputs), output, ctx.state, grad_output, ctx.flags)
        return (None, None, None, *(g.detach() if g is not None else None for g in grads))


class CanonicalLeaf(_nn.Module):
    """A canonical module with one operation. Subclasses implement ``compute(*inputs) -> (output, state)``."""

    def __init__(self, source: str) -> None:
        super().__init__()
        #: dotted path(s) of the original module(s) this leaf stands for
        self.source = source
        #: the backward rule while :func:`attach_rules` is active, else None (plain autograd)
        self.rule: Optional[Rule] = None
        self._shared: Optional[_Shared] = None

    def compute(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.rule is None:
            return self.compute(*inputs)[0]
        network_input = self._shared.input if self._shared is not None else None
        flags = tuple(x is network_input for x in inputs)
        return _RuleFunction.apply(self, self.rule, flags, *inputs)

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


# ---- normalisation at frozen statistics -----------------------------------------------------------

class NormStatistics(_nn.Module):
    """The per-channel affine map ``(s, c)`` of a normalisation layer for an input ``z``.

    ``affine(z)`` returns ``s``, ``c`` broadcastable to ``z`` ``(B, C, *spatial)``, detached:
    ``(B, C, 1, ..)`` for InstanceNorm / GroupNorm (statistics of ``z`` itself: the current
    forward), ``(1, C, 1, ..)`` for BatchNorm and tracked InstanceNorm (running statistics).
    """

    def __init__(self, norm: _nn.Module, source: str) -> None:
        super().__init__()
        self.source = source
        if isinstance(norm, _BATCH_NORMS):
            if norm.running_mean is None or norm.running_var is None:
                raise SegXAIInputError(
                    f"not supported: {source!r} ({type(norm).__name__}) has no running statistics, so samples of a "
                    "batch would interact; track_running_stats=True is needed"
                )
            self.kind = "running"
        elif isinstance(norm, _INSTANCE_NORMS):
            self.kind = "running" if norm.track_running_stats and norm.running_mean is not None else "instance"
        else:
            self.kind = "group"
            self.groups = int(norm.num_groups)
        self.eps = float(norm.eps)
        channels = int(norm.num_channels if isinstance(norm, _nn.GroupNorm) else norm.num_features)
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        like = next(iter(norm.buffers()), weight)
        factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        self.register_buffer("gamma", weight.detach().clone() if weight is not None else torch.ones(channels, **factory))
        self.register_buffer("beta", bias.detach().clone() if bias is not None else torch.zeros(channels, **factory))
        if self.kind == "running":
            self.register_buffer("mean", norm.running_mean.detach().clone())
            self.register_buffer("var", norm.running_var.detach().clone())

    def constant(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(s, c)`` per channel ``(C,)`` when they do not depend on the input (running statistics)."""
        if self.kind != "running":
            return None
        scale = self.gamma / torch.sqrt(self.var + self.eps)
        return scale, self.beta - self.mean * scale

    def affine(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1) + (1,) * (z.ndim - 2)
        constant = self.constant()
        if constant is not None:
            scale, shift = constant
            return scale.to(z.dtype).view(view), shift.to(z.dtype).view(view)
        # statistics in float32 at least (float16 under autocast), float64 for float64 inputs
        work = z.detach().to(torch.float64 if z.dtype == torch.float64 else torch.float32)
        if self.kind == "instance":
            dims = tuple(range(2, z.ndim))
            var, mean = torch.var_mean(work, dim=dims, keepdim=True, unbiased=False)
        else:
            grouped = work.reshape(z.shape[0], self.groups, -1)
            var, mean = torch.var_mean(grouped, dim=2, keepdim=True, unbiased=False)
            repeat = z.shape[1] // self.groups
            var = var.repeat_interleave(repeat, dim=1).view(z.shape[0], z.shape[1], *(1,) * (z.ndim - 2))
            mean = mean.repeat_interleave(repeat, dim=1).view(z.shape[0], z.shape[1], *(1,) * (z.ndim - 2))
        scale = self.gamma.to(work.dtype).view(view) / torch.sqrt(var + self.eps)
        shift = self.beta.to(work.dtype).view(view) - mean * scale
        return scale.to(z.dtype), shift.to(z.dtype)


# ---- leaves --------------------------------------------------------------------------------------

class LinearLayer(CanonicalLeaf):
    """A convolution, transposed convolution or dense layer, with a merged BatchNorm and/or an
    attached InstanceNorm / GroupNorm: ``y = s * (W x + b) + c`` (``s, c`` from :attr:`norm`
    at the current statistics, detached; absent without a norm).

    Attributes
    ----------
    kind : str
        ``"conv"``, ``"conv_transpose"`` or ``"dense"``.
    weight, bias : torch.Tensor
        Copies (bias None when the layer has none), BatchNorm merged in.
    norm : NormStatistics or None
        The attached InstanceNorm / GroupNorm.
    is_head : bool
        True for the output head: the layer(s) whose output reaches the network output
        without passing through another linear layer (set by :func:`canonicalise`).
    """

    def __init__(self, module: _nn.Module, source: str) -> None:
        super().__init__(source)
        self.kind = "conv_transpose" if isinstance(module, _TRANSPOSED) else "conv" if isinstance(module, _CONVOLUTIONS) else "dense"
        self.register_buffer("weight", module.weight.detach().clone())
        self.register_buffer("bias", module.bias.detach().clone() if module.bias is not None else None)
        self.norm: Optional[NormStatistics] = None
        self.is_head = False
        if self.kind != "dense":
            self.dims = self.weight.ndim - 2
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
            self.groups = module.groups
            self.padding_mode = module.padding_mode
            self.output_padding = getattr(module, "output_padding", None)
            self._explicit_padding = getattr(module, "_reversed_padding_repeated_twice", None)

    @property
    def out_axis(self) -> int:
        """The output's channel axis (1; -1 for a dense layer)."""
        return -1 if self.kind == "dense" else 1

    def channel_view(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-output-channel ``values`` ``(C,)`` shaped to broadcast over an output like ``like``."""
        if self.kind == "dense":
            return values.to(like.dtype)
        return values.to(like.dtype).view(1, -1, *(1,) * (like.ndim - 2))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's linear operation with ``weight`` (and ``bias``) in place of its own."""
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        if self.kind == "dense":
            return F.linear(x, weight, bias)
        if self.kind == "conv_transpose":
            function = getattr(F, f"conv_transpose{self.dims}d")
            return function(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        function = getattr(F, f"conv{self.dims}d")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
            return function(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return function(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def merge_batch_norm(self, statistics: NormStatistics) -> None:
        """Fold a BatchNorm (running statistics) into ``weight`` and ``bias`` exactly."""
        scale, shift = statistics.constant()  # type: ignore[misc]
        if self.kind == "conv_transpose":
            # weight (in, out / groups, ...): out channel o = g * (out / groups) + j
            per_group = self.weight.shape[1]
            w = self.weight.view(self.groups, -1, per_group, *self.weight.shape[2:])
            w = w * scale.view(self.groups, 1, per_group, *(1,) * (self.weight.ndim - 2)).to(w.dtype)
            self.weight = w.reshape(self.weight.shape)
        else:
            self.weight = self.weight * scale.view(-1, *(1,) * (self.weight.ndim - 1)).to(self.weight.dtype)
        bias = self.bias if self.bias is not None else torch.zeros_like(scale)
        self.bias = (bias * scale + shift).to(self.weight.dtype)
        self.source = f"{self.source}+{statistics.source}"

    def attach_norm(self, statistics: NormStatistics) -> None:
        self.norm = statistics
        self.source = f"{self.source}+{statistics.source}"

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        z = self.linear(x, self.weight, self.bias)
        if self.norm is None:
            return z, ()
        scale, shift = self.norm.affine(z)
        return scale * z + shift, (scale, shift)

    def extra_repr(self) -> str:
        head = ", head" if self.is_head else ""
        norm = f", norm={self.norm.kind}" if self.norm is not None else ""
        return f"{self.kind}, weight={tuple(self.weight.shape)}{norm}{head}, source={self.source!r}"


class FrozenNorm(CanonicalLeaf):
    """A normalisation that does not follow a linear layer: ``y = s x + c`` at frozen statistics."""

    def __init__(self, statistics: NormStatistics, source: str) -> None:
        super().__init__(source)
        self.statistics = statistics

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        scale, shift = self.statistics.affine(x)
        return scale * x + shift, (scale, shift)


class Activation(CanonicalLeaf):
    """ReLU, LeakyReLU or PReLU (a copy, never in place)."""

    def __init__(self, module: _nn.Module, source: str) -> None:
        super().__init__(source)
        activation = copy.deepcopy(module)
        if hasattr(activation, "inplace"):
            activation.inplace = False
        for parameter in activation.parameters():
            parameter.requires_grad_(False)
        self.activation = activation

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        return self.activation(x), ()


class Add(CanonicalLeaf):
    """``a + b`` of two tensors of one shape (a residual addition)."""

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if a.shape != b.shape:
            raise SegXAIInputError(f"not supported: {self.source!r} adds tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        return a + b, ()


class Concat(CanonicalLeaf):
    """``torch.cat(inputs, dim)`` (a UNet skip connection)."""

    def __init__(self, dim: int, source: str) -> None:
        super().__init__(source)
        self.dim = int(dim)

    def compute(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        return torch.cat(inputs, dim=self.dim), ()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, source={self.source!r}"


# ---- containers ----------------------------------------------------------------------------------

class Sequential(_nn.Sequential):
    """Canonical modules applied one after the other."""


class Residual(_nn.Module):
    """``add(body(x), residual(x))``; ``residual`` None is the identity (MONAI ResidualUnit)."""

    def __init__(self, body: _nn.Module, residual: Optional[_nn.Module], add: Add) -> None:
        super().__init__()
        self.body, self.residual, self.add = body, residual, add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x) if self.residual is not None else x
        return self.add(self.body(x), res)


class Skip(_nn.Module):
    """``merge(x, submodule(x))`` with a :class:`Concat` or :class:`Add` (MONAI SkipConnection);
    ``merge(submodule(x), x)`` with ``skip_last`` (nnU-Net's decoder: upsampled channels first)."""

    def __init__(self, submodule: _nn.Module, merge: CanonicalLeaf, skip_last: bool = False) -> None:
        super().__init__()
        self.submodule, self.merge, self.skip_last = submodule, merge, bool(skip_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_last:
            return self.merge(self.submodule(x), x)
        return self.merge(x, self.submodule(x))


class CanonicalNetwork(_nn.Module):
    """The canonical copy of a network (:func:`canonicalise`); ``forward`` equals the original's
    (to rounding; the norms at frozen statistics) on inputs ``(B, C, *spatial)``."""

    def __init__(self, body: _nn.Module, source_type: str) -> None:
        super().__init__()
        self.body = body
        self.source_type = source_type
        self._shared = _Shared()
        for module in self.body.modules():
            if isinstance(module, CanonicalLeaf):
                module._shared = self._shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the leaves compare their inputs with this tensor to find the network's input layers
        self._shared.input = x
        try:
            return self.body(x)
        finally:
            self._shared.input = None

    def leaves(self) -> Iterator[tuple[str, CanonicalLeaf]]:
        """``(name, leaf)`` of every canonical leaf, in definition order."""
        for name, module in self.named_modules():
            if isinstance(module, CanonicalLeaf):
                yield name, module

    def linear_layers(self) -> list[LinearLayer]:
        """The linear layers (convolutions, transposed convolutions, dense), in definition order."""
        return [module for _, module in self.leaves() if isinstance(module, LinearLayer)]


# ---- building ------------------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unsupported(module: _nn.Module, path: str, method: str, why: str = "",
                 leaf_first: bool = True) -> SegXAIInputError:
    """The error for ``module``: names its first leaf without a rule, else (or with ``leaf_first``
    False: ``why`` is about the whole module) the module itself."""
    for name, child in (module.named_modules() if leaf_first else ()):
        if not list(child.children()) and not isinstance(child, _SUPPORTED_LEAVES):
            where = _join(path, name) if name else (path or "<network>")
            return SegXAIInputError(
                f"{method}: not supported: no relevance rule for the layer {where!r} ({type(child).__name__}); "
                f"{_SUPPORTED_TEXT}"
            )
    reason = why or "its forward combines its sub-modules in a way without a relevance rule"
    return SegXAIInputError(
        f"{method}: not supported: the layer {path or '<network>'!r} ({type(module).__name__}): {reason}; {_SUPPORTED_TEXT}"
    )


def _known_types() -> dict[str, type]:
    """The container classes with a canonical form: MONAI's and nnU-Net's (when installed)."""
    types: dict[str, type] = {}
    try:
        from monai.networks.blocks.convolutions import ResidualUnit
        from monai.networks.layers.simplelayers import SkipConnection
        from monai.networks.nets.unet import UNet

        types.update(ResidualUnit=ResidualUnit, SkipConnection=SkipConnection, UNet=UNet)
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    try:  # nnU-Net v2's networks (optional dependency)
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
            ConvDropoutNormReLU,
            StackedConvBlocks,
        )
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

        types.update(PlainConvUNet=PlainConvUNet, PlainConvEncoder=PlainConvEncoder, UNetDecoder=UNetDecoder,
                     StackedConvBlocks=StackedConvBlocks, ConvDropoutNormReLU=ConvDropoutNormReLU)
    except ImportError:
        pass
    try:  # its residual networks (apart: older releases may lack one of them)
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet, ResidualUNet
        from dynamic_network_architectures.building_blocks.residual import (
            BasicBlockD,
            BottleneckD,
            StackedResidualBlocks,
        )
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
        from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder

        types.update(ResidualEncoderUNet=ResidualEncoderUNet, ResidualUNet=ResidualUNet,
                     ResidualEncoder=ResidualEncoder, UNetResDecoder=UNetResDecoder,
                     StackedResidualBlocks=StackedResidualBlocks, BasicBlockD=BasicBlockD, BottleneckD=BottleneckD)
    except ImportError:
        pass
    return types


def _is_plain_sequential(module: _nn.Module) -> bool:
    # MONAI's Convolution and ADN are nn.Sequential subclasses with Sequential's own forward
    return isinstance(module, _nn.Sequential) and type(module).forward is _nn.Sequential.forward


def _convert(module: _nn.Module, path: str, method: str, types: dict[str, type]) -> list[_nn.Module]:
    """Canonical modules for ``module`` (a list: Sequentials are flattened into their parent)."""
    if isinstance(module, (_CONVOLUTIONS, _TRANSPOSED, _nn.Linear)):
        return [LinearLayer(module, path)]
    if isinstance(module, _NORMS):
        return [NormStatistics(module, path)]  # merged or wrapped by _sequence
    if type(module) in _ACTIVATIONS:
        return [Activation(module, path)]
    if isinstance(module, _DROPPED):
        return []
    if _is_plain_sequential(module):
        items: list[_nn.Module] = []
        for name, child in module.named_children():
            items += _convert(child, _join(path, name), method, types)
        return items
    kind = type(module)
    if kind is types.get("UNet"):
        return _convert(module.model, _join(path, "model"), method, types)
    if kind is types.get("ResidualUnit"):
        body = _sequence(_convert(module.conv, _join(path, "conv"), method, types))
        residual_items = _convert(module.residual, _join(path, "residual"), method, types)
        residual = _sequence(residual_items) if residual_items else None
        return [Residual(body, residual, Add(f"{path} (cx + res)"))]
    if kind is types.get("SkipConnection"):
        submodule = _sequence(_convert(module.submodule, _join(path, "submodule"), method, types))
        if module.mode == "cat":
            merge: CanonicalLeaf = Concat(module.dim, f"{path} (cat)")
        elif module.mode == "add":
            merge = Add(f"{path} (add)")
        else:
            raise _unsupported(module, path, method, f"SkipConnection mode {module.mode!r} (only 'cat' and 'add')")
        return [Skip(submodule, merge)]
    if kind is types.get("ConvDropoutNormReLU"):
        # conv, dropout, norm, nonlinearity (or nonlin_first): its forward is all_modules
        return _convert(module.all_modules, _join(path, "all_modules"), method, types)
    if kind is types.get("StackedConvBlocks"):
        return _convert(module.convs, _join(path, "convs"), method, types)
    if kind is types.get("PlainConvEncoder") and not module.return_skips:
        return _convert(module.stages, _join(path, "stages"), method, types)
    if kind is types.get("ResidualEncoder") and not module.return_skips:
        return _stem(module, path, method, types) + _convert(module.stages, _join(path, "stages"), method, types)
    if kind is types.get("StackedResidualBlocks"):
        return _convert(module.blocks, _join(path, "blocks"), method, types)
    if kind in (types.get("BasicBlockD"), types.get("BottleneckD")):
        return _residual_block(module, path, method, types)
    if kind in (types.get("PlainConvUNet"), types.get("ResidualEncoderUNet"), types.get("ResidualUNet")):
        return [_nnunet_unet(module, path, method, types)]
    raise _unsupported(module, path, method)


def _stem(encoder: _nn.Module, path: str, method: str, types: dict[str, type]) -> list[_nn.Module]:
    """A ``ResidualEncoder``'s stem (none with ``disable_default_stem``), which runs before its first stage."""
    if getattr(encoder, "stem", None) is None:
        return []
    return _convert(encoder.stem, _join(path, "stem"), method, types)


def _per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _average_pool(pool: _nn.Module, channels: int, like: torch.Tensor, path: str, method: str) -> LinearLayer:
    """``AvgPool{1,2,3}d`` on ``channels`` channels as the depthwise convolution it is: weights
    ``1 / prod(kernel)`` (or ``1 / divisor_override``), ``groups = channels``, no bias."""
    dims = _AVERAGE_POOLS.index(type(pool)) + 1
    padded = any(int(p) != 0 for p in _per_axis(pool.padding, dims))
    if pool.ceil_mode or (padded and not pool.count_include_pad):
        # then the windows at the border average fewer values than a convolution would weigh
        raise _unsupported(pool, path, method, "an average pool with ceil_mode or padding left out of the count is not "
                                               "a convolution", leaf_first=False)
    kernel = _per_axis(pool.kernel_size, dims)
    stride = _per_axis(pool.stride if pool.stride is not None else pool.kernel_size, dims)
    convolution = _CONVOLUTIONS[dims - 1](channels, channels, kernel, stride=stride, padding=pool.padding,
                                          groups=channels, bias=False, device=like.device, dtype=like.dtype)
    divisor = pool.divisor_override or math.prod(kernel)
    with torch.no_grad():
        convolution.weight.fill_(1.0 / divisor)
    return LinearLayer(convolution, path)


def _residual_block(module: _nn.Module, path: str, method: str, types: dict[str, type]) -> list[_nn.Module]:
    """nnU-Net's ``BasicBlockD`` / ``BottleneckD``: ``nonlin(convs(x) + skip(x))`` as a
    :class:`Residual` (MONAI's ResidualUnit form) and its activation (see the module docstring)."""
    if module.apply_se:
        raise _unsupported(module.squeeze_excitation, _join(path, "squeeze_excitation"), method,
                           "squeeze-and-excitation multiplies the channels by a gate computed from them")
    # drop_path (stochastic depth) is the identity in eval mode: nothing to add
    bottleneck = type(module) is types.get("BottleneckD")
    body: list[_nn.Module] = []
    for name in ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2"):
        body += _convert(getattr(module, name), _join(path, name), method, types)
    residual: Optional[_nn.Module] = None
    if isinstance(module.skip, _nn.Module):  # else the identity (a lambda)
        like = module.conv1.conv.weight
        items: list[_nn.Module] = []
        for name, child in module.skip.named_children():
            where = _join(path, f"skip.{name}")
            if isinstance(child, _AVERAGE_POOLS):  # it runs on the block's input
                items.append(_average_pool(child, int(module.input_channels), like, where, method))
            else:
                items += _convert(child, where, method, types)
        residual = _sequence(items) if items else None
    last = "nonlin3" if bottleneck else "nonlin2"
    nonlin = getattr(module, last)  # a lambda (the identity) without a nonlinearity
    tail = _convert(nonlin, _join(path, last), method, types) if isinstance(nonlin, _nn.Module) else []
    return [Residual(_sequence(body), residual, Add(f"{path} (out += residual)")), *tail]


def _nnunet_unet(module: _nn.Module, path: str, method: str, types: dict[str, type]) -> _nn.Module:
    """nnU-Net's ``PlainConvUNet``, ``ResidualEncoderUNet`` or ``ResidualUNet`` as nested
    :class:`Skip` levels (see the module docstring)."""
    encoder, decoder = module.encoder, module.decoder
    encoders = (types.get("PlainConvEncoder"), types.get("ResidualEncoder"))
    decoders = (types.get("UNetDecoder"), types.get("UNetResDecoder"))
    if type(encoder) not in encoders or type(decoder) not in decoders:
        raise _unsupported(module, path, method, "its encoder or decoder is not dynamic_network_architectures' "
                                                 "PlainConvEncoder / ResidualEncoder / UNetDecoder / UNetResDecoder",
                           leaf_first=False)
    if decoder.deep_supervision:
        # about the whole network, whatever its layers: said first
        raise _unsupported(module, path, method, "deep supervision is on (the network returns one output per decoder "
                                                 "stage); set network.decoder.deep_supervision = False",
                           leaf_first=False)
    stages = list(encoder.stages.children())
    count = len(stages)
    if count < 1 or len(decoder.stages) != count - 1 or len(decoder.transpconvs) != count - 1:
        raise _unsupported(module, path, method, "its decoder does not have one stage per encoder stage but the last",
                           leaf_first=False)

    def convert(child: _nn.Module, name: str) -> list[_nn.Module]:
        return _convert(child, _join(path, name), method, types)

    # the encoder converted in forward order: an error names the first layer without a rule
    stem = _stem(encoder, _join(path, "encoder"), method, types)  # ResidualEncoder: before stage 0, not a skip
    encoded = [convert(stage, f"encoder.stages.{s}") for s, stage in enumerate(stages)]
    level = _sequence(encoded[-1])
    for s in range(count - 2, -1, -1):
        d = count - 2 - s  # decoder stages run from the bottleneck up
        upsampled = _sequence([level, *convert(decoder.transpconvs[d], f"decoder.transpconvs.{d}")])
        merge = Concat(1, f"{_join(path, 'decoder')} (cat stage {d})")
        items = encoded[s] + [Skip(upsampled, merge, skip_last=True)]
        level = _sequence(items + convert(decoder.stages[d], f"decoder.stages.{d}"))
    head = len(decoder.seg_layers) - 1
    return _sequence([*stem, level, *convert(decoder.seg_layers[head], f"decoder.seg_layers.{head}")])


def _sequence(items: list[_nn.Module]) -> _nn.Module:
    """One module for ``items``: norms merged into / attached to the linear layer before them,
    other norms wrapped in :class:`FrozenNorm`."""
    merged: list[_nn.Module] = []
    for item in items:
        if isinstance(item, NormStatistics):
            previous = merged[-1] if merged else None
            if isinstance(previous, LinearLayer) and previous.kind != "dense" and previous.norm is None:
                if item.constant() is not None:
                    previous.merge_batch_norm(item)
                else:
                    previous.attach_norm(item)
                continue
            merged.append(FrozenNorm(item, item.source))
            continue
        merged.append(item)
    return merged[0] if len(merged) == 1 else Sequential(*merged)


def _mark_heads(module: _nn.Module) -> list[LinearLayer]:
    """The linear layers whose output reaches ``module``'s output without another linear layer."""
    if isinstance(module, LinearLayer):
        return [module]
    if isinstance(module, Sequential):
        for child in reversed(list(module.children())):
            heads = _mark_heads(child)
            if heads:
                return heads
        return []
    if isinstance(module, Residual):
        return _mark_heads(module.body) + (_mark_heads(module.residual) if module.residual is not None else [])
    if isinstance(module, Skip):
        return _mark_heads(module.submodule)
    return []


def canonicalise(network: _nn.Module, method: str = "lrp") -> CanonicalNetwork:
    """The canonical copy of ``network`` (see the module docstring), in eval mode.

    Parameters
    ----------
    network : torch.nn.Module
        A MONAI ``UNet``, an nnU-Net ``PlainConvUNet``, ``ResidualEncoderUNet`` or
        ``ResidualUNet`` (deep supervision off, no squeeze-and-excitation) or an
        ``nn.Sequential`` (nesting MONAI ``Convolution`` / ``ADN`` / ``ResidualUnit`` /
        ``SkipConnection`` blocks) of supported layers. Not modified.
    method : str
        Names the caller in error messages (``"lrp"``, ``"patternnet"``).

    Returns
    -------
    CanonicalNetwork
        On the network's device and dtype; its weights are copies. The output head's linear
        layers have ``is_head`` set.

    Raises
    ------
    SegXAIInputError
        "not supported", naming the first layer (dotted path and type) without a rule:
        TorchScript networks, attention / transformer blocks (SwinUNETR), LayerNorm, other
        activations, pooling, modules with a custom ``forward``.
    """
    if isinstance(network, torch.jit.ScriptModule):
        raise SegXAIInputError(
            f"{method}: not supported: the network is TorchScript; relevance rules need an eager torch.nn.Module "
            f"({EAGER_HINT})"
        )
    items = _convert(network, "", method, _known_types())
    if not items:
        raise _unsupported(network, "", method, "it has no layer with weights")
    body = _sequence(items)
    for head in _mark_heads(body):
        head.is_head = True
    canonical = CanonicalNetwork(body, type(network).__name__)
    reference = next(iter(network.parameters()), None)
    if reference is not None:  # norms without weights made their defaults on the CPU
        canonical.to(reference.device)
    return canonical.eval()


@contextlib.contextmanager
def attach_rules(network: CanonicalNetwork, assign: Callable[[CanonicalLeaf], Optional[Rule]]) -> Iterator[CanonicalNetwork]:
    """Within the block, each leaf's backward follows ``assign(leaf)`` (None: plain autograd).

    Graphs built inside the block keep their rules after it ends (each forward records the
    rule it ran with).
    """
    previous: list[tuple[CanonicalLeaf, Optional[Rule]]] = []
    try:
        for _, leaf in network.leaves():
            previous.append((leaf, leaf.rule))
            leaf.rule = assign(leaf)
        yield network
    finally:
        for leaf, rule in previous:
            leaf.rule = rule


def input_layers(network: CanonicalNetwork, example: torch.Tensor) -> list[CanonicalLeaf]:
    """The leaves that read the network's input directly, found by running ``example``."""
    found: list[CanonicalLeaf] = []

    def hook(module: _nn.Module, args: Sequence[torch.Tensor]) -> None:
        if any(a is network._shared.input for a in args) and module not in found:
            found.append(module)  # type: ignore[arg-type]

    handles = [leaf.register_forward_pre_hook(hook) for _, leaf in network.leaves()]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for handle in handles:
            handle.remove()
    return found
