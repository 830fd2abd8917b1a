"""Layer-wise relevance propagation (Bach et al. 2015; paper 000; METHODS section 2).

Relevance starts at the target's logits (METHODS section 1): the output relevance is
``R_out = f * dT/df``, i.e. the class-c logits on the target's voxels (``ClassTarget``,
``InstanceTarget``, ``RegionTarget``, ``VoxelTarget``; ``f [f > t]`` for ``ClassThresholdTarget``),
and is redistributed layer by layer down to the input voxels. The result is the input relevance
``(1, C, D, H, W)``, one map per input channel.

How it runs (the modified-gradient formulation)
-----------------------------------------------
The network is first canonicalised (:mod:`.canonical`: BatchNorm merged, InstanceNorm /
GroupNorm frozen at the current statistics, residual additions and skip concatenations as
modules). Then every canonical leaf's backward is replaced by its rule, and the ordinary
backward pass of :class:`~SegXAILib.attribution.forward.SegmentationForward` runs, so the
sliding windows, the Gaussian blend and the targets work unchanged. The signal ``g`` that
flows backward is chosen so that a tensor ``a`` carries the relevance ``R = a * g``: at the
output ``g = dT/df`` gives ``R = f dT/df``; each rule turns its output relevance ``y * g_out``
into the relevance of its inputs and returns ``g_in = R_in / x`` in closed form (the rules
below are all ``x * something``), except for the layers that read the network's input, which
return ``R_in`` itself, so the gradient at the input *is* the relevance map (and the flat and
w^2 rules, whose relevance is not proportional to ``x``, work there). The blend of
overlapping windows, ``out = sum_w m_w f_w / sum_w m_w``, is linear: its plain backward splits
each output voxel's relevance between the windows in proportion to their blended
contributions, and the windows' copies of an input voxel add up. LRP is linear in the output
relevance, so explaining the target's sum equals summing every voxel's explanation (no
per-voxel aggregation is needed, unlike guided backprop).

Rules (all of them; ``z = W x + b`` is the layer's output, with a merged or frozen norm
``W <- s W, b <- s b + c``; ``R_j`` its relevance; ``stab(z) = z + e sign(z)``, sign(0) = 1;
``w+ = max(w, 0)``, ``w- = min(w, 0)``, likewise ``x+``, ``x-``, ``b+``, ``b-``)

==================  ===========================================================================
rule                input relevance ``R_i``
==================  ===========================================================================
epsilon             ``x_i sum_j w_ji R_j / stab(z_j)``, ``e = epsilon`` (the bias absorbs its share)
z+ (alpha1-beta0)   ``sum_j (x+_i w+_ji + x-_i w-_ji) R_j / stab(zp_j)``,
                    ``zp_j = sum_i (x+_i w+_ji + x-_i w-_ji) + b+_j`` (negative contributions
                    get nothing; paper 000's default)
alpha-beta (2, 1)   ``alpha P_i - beta N_i``; ``P`` the z+ term above, ``N_i = sum_j (x+_i w-_ji +
                    x-_i w+_ji) R_j / stab(zn_j)``, ``zn_j = sum_i (x+_i w-_ji + x-_i w+_ji) + b-_j``.
                    Bias-free: ``sum P = sum R``, ``sum N = sum R``, so the positive part sums to
                    2x and the negative part to -1x the relevance (alpha - beta = 1)
flat                ``sum_j 1 R_j / stab(sum_i' 1)`` over the connections of j (input layer only)
w^2                 ``sum_j w_ji^2 R_j / stab(sum_i' w_i'j^2)`` (input layer only)
proportional        additions and frozen norms: ``R_a = a R / stab(y)`` for ``y = a + b`` (and
                    ``R_x = s x R / stab(y)`` for ``y = s x + c``); stabiliser ``e = stabilizer``
concatenation       each input keeps the relevance of its channels
ReLU, LeakyReLU,    pass-through: ``R_z = R_a`` (in the signal form this is the plain gradient,
PReLU               as ``a = act'(z) z`` for these activations)
==================  ===========================================================================

The z+, alpha-beta, flat and w^2 rules use ``e = stabilizer``. They equal zennit's ``Epsilon``,
``ZPlus``, ``AlphaBeta``, ``Flat``, ``WSquare(zero_params=["bias"])`` and ``Norm`` rules
(Testing/test_lrp.py compares whole networks with zennit; zennit's default ``WSquare`` also
squares the bias and adds it to the denominator, which the w^2 rule does not).

Composites (parameter ``composite``): which rule each linear layer gets

===========================  =========================  ============  ========  ==============
composite                    convolutions (hidden)      output head   dense     input layers
===========================  =========================  ============  ========  ==============
zplus (default, paper 000)   z+                         z+            z+        (as their kind)
epsilon                      epsilon                    epsilon       epsilon   (as their kind)
alpha2_beta1                 alpha2-beta1               alpha2-beta1  a2-b1     (as their kind)
epsilon_plus                 z+                         epsilon       epsilon   (as their kind)
epsilon_plus_flat            z+                         epsilon       epsilon   flat
epsilon_plus_wsquare         z+                         epsilon       epsilon   w^2
epsilon_alpha2_beta1         alpha2-beta1               epsilon       epsilon   (as their kind)
epsilon_alpha2_beta1_flat    alpha2-beta1               epsilon       epsilon   flat
===========================  =========================  ============  ========  ==============

"Input layers" are every linear layer that reads the network's input (in MONAI's UNet both
convolutions of the first residual unit), not only the first in definition order as in
zennit. The output head is the linear layer(s) whose output reaches the network output without
another linear layer (:func:`~SegXAILib.attribution.canonical.canonicalise`).

Conservation: with bias-free layers (and norms without shift) every rule but flat / w^2
conserves relevance up to the stabilisers: ``sum(R_input) = T``. Biases, InstanceNorm's mean
subtraction and epsilon absorb relevance, so on trained networks the *relevance sum ratio*
``sum(R_input) / T`` (:func:`relevance_sum_ratio`) differs from 1 (the benchmark reports it for
the bundled lesion model).

Fold ensembles and mirroring: the window function is the mean over members ``k`` and flips
``s`` of ``s(f_k(s(x)))`` (logits averaged). Every member is canonicalised and gets the rules;
the mean and the flips are linear, so their plain backward hands member ``k`` under flip ``s``
the output relevance ``f_ks * dT/dL / passes``: the input relevance is the mean over members
and flips of each one's relevance of its own logits with the same upstream weighting ``dT/dL``
(LRP is linear in the relevance it starts from). Large targets run pass by pass
(:meth:`~SegXAILib.models.windows.WindowedForward.vjp`), one member x flip x window batch at
a time, with the same shares.

Limits: MONAI UNet, nnU-Net's PlainConvUNet, ResidualEncoderUNet and ResidualUNet (deep
supervision off, no squeeze-and-excitation) and ``nn.Sequential`` networks only (see
:mod:`.canonical`; the residual encoder's additions get the proportional rule as MONAI's
ResidualUnit does, the average pool of its skips the rule of a hidden convolution, being the
depthwise convolution with weights ``1 / prod(kernel)``); SwinUNETR and other attention networks
raise :class:`SegXAIInputError` "not supported".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report
from .base import Attribution, Parameter, check_inputs
from .canonical import (
    Activation,
    Add,
    CanonicalLeaf,
    CanonicalNetwork,
    Concat,
    FrozenNorm,
    LinearLayer,
    Rule,
    attach_rules,
    canonicalise,
)
from .forward import SegmentationForward

__all__ = [
    "LRP",
    "Composite",
    "COMPOSITES",
    "RULE_NAMES",
    "Epsilon",
    "AlphaBeta",
    "Flat",
    "WSquare",
    "Proportional",
    "Split",
    "PassThrough",
    "stabilise",
    "lrp_rules",
    "relevance_sum_ratio",
]


# ---- rule math -----------------------------------------------------------------------------------

def stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with sign(0) = 1 (zennit's convention); an exact zero that
    remains (epsilon 0) becomes 1, where the relevance divided by it is 0 anyway."""
    denominator = z + ((z == 0).to(z.dtype) + z.sign()) * epsilon
    return torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def _work(t: torch.Tensor) -> torch.Tensor:
    """Rule arithmetic in float32 at least (half precision under CUDA autocast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _finish(signal: torch.Tensor, x: torch.Tensor, is_input: bool) -> torch.Tensor:
    """The backward signal for input ``x``: relevance ``x * signal`` at the network input,
    else the signal itself (its relevance is ``x * signal``)."""
    return (x * signal if is_input else signal).to(x.dtype)


def _relevance(output: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    return _work(output) * _work(grad_output)


def _transpose(module: LinearLayer, x: torch.Tensor, weight: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """``W^T cotangent`` for the layer's linear map with ``weight``: the gradient of
    ``module.linear(x, weight)`` with respect to ``x`` (exact for any stride / padding)."""
    weight = weight.to(x.dtype)
    cotangent = cotangent.to(x.dtype)
    if module.kind == "dense":
        return cotangent @ weight
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        # the input gradient alone (autograd would run the forward convolution again first)
        transposed = module.kind == "conv_transpose"
        gradient, _, _ = torch.ops.aten.convolution_backward(
            cotangent, x, weight, None, list(module.stride), list(module.padding), list(module.dilation), transposed,
            list(module.output_padding) if transposed else [0] * module.dims, module.groups, [True, False, False],
        )
        return gradient
    leaf = x.detach().requires_grad_(True)
    z = module.linear(leaf, weight)
    (gradient,) = torch.autograd.grad(z, leaf, cotangent.to(z.dtype))
    return gradient


def _effective_bias(module: LinearLayer, like: torch.Tensor, state: tuple) -> Optional[torch.Tensor]:
    """``b`` of the layer, or ``s b + c`` with an attached frozen norm ``(s, c)``."""
    bias = module.channel_view(module.bias, like) if module.bias is not None else None
    if not state:
        return bias
    scale, shift = (_work(t) for t in state)
    return shift if bias is None else scale * bias + shift


class Epsilon(Rule):
    """LRP-epsilon on a linear layer: ``R_i = x_i sum_j w_ji R_j / stab(z_j)``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = float(epsilon)

    def backward(self, module, inputs, output, state, grad_output, is_input):
        (x,) = inputs
        signal = _relevance(output, grad_output) / stabilise(_work(output), self.epsilon)
        if state:
            signal = signal * _work(state[0])  # the merged weight is s W
        return (_finish(_transpose(module, _work(x), module.weight, signal), x, is_input[0]),)


class AlphaBeta(Rule):
    """LRP-alpha-beta on a linear layer (z+ is ``alpha=1, beta=0``); see the module table.

    With an attached frozen norm the merged weight is ``s W`` per sample and channel: where
    ``s < 0`` the positive contributions are those of ``W-`` on ``x+`` and ``W+`` on ``x-``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def _signals(self, module: LinearLayer, x: torch.Tensor, relevance: torch.Tensor, state: tuple,
                 negative: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The signals ``G+``, ``G-`` with positive term ``P = x G+`` and negative ``N = x G-``."""
        x = _work(x)
        weight = module.weight.to(x.dtype)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        x_pos = x.clamp(min=0).detach().requires_grad_(True)
        x_neg = x.clamp(max=0).detach().requires_grad_(True)
        positive = module.linear(x_pos, w_pos) + module.linear(x_neg, w_neg)
        scale = _work(state[0]) if state else None
        flip = scale is not None and bool((scale < 0).any())
        negative_sum = module.linear(x_pos, w_neg) + module.linear(x_neg, w_pos) if (negative or flip) else None
        if scale is not None:
            if flip:
                positive, negative_sum = (torch.where(scale > 0, scale * positive, scale * negative_sum),
                                          torch.where(scale > 0, scale * negative_sum, scale * positive))
            else:
                positive = scale * positive
                negative_sum = scale * negative_sum if negative_sum is not None else None
        bias = _effective_bias(module, positive, state)

        def signal(z: torch.Tensor, denominator: torch.Tensor, retain: bool) -> torch.Tensor:
            cotangent = relevance / stabilise(denominator, self.stabilizer)
            g_pos, g_neg = torch.autograd.grad(z, (x_pos, x_neg), cotangent, retain_graph=retain, allow_unused=True)
            g_pos = torch.zeros_like(x) if g_pos is None else g_pos
            g_neg = torch.zeros_like(x) if g_neg is None else g_neg
            return torch.where(x > 0, g_pos, g_neg)

        z_pos = positive + bias.clamp(min=0) if bias is not None else positive
        g_positive = signal(positive, z_pos, retain=negative)
        if not negative:
            return g_positive, None
        assert negative_sum is not None
        z_neg = negative_sum + bias.clamp(max=0) if bias is not None else negative_sum
        return g_positive, signal(negative_sum, z_neg, retain=False)

    def terms(self, module: LinearLayer, x: torch.Tensor, output_relevance: torch.Tensor,
              state: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive and negative terms ``(P, N)`` of the input relevance
        ``R_in = alpha P - beta N`` for the output relevance ``output_relevance``."""
        with torch.enable_grad():
            g_pos, g_neg = self._signals(module, x, _work(output_relevance), state, negative=True)
        assert g_neg is not None
        return _work(x) * g_pos, _work(x) * g_neg

    def backward(self, module, inputs, output, state, grad_output, is_input):
        (x,) = inputs
        relevance = _relevance(output, grad_output)
        g_pos, g_neg = self._signals(module, x, relevance, state, negative=self.beta != 0)
        signal = self.alpha * g_pos if g_neg is None else self.alpha * g_pos - self.beta * g_neg
        return (_finish(signal, x, is_input[0]),)


class _InputOnlyRule(Rule):
    """A rule whose relevance is not proportional to the input (flat, w^2): input layers only."""

    name = ""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def _denominator_map(self, module: LinearLayer, ones: torch.Tensor, state: tuple) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward(self, module, inputs, output, state, grad_output, is_input):
        (x,) = inputs
        if not is_input[0]:
            raise RuntimeError(f"the {self.name} rule applies only to layers reading the network input ({module.source})")
        ones = torch.ones_like(_work(x)).requires_grad_(True)
        z = self._denominator_map(module, ones, state)
        cotangent = _relevance(output, grad_output) / stabilise(z, self.stabilizer)
        (relevance,) = torch.autograd.grad(z, ones, cotangent)
        return (relevance.to(x.dtype),)


class Flat(_InputOnlyRule):
    """LRP-flat: every connection weighs 1 (``R_i = sum_j R_j / #connections(j)``)."""

    name = "flat"

    def _denominator_map(self, module, ones, state):
        return module.linear(ones, torch.ones_like(module.weight, dtype=ones.dtype))


class WSquare(_InputOnlyRule):
    """LRP-w^2: connections weigh ``w^2`` (``(s w)^2`` with a frozen norm)."""

    name = "wsquare"

    def _denominator_map(self, module, ones, state):
        z = module.linear(ones, module.weight.to(ones.dtype) ** 2)
        return z * _work(state[0]) ** 2 if state else z


class Proportional(Rule):
    """Additions ``y = a + b`` and frozen norms ``y = s x + c``: each input gets the relevance
    in proportion to its contribution, ``R_a = a R / stab(y)`` (zennit's ``Norm`` rule)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def backward(self, module, inputs, output, state, grad_output, is_input):
        signal = _relevance(output, grad_output) / stabilise(_work(output), self.stabilizer)
        if state:  # a frozen norm: the contribution of x is s x
            signal = signal * _work(state[0])
        return tuple(_finish(signal, x, flag) for x, flag in zip(inputs, is_input))


class Split(Rule):
    """Concatenation: each input keeps the relevance of its own channels."""

    def backward(self, module, inputs, output, state, grad_output, is_input):
        parts = _work(grad_output).split([x.shape[module.dim] for x in inputs], dim=module.dim)
        return tuple(_finish(part, x, flag) for part, x, flag in zip(parts, inputs, is_input))


class PassThrough(Rule):
    """ReLU / LeakyReLU / PReLU: ``R_z = R_a``; in the signal form ``g_z = act'(z) g_a``
    (exact since ``a = act'(z) z``)."""

    def backward(self, module, inputs, output, state, grad_output, is_input):
        (x,) = inputs
        leaf = _work(x).detach().requires_grad_(True)
        (signal,) = torch.autograd.grad(module.activation(leaf), leaf, _work(grad_output))
        return (_finish(signal, x, is_input[0]),)


class _LinearRule(Rule):
    """A linear layer's rule: ``first`` (flat / w^2) when it reads the network input, else ``rule``."""

    def __init__(self, rule: Rule, first: Optional[Rule]) -> None:
        self.rule, self.first = rule, first

    def backward(self, module, inputs, output, state, grad_output, is_input):
        chosen = self.first if self.first is not None and is_input[0] else self.rule
        return chosen.backward(module, inputs, output, state, grad_output, is_input)


# ---- composites ----------------------------------------------------------------------------------

RULE_NAMES = ("epsilon", "zplus", "alpha2_beta1", "flat", "wsquare")


@dataclass(frozen=True)
class Composite:
    """Rule names (:data:`RULE_NAMES`) per kind of linear layer; ``first`` (optional) takes
    precedence for the layers reading the network input."""

    convolution: str
    head: str
    dense: str
    first: Optional[str] = None
    description: str = ""


COMPOSITES: dict[str, Composite] = {
    "zplus": Composite("zplus", "zplus", "zplus", None, "z+ (alpha1-beta0) everywhere: negative contributions suppressed (paper 000)"),
    "epsilon": Composite("epsilon", "epsilon", "epsilon", None, "epsilon everywhere"),
    "alpha2_beta1": Composite("alpha2_beta1", "alpha2_beta1", "alpha2_beta1", None, "alpha2-beta1 everywhere"),
    "epsilon_plus": Composite("zplus", "epsilon", "epsilon", None, "z+ on convolutions, epsilon on the head and dense layers"),
    "epsilon_plus_flat": Composite("zplus", "epsilon", "epsilon", "flat", "epsilon_plus with flat on the input layers"),
    "epsilon_plus_wsquare": Composite("zplus", "epsilon", "epsilon", "wsquare", "epsilon_plus with w^2 on the input layers"),
    "epsilon_alpha2_beta1": Composite("alpha2_beta1", "epsilon", "epsilon", None,
                                      "alpha2-beta1 on convolutions, epsilon on the head and dense layers"),
    "epsilon_alpha2_beta1_flat": Composite("alpha2_beta1", "epsilon", "epsilon", "flat",
                                           "epsilon_alpha2_beta1 with flat on the input layers"),
}


def _rule(name: str, epsilon: float, stabilizer: float) -> Rule:
    return {
        "epsilon": lambda: Epsilon(epsilon),
        "zplus": lambda: AlphaBeta(1.0, 0.0, stabilizer),
        "alpha2_beta1": lambda: AlphaBeta(2.0, 1.0, stabilizer),
        "flat": lambda: Flat(stabilizer),
        "wsquare": lambda: WSquare(stabilizer),
    }[name]()


@contextlib.contextmanager
def lrp_rules(network: CanonicalNetwork, composite: str = "zplus", epsilon: float = 1e-6,
              stabilizer: float = 1e-6) -> Iterator[CanonicalNetwork]:
    """Within the block, backward passes through the canonical ``network`` propagate relevance
    with ``composite`` (:data:`COMPOSITES`); the gradient at the input is the relevance."""
    if composite not in COMPOSITES:
        raise SegXAIInputError(f"parameter composite: expected one of {list(COMPOSITES)}, got {composite!r}")
    spec = COMPOSITES[composite]
    first = _rule(spec.first, epsilon, stabilizer) if spec.first else None
    rules = {name: _rule(name, epsilon, stabilizer) for name in {spec.convolution, spec.head, spec.dense}}
    proportional, split, passthrough = Proportional(stabilizer), Split(), PassThrough()

    def assign(leaf: CanonicalLeaf) -> Rule:
        if isinstance(leaf, LinearLayer):
            name = spec.head if leaf.is_head else spec.dense if leaf.kind == "dense" else spec.convolution
            return _LinearRule(rules[name], first)
        if isinstance(leaf, (Add, FrozenNorm)):
            return proportional
        if isinstance(leaf, Concat):
            return split
        if isinstance(leaf, Activation):
            return passthrough
        raise SegXAIInputError(f"lrp: not supported: no relevance rule for {leaf.source!r} ({type(leaf).__name__})")

    with attach_rules(network, assign):
        yield network


def relevance_sum_ratio(forward: SegmentationForward, inputs: torch.Tensor, relevance: torch.Tensor) -> float:
    """``sum(relevance) / T(x)``: 1 when relevance is conserved (bias-free networks)."""
    with torch.no_grad():
        target = float(forward(check_inputs(inputs)).sum())
    return float(relevance.double().sum()) / target if target != 0 else float("nan")


# ---- the method ------------------------------------------------------------------------------------

_COMPOSITE = Parameter(
    "composite", "choice", "zplus",
    "rules per layer: zplus (paper 000: negative contributions suppressed), epsilon, alpha2_beta1, epsilon_plus "
    "(z+ convolutions, epsilon head), epsilon_plus_flat, epsilon_plus_wsquare, epsilon_alpha2_beta1, "
    "epsilon_alpha2_beta1_flat",
    choices=tuple(COMPOSITES),
)
_EPSILON = Parameter("epsilon", "float", 1e-6, "epsilon of the epsilon rule (relevance it absorbs grows with it)", minimum=0.0)
_STABILIZER = Parameter("stabilizer", "float", 1e-6, "stabiliser of the other rules' denominators", minimum=1e-12)


class LRP(Attribution):
    """Layer-wise relevance propagation of the target's logits to the input voxels.

    Runs on a canonical copy of the network (:func:`~SegXAILib.attribution.canonical.canonicalise`;
    of each member of a fold ensemble) through the same window-exact forward, mirror flips and
    target as the other methods; see the module docstring for the rules, composites and
    ensembles.
    """

    name = "lrp"
    summary = "layer-wise relevance propagation of the target's logits (rule composites; default z+)"
    parameters = (_COMPOSITE, _EPSILON, _STABILIZER)

    def __init__(self, forward: SegmentationForward) -> None:
        super().__init__(forward)
        self._relevance_forward: Optional[SegmentationForward] = None

    @property
    def relevance_forward(self) -> SegmentationForward:
        """The forward of the canonical copies, one per ensemble member (built once; the user's
        networks are not touched)."""
        if self._relevance_forward is None:
            forward = self.forward
            members = [canonicalise(network, self.name) for network in forward.networks]
            self._relevance_forward = SegmentationForward(
                members[0], forward.card, forward.spatial_shape, forward.target,
                amp=forward.windowed.amp, window_batch=forward.window_batch, max_graph_windows=forward.max_graph_windows,
                networks=members,
            )
        return self._relevance_forward

    def attribute(
        self,
        inputs: torch.Tensor,
        composite: str = "zplus",
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        """The input relevance ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        composite : str
            One of :data:`COMPOSITES`.
        epsilon : float
            Of the epsilon rule.
        stabilizer : float
            Of the z+, alpha-beta, flat, w^2 and proportional rules.
        """
        inputs = check_inputs(inputs)
        _COMPOSITE.check(composite)
        _EPSILON.check(epsilon)
        _STABILIZER.check(stabilizer)
        if cancel is not None:
            cancel.raise_if_cancelled()
        forward = self.relevance_forward
        with contextlib.ExitStack() as stack:
            for member in forward.networks:  # every fold's canonical copy propagates relevance
                stack.enter_context(lrp_rules(member, composite, epsilon, stabilizer))  # type: ignore[arg-type]
            relevance = forward.gradient(inputs)
        report(progress, 1.0, self.name)
        return relevance
