"""Targets: how a 3D segmentation becomes the scalar an attribution explains (METHODS section 1).

A target lives on the model grid. It maps logits ``(B, K, D, H, W)`` to one scalar per sample
``(B,)`` and knows its *support*, the output voxels it reads (``None``: possibly any voxel),
so that the windowed forward runs only the sliding windows that touch it.

==================  ==========================================  =========================
target              scalar T                                    support
==================  ==========================================  =========================
ClassTarget         sum_i f_c(x)_i * M_c,i (M_c fixed, clean)   M_c
ClassThreshold      sum_i f_c(x)_i * [f_c(x)_i > t]             all voxels
RegionTarget        sum_{i in R} f_c(x)_i                       R
InstanceTarget      RegionTarget on one connected component     the component
VoxelTarget         f_c(x)_i                                    the voxel
==================  ==========================================  =========================

``c`` is the target's class (``class_index``, an index into the card's classes, background
0) and ``f_c`` that class's logit, read from output channel ``channel``: channel ``c`` for a
softmax (or activation-free) model, channel ``c - 1`` for a sigmoid model, whose K-1 outputs
are one yes / no logit per foreground class
(:meth:`~SegXAILib.models.card.ModelCard.output_channel`). So for every activation T is the
sum of the class's own pre-activation score over the target voxels. For a sigmoid model the
class mask ``M_c`` is ``sigmoid(f_c) > 0.5`` (multi-label: structures may overlap, a voxel
of two structures counts in both), see :class:`~SegXAILib.models.Segmentation`. ``channel``
defaults to ``class_index`` (the softmax layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch

from ..image import SegXAIInputError

__all__ = ["Target", "ClassTarget", "ClassThresholdTarget", "RegionTarget", "InstanceTarget", "VoxelTarget"]


class Target:
    """Base class: ``target(logits) -> (B,)`` and ``target.support`` (bool ``(D, H, W)`` or None).

    ``class_index`` is the card's class, ``channel`` the output channel holding its logit
    (None: ``class_index``; see the module docstring).
    """

    class_index: int
    channel: Optional[int]
    support: Optional[torch.Tensor]
    #: ``T`` is linear in the logits, so ``dT/dlogits`` does not depend on them (a gradient
    #: needs no forward pass to find it)
    linear: ClassVar[bool] = False

    def _default_channel(self) -> None:
        self.channel = int(self.class_index) if self.channel is None else int(self.channel)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready description for result metadata."""
        return {"kind": type(self).__name__, "class_index": int(self.class_index), "output_channel": int(self.channel)}

    def _check(self, logits: torch.Tensor) -> None:
        if logits.ndim != 5:
            raise ValueError(f"logits must be (B, K, D, H, W), got {tuple(logits.shape)}")
        if not 0 <= self.channel < logits.shape[1]:
            raise SegXAIInputError(f"target class {self.class_index} reads output channel {self.channel}; "
                                   f"the model has {logits.shape[1]} output channel(s)")


def _mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    mask = torch.as_tensor(mask).bool()
    if mask.ndim != 3:
        raise SegXAIInputError(f"{name}: expected a 3D mask (D, H, W), got shape {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise SegXAIInputError(f"{name}: the mask is empty; nothing to explain")
    return mask


@dataclass
class RegionTarget(Target):
    """Sum of class ``class_index`` logits over a region (any mask: a drawn FN, a RoI)."""

    linear: ClassVar[bool] = True
    class_index: int
    mask: torch.Tensor
    channel: Optional[int] = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.mask = _mask(self.mask, type(self).__name__)
        self._default_channel()

    @property
    def support(self) -> torch.Tensor:  # type: ignore[override]
        return self.mask

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        return logits[:, self.channel][:, self.mask.to(logits.device)].sum(dim=1)

    def describe(self) -> dict:
        return {**super().describe(), "voxels": int(self.mask.sum())}


@dataclass
class ClassTarget(RegionTarget):
    """Sum of class-c logits over the clean prediction's class-c voxels ``M_c`` (paper 003)."""


@dataclass
class InstanceTarget(RegionTarget):
    """One connected component ``L`` of the prediction: ``sum_{i in L} f_c(x)_i`` (paper 001)."""

    instance_id: int = 0

    def describe(self) -> dict:
        return {**super().describe(), "instance_id": int(self.instance_id)}


@dataclass
class ClassThresholdTarget(Target):
    """``sum_i f_c(x)_i [f_c(x)_i > t]`` (paper 001, eq. 5). The indicator follows the input,
    so any output voxel may count: the support is the whole volume."""

    class_index: int
    threshold: float = 0.0
    channel: Optional[int] = field(default=None, kw_only=True)
    support: Optional[torch.Tensor] = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._default_channel()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        values = logits[:, self.channel]
        return (values * (values > self.threshold)).flatten(1).sum(dim=1)

    def describe(self) -> dict:
        return {**super().describe(), "threshold": float(self.threshold)}


@dataclass
class VoxelTarget(Target):
    """One output voxel ``f_c(x)_i``: the building block of per-voxel aggregation."""

    linear: ClassVar[bool] = True
    class_index: int
    index: Sequence[int]
    spatial_shape: Sequence[int]
    channel: Optional[int] = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._default_channel()
        self.index = tuple(int(i) for i in self.index)
        if len(self.index) != 3 or not all(0 <= i < s for i, s in zip(self.index, self.spatial_shape)):
            raise SegXAIInputError(f"voxel {self.index} is outside the grid {tuple(self.spatial_shape)}")

    @property
    def support(self) -> torch.Tensor:  # type: ignore[override]
        mask = torch.zeros(tuple(self.spatial_shape), dtype=torch.bool)
        mask[self.index] = True
        return mask

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        return logits[(slice(None), self.channel, *self.index)]

    def describe(self) -> dict:
        return {**super().describe(), "index": list(self.index)}
