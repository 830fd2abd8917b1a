"""The differentiable function every attribution method explains: input -> target scalar.

:class:`SegmentationForward` binds a loaded model, the model-grid shape and a target:
``forward(x)`` gives ``T(f(x))`` per sample ``(B,)`` for inputs ``(B, C, D, H, W)`` on the
model grid (preprocessed intensities), running only the sliding windows that touch the
target's support (each window: the mean over a fold ensemble's members and the card's mirror
flips); ``forward.gradient(x)`` gives ``dT/dx`` per sample. Methods (gradient,
CAM, guided, perturbation) take one and call nothing else of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..models.card import ModelCard
from ..models.windows import WindowedForward
from .targets import Target

__all__ = ["SegmentationForward", "GradientCost"]


@dataclass(frozen=True)
class GradientCost:
    """Estimated cost of :meth:`SegmentationForward.gradient` per sample of its batch.

    ``per_sample_bytes``: memory that grows with the batch (the graph of the windows held at
    once, the volume-sized buffers); ``graph_bytes``: the same when the whole graph of the
    target's windows is kept (what replica methods, which call the windowed forward under
    autograd themselves, need per replica); ``seconds``: time of one sample; ``passes``:
    network passes per sample (windows x members x flips).
    """

    per_sample_bytes: int
    graph_bytes: int
    seconds: float
    passes: int


class SegmentationForward:
    """``x (B, C, D, H, W) -> T(f(x)) (B,)`` through the window-exact sliding-window forward.

    Parameters
    ----------
    network : torch.nn.Module
        In eval mode (samples in a batch must not interact); an ensemble's first member
        (``networks[0]``: layer hooks and rules apply to it).
    card : ModelCard
    spatial_shape : (D, H, W)
        Model-grid shape of the inputs.
    target : Target
    amp : bool
        CUDA autocast for the windows.
    window_batch : int
        Windows per network call.
    max_graph_windows : int
        Keep the whole autograd graph when the target needs at most this many network passes
        (windows x ensemble members x mirror flips; fastest); above it, backpropagate pass by
        pass (memory of one window batch through one network, about 1.5-2x the time).
    networks : sequence of torch.nn.Module, optional
        A fold ensemble's members (``network`` first; :attr:`LoadedModel.networks`); default
        ``[network]``.
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
        networks: Optional[Sequence[torch.nn.Module]] = None,
    ) -> None:
        if networks and networks[0] is not network:
            raise ValueError("SegmentationForward: network must be networks[0]")
        self.network = network
        self.networks = list(networks) if networks else [network]
        self.card = card
        self.target = target
        self.window_batch = window_batch
        self.max_graph_windows = max_graph_windows
        self.windowed = WindowedForward(network, card, spatial_shape, amp=amp, networks=self.networks)
        self._cost: Optional[GradientCost] = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.windowed.spatial_shape

    def logits(
        self,
        x: torch.Tensor,
        on_window: Optional[Callable[[torch.Tensor, int], None]] = None,
        hooks_per_pass: bool = False,
    ) -> torch.Tensor:
        """Blended logits ``(B, K, D, H, W)``, exact on the target's support (``on_window``,
        ``hooks_per_pass``: see :meth:`WindowedForward.__call__`)."""
        return self.windowed(x, self.target.support, self.window_batch, on_window, hooks_per_pass=hooks_per_pass)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.logits(x))

    def whole_graph(self) -> bool:
        """True when :meth:`gradient` keeps the whole autograd graph (few passes), False when it
        back-propagates pass by pass (:meth:`WindowedForward.vjp`)."""
        passes = len(self.windowed.windows_for(self.target.support)) * self.windowed.passes
        return passes <= max(self.window_batch, self.max_graph_windows)

    def gradient_cost(self, x: torch.Tensor) -> GradientCost:
        """The memory and time of :meth:`gradient` per sample, from one measured window pass
        (:func:`~SegXAILib.models.memory.measure_pass`; measured once, then kept).

        Memory per sample: the graph of every pass when the whole graph is kept, else of one
        window batch through one network with its stacked flips; plus the volume-sized
        buffers (padded input, logits, cotangent, gradient). Time: one window pass times the
        passes the target needs.
        """
        if self._cost is not None:
            return self._cost
        from ..models.memory import measure_pass
        from ..models.windows import PASS_BATCH_VOXELS, flip_groups

        windowed = self.windowed
        first = windowed.pad_input(x[:1].detach())[(slice(None), slice(None), *windowed.windows[0])]
        measured = measure_pass(self.network, first, windowed.amp)
        windows = len(windowed.windows_for(self.target.support))
        passes = windows * windowed.passes
        item = max(4, x.element_size())
        volume = math.prod(windowed.padded_shape)
        channels, classes = int(x.shape[1]), int(self.card.output_channels)
        # whole graph: every pass's graph, the blended logits and their sum, the input gradient
        whole = measured.bytes * passes + volume * item * (2 * classes + channels)
        if self.whole_graph():
            per_sample = whole
        else:
            # one window batch through one network (its flips stacked), plus the logits, the
            # cotangent, the padded input and the gradient
            stacked = len(flip_groups(windowed.mirrors, (self.window_batch, *first.shape[1:]), PASS_BATCH_VOXELS)[0])
            per_sample = measured.bytes * self.window_batch * stacked + volume * item * (2 * classes + 2 * channels)
        seconds = measured.seconds * passes * (1.0 if self.whole_graph() or self.target.linear else 1.3)
        self._cost = GradientCost(int(per_sample), int(whole), seconds, passes)
        return self._cost

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``dT/dx`` for each sample of ``x`` ``(B, C, D, H, W)`` (samples are independent).

        When the target needs more than ``max_graph_windows`` network passes (windows it
        touches x members x flips), two passes: the blended logits without a graph, their
        gradient ``dT/dL``, then each member x window batch x flip back-propagated with its
        share of it (:meth:`WindowedForward.vjp`): the exact gradient with the memory of one
        window batch through one network, whatever the volume's size. A target linear in the
        logits (:attr:`Target.linear`: class, instance, region and voxel sums) skips the
        first pass: its ``dT/dL`` is the same everywhere.
        """
        x = x.detach()
        if self.whole_graph():
            x.requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(self(x).sum(), x)
            return gradient
        if self.target.linear:
            # dT/dL is the same at any logits: read it at zero, no forward pass needed
            logits = torch.zeros((x.shape[0], self.card.output_channels, *self.spatial_shape), device=x.device,
                                 dtype=torch.promote_types(x.dtype, torch.float32))
        else:
            with torch.no_grad():
                logits = self.logits(x)
        logits.requires_grad_(True)
        with torch.enable_grad():
            (cotangent,) = torch.autograd.grad(self.target(logits).sum(), logits)
        return self.windowed.vjp(x, cotangent, self.target.support, self.window_batch)
