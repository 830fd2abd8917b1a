"""Sample sources of predictive uncertainty: the registry of what varies between samples, and
the transforms that make one sample.

A *source* is one way to draw another prediction of the same case: flip the network's input
(test-time mirroring), change the intensities (gamma, Gaussian noise, intensity scale), warp
it a little (rotation and scale), keep dropout on (MC dropout), or take one ensemble member.
Several sources compose: every sample draws from each of them (e.g. MC dropout with noise).
The registry (:data:`SOURCES`, :func:`source_specs`) describes each source's parameters as
:class:`~SegXAILib.attribution.base.Parameter` s, so front ends build their forms from it
as they do for attribution methods; :func:`check_sources` validates a request.

Where each transform acts (all on the *model grid*, after the card's preprocessing, so that
intensity changes are not undone by the card's normalisation and spatial axes are the
network's):

* ``flips``: one flip combination per sample, applied per sliding window as the card's own
  mirroring is (``flip(f(flip(window)))``, exact: no interpolation); the sample's card
  mirroring is switched off, so each sample is one flip, not their mean.
* ``gamma``, ``intensity_scale``, ``noise``: on the whole model-grid input volume, per
  channel (gamma on the channel's min-max range, as nnU-Net's gamma augmentation; the noise
  standard deviation relative to the channel's).
* ``spatial``: the input volume is resampled (trilinear) through an affine map ``M`` about the
  volume centre, the network's output (logits) back through ``M^-1``: the two compose to the
  identity, so the sample lands exactly on the model grid again (:func:`warp_volume`).
* ``mc_dropout``: dropout modules in train mode, everything else (norms) in eval mode.
* ``ensemble``: one network per sample, from every member of every model given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution.base import Parameter
from ..image import SegXAIInputError
from ..models.windows import mirror_combinations

__all__ = ["SourceSpec", "SOURCES", "available_sources", "source_specs", "check_sources", "SourcesArgument",
           "Flipped", "flip_combinations", "warp_volume", "spatial_matrix", "rotation_matrix", "apply_gamma",
           "add_noise", "mc_dropout", "dropout_modules", "seeded_global_rng", "DROPOUT_NAMES"]

#: what :func:`check_sources` accepts: a name, names, or name -> parameters
SourcesArgument = Union[str, Sequence[str], Mapping[str, Optional[Mapping[str, Any]]]]


@dataclass(frozen=True)
class SourceSpec:
    """One sample source: its name, a one-line summary, whether it draws random numbers, and
    its parameters (names, kinds, defaults, ranges, help)."""

    name: str
    summary: str
    stochastic: bool
    parameters: tuple[Parameter, ...] = ()


_AXES_HELP = ("model-grid axes (0, 1, 2 = D, H, W of the network input) to flip, e.g. '0,1,2'; "
              "default: the model card's inference.mirror_axes")

SOURCES: dict[str, SourceSpec] = {spec.name: spec for spec in (
    SourceSpec("flips", "test-time mirroring: each sample is one combination of flips of the allowed axes "
               "(exact: the output is flipped back)", False,
               (Parameter("axes", "str", None, _AXES_HELP, objects=(list, tuple)),)),
    SourceSpec("gamma", "gamma of the model input's intensities, per channel on its min-max range", True,
               (Parameter("low", "float", 0.7, "smallest gamma", minimum=0.05, maximum=20.0),
                Parameter("high", "float", 1.5, "largest gamma (drawn uniformly in [low, high])", minimum=0.05,
                          maximum=20.0))),
    SourceSpec("noise", "additive Gaussian noise on the model input", True,
               (Parameter("std", "float", 0.1, "noise standard deviation, as a fraction of each input channel's "
                          "standard deviation", minimum=0.0, maximum=10.0),)),
    SourceSpec("intensity_scale", "multiplies the model input's intensities by a factor", True,
               (Parameter("low", "float", 0.9, "smallest factor", minimum=0.0, maximum=10.0),
                Parameter("high", "float", 1.1, "largest factor (drawn uniformly in [low, high])", minimum=0.0,
                          maximum=10.0))),
    SourceSpec("spatial", "small rotation and isotropic scaling about the volume centre (physical mm); the output "
               "is mapped back through the inverse transform", True,
               (Parameter("rotation_degrees", "float", 10.0, "largest rotation about each axis (uniform in "
                          "[-r, r] degrees)", minimum=0.0, maximum=45.0),
                Parameter("scale", "float", 0.1, "largest relative scaling (factor uniform in [1 - s, 1 + s])",
                          minimum=0.0, maximum=0.5))),
    SourceSpec("mc_dropout", "Monte Carlo dropout: dropout layers kept on at inference (norms stay in eval mode)",
               True,
               (Parameter("rate", "float", None, "dropout probability of every dropout layer; default: each "
                          "layer's own", minimum=0.0, maximum=0.95),)),
    SourceSpec("ensemble", "each sample is one ensemble member: one network of each model given (e.g. the folds "
               "of an nnU-Net model), or one of several models", False),
)}


def available_sources() -> list[str]:
    return list(SOURCES)


def source_specs() -> list[dict[str, Any]]:
    """One JSON-ready description per source: name, summary, stochastic, parameters (as
    :func:`SegXAILib.attribution.method_specs` describes methods)."""
    return [
        {"name": spec.name, "summary": spec.summary, "stochastic": spec.stochastic,
         "parameters": [{"name": p.name, "kind": p.kind, "default": p.default, "help": p.help, "minimum": p.minimum,
                         "maximum": p.maximum, "choices": list(p.choices)} for p in spec.parameters]}
        for spec in SOURCES.values()
    ]


def _check_axes(value: Any) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace(" ", ",").split(",") if part.strip()]
        try:
            value = [int(part) for part in parts]
        except ValueError:
            raise SegXAIInputError(f"parameter axes: expected axis numbers such as '0,1,2', got {value!r}") from None
    axes = []
    for axis in value:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) or not 0 <= int(axis) <= 2:
            raise SegXAIInputError(f"parameter axes: expected axes among 0, 1, 2, got {list(value)!r}")
        axes.append(int(axis))
    if len(set(axes)) != len(axes):
        raise SegXAIInputError(f"parameter axes: each axis at most once, got {axes}")
    return tuple(axes)


def check_sources(sources: SourcesArgument) -> dict[str, dict[str, Any]]:
    """Validate a request of sources and fill in their defaults.

    Parameters
    ----------
    sources : str, sequence of str, or mapping
        ``"flips"``, ``["flips", "noise"]``, or ``{"noise": {"std": 0.2}, "mc_dropout": None}``.

    Returns
    -------
    dict
        Source name -> its complete, checked parameters, in the order given.

    Raises
    ------
    SegXAIInputError
        No source, an unknown source or parameter (naming it and listing the known ones), a
        value of the wrong type or out of range, or ``low > high``.
    """
    if isinstance(sources, str):
        sources = [sources]
    if isinstance(sources, Mapping):
        items = list(sources.items())
    elif isinstance(sources, Sequence):
        items = [(name, None) for name in sources]
    else:
        raise SegXAIInputError(f"sources: expected a source name, a list of names or a mapping of names to "
                               f"parameters, got {type(sources).__name__}")
    if not items:
        raise SegXAIInputError(f"sources: give at least one of {', '.join(SOURCES)}")
    checked: dict[str, dict[str, Any]] = {}
    for name, params in items:
        if name not in SOURCES:
            raise SegXAIInputError(f"sources: unknown source {name!r}; available: {', '.join(SOURCES)}")
        if name in checked:
            raise SegXAIInputError(f"sources: {name!r} given twice")
        spec = SOURCES[name]
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise SegXAIInputError(f"source {name!r}: expected a mapping of parameter names to values, "
                                   f"got {type(params).__name__}")
        known = {p.name: p for p in spec.parameters}
        unknown = [key for key in params if key not in known]
        if unknown:
            takes = ", ".join(known) or "no parameters"
            names = ", ".join(map(repr, unknown))
            raise SegXAIInputError(f"source {name!r} has no parameter {names}; it takes {takes}")
        values: dict[str, Any] = {}
        for parameter in spec.parameters:
            value = params.get(parameter.name, parameter.default)
            try:
                value = parameter.check(value)
                if parameter.name == "axes":
                    value = _check_axes(value)
            except SegXAIInputError as error:
                raise SegXAIInputError(f"source {name!r}: {error}") from None
            values[parameter.name] = value
        if "low" in values and values["low"] > values["high"]:
            raise SegXAIInputError(f"source {name!r}: parameter low ({values['low']}) must be <= high "
                                   f"({values['high']})")
        checked[name] = values
    return checked


# ---- flips ------------------------------------------------------------------------------------------
class Flipped(torch.nn.Module):
    """``flip(network(flip(x)))`` over the spatial ``axes`` (0, 1, 2 = D, H, W): one mirror
    pass, as the card's mirroring runs it per window, but alone instead of averaged."""

    def __init__(self, network: torch.nn.Module, axes: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.dims = [int(axis) + 2 for axis in axes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dims:
            return self.network(x)
        return torch.flip(self.network(torch.flip(x, self.dims)), self.dims)


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips of ``axes``, none first (``2 ** len(axes)``)."""
    return mirror_combinations(axes)


# ---- intensity ----------------------------------------------------------------------------------------
def apply_gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``min + range * ((x - min) / range) ** gamma`` per channel of ``x`` ``(1, C, D, H, W)``
    (a constant channel is left as it is)."""
    flat = x.flatten(2)
    low = flat.min(dim=2).values[..., None, None, None]
    high = flat.max(dim=2).values[..., None, None, None]
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    scaled = ((x - low) / safe).clamp(0, 1) ** gamma * safe + low
    return torch.where(span > 0, scaled, x)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``x + std * sd(x_c) * N(0, 1)`` per channel; the noise is drawn on the CPU from
    ``generator`` (the same numbers on every device)."""
    channel_std = x.flatten(2).float().std(dim=2)[..., None, None, None]
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return x + noise * (std * channel_std).to(x.dtype)


# ---- spatial ----------------------------------------------------------------------------------------------
def rotation_matrix(angles_degrees: Sequence[float]) -> np.ndarray:
    """``(3, 3)`` rotation: about axis 0, then 1, then 2, by the given angles."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles_degrees):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        a, b = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[a, a], step[a, b], step[b, a], step[b, b] = c, -s, s, c
        matrix = step @ matrix
    return matrix


def spatial_matrix(angles_degrees: Sequence[float], scale: float, spacing: Sequence[float]) -> np.ndarray:
    """Index-space map ``M`` ``(3, 3)`` of a rotation and isotropic scaling in physical space.

    The augmented volume at index ``u`` reads the original at ``c + M (u - c)`` (``c`` the
    volume centre), with ``M = S^-1 R^T S / scale`` and ``S = diag(spacing)``: the content is
    rotated by ``R`` and magnified by ``scale`` in millimetres, whatever the voxel spacing.
    """
    s = np.diag(np.asarray(spacing, dtype=float))
    return np.linalg.inv(s) @ rotation_matrix(angles_degrees).T @ s / float(scale)


def warp_volume(volume: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``volume`` ``(B, C, D, H, W)`` resampled (trilinear) at ``c + matrix (u - c)`` for every
    index ``u``, ``c = (shape - 1) / 2``; positions outside take the nearest border value.

    ``warp_volume(warp_volume(v, M), inv(M))`` is ``v`` wherever no position left the volume
    and the values are linear between voxels (trilinear interpolation is exact on linear
    functions); an identity ``matrix`` gives ``v`` back to float rounding.
    """
    shape = np.asarray(volume.shape[2:], dtype=float)
    centre = (shape - 1) / 2
    axes = [np.arange(int(n), dtype=float) - c for n, c in zip(shape, centre)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (D, H, W, 3) u - c
    source = grid @ np.asarray(matrix, dtype=float).T + centre
    # normalised coordinates (align_corners=True: -1 and 1 are the first and last voxel centres)
    normalised = np.where(shape > 1, 2 * source / np.maximum(shape - 1, 1) - 1, 0.0)
    grid_tensor = torch.from_numpy(normalised[..., ::-1].copy()).to(volume.device, torch.float32)  # x = W first
    grid_tensor = grid_tensor[None].expand(volume.shape[0], *grid_tensor.shape)
    warped = F.grid_sample(volume.float(), grid_tensor, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.to(volume.dtype)


# ---- MC dropout ---------------------------------------------------------------------------------------------
#: class names of torch's dropout layers (also matched on TorchScript modules' ``original_name``)
DROPOUT_NAMES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


def dropout_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers of ``network`` (eager modules and TorchScript submodules)."""
    found = []
    for module in network.modules():
        eager = isinstance(module, torch.nn.modules.dropout._DropoutNd)
        scripted = getattr(module, "original_name", None) in DROPOUT_NAMES
        if eager or scripted:
            found.append(module)
    return found


#: eager dropout layers whose masks SegXAI draws itself: element-wise (Dropout) or whole
#: channels (Dropout1d / 2d / 3d), as torch defines them
_ELEMENTWISE_DROPOUT = (torch.nn.Dropout,)
_CHANNEL_DROPOUT = (torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)


def _drawn_dropout(generator: torch.Generator):
    """A forward hook that applies dropout with a mask drawn on the CPU from ``generator``.

    The layer stays in eval mode (its own output is its input); the hook returns
    ``x * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` per element (Dropout) or per
    sample and channel (Dropout1d/2d/3d). Drawn on the CPU, the masks are the same on every
    device, which torch's own dropout (each device its own generator) does not give.
    """

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        p = float(module.p)
        if p <= 0.0:
            return x
        if p >= 1.0:
            return torch.zeros_like(x)
        shape = tuple(x.shape) if isinstance(module, _ELEMENTWISE_DROPOUT) else (*x.shape[:2], *([1] * (x.ndim - 2)))
        keep = torch.rand(shape, generator=generator, dtype=torch.float32) >= p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)

    return hook


@contextlib.contextmanager
def mc_dropout(networks: Sequence[torch.nn.Module], model_name: str, rate: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> Iterator[None]:
    """Dropout active in ``networks`` within the block (everything else left in its mode, eval
    for a loaded model); ``rate`` replaces their probability. Restored after.

    With ``generator`` (a CPU ``torch.Generator``), eager ``Dropout`` / ``Dropout1d/2d/3d``
    layers stay in eval mode and a forward hook drops with masks drawn from it
    (:func:`_drawn_dropout`): the same seed gives the same masks on every device. Other dropout
    layers (alpha dropout, TorchScript modules, which take no Python hooks) are switched to
    train mode and draw from torch's global generator of their device (see
    :func:`seeded_global_rng`).

    Raises
    ------
    SegXAIInputError
        A network without dropout layers, or (``rate`` unset) whose every rate is 0, naming the model.
    """
    layers = []
    for number, network in enumerate(networks):
        found = dropout_modules(network)
        if not found:
            member = f" (ensemble member {number})" if len(networks) > 1 else ""
            raise SegXAIInputError(f"source 'mc_dropout': model {model_name!r}{member} has no dropout layer "
                                   f"({', '.join(DROPOUT_NAMES)}); MC dropout needs a network trained with dropout")
        if rate is None and all(getattr(layer, "p", 1.0) == 0 for layer in found):
            member = f" (ensemble member {number})" if len(networks) > 1 else ""
            raise SegXAIInputError(f"source 'mc_dropout': model {model_name!r}{member}: every dropout layer has rate "
                                   "0 (trained without dropout), so the samples would all be equal; give a rate "
                                   "to drop anyway")
        layers.extend(found)
    saved = [(layer, layer.training, getattr(layer, "p", None)) for layer in layers]
    handles = []
    try:
        for layer in layers:
            if rate is not None:
                if not hasattr(layer, "p"):
                    raise SegXAIInputError(f"source 'mc_dropout': model {model_name!r}: the rate of a TorchScript "
                                           "dropout layer cannot be changed; leave rate unset")
                layer.p = float(rate)
            if generator is not None and type(layer) in (*_ELEMENTWISE_DROPOUT, *_CHANNEL_DROPOUT):
                layer.train(False)
                handles.append(layer.register_forward_hook(_drawn_dropout(generator)))
            else:
                layer.train(True)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, training, p in saved:
            layer.train(training)
            if p is not None:
                layer.p = p


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (CPU and ``device``'s) seeded with ``seed`` inside the block and
    restored after: dropout layers draw from them and take no generator."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(int(seed))
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(int(seed))
        if device.type == "mps":
            saved = torch.mps.get_rng_state()
            torch.mps.manual_seed(int(seed))
            try:
                yield
            finally:
                torch.mps.set_rng_state(saved)
            return
        yield

