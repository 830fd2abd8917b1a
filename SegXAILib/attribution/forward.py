"""The differentiable function every attribution method explains: input -> target scalar.

:class:`SegmentationForward` binds a loaded model, the model-grid shape and a target:
``forward(x)`` gives ``T(f(x))`` per sample ``(B,)`` for inputs ``(B, C, D, H, W)`` on the
model grid (preprocessed intensities), running only the sliding windows that touch the
target's support; ``forward.gradient(x)`` gives ``dT/dx`` per sample. Methods (gradient,
CAM, guided, perturbation) take one and call nothing else of the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.card import ModelCard
from ..models.windows import WindowedForward
from .targets import Target

__all__ = ["SegmentationForward"]


class SegmentationForward:
    """``x (B, C, D, H, W) -> T(f(x)) (B,)`` through the window-exact sliding-window forward.

    Parameters
    ----------
    network : torch.nn.Module
        In eval mode (samples in a batch must not interact).
    card : ModelCard
    spatial_shape : (D, H, W)
        Model-grid shape of the inputs.
    target : Target
    amp : bool
        CUDA autocast for the windows.
    window_batch : int
        Windows per network call.
    max_graph_windows : int
        Keep the whole autograd graph when the target touches at most this many windows
        (fastest); above it, backpropagate window batch by window batch (memory of one window
        batch, about 1.5-2x the time).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        card: ModelCard,
        spatial_shape,
        target: Target,
        amp: bool = False,
        window_batch: int = 1,
        max_graph_windows: int = 8,
    ) -> None:
        self.network = network
        self.card = card
        self.target = target
        self.window_batch = window_batch
        self.max_graph_windows = max_graph_windows
        self.windowed = WindowedForward(network, card, spatial_shape, amp=amp)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.windowed.spatial_shape

    def logits(self, x: torch.Tensor, on_window: Optional[Callable[[torch.Tensor, int], None]] = None) -> torch.Tensor:
        """Blended logits ``(B, K, D, H, W)``, exact on the target's support."""
        return self.windowed(x, self.target.support, self.window_batch, on_window)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.logits(x))

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``dT/dx`` for each sample of ``x`` ``(B, C, D, H, W)`` (samples are independent).

        When the target's support touches more than ``max_graph_windows`` windows, the
        backward runs window batch by window batch (:meth:`WindowedForward.vjp`): memory
        stays that of one window batch whatever the volume's size.
        """
        x = x.detach()
        windows = len(self.windowed.windows_for(self.target.support))
        if windows <= max(self.window_batch, self.max_graph_windows):
            x.requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(self(x).sum(), x)
            return gradient
        with torch.no_grad():
            logits = self.logits(x)
        logits.requires_grad_(True)
        with torch.enable_grad():
            (cotangent,) = torch.autograd.grad(self.target(logits).sum(), logits)
        return self.windowed.vjp(x, cotangent, self.target.support, self.window_batch)
