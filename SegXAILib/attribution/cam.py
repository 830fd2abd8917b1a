"""Class activation maps (METHODS section 2): Grad-CAM, Grad-CAM++ and their guided variants.

For a layer with activations ``A`` ``(K, d, h, w)`` (channels ``k``) and ``g = dT/dA``:

==========================  ======================================================================
method                      map on the layer's grid
==========================  ======================================================================
Grad-CAM (000, 001)         ``w_k = mean_space g_k``; ``relu(sum_k w_k A_k)``
Grad-CAM++ (001,            ``alpha = g^2 / (2 g^2 + sum_space(A_k) g^3)`` (0 where the denominator
Chattopadhay 2018)          is 0); ``w_k = sum_space alpha relu(g_k)``; ``relu(sum_k w_k A_k)``
Guided Grad-CAM (000)       guided backprop map (:mod:`.guided`) x upsampled Grad-CAM map
Guided Grad-CAM++           guided backprop map x upsampled Grad-CAM++ map
==========================  ======================================================================

The layer map is upsampled trilinearly (``align_corners=False``) to the input grid. A CAM is
one map for the whole volume: it is returned broadcast to every input channel, shape
``(1, C, D, H, W)`` (the guided variants differ per channel through the guided map).

Layers (parameter ``layer``)
----------------------------
Layers are found by running the network once on a zero patch ``(1, C, *patch_size)`` with
hooks on every ``Conv3d`` / ``ConvTranspose3d`` and activation module, recording the order in
which they first run and their output shapes; the network's output channel count is ``K``.

* a dotted module name of the network (``"model.1.submodule.0.conv.unit0.conv"``): that
  module's output (a 5D tensor; any module, not only convolutions);
* ``"final"``: the last convolution executed before the *output head*, the trailing run of
  convolutions (in execution order) whose output has the network's ``K`` channels. For
  MONAI's UNet the head is the last up-sampling block (``ConvTranspose3d(., K)`` and the
  ``K -> K`` convolution), so ``final`` is the last decoder convolution before it. When every
  convolution has ``K`` channels, the last one executed;
* ``"bottleneck_decoder"`` (default; paper 000): the mean of the per-layer maps of the
  bottleneck, the first convolution executed whose output has the fewest voxels, and of every
  convolution executed after it (decoder and head);
* ``"all_conv"``: the mean of the per-layer maps of every convolution that runs.

The per-layer maps are averaged as they are (upsampled, not normalised). A layer that runs
more than once per network call is refused (its map would be ambiguous).

A convolution layer's map ``A`` is its *feature map*: the output of the activation that
follows it (after the normalisation), or the convolution's own output where none follows
(residual projections, the output head). The raw output of a convolution followed by an
InstanceNorm (most convolutions of a MONAI UNet) has ``sum_space dT/dA_k = 0``, because the norm
removes any per-channel constant, so its Grad-CAM weights and map would vanish. A dotted name
still selects exactly the module named.

Sliding windows: one set of weights for the whole target (``weights="global"``, default)
-----------------------------------------------------------------------------------------
The network runs on sliding windows (:class:`~SegXAILib.models.windows.WindowedForward`,
only the windows that touch the target's support). The target ``T`` is one scalar for the
whole volume, whatever its kind: a class target sums the class score over every predicted
voxel of the class, an instance or region target over the voxels of its mask (cut by the
threshold for class-threshold targets). Windows that do not touch the support have
``dT/dA = 0`` and are not run. The channel weights are those of Grad-CAM / Grad-CAM++ on the
*stitched* feature map of all windows, on the padded input grid ``V`` (the model grid padded
up to the patch as the windows are):

* each window's layer voxel ``j`` covers a *cell* ``C_j`` of the patch: the voxels that nearest
  upsampling assigns it (``x s / P`` rounded down per axis, layer shape ``s``, patch ``P``),
  ``rho = prod(s) / prod(P)`` layer voxels per input voxel;
* stitched gradient ``G(x) = sum_w g_w(j_w(x)) / |C_j|``: the gradient of ``T`` with respect
  to one feature field ``F`` on ``V`` that every window reads, each layer voxel as the mean of
  ``F`` over its cell (the window's gradients spread over its cells and *added* where windows
  overlap; ``g_w`` already holds the window's blend share ``m_w / sum m``). In layer-voxel
  units ``G' = G / rho``;
* stitched activations ``A~(x) = sum_w m_w(x) A_w(j_w(x)) / sum_w m_w(x)``: the windows'
  maps blended as the logits are (importance ``m``, the count of every window, also those
  not run); ``S_k = rho sum_V A~_k``;
* Grad-CAM: ``w_k = mean_V G'_k = sum_w sum_j g_w,k(j) / (rho |V|)``;
* Grad-CAM++: ``alpha = G'^2 / (2 G'^2 + S_k G'^3)`` (0 where the denominator is 0),
  ``w_k = rho sum_V alpha relu(G'_k)``.

One set of weights per layer is applied to every window's activations,
``cam_w = relu(sum_k w_k A_w,k)``, upsampled to the patch and blended like the logits:
``sum_w m_w cam_w / sum_w m_w``, cropped to the input grid; where no run window reaches the map
is 0 (and near such windows it fades as the logits do). When every cell is one voxel and the
windows' activations agree where they overlap (a network of 1x1x1 convolutions), ``G`` and
``A~`` are the whole-volume gradient and activations and the map is the whole-volume CAM. With
one window (the input fits the patch) the stitched map is the window's own layer map, and the
CAM is the plain one (computed on the layer grid, so also when the patch is not a multiple of
the layer shape). The sums over ``V`` are taken on the pieces between the windows' cell
borders (values are constant there), so memory is that of the layer's windows, not of ``V``.

``weights="per_window"`` gives the earlier definition: each window's CAM from its own weights
(``w_k`` from that window's ``A``, ``g`` alone), blended the same way; its maps show the windows
as patches where neighbouring windows' weights differ. The instance Grad-CAM++ of
:mod:`SegXAILib.instances.gradcam` (a per-element layer map, no channel weights) stays per
window.

Fold ensembles and mirroring
----------------------------
When a window's logits are the mean over ensemble members ``f_j`` and mirror flips ``s``
(card ``architecture.weights`` as a list, ``inference.mirror_axes``) of ``s(f_j(s(x_w)))``,
each of these *passes* has its own activations: the hooks are on the named layer of every
member (the layer names are the same in every member). For each window, member and flip, ``A``
is the layer's output in that pass and ``g = dT/dA`` the gradient of the target through that
pass alone, whose upstream gradient is the pass's share of ``dT/dL`` (the window's slice, times
``m_w / sum_w m_w``, divided by members x flips: the exact gradient, as
:meth:`~SegXAILib.models.windows.WindowedForward.vjp` splits it). Each pass ``(j, s)`` has its own
weights, pooled as above over the windows (the pass's activations and gradients flipped back by
``s`` into the window's frame; members' channels differ, and each flip keeps its own weights, as
with one window). The pass's CAM is computed in the pass's own (flipped) frame, upsampled to the
patch, flipped back by ``s``, and the window's map is the mean over members x flips of these maps::

    cam_w = 1 / (J |S|) sum_j sum_s s(up(CAM(A_{w,j,s}, weights_{j,s})))

blended over the windows as above. With one member and no mirror axes this is the
single-network CAM, bit for bit. The guided variants multiply by the guided map of the
ensemble (:mod:`.guided`, rules on every member). The autograd graph holds every run window's
passes at once (memory grows with windows x members x flips).

Hooks need an eager ``torch.nn.Module``: TorchScript networks are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..image import SegXAIInputError
from ..models.card import EAGER_HINT
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .base import Attribution, Parameter, check_inputs
from .forward import SegmentationForward
from .guided import _AGGREGATION, _BATCH, _DERIVATIVES, GuidedBackprop

__all__ = [
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedGradCAM",
    "GuidedGradCAMPlusPlus",
    "LayerInfo",
    "LAYER_OPTIONS",
    "trace_conv_layers",
    "resolve_layers",
    "cam_from_layer",
    "gradcam_plusplus_alpha",
    "windowed_cam",
    "WEIGHT_OPTIONS",
]

LAYER_OPTIONS = ("final", "bottleneck_decoder", "all_conv")
CAM_KINDS = ("gradcam", "gradcam_plusplus")
#: ``weights`` of the CAMs: one set for the whole target (stitched windows) or each window's own
WEIGHT_OPTIONS = ("global", "per_window")
#: at most this many values (batch x channels x pieces) in one Grad-CAM++ pooling step
_POOL_CHUNK = 2**24
_CONV_TYPES = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerInfo:
    """A convolution as it ran: dotted name, type, output channels and spatial shape."""

    name: str
    type_name: str
    out_channels: int
    spatial_shape: tuple[int, ...]

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.spatial_shape:
            n *= int(s)
        return n


def _check_eager(network: torch.nn.Module) -> None:
    if isinstance(network, torch.jit.ScriptModule):
        raise SegXAIInputError(
            f"Grad-CAM needs layer hooks, which TorchScript networks do not run; {EAGER_HINT}"
        )


def trace_conv_layers(
    network: torch.nn.Module, in_channels: int, patch_size: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[list[LayerInfo], int]:
    """The convolution layers of ``network`` in the order they first run on a zero patch
    ``(1, in_channels, *patch_size)``, and the network's output channel count ``K``.

    Each layer is represented by its *feature map*: the output of the first activation module
    that runs after the ``Conv3d`` / ``ConvTranspose3d`` (before the next convolution) with the
    convolution's output shape, i.e. the rectified map after normalisation (Selvaraju's
    ``A^k``); a convolution without one (a residual projection, the output head) is itself.
    Raw convolution outputs followed by an InstanceNorm would give Grad-CAM weights of 0.
    """
    _check_eager(network)
    activation_types = tuple(_DERIVATIVES)  # element-wise activations
    names = {
        module: name for name, module in network.named_modules() if isinstance(module, _CONV_TYPES + activation_types)
    }
    events: list[tuple[str, bool, tuple[int, ...]]] = []  # (name, is_convolution, output shape)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor):
            events.append((names[module], isinstance(module, _CONV_TYPES), tuple(output.shape)))

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        with torch.no_grad():
            output = network(torch.zeros((1, in_channels, *patch_size), device=device))
    finally:
        for handle in handles:
            handle.remove()
    runs: dict[str, int] = {}
    for name, _, _ in events:
        runs[name] = runs.get(name, 0) + 1
    order: list[LayerInfo] = []
    seen: set[str] = set()
    for position, (name, is_convolution, shape) in enumerate(events):
        if not is_convolution or name in seen:
            continue
        seen.add(name)
        chosen, type_name = name, type(dict(network.named_modules())[name]).__name__
        for later, later_is_convolution, later_shape in events[position + 1 :]:
            if later_is_convolution:
                break
            if later_shape == shape and runs[later] == 1:  # a shared activation module is ambiguous
                chosen, type_name = later, type(dict(network.named_modules())[later]).__name__
                break
        if chosen not in {info.name for info in order}:
            order.append(LayerInfo(chosen, type_name, int(shape[1]), tuple(shape[2:])))
    return order, int(output.shape[1])


def resolve_layers(
    network: torch.nn.Module, layer: str, in_channels: int, patch_size: Sequence[int], device: torch.device | str = "cpu"
) -> list[str]:
    """The dotted names of the layers that ``layer`` selects (see the module docstring)."""
    _check_eager(network)
    modules = dict(network.named_modules())
    if layer not in LAYER_OPTIONS:
        if layer and layer in modules:
            return [layer]
        convs = [name for name, m in modules.items() if isinstance(m, _CONV_TYPES)]
        examples = convs[:3] + convs[-2:] if len(convs) > 5 else convs
        raise SegXAIInputError(
            f"layer {layer!r}: not a module of the network; use one of {list(LAYER_OPTIONS)} or a dotted module name "
            f"such as {examples}"
        )
    order, out_channels = trace_conv_layers(network, in_channels, patch_size, device)
    if not order:
        raise SegXAIInputError("Grad-CAM: the network runs no Conv3d / ConvTranspose3d layer; name a layer explicitly")
    if layer == "all_conv":
        return [info.name for info in order]
    if layer == "final":
        end = len(order)
        while end > 0 and order[end - 1].out_channels == out_channels:
            end -= 1  # the output head: trailing convolutions with the network's K channels
        return [order[end - 1].name if end > 0 else order[-1].name]
    smallest = min(info.voxels for info in order)
    start = next(i for i, info in enumerate(order) if info.voxels == smallest)
    return [info.name for info in order[start:]]


def gradcam_plusplus_alpha(
    activations: torch.Tensor, gradients: torch.Tensor, totals: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Grad-CAM++'s ``alpha = g^2 / (2 g^2 + sum_space(A_k) g^3)`` ``(B, K, *space)``, 0 where
    the denominator is 0 (class level: weights summed over space; instance level, paper 001
    eq. 10: kept per element).

    ``totals`` ``(B, K, 1, 1, 1)``, optional: ``sum_space(A_k)`` given (the stitched map's, when
    ``gradients`` are stitched over windows); ``activations`` are then unused (may be None).
    """
    g = gradients.float()
    total = activations.float().sum(dim=tuple(range(2, g.ndim)), keepdim=True) if totals is None else totals.float()
    g2 = g * g
    denominator = 2 * g2 + total * g2 * g
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, g2 / safe, torch.zeros_like(g))


def cam_from_layer(activations: torch.Tensor, gradients: torch.Tensor, kind: str = "gradcam") -> torch.Tensor:
    """The CAM ``(B, 1, *space)`` of one layer from its activations and gradients ``(B, K, *space)``.

    ``kind`` ``"gradcam"``: ``w_k = mean_space g_k``; ``"gradcam_plusplus"``: ``alpha = g^2 /
    (2 g^2 + sum_space(A_k) g^3)`` (0 where the denominator is 0), ``w_k = sum_space alpha
    relu(g_k)``. Both: ``relu(sum_k w_k A_k)``.
    """
    if kind not in CAM_KINDS:
        raise ValueError(f"kind must be one of {CAM_KINDS}, got {kind!r}")
    a = activations.float()
    g = gradients.float()
    space = tuple(range(2, a.ndim))
    if kind == "gradcam":
        weights = g.mean(dim=space, keepdim=True)
    else:
        weights = (gradcam_plusplus_alpha(a, g) * F.relu(g)).sum(dim=space, keepdim=True)
    return F.relu((weights * a).sum(dim=1, keepdim=True))


def _cells(patch: int, size: int, flipped: bool) -> np.ndarray:
    """The layer index ``(patch,)`` of each patch voxel along one axis: nearest assignment
    ``x size // patch``, in the window's frame (``flipped``: of a pass run on the flipped patch,
    whose layer tensor is flipped back)."""
    assign = (np.arange(patch) * size) // patch
    return (size - 1 - assign[::-1]).copy() if flipped else assign


def _pooled_weights(
    kind: str,
    views: Sequence[tuple[tuple[slice, ...], tuple[int, ...], torch.Tensor, torch.Tensor]],
    importance: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Grad-CAM / Grad-CAM++ channel weights ``(B, K, 1, 1, 1)`` of the stitched feature map of
    one layer and pass over all run windows (module docstring, "Sliding windows").

    Parameters
    ----------
    kind : str
        ``"gradcam"`` or ``"gradcam_plusplus"``.
    views : sequence of (window, flips, A, g)
        Per run window: its slices of the padded grid, the pass's flip axes (spatial), the
        layer's activations and ``dT/dA`` ``(B, K, *s)`` in the pass's frame.
    importance : torch.Tensor
        ``(*P)`` blend importance map of a window.
    count : torch.Tensor
        ``(*padded)`` sum of the importance of every window.
    """
    patch = tuple(int(sl.stop - sl.start) for sl in views[0][0])
    layer = tuple(int(n) for n in views[0][2].shape[2:])
    rho = float(np.prod(layer)) / float(np.prod(patch))  # layer voxels per input voxel
    volume = float(np.prod(tuple(count.shape)))
    if kind == "gradcam":
        # linear in g: the sum over the stitched grid is the sum of every window's gradients
        total = sum(g.float().sum(dim=(2, 3, 4), keepdim=True) for _, _, _, g in views)
        return total / (rho * volume)
    # Grad-CAM++ is not linear in g: stitch G on the pieces between every window's cell borders
    backs = [[axis + 2 for axis in flips] for _, flips, _, _ in views]
    cells = [[_cells(patch[a], layer[a], a in flips) for a in range(3)] for _, flips, _, _ in views]
    borders = []
    for a in range(3):
        points: set[int] = set()
        for (window, _, _, _), assign in zip(views, cells):
            start = int(window[a].start)
            changes = np.flatnonzero(np.diff(assign[a])) + 1
            points.update([start, start + patch[a], *(start + changes).tolist()])
        borders.append(np.array(sorted(points)))
    lengths = [torch.from_numpy(np.diff(b)).to(torch.float32) for b in borders]
    device = views[0][2].device
    piece_volume = (lengths[0][:, None, None] * lengths[1][None, :, None] * lengths[2][None, None, :]).to(device)
    placements = []  # per view: piece ranges, layer index per piece and 1 / |cell| per axis
    for (window, _, _, _), assign in zip(views, cells):
        ranges, indices, factors = [], [], []
        for a in range(3):
            start = int(window[a].start)
            lo = int(np.searchsorted(borders[a], start))
            hi = int(np.searchsorted(borders[a], start + patch[a]))
            index = assign[a][borders[a][lo:hi] - start]
            size = np.bincount(assign[a], minlength=layer[a]).astype(np.float32)
            ranges.append(slice(lo, hi))
            indices.append(torch.from_numpy(index).to(device))
            factors.append(torch.from_numpy(1.0 / size[index]).to(device))
        placements.append((tuple(ranges), indices, factors))

    # S_k = rho sum_V A~_k: each window's activations times its blend share, pooled over its cells
    totals = None
    for (window, _, a, _), back, assign in zip(views, backs, cells):
        share = (importance.to(device) / count[window].to(device)).float()
        for axis in range(3):
            pooled = torch.zeros((*share.shape[:axis], layer[axis], *share.shape[axis + 1 :]), device=device)
            share = pooled.index_add_(axis, torch.from_numpy(assign[axis]).to(device), share)
        a_back = torch.flip(a.float(), back) if back else a.float()
        term = (a_back * share).sum(dim=(2, 3, 4), keepdim=True)
        totals = term if totals is None else totals + term
    assert totals is not None
    totals = totals * rho

    samples, channels = views[0][2].shape[:2]
    pieces = int(piece_volume.numel())
    chunk = max(1, _POOL_CHUNK // max(1, samples * pieces))
    weights = []
    for first in range(0, channels, chunk):
        stitched = torch.zeros((samples, min(chunk, channels - first), *piece_volume.shape), device=device)
        for (_, _, _, g), back, (ranges, indices, factors) in zip(views, backs, placements):
            part = g[:, first : first + chunk].float()
            part = torch.flip(part, back) if back else part
            part = part.index_select(2, indices[0]).index_select(3, indices[1]).index_select(4, indices[2])
            density = factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
            stitched[(slice(None), slice(None), *ranges)] += part * density  # G on the pieces
        stitched = stitched / rho  # G' (layer-voxel units)
        alpha = gradcam_plusplus_alpha(None, stitched, totals[:, first : first + chunk])  # type: ignore[arg-type]
        weights.append(rho * (alpha * F.relu(stitched) * piece_volume).sum(dim=(2, 3, 4), keepdim=True))
    return torch.cat(weights, dim=1)


def windowed_cam(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    layers: Sequence[str],
    kind: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "gradcam",
    cancel: Optional[CancelToken] = None,
    weights: str = "global",
) -> torch.Tensor:
    """The mean over ``layers`` of their CAMs, per sliding window and network pass, blended:
    ``(B, 1, D, H, W)``.

    Each window's map is the mean over its passes (ensemble members x mirror flips) of the
    pass's CAM, computed in the pass's flipped frame, upsampled to the patch and flipped back
    (see the module docstring); the windows' maps are blended like the logits. The CAM's
    channel weights are those of the stitched feature map of all run windows
    (``weights="global"``) or each window's own (``"per_window"``).

    Parameters
    ----------
    forward : SegmentationForward
    inputs : torch.Tensor
        ``(B, C, D, H, W)`` on the model grid.
    layers : sequence of str
        Dotted module names, the same in every network of ``forward.networks``.
    kind : str or callable
        ``"gradcam"`` or ``"gradcam_plusplus"``, or a function ``(A, dT/dA) -> (B, 1, *space)``
        giving one layer's map (e.g. instance Grad-CAM++'s per-element weighting; always per
        window: it has no channel weights to pool).
    cancel : CancelToken, optional
    weights : str
        ``"global"`` (default): one set of channel weights per layer and pass for the whole
        target, from the stitched map of every run window (exact pooled Grad-CAM /
        Grad-CAM++); ``"per_window"``: each window's weights from that window alone.

    Returns
    -------
    torch.Tensor
        ``(B, 1, D, H, W)`` float32, 0 where no run window reaches.
    """
    if weights not in WEIGHT_OPTIONS:
        raise SegXAIInputError(f"weights {weights!r}: expected one of {list(WEIGHT_OPTIONS)}")
    layer_map = kind if callable(kind) else (lambda a, g: cam_from_layer(a, g, kind))
    networks = forward.networks
    for network in networks:
        _check_eager(network)
    windowed = forward.windowed
    mirrors = windowed.mirrors
    samples = inputs.shape[0]
    # one hook per distinct (layer, module): members sharing a module object see its calls in
    # member order, each member's calls in mirror order (WindowedForward's pass order)
    members_of: dict[tuple[str, int], list[int]] = {}
    module_of: dict[tuple[str, int], torch.nn.Module] = {}
    for member, network in enumerate(networks):
        modules = dict(network.named_modules())
        for name in layers:
            if name not in modules:
                raise SegXAIInputError(f"layer {name!r}: not a module of ensemble member {member}")
            key = (name, id(modules[name]))
            members_of.setdefault(key, []).append(member)
            module_of[key] = modules[name]
    pending: dict[tuple[str, int], list[torch.Tensor]] = {}
    # (window, position in its call, {(layer, member, flip index): activations})
    records: list[tuple[int, int, dict[tuple[str, int, int], torch.Tensor]]] = []
    position = [0]

    def make_hook(key: tuple[str, int]):
        name = key[0]

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.ndim != 5:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise SegXAIInputError(
                    f"layer {name!r} ({type(module).__name__}) gives {shape}; Grad-CAM needs a (B, K, d, h, w) tensor"
                )
            calls = pending.setdefault(key, [])
            if len(calls) >= len(mirrors) * len(members_of[key]):
                raise SegXAIInputError(f"layer {name!r} runs more than once per network call; choose another layer")
            calls.append(output)
            # the captured tensor stays untouched by later in-place operations
            return output.clone()

        return hook

    def on_window(window_logits: torch.Tensor, index: int) -> None:
        captured: dict[tuple[str, int, int], torch.Tensor] = {}
        for key, members in members_of.items():
            calls = pending.get(key, [])
            if not calls:
                raise SegXAIInputError(f"layer(s) {[key[0]]} did not run in the network's forward")
            if len(calls) != len(mirrors) * len(members):
                raise SegXAIInputError(f"layer {key[0]!r} runs more than once per network call; choose another layer")
            for call, tensor in enumerate(calls):
                captured[(key[0], members[call // len(mirrors)], call % len(mirrors))] = tensor
        records.append((index, position[0], captured))
        position[0] += 1
        if position[0] * samples >= next(iter(captured.values())).shape[0]:
            pending.clear()
            position[0] = 0

    if cancel is not None:
        cancel.raise_if_cancelled()
    x = inputs.detach().requires_grad_(True)
    handles = [module_of[key].register_forward_hook(make_hook(key)) for key in members_of]
    try:
        with torch.enable_grad():
            logits = forward.logits(x, on_window=on_window, hooks_per_pass=True)
            value = forward.target(logits).sum()
            tensors: dict[int, torch.Tensor] = {}
            for _, _, captured in records:
                for tensor in captured.values():
                    tensors[id(tensor)] = tensor
            # each pass's dT/dA: its share of the upstream gradient (m_w / sum m, 1 / passes)
            gradients = torch.autograd.grad(value, list(tensors.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    gradient_of = {
        key: (grad if grad is not None else torch.zeros_like(tensor))
        for (key, tensor), grad in zip(tensors.items(), gradients)
    }

    patch = tuple(int(s) for s in forward.card.patch_size)
    importance = windowed.importance.to(inputs.device)
    # one window: its own layer grid is the stitched map, and the plain CAM is exact there
    pooled: Optional[dict[tuple[str, int, int], torch.Tensor]] = None
    if weights == "global" and not callable(kind) and len(windowed.windows) > 1:
        pooled = {}
        for name in layers:
            for member in range(len(networks)):
                for flip, flips in enumerate(mirrors):
                    views = []
                    for index, pos, captured in records:
                        rows = slice(pos * samples, (pos + 1) * samples)
                        tensor = captured[(name, member, flip)]
                        views.append((windowed.windows[index], flips, tensor[rows].detach(),
                                      gradient_of[id(tensor)][rows]))
                    pooled[(name, member, flip)] = _pooled_weights(kind, views, windowed.importance, windowed.count)
    blended = torch.zeros((samples, 1, *windowed.padded_shape), device=inputs.device, dtype=torch.float32)
    for index, pos, captured in records:
        rows = slice(pos * samples, (pos + 1) * samples)
        window_map: Optional[torch.Tensor] = None
        for member in range(len(networks)):
            for flip, flips in enumerate(mirrors):
                maps = []
                for name in layers:
                    tensor = captured[(name, member, flip)]
                    if pooled is None:
                        cam = layer_map(tensor[rows].detach(), gradient_of[id(tensor)][rows])
                    else:  # the whole target's weights on this window's activations
                        channel_weights = pooled[(name, member, flip)]
                        cam = F.relu((channel_weights * tensor[rows].detach().float()).sum(dim=1, keepdim=True))
                    maps.append(F.interpolate(cam, size=patch, mode="trilinear", align_corners=False))
                pass_map = torch.stack(maps).mean(dim=0)
                if flips:  # the pass's frame is flipped: back to the window's
                    pass_map = torch.flip(pass_map, [axis + 2 for axis in flips])
                window_map = pass_map if window_map is None else window_map + pass_map
        assert window_map is not None
        if windowed.passes > 1:
            window_map = window_map / windowed.passes
        blended[(slice(None), slice(None), *windowed.windows[index])] += window_map * importance
    blended = blended / windowed.count.to(inputs.device)
    return blended[(slice(None), slice(None), *windowed._crop_slices())]


_LAYER = Parameter(
    "layer", "str", "bottleneck_decoder",
    "layer(s) of the CAM: final, bottleneck_decoder (mean of bottleneck + later convs), all_conv, or a dotted module name",
)


_WEIGHTS = Parameter(
    "weights", "choice", "global",
    "CAM channel weights: global (the whole target's, pooled over the stitched windows: no seams) or per_window "
    "(each sliding window's own, the earlier definition)",
    choices=WEIGHT_OPTIONS,
)


class _CAM(Attribution):
    """A CAM of ``layer``, broadcast to every input channel."""

    cam_kind: ClassVar[str] = "gradcam"
    parameters = (_LAYER, _WEIGHTS)

    def layers(self, inputs: torch.Tensor, layer: str = "bottleneck_decoder") -> list[str]:
        """The dotted names of the layers ``layer`` selects for ``inputs`` ``(1, C, D, H, W)``."""
        return resolve_layers(self.forward.network, layer, int(inputs.shape[1]), self.forward.card.patch_size, inputs.device)

    def _cam(self, inputs: torch.Tensor, layer: str, progress: Optional[ProgressCallback],
             cancel: Optional[CancelToken], weights: str = "global") -> torch.Tensor:
        """The CAM ``(1, 1, D, H, W)`` of checked ``inputs`` ``(1, C, D, H, W)``."""
        cam = windowed_cam(self.forward, inputs, self.layers(inputs, layer), self.cam_kind, cancel, weights)
        report(progress, 1.0, self.name)
        return cam

    def attribute(
        self,
        inputs: torch.Tensor,
        layer: str = "bottleneck_decoder",
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        weights: str = "global",
    ) -> torch.Tensor:
        """The map ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        layer : str
            ``"final"``, ``"bottleneck_decoder"``, ``"all_conv"`` or a dotted module name.
        weights : str
            ``"global"`` (default): the whole target's channel weights, pooled over the stitched
            sliding windows (module docstring); ``"per_window"``: each window's own weights.

        Returns
        -------
        torch.Tensor
            The CAM (one map for the volume) repeated over the ``C`` input channels.
        """
        inputs = check_inputs(inputs)
        return self._cam(inputs, layer, progress, cancel, weights).repeat(1, inputs.shape[1], 1, 1, 1)


class _GuidedCAM(_CAM):
    """The guided-backprop map (:class:`GuidedBackprop`) times the CAM of ``layer``."""

    parameters = (_LAYER, _AGGREGATION, _BATCH, _WEIGHTS)

    def attribute(
        self,
        inputs: torch.Tensor,
        layer: str = "bottleneck_decoder",
        aggregation: str = "per_voxel",
        batch_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        weights: str = "global",
    ) -> torch.Tensor:
        """The map ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        layer : str
            ``"final"``, ``"bottleneck_decoder"``, ``"all_conv"`` or a dotted module name.
        aggregation, batch_size
            Of the guided-backprop map (see :class:`GuidedBackprop`).
        weights : str
            Of the CAM: ``"global"`` (default) or ``"per_window"`` (see :class:`GradCAM`).

        Returns
        -------
        torch.Tensor
            The guided map (per channel) times the CAM.
        """
        inputs = check_inputs(inputs)
        cam = self._cam(inputs, layer, sub_progress(progress, 0.5, 1.0), cancel, weights)
        guided = GuidedBackprop(self.forward).attribute(
            inputs, aggregation=aggregation, batch_size=batch_size, progress=sub_progress(progress, 0.0, 0.5), cancel=cancel
        )
        result = guided * cam
        report(progress, 1.0, self.name)
        return result


class GradCAM(_CAM):
    """Grad-CAM (Selvaraju et al. 2017; papers 000, 001): ``relu(sum_k mean(g_k) A_k)``."""

    name = "gradcam"
    summary = "Grad-CAM of a layer (final, bottleneck_decoder, all_conv or named), upsampled to the input"


class GradCAMPlusPlus(_CAM):
    """Grad-CAM++ (Chattopadhay et al. 2018; paper 001), exponential-output closed form."""

    name = "gradcam_plusplus"
    summary = "Grad-CAM++ of a layer (closed-form alpha), upsampled to the input"
    cam_kind = "gradcam_plusplus"


class GuidedGradCAM(_GuidedCAM):
    """Guided Grad-CAM (paper 000): guided backprop map x upsampled Grad-CAM."""

    name = "guided_gradcam"
    summary = "guided backprop times Grad-CAM"


class GuidedGradCAMPlusPlus(_GuidedCAM):
    """Guided Grad-CAM++: guided backprop map x upsampled Grad-CAM++."""

    name = "guided_gradcam_plusplus"
    summary = "guided backprop times Grad-CAM++"
    cam_kind = "gradcam_plusplus"
