"""The window-exact, differentiable sliding-window forward used by attribution.

:func:`monai.inferers.sliding_window_inference` blends overlapping windows with an importance
map: ``out(v) = sum_w m_w(v) f(x_w)(v) / sum_w m_w(v)``. A target that reads the output only
on a support ``S`` depends only on the windows that overlap ``S``; the others contribute
nothing to ``out`` on ``S`` nor to any gradient of the target. :class:`WindowedForward` runs
exactly those windows, with MONAI's own window placement, padding and importance map, so
values and gradients on ``S`` equal autograd through the full ``sliding_window_inference``
(``Testing/test_attribution_engine.py`` checks this).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .card import ModelCard

__all__ = ["WindowedForward"]


class WindowedForward:
    """Differentiable sliding-window logits of ``network`` over inputs of one spatial shape.

    Parameters
    ----------
    network : callable
        ``(B, C, *patch) -> (B, K, *patch)``.
    card : ModelCard
        Gives the patch size, overlap and blend mode (as used by :func:`segment`).
    spatial_shape : (D, H, W)
        Spatial shape of the inputs (the model grid).
    amp : bool
        Run windows under CUDA autocast (float16); the result is float32.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        card: ModelCard,
        spatial_shape: Sequence[int],
        amp: bool = False,
    ) -> None:
        from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
        from monai.inferers.utils import _get_scan_interval

        self.network = network
        self.card = card
        self.amp = amp
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        roi = tuple(int(r) for r in card.patch_size)
        # as sliding_window_inference: pad up to the patch size, split the padding in two
        self.padded_shape = tuple(max(s, r) for s, r in zip(self.spatial_shape, roi))
        pad = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            diff = max(roi[axis] - self.spatial_shape[axis], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = tuple(pad)
        overlap = [float(card.inference["overlap"])] * 3
        interval = _get_scan_interval(self.padded_shape, roi, 3, overlap)
        self.windows: list[tuple[slice, slice, slice]] = [
            tuple(w) for w in dense_patch_slices(self.padded_shape, roi, interval, return_slice=True)
        ]
        self.importance = compute_importance_map(
            get_valid_patch_size(self.padded_shape, roi), mode=card.inference.get("blend", "gaussian"),
            sigma_scale=0.125, device="cpu", dtype=torch.float32,
        )
        count = torch.zeros(self.padded_shape)
        for window in self.windows:
            count[window] += self.importance
        self.count = count

    # ---- windows and support ------------------------------------------------------------------
    def _crop_slices(self) -> tuple[slice, slice, slice]:
        # pad is (last-before, last-after, mid-before, mid-after, first-before, first-after)
        before = (self.pad[4], self.pad[2], self.pad[0])
        return tuple(slice(b, b + s) for b, s in zip(before, self.spatial_shape))  # type: ignore[return-value]

    def windows_for(self, support: Optional[torch.Tensor]) -> list[int]:
        """Indices of the windows that overlap ``support`` (bool ``(D, H, W)``); all if None."""
        if support is None:
            return list(range(len(self.windows)))
        if tuple(support.shape) != self.spatial_shape:
            raise ValueError(f"support shape {tuple(support.shape)} differs from the input's {self.spatial_shape}")
        padded = torch.zeros(self.padded_shape, dtype=torch.bool)
        padded[self._crop_slices()] = support.bool().cpu()
        return [index for index, window in enumerate(self.windows) if bool(padded[window].any())]

    # ---- forward ----------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        support: Optional[torch.Tensor] = None,
        window_batch: int = 1,
        on_window: Optional[Callable[[torch.Tensor, int], None]] = None,
    ) -> torch.Tensor:
        """Blended logits ``(B, K, D, H, W)`` of ``x`` ``(B, C, D, H, W)``.

        Only windows overlapping ``support`` are run: the result is exact on ``support`` and
        zero where no window ran. ``window_batch`` windows of each sample go through the
        network together. ``on_window(output, index)`` is called with each window's output
        (used by layer-activation methods to know which window a hook call belongs to).
        """
        if tuple(x.shape[2:]) != self.spatial_shape:
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} differs from {self.spatial_shape}")
        if any(self.pad):
            x = F.pad(x, self.pad, mode="replicate")
        selected = self.windows_for(support)
        device = x.device
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp and x.is_cuda else contextlib.nullcontext()
        if len(self.windows) == 1:
            # one window covers the (padded) volume: the blend m f / m is f itself, so skip the
            # accumulation buffers (less memory, same values)
            with autocast:
                logits = self.network(x).float()
            if on_window is not None:
                on_window(logits, 0)
            return logits[(slice(None), slice(None), *self._crop_slices())]
        importance = self.importance.to(device)
        output: Optional[torch.Tensor] = None
        for start in range(0, len(selected), max(1, window_batch)):
            chunk = selected[start : start + max(1, window_batch)]
            patches = torch.cat([x[(slice(None), slice(None), *self.windows[i])] for i in chunk])
            with autocast:
                logits = self.network(patches).float()
            if output is None:
                output = torch.zeros((x.shape[0], logits.shape[1], *self.padded_shape), device=device, dtype=torch.float32)
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
        """``cotangent^T d(logits)/dx`` ``(B, C, D, H, W)``, one window batch at a time.

        ``cotangent`` ``(B, K, D, H, W)`` is the gradient of a scalar with respect to the
        blended logits (zero off ``support``). The blending is linear in the window outputs,
        so the backward splits into one backward per window: memory holds one window batch's
        graph, not the whole volume's, at the cost of running the windows' forward again.
        """
        device = x.device
        padded_x = F.pad(x, self.pad, mode="replicate") if any(self.pad) else x
        padded_cotangent = torch.zeros((*cotangent.shape[:2], *self.padded_shape), device=device, dtype=torch.float32)
        padded_cotangent[(slice(None), slice(None), *self._crop_slices())] = cotangent.float()
        importance, count = self.importance.to(device), self.count.to(device)
        gradient = torch.zeros_like(padded_x)
        selected = self.windows_for(support)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp and x.is_cuda else contextlib.nullcontext()
        batch = x.shape[0]
        for start in range(0, len(selected), max(1, window_batch)):
            chunk = selected[start : start + max(1, window_batch)]
            patches = torch.cat([padded_x[(slice(None), slice(None), *self.windows[i])] for i in chunk]).detach()
            patches.requires_grad_(True)
            with torch.enable_grad():
                with autocast:
                    logits = self.network(patches).float()
                weights = torch.cat(
                    [
                        padded_cotangent[(slice(None), slice(None), *self.windows[i])] * (importance / count[self.windows[i]])
                        for i in chunk
                    ]
                )
                (patch_gradient,) = torch.autograd.grad((logits * weights).sum(), patches)
            for position, index in enumerate(chunk):
                gradient[(slice(None), slice(None), *self.windows[index])] += patch_gradient[position * batch : (position + 1) * batch]
        if not any(self.pad):
            return gradient
        # back through the replicate padding: border voxels collect their copies' gradients
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (result,) = torch.autograd.grad(F.pad(leaf, self.pad, mode="replicate"), leaf, gradient)
        return result

