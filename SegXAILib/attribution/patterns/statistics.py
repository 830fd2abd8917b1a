"""Streaming statistics of every pattern layer and the pattern estimators (``linear``,
``two_component``) computed from them (see the package docstring,
:mod:`SegXAILib.attribution.patterns`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ...image import SegXAIInputError
from .algebra import _conv_weight_sums, _out_channels, _rows, _solve, _unrows, pattern_layers

__all__ = ["ESTIMATORS", "PatternStatistics"]

ESTIMATORS = ("linear", "two_component")


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
    """Streaming statistics of every pattern layer of ``network`` (see the package docstring).

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
        """Add one call of layer ``name``: its input ``x`` and output ``y`` (batch first).

        The call's sums are computed in float64 (the convolution weight gradients included), not
        only accumulated in it: float32 sums over a batch's positions changed with the batching
        by up to 2e-4 relative (six 8^3 volumes), which ``cov = E[xy] - E[x] E[y]`` and the
        solve carry into the patterns. (float64 convolutions are slower; patterns are fitted once.)
        """
        module = self.layers[name]
        x, y = x.detach().double(), y.detach().double()
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
    def _add(sums: _Sums, regime: int, count: torch.Tensor, sum_y: torch.Tensor, sum_x: torch.Tensor,
             sum_xy: torch.Tensor) -> None:
        # the arguments are float64 already (update); .cpu() moves a CUDA fit's sums to the totals
        sums.count[regime] += count.cpu()
        sums.sum_y[regime] += sum_y.cpu()
        sums.sum_x[regime] += sum_x.cpu()
        sums.sum_xy[regime] += sum_xy.cpu()

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
            w = _rows(module.weight.detach().cpu(), module)
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
