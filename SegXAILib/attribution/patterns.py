"""PatternNet and PatternAttribution (Kindermans et al. 2018; paper 000; METHODS section 2).

Every layer with weights (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear``) is, per
output channel ``j`` and output position, a linear neuron ``y = w^T x + b`` whose input ``x``
is the receptive-field patch (all input channels x kernel offsets, zero padding included). Its
*pattern* ``a`` (same shape as ``w``) is the direction in input space that carries the signal
the neuron detects: the signal estimator is ``S_a(x) = a w^T x``.

Estimators (per output channel, expectations over every position of every window seen):

``linear``  (Kindermans eq. for ``S_a``)
    ``a = cov(x, y) / (w^T cov(x, y))``, ``cov(x, y) = E[x y] - E[x] E[y]``
    (= ``cov(x, y) / var(y)``, since ``w^T cov(x, y) = var(y)``).
``two_component``  (Kindermans section 4.2, ``S_a+-``)
    The positions split by the sign of the neuron's output: ``+`` where ``y > 0``, ``-`` where
    ``y <= 0``, with ``pi_+`` the share of ``y > 0``. The covariance decomposes as
    ``cov(x, y) = pi_+ (E_+[x y] - E_+[x] E[y]) + (1 - pi_+) (E_-[x y] - E_-[x] E[y])`` and each
    regime gets its own pattern::

        a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T E_+[x y] - w^T E_+[x] E[y])
        a_- = (E_-[x y] - E_-[x] E[y]) / (w^T E_-[x y] - w^T E_-[x] E[y])

    (``E_+`` / ``E_-`` average over the regime's positions, ``E[y]`` over all positions, as the
    paper's decomposition and iNNvestigate's ReLU pattern do). The signal estimator is
    piecewise: ``S(x) = a_+ y`` where ``y > 0``, ``a_- y`` where ``y <= 0``. In a ReLU network
    the gating zeroes the negative regime, so only ``a_+`` matters there; in a PReLU / norm
    network (MONAI's default) ``a_-`` is used where the layer's output is not positive.

``y`` is the layer's own output (bias included: both covariances are bias-invariant). A regime
(or channel) with fewer than two positions, or a denominator that vanishes
(``|w^T cov| <= 1e-6 |w| |cov|``), falls back to that channel's linear pattern (zero if that
one is degenerate too).

Statistics stream: per layer, output channel and regime, running float64 sums of ``x``,
``x y`` (weight-shaped), ``y`` and counts; memory does not grow with the number of volumes.
For a convolution ``sum_positions x_patch * g_j`` is the weight gradient for the output
cotangent ``g``, so ``aten.convolution_backward`` with ``g = [y > 0]``, ``y [y > 0]`` (and the
``<= 0`` complements) gives every sum exactly, zero padding included, without unfolding patches.

Backward (PatternNet / PatternAttribution): the gradient of the target with every weighted
layer's backward replaced by its transposed operator with ``a`` (PatternNet: the *signal*) or
``w * a`` elementwise (PatternAttribution) in place of ``w`` (two_component: ``a_+`` at the
output positions where the layer's forward output was > 0, ``a_-`` elsewhere). Everything else
keeps its ordinary backward: activations gate as in the gradient (ReLU ``[x > 0]``, PReLU its
slope), skip connections, pooling, the sliding-window blend. Normalisation layers
(``InstanceNorm``, ``BatchNorm``, ``GroupNorm``, ``LayerNorm``) are treated as per-channel affine
maps at the statistics of the forward: their backward is ``g * weight / sqrt(var + eps)`` with
the mean and variance held fixed (detached), not the full gradient through the statistics.
The backward starts (``start="value"``, Kindermans) from the target's logits themselves,
``dT/df * f``, so a one-layer linear model gives exactly ``S = a y`` and ``w * a * y``;
``start="ones"`` starts from ``dT/df`` like the gradient. The backward is linear in the
backward signal (the gating follows the forward), so summing per-voxel maps equals one
backward of the summed target: no per-voxel aggregation is needed.

Patterns are fitted once per model (``segxai patterns fit``) and stored beside the model card
as ``patterns_<estimator>.pt``, readable with ``torch.load(weights_only=True)``: the patterns,
the estimator, the layer names and weight shapes, the SHA-256 of the card's weights, and the
number of volumes / windows / voxels used. Applying them to a network with other weights or
other layers is refused.

Limits: eager networks only (hooks on modules; a TorchScript network is refused); convolutions
with ``padding_mode`` other than ``"zeros"`` are refused; layers called as functions
(``F.conv3d``) inside a ``forward`` are invisible and keep their ordinary gradient.
PatternNet's signal is not normalised: since ``w^T a = 1``, ``|a| >= 1 / |w|`` per channel and
the signal grows roughly by that gain per layer (the bundled 14-layer lesion UNet: about 1e8;
an untrained 40-layer SwinUNETR passes float32's 3e38, which is reported as an error rather
than returned as inf / nan). PatternAttribution (``w * a``, ``sum(w * a) = 1`` per channel)
stays bounded. ``patterns="input"`` fits on the explained volume alone (one pass of statistics
per call); use fitted files for real work.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..image import Image, SegXAIInputError
from ..models.card import ModelCard, sha256_of
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .base import Attribution, Parameter, check_inputs
from .forward import SegmentationForward

__all__ = [
    "ESTIMATORS",
    "PatternStatistics",
    "PatternSet",
    "PatternNet",
    "PatternAttribution",
    "pattern_layers",
    "pattern_backward",
    "pattern_map",
    "fit_patterns",
    "fit_patterns_on_tensors",
    "default_patterns_path",
    "load_patterns",
    "weights_sha256",
]

ESTIMATORS = ("linear", "two_component")
MODES = ("signal", "attribution")
STARTS = ("value", "ones")
FILE_FORMAT = "segxai-patterns"
FILE_VERSION = 1

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


# ---- layers -----------------------------------------------------------------------------------

def _check_eager(network: torch.nn.Module, what: str) -> None:
    if isinstance(network, torch.jit.ScriptModule):
        raise SegXAIInputError(
            f"{what}: the network is TorchScript; patterns need an eager torch.nn.Module whose layers are modules "
            "(load the model in the 'monai' or 'python' format)"
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


# ---- statistics -----------------------------------------------------------------------------------

@dataclass
class _Sums:
    """Running sums of one layer; index 0 = regime ``y > 0``, 1 = regime ``y <= 0``."""

    count: torch.Tensor  # (2, O)
    sum_y: torch.Tensor  # (2, O)
    sum_x: torch.Tensor  # (2, O, P)
    sum_xy: torch.Tensor  # (2, O, P)

    @classmethod
    def zeros(cls, outputs: int, patch: int) -> "_Sums":
        z = lambda *s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
        return cls(z(2, outputs), z(2, outputs), z(2, outputs, patch), z(2, outputs, patch))


class PatternStatistics:
    """Streaming statistics of every pattern layer of ``network`` (see the module docstring).

    Use :meth:`collecting` around forward passes (``torch.no_grad`` is fine), or call
    :meth:`update` with a layer's input and output; then :meth:`patterns`.
    """

    def __init__(self, network: torch.nn.Module, regimes: bool = True) -> None:
        #: False: keep only the all-positions sums the linear estimator needs (half the work)
        self.regimes = regimes
        self.layers = dict(pattern_layers(network))
        self.sums = {
            name: _Sums.zeros(_out_channels(m), _rows(m.weight, m).shape[1]) for name, m in self.layers.items()
        }
        self.calls = 0

    def update(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one call of layer ``name``: its input ``x`` and output ``y`` (batch first)."""
        module = self.layers[name]
        x, y = x.detach().float(), y.detach().float()
        if self.regimes:
            positive = (y > 0).to(y.dtype)
            masks: tuple[torch.Tensor, ...] = (positive, 1.0 - positive)  # regime 0: y > 0, regime 1: y <= 0
        else:
            masks = (torch.ones_like(y),)  # everything in regime 0
        sums = self.sums[name]
        if isinstance(module, torch.nn.Linear):
            x2 = x.reshape(-1, x.shape[-1])
            for r, mask in enumerate(masks):
                m2, y2 = mask.reshape(-1, y.shape[-1]), (y * mask).reshape(-1, y.shape[-1])
                self._add(sums, r, m2.sum(0), y2.sum(0), m2.T @ x2, y2.T @ x2)
        else:
            axes = [0, *range(2, y.ndim)]
            cotangents = torch.cat([c for mask in masks for c in (mask, y * mask)], dim=1)
            weight_sums = [_rows(s, module) for s in _conv_weight_sums(module, x, cotangents)]
            for r, mask in enumerate(masks):
                self._add(sums, r, mask.sum(axes), (y * mask).sum(axes), weight_sums[2 * r], weight_sums[2 * r + 1])
        self.calls += 1

    @staticmethod
    def _add(sums: _Sums, regime: int, count, sum_y, sum_x, sum_xy) -> None:
        sums.count[regime] += count.double().cpu()
        sums.sum_y[regime] += sum_y.double().cpu()
        sums.sum_x[regime] += sum_x.double().cpu()
        sums.sum_xy[regime] += sum_xy.double().cpu()

    @contextlib.contextmanager
    def collecting(self) -> Iterator["PatternStatistics"]:
        """Within the block, every forward call of a pattern layer updates the statistics."""
        handles = []

        def hook_for(name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if not args:
                    raise SegXAIInputError(f"patterns: layer {name!r} was called without a positional input")
                self.update(name, args[0], output)

            return hook

        try:
            for name, module in self.layers.items():
                handles.append(module.register_forward_hook(hook_for(name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def positions(self, name: str) -> torch.Tensor:
        """Positions seen per output channel of layer ``name`` ``(O,)``."""
        return self.sums[name].count.sum(0)

    def patterns(self, estimator: str) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer ``{"all": a}`` (linear) or ``{"positive": a_+, "negative": a_-}``, weight-shaped float32."""
        if estimator not in ESTIMATORS:
            raise SegXAIInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "two_component" and not self.regimes:
            raise ValueError("two_component patterns need statistics collected with regimes=True")
        result = {}
        for name, module in self.layers.items():
            s = self.sums[name]
            w = _rows(module.weight.detach().double().cpu(), module)
            total = s.count.sum(0)
            if not bool((total > 0).all()):
                raise SegXAIInputError(f"patterns: layer {name!r} saw no data; run forward passes while collecting")
            mean_y = s.sum_y.sum(0) / total
            linear, linear_ok = _solve(w, s.sum_x.sum(0), s.sum_xy.sum(0), total, mean_y)
            linear = torch.where(linear_ok[:, None], linear, torch.zeros_like(linear))
            if estimator == "linear":
                result[name] = {"all": _unrows(linear.float(), module)}
                continue
            pair = {}
            for r, key in enumerate(("positive", "negative")):
                a, ok = _solve(w, s.sum_x[r], s.sum_xy[r], s.count[r], mean_y)
                pair[key] = _unrows(torch.where(ok[:, None], a, linear).float(), module)
            result[name] = pair
        return result


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


# ---- the pattern file ---------------------------------------------------------------------------

def weights_sha256(card: ModelCard) -> str:
    """SHA-256 of the card's weights file (the card's ``sha256`` when it states one, which
    :func:`~SegXAILib.models.load_model` has checked); empty when there is no file."""
    arch = card.architecture
    if arch.get("sha256"):
        return str(arch["sha256"])
    if card.format == "bundle":
        path = card.resolve(arch["path"]) / arch.get("weights", "models/model.pt")
    else:
        relative = arch.get("weights") or arch.get("file")
        if not relative:
            return ""
        path = card.resolve(relative)
    return sha256_of(path) if path.is_file() else ""


@dataclass
class PatternSet:
    """Fitted patterns of one model and estimator, with their provenance.

    ``patterns`` maps a layer name to ``{"all": a}`` (linear) or ``{"positive": a_+,
    "negative": a_-}`` (two_component), each shaped like the layer's weight.
    """

    estimator: str
    patterns: dict[str, dict[str, torch.Tensor]]
    layer_shapes: dict[str, tuple[int, ...]]
    weights_sha256: str = ""
    model_name: str = ""
    card_checksum: str = ""
    volumes: int = 0
    windows: int = 0
    voxels: int = 0
    seed: int = 0
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return (f"PatternSet({self.estimator}, model={self.model_name!r}, layers={len(self.patterns)}, "
                f"volumes={self.volumes}, voxels={self.voxels})")

    def to_dict(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "format_version": FILE_VERSION,
            "estimator": self.estimator,
            "model_name": self.model_name,
            "weights_sha256": self.weights_sha256,
            "card_checksum": self.card_checksum,
            "volumes": int(self.volumes),
            "windows": int(self.windows),
            "voxels": int(self.voxels),
            "seed": int(self.seed),
            "layers": list(self.patterns),
            "layer_shapes": {name: list(shape) for name, shape in self.layer_shapes.items()},
            "patterns": {name: {k: v.detach().cpu().float().contiguous() for k, v in p.items()}
                         for name, p in self.patterns.items()},
        }

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the set atomically (``torch.save`` of tensors, strings and numbers)."""
        from ..io import atomic_path

        path = Path(path)
        with atomic_path(path) as temporary:
            torch.save(self.to_dict(), temporary)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PatternSet":
        path = Path(path)
        if not path.is_file():
            raise SegXAIInputError(f"patterns {path}: no such file")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # zip / pickle errors
            raise SegXAIInputError(f"patterns {path}: cannot be read ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise SegXAIInputError(f"patterns {path}: not a SegXAI patterns file")
        if data.get("format_version") != FILE_VERSION:
            raise SegXAIInputError(f"patterns {path}: format version {data.get('format_version')} is not supported")
        if data.get("estimator") not in ESTIMATORS:
            raise SegXAIInputError(f"patterns {path}: unknown estimator {data.get('estimator')!r}")
        return cls(
            estimator=data["estimator"],
            patterns={name: dict(p) for name, p in data["patterns"].items()},
            layer_shapes={name: tuple(shape) for name, shape in data["layer_shapes"].items()},
            weights_sha256=data.get("weights_sha256", ""),
            model_name=data.get("model_name", ""),
            card_checksum=data.get("card_checksum", ""),
            volumes=int(data.get("volumes", 0)),
            windows=int(data.get("windows", 0)),
            voxels=int(data.get("voxels", 0)),
            seed=int(data.get("seed", 0)),
            source=str(path),
        )

    def check(self, network: torch.nn.Module, card: Optional[ModelCard] = None) -> None:
        """Refuse (SegXAIInputError) patterns fitted for other weights or other layers."""
        where = f"patterns {self.source or '(in memory)'}"
        if card is not None:
            expected = weights_sha256(card)
            if self.weights_sha256 and expected and self.weights_sha256 != expected:
                raise SegXAIInputError(
                    f"{where} were fitted for a model whose weights have SHA-256 {self.weights_sha256[:16]}..., but "
                    f"model {card.name!r} has {expected[:16]}...; fit patterns for this model: segxai patterns fit"
                )
        layers = {name: tuple(module.weight.shape) for name, module in pattern_layers(network)}
        if layers != self.layer_shapes:
            missing = sorted(set(layers) - set(self.layer_shapes))
            extra = sorted(set(self.layer_shapes) - set(layers))
            shapes = sorted(n for n in set(layers) & set(self.layer_shapes) if layers[n] != self.layer_shapes[n])
            raise SegXAIInputError(
                f"{where} do not match the network's layers (no pattern for {missing[:3]}, patterns of absent "
                f"layers {extra[:3]}, other weight shapes {shapes[:3]}); fit patterns for this model: segxai patterns fit"
            )
        for name, pattern in self.patterns.items():
            keys = {"all"} if self.estimator == "linear" else {"positive", "negative"}
            if set(pattern) != keys or any(tuple(v.shape) != layers[name] for v in pattern.values()):
                raise SegXAIInputError(f"{where}: layer {name!r} has malformed patterns for the {self.estimator} estimator")


def default_patterns_path(card: ModelCard, estimator: str) -> Path:
    """``patterns_<estimator>.pt`` in the model card's folder."""
    if card.path is None:
        raise SegXAIInputError("patterns: the model card has no folder; pass patterns=PATH")
    return card.path.parent / f"patterns_{estimator}.pt"


_CACHE: dict[tuple[str, int, int], PatternSet] = {}


def load_patterns(path: Union[str, os.PathLike]) -> PatternSet:
    """:meth:`PatternSet.load` with a small cache keyed by path, size and modification time."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SegXAIInputError(f"patterns {path}: no such file")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = PatternSet.load(path)
    return _CACHE[key]


# ---- fitting ------------------------------------------------------------------------------------

def _windows_of(network, card: ModelCard, x: torch.Tensor, max_windows: Optional[int],
                rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """The card's sliding windows of ``x`` ``(1, C, D, H, W)`` as inference places and pads them
    (all, or a seeded subset of ``max_windows``), one tensor ``(1, C, *patch)`` each."""
    from ..models.windows import WindowedForward

    windowed = WindowedForward(network, card, x.shape[2:])
    padded = torch.nn.functional.pad(x, windowed.pad, mode="replicate") if any(windowed.pad) else x
    indices = np.arange(len(windowed.windows))
    if max_windows is not None and len(indices) > max_windows:
        indices = np.sort(rng.choice(indices, size=max_windows, replace=False))
    for index in indices:
        yield padded[(slice(None), slice(None), *windowed.windows[int(index)])]


def fit_patterns_on_tensors(
    network: torch.nn.Module,
    card: ModelCard,
    volumes: Sequence[Union[torch.Tensor, Callable[[], torch.Tensor]]],
    estimators: Sequence[str] = ESTIMATORS,
    max_windows: Optional[int] = None,
    window_batch: int = 1,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, PatternSet]:
    """Fit patterns from model-grid volumes ``(1, C, D, H, W)`` (tensors, or callables that make
    one when called, so that only one volume is in memory at a time).

    Parameters
    ----------
    network : torch.nn.Module
        The eager network, in eval mode.
    card : ModelCard
        Gives the sliding windows (patch size, overlap) and the provenance recorded.
    volumes : sequence
        Preprocessed network inputs on the model grid.
    estimators : sequence of str
        Which pattern sets to return (one pass of statistics serves both).
    max_windows : int, optional
        At most this many windows per volume, a seeded random subset; all when None.
    window_batch : int
        Windows per network call.
    seed : int
        Seed of the window subsets.

    Returns
    -------
    dict
        ``estimator -> PatternSet``.
    """
    for estimator in estimators:
        if estimator not in ESTIMATORS:
            raise SegXAIInputError(f"--estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)} or both")
    if not volumes:
        raise SegXAIInputError("patterns: no volumes to fit on")
    if window_batch < 1:
        raise SegXAIInputError(f"window_batch must be >= 1, got {window_batch}")
    if max_windows is not None and max_windows < 1:
        raise SegXAIInputError(f"max_windows must be >= 1, got {max_windows}")
    statistics = PatternStatistics(network, regimes="two_component" in estimators)
    rng = np.random.default_rng(seed)
    device = next(network.parameters()).device
    windows = voxels = 0
    with statistics.collecting(), torch.no_grad():
        for index, volume in enumerate(volumes):
            if cancel is not None:
                cancel.raise_if_cancelled()
            x = volume() if callable(volume) else volume
            x = torch.as_tensor(x).float().to(device)
            if x.ndim != 5 or x.shape[:2] != (1, len(card.input_channels)):
                raise SegXAIInputError(
                    f"patterns: volume {index} must be (1, {len(card.input_channels)}, D, H, W), got {tuple(x.shape)}"
                )
            patches = list(_windows_of(network, card, x, max_windows, rng))
            for start in range(0, len(patches), window_batch):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                batch = torch.cat(patches[start : start + window_batch])
                network(batch)
                windows += batch.shape[0]
                voxels += int(batch[0, 0].numel()) * batch.shape[0]
                report(progress, (index + min(len(patches), start + window_batch) / len(patches)) / len(volumes),
                       f"patterns: volume {index + 1}/{len(volumes)}")
    sets = {}
    shapes = {name: tuple(m.weight.shape) for name, m in statistics.layers.items()}
    for estimator in estimators:
        sets[estimator] = PatternSet(
            estimator=estimator,
            patterns=statistics.patterns(estimator),
            layer_shapes=shapes,
            weights_sha256=weights_sha256(card),
            model_name=card.name,
            card_checksum=card.checksum(),
            volumes=len(volumes),
            windows=windows,
            voxels=voxels,
            seed=int(seed),
        )
    return sets


def fit_patterns(
    model,
    images: Sequence[Union[Image, Callable[[], Image]]],
    estimators: Sequence[str] = ESTIMATORS,
    max_volumes: Optional[int] = None,
    max_windows: Optional[int] = None,
    window_batch: int = 1,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, PatternSet]:
    """Fit a loaded model's patterns on input images, preprocessed exactly as for inference.

    Parameters
    ----------
    model : LoadedModel
    images : sequence of Image or of callables returning one
        Each ``(C, I, J, K)`` with the card's channels, on any grid (callables load lazily).
    max_volumes : int, optional
        Use a seeded random subset of this many images (all when None).
    max_windows, window_batch, seed, progress, cancel
        See :func:`fit_patterns_on_tensors`.
    """
    from ..models.preprocessing import model_input

    images = list(images)
    if max_volumes is not None:
        if max_volumes < 1:
            raise SegXAIInputError(f"--max-volumes {max_volumes}: must be >= 1")
        if len(images) > max_volumes:
            chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=max_volumes, replace=False))
            images = [images[int(i)] for i in chosen]

    def loader(item):
        def load() -> torch.Tensor:
            image = item() if callable(item) else item
            return model_input(image, model.card, model.device)[0]

        return load

    return fit_patterns_on_tensors(model.network, model.card, [loader(item) for item in images], estimators,
                                   max_windows, window_batch, seed, progress, cancel)


# ---- the backward -------------------------------------------------------------------------------

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


# ---- the methods --------------------------------------------------------------------------------

_ESTIMATOR = Parameter(
    "estimator", "choice", "two_component",
    "linear: a = cov(x,y) / w^T cov(x,y); two_component: separate patterns where the layer output is > 0 and <= 0",
    choices=ESTIMATORS,
)
_PATTERNS = Parameter(
    "patterns", "str", "",
    "patterns file (default: patterns_<estimator>.pt beside the model card, made by 'segxai patterns fit'); "
    "'input' fits them on the explained volume itself",
)
_START = Parameter(
    "start", "choice", "value",
    "value: the backward starts from the target logits' values (Kindermans); ones: from dT/df like the gradient",
    choices=STARTS,
)


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


class _PatternMethod(Attribution):
    mode: ClassVar[str] = ""
    parameters = (_ESTIMATOR, _PATTERNS, _START)

    def attribute(
        self,
        inputs: torch.Tensor,
        estimator: str = "two_component",
        patterns: Union[str, os.PathLike, PatternSet, None] = "",
        start: str = "value",
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        **_: object,
    ) -> torch.Tensor:
        """The map ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        estimator : str
            ``"linear"`` or ``"two_component"`` (see the module docstring).
        patterns : str, path or PatternSet
            A patterns file; ``""`` (default) for ``patterns_<estimator>.pt`` beside the model
            card; ``"input"`` to fit them on this volume's windows first.
        start : str
            ``"value"`` (Kindermans: start from the target's logits) or ``"ones"``.
        """
        inputs = check_inputs(inputs)
        _ESTIMATOR.check(estimator)
        _START.check(start)
        if cancel is not None:
            cancel.raise_if_cancelled()
        pattern_set = resolve_patterns(self.forward, inputs, estimator, patterns, self.name,
                                       sub_progress(progress, 0.0, 0.5), cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = pattern_map(self.forward, inputs, pattern_set, self.mode, start)
        report(progress, 1.0, self.name)
        return result


class PatternNet(_PatternMethod):
    """PatternNet (Kindermans et al. 2018; paper 000 "PNet-S"): the target projected back to the
    input through the learned patterns ``a`` in place of the weights: the estimated signal."""

    name = "pattern_net"
    summary = "PatternNet signal: the output backpropagated through learned patterns instead of weights"
    mode = "signal"


class PatternAttribution(_PatternMethod):
    """PatternAttribution (Kindermans et al. 2018; paper 000 "PNet-A"): the target backpropagated
    with ``w * a`` (weights times patterns, elementwise) in place of the weights."""

    name = "pattern_attribution"
    summary = "PatternAttribution: backpropagation with weights x learned patterns (signal-based attribution)"
    mode = "attribution"
