"""Modified-backward methods (METHODS section 2): guided backpropagation and deconvolution.

Both are the gradient ``dT/dx`` with the backward pass through every activation *module*
replaced by a rule. With ``g`` the gradient arriving at the activation's output, ``x`` its
input and ``act'`` its exact derivative:

=====================================  ==============================  =====================
activation module                      guided backprop (000, 002)      deconvolution (002)
=====================================  ==============================  =====================
``nn.ReLU``                            ``relu(g) * [x > 0]``           ``relu(g)``
``nn.LeakyReLU`` (slope ``a``)         ``relu(act'(x) g)``,            ``relu(g)``
                                       ``act' = 1 (x > 0) else a``
``nn.PReLU`` (slope per channel or     ``relu(act'(x) g)``,            ``relu(g)``
one for all channels, ``w``)           ``act' = 1 (x > 0) else w``
``nn.GELU`` (exact or ``tanh``),       ``relu(act'(x) g)``, ``act'``   ``relu(g)``
``nn.SiLU``, MONAI ``Swish``           by autograd on the element-
(``alpha``), MONAI                     wise function (exact)
``MemoryEfficientSwish``
``nn.Softmax``,                        ordinary backward               ordinary backward
``nn.MultiheadAttention`` (attention
normalisation, not a rectifier)
any other activation module            :class:`SegXAIInputError`       :class:`SegXAIInputError`
=====================================  ==============================  =====================

i.e. guided backprop passes ``relu(standard backward)``; for ReLU that is Springenberg's
``relu(g) * [x > 0]``. Deconvolution passes ``relu(g)`` whatever the forward did. Nothing
flows through the original activation's backward, and every other module (convolutions,
norms, skip connections, pooling, the sliding-window blend) keeps its ordinary backward.

"Any other activation module" is every class of :mod:`torch.nn.modules.activation` without
a rule (ELU, SELU, CELU, Tanh, Sigmoid, Softplus, Mish, Hardswish, Hardtanh, ReLU6, RReLU,
...) and MONAI's ``Mish`` and ``GEGLU``: the method raises
naming the module's path and type, and never silently falls back to the plain gradient.
Rules match the module's exact type (a subclass may change ``forward``).

Activations called as functions inside a ``forward`` get the same rules: while the
network's forward runs, a :class:`torch.overrides.TorchFunctionMode` routes the calls of
``relu`` / ``relu_`` (``torch.nn.functional``, ``torch``, ``Tensor`` methods),
``leaky_relu``, ``prelu``, ``gelu`` and ``silu`` through the rule of the module of the same
activation (``F.leaky_relu(x, 0.2)`` is ``nn.LeakyReLU(0.2)``'s rule; an in-place call stays
in place), and a call of an activation function without a rule (``elu``, ``selu``, ``celu``,
``sigmoid``, ``tanh``, ``softplus``, ``mish``, ``hardswish``, ``hardtanh``, ``relu6``, ...)
raises naming the call. ``softmax`` / ``log_softmax`` keep their ordinary backward (as
``nn.Softmax``). Calls inside an activation module with a rule are left to its hook (MONAI's
``Swish`` calls ``torch.sigmoid``). Element-wise code that is an activation but no
activation call (``torch.where(x > 0, x, 0.1 * x)``, ``x.clamp(min=0)``) is not recognised
and keeps its ordinary gradient.

Limits: a TorchScript network runs no hooks and no Python-level calls, so the method
inspects the scripted graph and raises if it calls any activation op (a scripted network
without one, e.g. a single convolution, is handled: its guided map is its gradient).

Aggregation (METHODS section 1): the rules are non-linear in the backward signal, so
explaining the summed target (``aggregation="target"``, one backward pass) differs from
summing the maps of every voxel term of the target (``aggregation="per_voxel"``, the default,
as paper
000 accumulates guided backprop over every predicted voxel). ``per_voxel`` is exact: the
target is written ``T = sum_j w_j f_{k_j}(x)_{i_j}`` (``w = dT/df`` at the clean input: the
target's voxels with weight 1 for every target of :mod:`.targets`), the input is replicated
``batch_size`` times, replica ``b`` explains its own term ``w_b f_{k_b}(x)_{i_b}``, one
modified backward per batch; the per-replica maps are summed.
"""

from __future__ import annotations

import contextlib
import functools
import re
import types
from typing import Any, Callable, ClassVar, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..image import SegXAIInputError
from ..models.card import EAGER_HINT
from ..progress import CancelToken, ProgressCallback, report
from .base import Attribution, Parameter, batched, check_inputs, memory_batch_size
from .forward import SegmentationForward

__all__ = ["GuidedBackprop", "Deconvolution", "backward_rules", "per_voxel_sum", "RULES", "AGGREGATIONS"]

AGGREGATIONS = ("target", "per_voxel")
RULES = ("guided", "deconvolution")

#: ``derivative(module, x) -> act'(x)`` for every activation type with a rule
_Derivative = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _autograd_derivative(function: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> _Derivative:
    """``act'(x)`` of an element-wise ``function(module, x)`` by autograd (exact)."""

    def derivative(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (value,) = torch.autograd.grad(function(module, leaf).sum(), leaf)
        return value

    return derivative


def _prelu_derivative(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight.detach().to(x.dtype)
    if weight.numel() > 1:  # one slope per channel: channel axis 1 (0 for a 1D input)
        shape = [1] * x.ndim
        shape[1 if x.ndim >= 2 else 0] = weight.numel()
        weight = weight.view(shape)
    return torch.where(x > 0, torch.ones_like(x), weight.expand_as(x))


def _derivatives() -> dict[type, _Derivative]:
    nn = torch.nn
    table: dict[type, _Derivative] = {
        nn.ReLU: lambda m, x: (x > 0).to(x.dtype),
        nn.LeakyReLU: lambda m, x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, m.negative_slope)),
        nn.PReLU: _prelu_derivative,
        nn.GELU: _autograd_derivative(lambda m, x: F.gelu(x, approximate=getattr(m, "approximate", "none"))),
        nn.SiLU: _autograd_derivative(lambda m, x: F.silu(x)),
    }
    try:
        from monai.networks.blocks import activation as monai_activation
    except ImportError:  # pragma: no cover - monai is a dependency
        return table
    if hasattr(monai_activation, "Swish"):
        table[monai_activation.Swish] = _autograd_derivative(lambda m, x: x * torch.sigmoid(m.alpha * x))
    if hasattr(monai_activation, "MemoryEfficientSwish"):
        table[monai_activation.MemoryEfficientSwish] = _autograd_derivative(lambda m, x: F.silu(x))
    return table


_DERIVATIVES = _derivatives()


def _activation_types() -> tuple[type, ...]:
    """Every activation module class we know of (with or without a rule)."""
    import torch.nn.modules.activation as torch_activation

    types = [
        value
        for value in vars(torch_activation).values()
        if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == torch_activation.__name__
    ]
    try:
        from monai.networks.blocks import activation as monai_activation

        types += [
            value
            for value in vars(monai_activation).values()
            if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == monai_activation.__name__
        ]
    except ImportError:  # pragma: no cover
        pass
    return tuple(set(types) | set(_DERIVATIVES))


_ACTIVATION_TYPES = _activation_types()

#: Normalisations inside attention (not rectifiers): they keep their ordinary backward, as in
#: Captum's guided backprop; so SwinUNETR / UNETR work with the rules on their GELU / LeakyReLU.
_PASS_THROUGH = (torch.nn.Softmax, torch.nn.MultiheadAttention)

#: TorchScript graph ops that are activations (a scripted network hides its modules' hooks)
_SCRIPT_ACTIVATION_OPS = re.compile(
    r"aten::(relu|relu_|leaky_relu|leaky_relu_|prelu|_prelu_kernel|gelu|silu|silu_|elu|elu_|selu|selu_|celu|celu_|"
    r"sigmoid|sigmoid_|tanh|tanh_|softplus|mish|mish_|hardswish|hardswish_|hardtanh|hardtanh_|hardsigmoid|"
    r"relu6|rrelu|threshold|softmax|log_softmax|glu|logsigmoid|softsign|softshrink|hardshrink)\b"
)


def _supported_names() -> str:
    return ", ".join(sorted({t.__name__ for t in _DERIVATIVES}))


class _Rule(torch.autograd.Function):
    """Forward: the activation's output (a copy). Backward: the rule's gradient for the
    activation's input and none for its output, so nothing flows through the original
    activation's backward. ``derivative(x)`` is ``act'(x)`` (guided rule only)."""

    @staticmethod
    def forward(ctx, x, output, derivative, rule):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        ctx.rule = rule
        # a copy: later in-place operations on it must not touch the saved graph
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.rule == "deconvolution":
            grad_input = F.relu(grad_output)
        else:
            (x,) = ctx.saved_tensors
            grad_input = F.relu(ctx.derivative(x) * grad_output)
        return grad_input, None, None, None


# ---- activations called as functions ------------------------------------------------------------
#: activations with a rule -> index of the ``inplace`` argument of torch.nn.functional's function
#: (None: it has none)
_FUNCTIONAL_WITH_RULE = {"relu": 1, "leaky_relu": 2, "silu": 1, "gelu": None, "prelu": None}
#: activation functions without a rule (their modules are refused too); softmax is not here: it
#: keeps its ordinary backward, as nn.Softmax does
_FUNCTIONAL_WITHOUT_RULE = (
    "elu", "selu", "celu", "sigmoid", "tanh", "softplus", "mish", "hardswish", "hardsigmoid", "hardtanh", "relu6",
    "rrelu", "threshold", "glu", "logsigmoid", "log_sigmoid", "softsign", "softshrink", "hardshrink", "tanhshrink",
    "expit",
)
_FUNCTION_OWNERS = (
    (F, "torch.nn.functional"), (torch, "torch"), (torch.Tensor, "Tensor"), (torch._C._nn, "torch._C._nn"),
    (torch.special, "torch.special"),
)


def _functional_activations() -> dict[Any, tuple[str, Optional[str], Union[bool, int]]]:
    """``function -> (shown name, activation with a rule or None, in-place)``: every spelling of
    the activation functions (``F.relu``, ``torch.relu_``, ``Tensor.relu``, ...). In-place is
    True / False, or the position of the call's ``inplace`` argument."""
    table: dict[Any, tuple[str, Optional[str], Union[bool, int]]] = {}
    for base in list(_FUNCTIONAL_WITH_RULE) + list(_FUNCTIONAL_WITHOUT_RULE):
        activation = base if base in _FUNCTIONAL_WITH_RULE else None
        for owner, prefix in _FUNCTION_OWNERS:  # torch.nn.functional first: its name is shown for aliases
            for attribute, inplace in ((base, False), (base + "_", True)):
                function = getattr(owner, attribute, None)
                if function is None or not callable(function) or function in table:
                    continue
                if owner is F and not inplace and _FUNCTIONAL_WITH_RULE.get(base) is not None:
                    inplace = _FUNCTIONAL_WITH_RULE[base]  # type: ignore[assignment]
                table[function] = (f"{prefix}.{attribute}", activation, inplace)
    return table


_FUNCTIONAL = _functional_activations()


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    """A call's argument, given by position ``index`` or by keyword ``name``."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _functional_rule(activation: str, args: tuple, kwargs: dict) -> tuple[Callable, Callable]:
    """``(act, act')`` of a functional call: the out-of-place activation with the call's
    arguments and its derivative, both from the module rule of the same activation
    (:data:`_DERIVATIVES`): ``F.leaky_relu(x, 0.2)`` is ``nn.LeakyReLU(0.2)``."""
    nn = torch.nn
    if activation == "prelu":
        weight = _argument(args, kwargs, 1, "weight", None)
        return (lambda x: F.prelu(x, weight)), functools.partial(_prelu_derivative, types.SimpleNamespace(weight=weight))
    if activation == "leaky_relu":
        module: torch.nn.Module = nn.LeakyReLU(float(_argument(args, kwargs, 1, "negative_slope", 0.01)))
    elif activation == "gelu":
        module = nn.GELU(approximate=str(_argument(args, kwargs, 1, "approximate", "none")))
    else:
        module = {"relu": nn.ReLU, "silu": nn.SiLU}[activation]()
    return module, functools.partial(_DERIVATIVES[type(module)], module)


class _FunctionalRules(TorchFunctionMode):
    """Applies ``rule`` to the activation functions called while the network's forward runs
    (``depth > 0``), except inside activation modules, whose hooks apply it (``suspended > 0``).
    Calls outside the forward (the target, a CAM's ``relu``) are left alone."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.depth = 0
        self.suspended = 0
        self.routed: list[str] = []  # the functions routed, in call order

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        entry = _FUNCTIONAL.get(func) if self.depth > 0 and self.suspended == 0 else None
        if entry is None:
            return func(*args, **kwargs)
        name, activation, inplace = entry
        if activation is None:
            raise SegXAIInputError(
                f"{self.rule}: no backward rule for the activation function {name} called in the network's forward; "
                f"supported functions: {', '.join(sorted(_FUNCTIONAL_WITH_RULE))} (and modules {_supported_names()})"
            )
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        act, derivative = _functional_rule(activation, args, kwargs)
        if isinstance(inplace, int) and not isinstance(inplace, bool):
            inplace = bool(_argument(args, kwargs, inplace, "inplace", False))
        self.routed.append(name)
        if not inplace:
            return _Rule.apply(x, act(x), derivative, self.rule)
        # in place: x takes the rule's output, so code that reads x (not the result) gets it
        # too; the rule keeps a copy of the input (the in-place write would change it)
        saved = x.clone()
        return x.copy_(_Rule.apply(saved, act(saved), derivative, self.rule))


def _check_script(network: torch.nn.Module, rule: str) -> None:
    graph = getattr(network, "inlined_graph", None)
    text = str(graph) if graph is not None else ""
    match = _SCRIPT_ACTIVATION_OPS.search(text)
    if match:
        raise SegXAIInputError(
            f"{rule}: the network is TorchScript and calls the activation {match.group(0)!r}; backward rules need an "
            f"eager torch.nn.Module; {EAGER_HINT}"
        )


@contextlib.contextmanager
def backward_rules(network: torch.nn.Module, rule: str = "guided") -> Iterator[list[str]]:
    """Within the block, backward passes through ``network``'s activations follow ``rule``:
    its activation modules (forward hooks) and the activation functions its forward calls
    (``F.relu``, ``torch.relu``, ``F.leaky_relu``, ...; a :class:`torch.overrides.TorchFunctionMode`).

    Parameters
    ----------
    network : torch.nn.Module
    rule : str
        ``"guided"`` (guided backprop) or ``"deconvolution"``; see the module docstring.

    Yields
    ------
    list of str
        The dotted paths of the hooked activation modules.

    Raises
    ------
    SegXAIInputError
        For an activation module without a rule (naming its path and type), an activation
        function without a rule called in the forward (naming the function, when the forward
        runs), or a TorchScript network that calls an activation op.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if isinstance(network, torch.jit.ScriptModule):
        _check_script(network, rule)
        yield []
        return
    hooked: list[tuple[str, torch.nn.Module]] = []
    passed: list[torch.nn.Module] = []
    for name, module in network.named_modules():
        if type(module) in _DERIVATIVES:
            hooked.append((name, module))
        elif isinstance(module, _PASS_THROUGH):
            passed.append(module)
        elif isinstance(module, _ACTIVATION_TYPES):
            raise SegXAIInputError(
                f"{rule}: no backward rule for the activation module {name or '<network>'!r} ({type(module).__name__}); "
                f"supported: {_supported_names()}"
            )
    functional = _FunctionalRules(rule)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _Rule.apply(args[0], output, functools.partial(_DERIVATIVES[type(module)], module), rule)

    def enter_forward(module: torch.nn.Module, args: tuple) -> None:
        functional.depth += 1

    def leave_forward(module: torch.nn.Module, args: tuple, output: Any) -> None:
        functional.depth -= 1

    def suspend(module: torch.nn.Module, args: tuple) -> None:
        functional.suspended += 1

    def resume(module: torch.nn.Module, args: tuple, output: Any) -> None:
        functional.suspended -= 1

    handles = []
    inplace: list[tuple[torch.nn.Module, bool]] = []
    try:
        for _, module in hooked:
            if isinstance(getattr(module, "inplace", None), bool):
                inplace.append((module, module.inplace))
                module.inplace = False  # the rule needs the activation's input intact
            handles.append(module.register_forward_hook(hook))
        # inside activation modules the functions they call are theirs (MONAI's Swish calls sigmoid)
        for module in [m for _, m in hooked] + passed:
            handles.append(module.register_forward_pre_hook(suspend))
            handles.append(module.register_forward_hook(resume, always_call=True))
        handles.append(network.register_forward_pre_hook(enter_forward))
        handles.append(network.register_forward_hook(leave_forward, always_call=True))
        with functional:
            yield [name for name, _ in hooked]
    finally:
        for handle in handles:
            handle.remove()
        for module, value in inplace:
            module.inplace = value


def _rules_on_every_member(forward: SegmentationForward, rule: Optional[str]) -> contextlib.ExitStack:
    """The backward rules on every network of the forward (a fold ensemble's members too)."""
    stack = contextlib.ExitStack()
    if rule:
        for network in forward.networks:
            stack.enter_context(backward_rules(network, rule))
    return stack


def _rule_gradient(forward: SegmentationForward, x: torch.Tensor, rule: Optional[str]) -> torch.Tensor:
    with _rules_on_every_member(forward, rule):
        return forward.gradient(x)


def per_voxel_sum(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    rule: Optional[str] = "guided",
    batch_size: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> torch.Tensor:
    """``sum_j map(w_j f_{k_j}(x)_{i_j})``: the exact sum over the target's voxel terms of
    each term's map, ``batch_size`` terms per backward pass.

    Parameters
    ----------
    forward : SegmentationForward
    inputs : torch.Tensor
        ``(1, C, D, H, W)`` on the model grid.
    rule : str or None
        ``"guided"``, ``"deconvolution"``, or None for the plain gradient (then, by linearity,
        the result equals ``forward.gradient(inputs)``).
    batch_size : int
        Replicas of the input (voxel terms) per backward pass; 0: the largest that fits in the
        free memory, at most 4 (:func:`~SegXAILib.attribution.base.memory_batch_size`).

    Returns
    -------
    torch.Tensor
        ``(1, C, D, H, W)``.
    """
    inputs = check_inputs(inputs)
    # the target's voxel terms and weights: T = sum_j w_j f_(k_j, i_j), w = dT/df at the clean input
    with torch.enable_grad():
        logits = forward.logits(inputs).detach().requires_grad_(True)
        (weights,) = torch.autograd.grad(forward.target(logits).sum(), logits)
    weights = weights[0]
    terms = torch.nonzero(weights)  # (N, 4): class, d, h, w
    if terms.shape[0] == 0:
        raise SegXAIInputError("per_voxel: the target reads no output voxel; nothing to explain")
    term_weights = weights[tuple(terms.T)]
    # each replica keeps the whole graph of the windows its voxel touches
    batch_size = memory_batch_size(forward, inputs, batch_size, terms.shape[0], "per-voxel maps", progress=progress,
                                   whole_graph=True)
    total: Optional[torch.Tensor] = None
    with _rules_on_every_member(forward, rule):
        for chunk in batched(terms.shape[0], batch_size, progress, cancel, "per-voxel maps"):
            index = terms[chunk.start : chunk.stop]
            n = index.shape[0]
            support = torch.zeros(forward.spatial_shape, dtype=torch.bool)
            support[tuple(index[:, 1:].cpu().T)] = True
            replicas = inputs.expand(n, *inputs.shape[1:]).clone().requires_grad_(True)
            with torch.enable_grad():
                batch_logits = forward.windowed(replicas, support, forward.window_batch)
                rows = torch.arange(n, device=batch_logits.device)
                values = term_weights[chunk.start : chunk.stop].to(batch_logits.device) * batch_logits[
                    rows, index[:, 0], index[:, 1], index[:, 2], index[:, 3]
                ]
                (gradient,) = torch.autograd.grad(values.sum(), replicas)
            contribution = gradient.sum(dim=0, keepdim=True)
            total = contribution if total is None else total + contribution
    assert total is not None
    return total


_AGGREGATION = Parameter(
    "aggregation", "choice", "per_voxel",
    "target: one backward of the target scalar; per_voxel: exact sum of every target voxel's map (paper 000)",
    choices=AGGREGATIONS,
)
_BATCH = Parameter("batch_size", "int", 0, "voxel terms per backward pass (aggregation=per_voxel); 0 or auto: the "
                   "largest that fits in the free memory, at most 4", minimum=0, auto=True)


class _ModifiedBackward(Attribution):
    """``dT/dx`` with the activation modules' backward replaced by ``rule``."""

    rule: ClassVar[str] = ""
    parameters = (_AGGREGATION, _BATCH)

    def attribute(
        self,
        inputs: torch.Tensor,
        aggregation: str = "per_voxel",
        batch_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        """The map ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        aggregation : str
            ``"target"`` (one modified backward of ``T``) or ``"per_voxel"`` (exact sum over
            the target's voxel terms of their maps; ``batch_size`` terms per backward).
        batch_size : int
            Replicas per backward pass for ``per_voxel`` (0: the largest that fits in memory).
        """
        inputs = check_inputs(inputs)
        _AGGREGATION.check(aggregation)
        if batch_size < 0:
            raise SegXAIInputError(f"batch_size must be >= 1 (or 0: the largest that fits in memory), got {batch_size}")
        if aggregation == "per_voxel":
            return per_voxel_sum(self.forward, inputs, self.rule, batch_size, progress, cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = _rule_gradient(self.forward, inputs, self.rule)
        report(progress, 1.0, self.name)
        return result


class GuidedBackprop(_ModifiedBackward):
    """Guided backpropagation (Springenberg et al. 2015; papers 000, 002): the gradient with
    ``relu(act'(x) g)`` through every activation module (``relu(g) [x > 0]`` for ReLU)."""

    name = "guided_backprop"
    summary = "gradient with only positive signals passed back through activations (guided backprop)"
    rule = "guided"


class Deconvolution(_ModifiedBackward):
    """Deconvolution (Zeiler & Fergus 2014; paper 002): the gradient with ``relu(g)`` through
    every activation module, whatever its input was."""

    name = "deconvolution"
    summary = "gradient with the backward signal rectified at activations (deconvnet)"
    rule = "deconvolution"
