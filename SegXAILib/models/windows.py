"""The window-exact, differentiable sliding-window forward used by attribution and prediction.

A sliding window blends overlapping windows with an importance map:
``out(v) = sum_w m_w(v) g(x_w)(v) / sum_w m_w(v)``, where the window function ``g`` is the
network, or for a fold ensemble with mirroring the mean over members ``f_k`` and flips ``s``
of ``s(f_k(s(x_w)))`` (logits averaged, as nnU-Net v2 does; the activation comes after). A
target that reads the output only on a support ``S`` depends only on the windows that overlap
``S``; the others contribute nothing to ``out`` on ``S`` nor to any gradient of the target.
:class:`WindowedForward` runs exactly those windows, with the card's window placement, padding
and importance map: MONAI's (``window_scheme`` ``"monai"``, values and gradients on ``S`` equal
autograd through :func:`monai.inferers.sliding_window_inference`, checked by
``Testing/test_attribution_engine.py``) or nnU-Net v2's (``"nnunet"``: its
``compute_steps_for_sliding_window`` positions, zero padding and ``compute_gaussian`` map,
re-implemented here in float32; ``Testing/test_ensemble_inference.py``).

Exact gradients with memory bounded by one patch (:meth:`WindowedForward.vjp`): the blend is
linear in the window outputs, so ``dT/dx`` is the sum over member x window x flip of each
pass's vector-Jacobian product with its share of the upstream gradient ``dT/dL`` (the window's
slice of it, times ``m_w / sum m``, divided by members x flips).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..image import SegXAIInputError
from .card import ModelCard

__all__ = ["WindowedForward", "mirror_combinations", "nnunet_steps", "nnunet_gaussian", "ensemble_window_logits",
           "flip_groups", "PASS_BATCH_VOXELS"]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips over ``axes`` (spatial axes 0, 1, 2), none first, in nnU-Net's
    order (``itertools.combinations`` by size): ``2 ** len(axes)`` entries."""
    axes = tuple(int(a) for a in axes)
    return [()] + [c for size in range(1, len(axes) + 1) for c in itertools.combinations(axes, size)]


def nnunet_steps(image_size: Sequence[int], patch_size: Sequence[int], tile_step_size: float) -> list[list[int]]:
    """Window start positions per axis, as nnU-Net v2's ``compute_steps_for_sliding_window``.

    Parameters
    ----------
    image_size, patch_size : (D, H, W)
        The (padded) image is at least the patch on every axis.
    tile_step_size : float
        In (0, 1]: the largest step as a fraction of the patch (``1 - overlap``).

    Returns
    -------
    list of 3 lists of int
        The steps are spread evenly between 0 and ``image - patch`` (rounded half to even,
        as ``np.round``), as few as keep each step at most ``patch * tile_step_size``.
    """
    if not 0 < tile_step_size <= 1:
        raise SegXAIInputError(f"tile_step_size {tile_step_size}: expected 0 < tile_step_size <= 1")
    if any(int(i) < int(k) for i, k in zip(image_size, patch_size)):
        raise SegXAIInputError(f"image size {list(image_size)} is smaller than the patch {list(patch_size)}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        target = patch * tile_step_size
        count = int(np.ceil((size - patch) / target)) + 1
        largest = size - patch
        actual = largest / (count - 1) if count > 1 else 99999999999  # one step at 0
        steps.append([int(np.round(actual * i)) for i in range(count)])
    return steps


def nnunet_gaussian(
    patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10.0
) -> torch.Tensor:
    """nnU-Net v2's ``compute_gaussian`` importance map ``(D, H, W)`` in float32.

    nnU-Net filters a unit impulse at ``patch // 2`` with ``scipy.ndimage.gaussian_filter``
    (sigma ``patch * sigma_scale``, truncated at ``int(4 sigma + 0.5)`` voxels, zero outside),
    scales the peak to ``value_scaling_factor`` and replaces zeros by the smallest non-zero
    value. The filtered impulse is the product of the 1-D kernels, so the map is computed in
    closed form (float64, then float32; nnU-Net keeps it in float16 on CUDA).
    """
    factors = []
    for size in patch_size:
        size = int(size)
        sigma = size * sigma_scale
        radius = int(4.0 * sigma + 0.5)
        offset = np.arange(size) - size // 2
        kernel = np.exp(-0.5 * (offset / sigma) ** 2)
        kernel[np.abs(offset) > radius] = 0.0  # scipy's kernel stops at the truncation radius
        factors.append(kernel)
    gaussian = np.einsum("i,j,k->ijk", *factors) * value_scaling_factor  # peak exp(0) = 1 at the centre
    gaussian = torch.from_numpy(gaussian).to(torch.float32)
    zero = gaussian == 0
    if bool(zero.any()):
        gaussian[zero] = gaussian[~zero].min()  # no zero weights: the blend divides by their sum
    return gaussian


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs as float32; float32 and float64 outputs unchanged
    (a float64 network gives float64 logits and gradients, e.g. for finite differences)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


#: at most this many voxels (batch x patch) per network call when flips are batched together
PASS_BATCH_VOXELS = 2**19


def flip_groups(
    mirrors: Sequence[tuple[int, ...]], patches_shape: Sequence[int], max_batch_voxels: int = PASS_BATCH_VOXELS
) -> list[list[tuple[int, ...]]]:
    """``mirrors`` split into groups that go through the network as one batch.

    A network call costs a fixed overhead (dozens of small kernels, Python) on top of its
    arithmetic; on small patches the overhead dominates, and the flips of one window batch
    stacked along the batch axis run several times faster per flip (6x for the nnU-Net demo's
    16 x 24 x 24 patch on one CPU thread). Each group holds as many flips as keep the stacked
    batch within ``max_batch_voxels`` (batch x patch voxels), at least one: large patches go
    one flip per call, with the memory of one call.

    Parameters
    ----------
    mirrors : sequence of tuple of int
        Spatial-axis flip combinations (:func:`mirror_combinations`).
    patches_shape : (B, C, D, H, W)
        The window batch.
    max_batch_voxels : int
    """
    voxels = int(patches_shape[0]) * math.prod(int(s) for s in patches_shape[2:])
    size = max(1, min(len(mirrors), int(max_batch_voxels) // max(1, voxels)))
    return [list(mirrors[start : start + size]) for start in range(0, len(mirrors), size)]


def _stacked_flips(patches: torch.Tensor, group: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """The flips of ``patches`` in ``group`` stacked along the batch axis ``(len(group) B, C, ...)``."""
    flipped = [torch.flip(patches, [axis + 2 for axis in flips]) if flips else patches for flips in group]
    return flipped[0] if len(flipped) == 1 else torch.cat(flipped)


def ensemble_window_logits(
    networks: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    mirrors: Sequence[tuple[int, ...]],
    patches: torch.Tensor,
    amp: bool = False,
    max_batch_voxels: Optional[int] = None,
) -> torch.Tensor:
    """Mean over members and flips of ``flip(f(flip(patches)))``: ``(B, K, *patch)``, float32
    (float64 for a float64 network).

    ``mirrors`` are spatial-axis combinations (:func:`mirror_combinations`); the empty one is
    the plain prediction. Logits are averaged (nnU-Net v2); the activation comes after. Flips
    go through each member in batches of :func:`flip_groups` (``max_batch_voxels``, default
    :data:`PASS_BATCH_VOXELS`; 0 or 1: one flip per call); samples of a batch are independent in an eval-mode network, so the
    values are those of one call per flip up to float32 rounding.
    """
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and patches.is_cuda else contextlib.nullcontext()
    batch = patches.shape[0]
    limit = PASS_BATCH_VOXELS if max_batch_voxels is None else max_batch_voxels
    total: Optional[torch.Tensor] = None
    for network in networks:
        for group in flip_groups(mirrors, patches.shape, limit):
            with autocast:
                stacked = network(_stacked_flips(patches, group))
            stacked = _widened(stacked)
            for position, flips in enumerate(group):
                logits = stacked[position * batch : (position + 1) * batch]
                if flips:
                    logits = torch.flip(logits, [axis + 2 for axis in flips])
                total = logits if total is None else total + logits
    assert total is not None
    passes = len(networks) * len(mirrors)
    return total if passes == 1 else total / passes


class WindowedForward:
    """Differentiable sliding-window logits of a network (or a fold ensemble, with mirroring)
    over inputs of one spatial shape.

    Parameters
    ----------
    network : callable
        ``(B, C, *patch) -> (B, K, *patch)``: the (first) network.
    card : ModelCard
        Gives the patch size, overlap, blend mode, window scheme and mirror axes (as used by
        :func:`~SegXAILib.models.inference.segment`).
    spatial_shape : (D, H, W)
        Spatial shape of the inputs (the model grid).
    amp : bool
        Run windows under CUDA autocast (float16); the result is float32.
    networks : sequence of callables, optional
        The ensemble's members (``network`` first); default ``[network]``.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        card: ModelCard,
        spatial_shape: Sequence[int],
        amp: bool = False,
        networks: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
    ) -> None:
        self.networks = list(networks) if networks else [network]
        self.network = self.networks[0]
        self.card = card
        self.amp = amp
        self.mirrors = mirror_combinations(card.mirror_axes)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.scheme = card.window_scheme
        roi = tuple(int(r) for r in card.patch_size)
        overlap = float(card.inference["overlap"])
        blend = card.inference.get("blend", "gaussian")
        # both schemes pad up to the patch size, splitting the padding in two (the smaller
        # half first); MONAI repeats the border, nnU-Net pads zeros
        self.padded_shape = tuple(max(s, r) for s, r in zip(self.spatial_shape, roi))
        pad = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            diff = max(roi[axis] - self.spatial_shape[axis], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = tuple(pad)
        self.pad_mode = "constant" if self.scheme == "nnunet" else "replicate"
        if self.scheme == "nnunet":
            steps = nnunet_steps(self.padded_shape, roi, 1.0 - overlap)
            self.windows: list[tuple[slice, slice, slice]] = [
                tuple(slice(start, start + r) for start, r in zip(corner, roi))  # type: ignore[misc]
                for corner in itertools.product(*steps)
            ]
            self.importance = nnunet_gaussian(roi) if blend == "gaussian" else torch.ones(roi)
        else:
            from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
            from monai.inferers.utils import _get_scan_interval

            interval = _get_scan_interval(self.padded_shape, roi, 3, [overlap] * 3)
            self.windows = [tuple(w) for w in dense_patch_slices(self.padded_shape, roi, interval, return_slice=True)]
            self.importance = compute_importance_map(
                get_valid_patch_size(self.padded_shape, roi), mode=blend,
                sigma_scale=0.125, device="cpu", dtype=torch.float32,
            )
        count = torch.zeros(self.padded_shape)
        for window in self.windows:
            count[window] += self.importance
        self.count = count

    @property
    def passes(self) -> int:
        """Network calls per window: members x mirror flips."""
        return len(self.networks) * len(self.mirrors)

    # ---- windows and support ------------------------------------------------------------------
    def _crop_slices(self) -> tuple[slice, slice, slice]:
        # pad is (last-before, last-after, mid-before, mid-after, first-before, first-after)
        before = (self.pad[4], self.pad[2], self.pad[0])
        return tuple(slice(b, b + s) for b, s in zip(before, self.spatial_shape))  # type: ignore[return-value]

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, D, H, W)`` padded up to the patch as the scheme does (MONAI: border
        repeated; nnU-Net: zeros); ``x`` itself when no padding is needed."""
        if not any(self.pad):
            return x
        if self.pad_mode == "constant":
            return F.pad(x, self.pad, mode="constant", value=0.0)
        return F.pad(x, self.pad, mode="replicate")

    def windows_for(self, support: Optional[torch.Tensor]) -> list[int]:
        """Indices of the windows that overlap ``support`` (bool ``(D, H, W)``); all if None."""
        if support is None:
            return list(range(len(self.windows)))
        if tuple(support.shape) != self.spatial_shape:
            raise ValueError(f"support shape {tuple(support.shape)} differs from the input's {self.spatial_shape}")
        padded = torch.zeros(self.padded_shape, dtype=torch.bool)
        padded[self._crop_slices()] = support.bool().cpu()
        return [index for index, window in enumerate(self.windows) if bool(padded[window].any())]

    def window_logits(self, patches: torch.Tensor, batch_flips: bool = True) -> torch.Tensor:
        """The window function: mean over members and flips (float32 ``(B, K, *patch)``);
        ``batch_flips=False``: one network call per member x flip (layer hooks see one pass)."""
        return ensemble_window_logits(self.networks, self.mirrors, patches, self.amp,
                                      PASS_BATCH_VOXELS if batch_flips else 0)

    # ---- forward ----------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        support: Optional[torch.Tensor] = None,
        window_batch: int = 1,
        on_window: Optional[Callable[[torch.Tensor, int], None]] = None,
        on_batch: Optional[Callable[[int, int], None]] = None,
        hooks_per_pass: bool = False,
    ) -> torch.Tensor:
        """Blended logits ``(B, K, D, H, W)`` of ``x`` ``(B, C, D, H, W)``.

        Only windows overlapping ``support`` are run: the result is exact on ``support`` and
        zero where no window ran. ``window_batch`` windows of each sample go through the
        network together. ``on_window(output, index)`` is called with each window's output
        (used by layer-activation methods to know which window a hook call belongs to), after
        every pass of its window batch. With several passes per window (ensemble members x
        mirror flips) it is refused unless ``hooks_per_pass``: the caller then tells the passes
        apart itself (they run member by member, in :attr:`networks` order, each over the flips
        in :func:`mirror_combinations` order, on the flipped window batch).
        ``on_batch(done, total)`` is called before each window batch (progress, cancelling).
        """
        if tuple(x.shape[2:]) != self.spatial_shape:
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} differs from {self.spatial_shape}")
        if on_window is not None and self.passes > 1 and not hooks_per_pass:
            # a hook sees one network call at a time: with members or flips its activations no
            # longer belong to one window's blended output
            raise SegXAIInputError(
                f"model {self.card.name!r} averages {len(self.networks)} ensemble member(s) x {len(self.mirrors)} "
                "mirror flip(s) per window; an on_window hook that reads layer activations must tell these passes "
                "apart (hooks_per_pass=True) or run on a single-network card without mirror_axes"
            )
        x = self.pad_input(x)
        selected = self.windows_for(support)
        device = x.device
        step = max(1, window_batch)
        if len(self.windows) == 1:
            # one window covers the (padded) volume: the blend m g / m is g itself, so skip the
            # accumulation buffers (less memory, same values)
            if on_batch is not None:
                on_batch(0, 1)
            logits = self.window_logits(x, batch_flips=on_window is None)
            if on_window is not None:
                on_window(logits, 0)
            return logits[(slice(None), slice(None), *self._crop_slices())]
        importance = self.importance.to(device)
        output: Optional[torch.Tensor] = None
        batches = math.ceil(len(selected) / step)
        for number, start in enumerate(range(0, len(selected), step)):
            if on_batch is not None:
                on_batch(number, batches)
            chunk = selected[start : start + step]
            patches = torch.cat([x[(slice(None), slice(None), *self.windows[i])] for i in chunk])
            logits = self.window_logits(patches, batch_flips=on_window is None)
            if output is None:
                dtype = torch.promote_types(logits.dtype, torch.float32)
                output = torch.zeros((x.shape[0], logits.shape[1], *self.padded_shape), device=device, dtype=dtype)
            for position, index in enumerate(chunk):
                window_logits = logits[position * x.shape[0] : (position + 1) * x.shape[0]]
                if on_window is not None:
                    on_window(window_logits, index)
                # in-place slice addition is recorded by autograd (CopySlices)
                output[(slice(None), slice(None), *self.windows[index])] += window_logits * importance
        if output is None:
            raise ValueError("no window overlaps the support")
        output = output / self.count.to(device)
        return output[(slice(None), slice(None), *self._crop_slices())]

    def vjp(
        self,
        x: torch.Tensor,
        cotangent: torch.Tensor,
        support: Optional[torch.Tensor] = None,
        window_batch: int = 1,
    ) -> torch.Tensor:
        """``cotangent^T d(logits)/dx`` ``(B, C, D, H, W)``, one network pass at a time.

        ``cotangent`` ``(B, K, D, H, W)`` is the gradient of a scalar with respect to the
        blended logits (zero off ``support``). The blending and the mean over members and
        flips are linear in the network outputs, so the backward splits into one backward per
        member x window batch x flip, each with its share of the cotangent (the window's slice,
        times ``m_w / sum m``, divided by members x flips): memory holds the graph of one window
        batch through one network (its flips stacked as :func:`flip_groups` allows), not the
        whole volume's, at the cost of running the forward again.
        """
        device = x.device
        padded_x = self.pad_input(x)
        dtype = torch.promote_types(cotangent.dtype, torch.float32)
        padded_cotangent = torch.zeros((*cotangent.shape[:2], *self.padded_shape), device=device, dtype=dtype)
        padded_cotangent[(slice(None), slice(None), *self._crop_slices())] = cotangent.to(dtype)
        importance, count = self.importance.to(device), self.count.to(device)
        gradient = torch.zeros_like(padded_x)
        selected = self.windows_for(support)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp and x.is_cuda else contextlib.nullcontext()
        batch = x.shape[0]
        share = 1.0 / self.passes
        for start in range(0, len(selected), max(1, window_batch)):
            chunk = selected[start : start + max(1, window_batch)]
            patches = torch.cat([padded_x[(slice(None), slice(None), *self.windows[i])] for i in chunk]).detach()
            weights = torch.cat(
                [
                    padded_cotangent[(slice(None), slice(None), *self.windows[i])] * (importance / count[self.windows[i]])
                    for i in chunk
                ]
            )
            if self.passes > 1:
                weights = weights * share
            patch_gradient = torch.zeros_like(patches)
            for network in self.networks:
                for group in flip_groups(self.mirrors, patches.shape, PASS_BATCH_VOXELS):
                    leaf = patches.detach().requires_grad_(True)
                    with torch.enable_grad():
                        with autocast:
                            logits = network(_stacked_flips(leaf, group))
                        logits = _widened(logits)
                        # flip(f(flip(p))) . w = f(flip(p)) . flip(w)
                        upstream = _stacked_flips(weights, group)
                        if logits.shape[1] != upstream.shape[1]:
                            raise SegXAIInputError(
                                f"model {self.card.name!r}: the network outputs {logits.shape[1]} channel(s), the "
                                f"gradient of the target has {upstream.shape[1]}; the card's classes and "
                                "output_activation must match the network")
                        (pass_gradient,) = torch.autograd.grad((logits * upstream).sum(), leaf)
                    patch_gradient += pass_gradient
            for position, index in enumerate(chunk):
                gradient[(slice(None), slice(None), *self.windows[index])] += patch_gradient[position * batch : (position + 1) * batch]
        if not any(self.pad):
            return gradient
        # back through the padding: a replicated border voxel collects its copies' gradients
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (result,) = torch.autograd.grad(self.pad_input(leaf), leaf, gradient)
        return result
