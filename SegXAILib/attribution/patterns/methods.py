"""The registered attribution methods PatternNet and PatternAttribution (their parameters and
``attribute``; the work is in :mod:`.rules`)."""

from __future__ import annotations

import os
from typing import ClassVar, Optional, Union

import torch

from ...progress import CancelToken, ProgressCallback, report, sub_progress
from ..base import Attribution, Parameter, check_inputs
from .rules import STARTS, pattern_map, resolve_patterns
from .statistics import ESTIMATORS
from .store import PatternSet

__all__ = ["PatternNet", "PatternAttribution"]

_ESTIMATOR = Parameter(
    "estimator", "choice", "two_component",
    "linear: a = cov(x,y) / w^T cov(x,y); two_component: separate patterns where the layer output is > 0 and <= 0",
    choices=ESTIMATORS,
)
_PATTERNS = Parameter(
    "patterns", "str", "",
    "patterns file (default: patterns_<estimator>.pt beside the model card, made by 'segxai patterns fit'); "
    "'input' fits them on the explained volume itself",
    objects=(os.PathLike, PatternSet),
)
_START = Parameter(
    "start", "choice", "value",
    "value: the backward starts from the target logits' values (Kindermans); ones: from dT/df like the gradient",
    choices=STARTS,
)


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
    ) -> torch.Tensor:
        """The map ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

        Parameters
        ----------
        estimator : str
            ``"linear"`` or ``"two_component"`` (see the package docstring).
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
