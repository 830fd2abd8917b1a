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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..image import SegXAIInputError

__all__ = ["Target", "ClassTarget", "ClassThresholdTarget", "RegionTarget", "InstanceTarget", "VoxelTarget"]


class Target:
    """Base class: ``target(logits) -> (B,)`` and ``target.support`` (bool ``(D, H, W)`` or None)."""

    class_index: int
    support: Optional[torch.Tensor]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready description for result metadata."""
        return {"kind": type(self).__name__, "class_index": int(self.class_index)}

    def _check(self, logits: torch.Tensor) -> None:
        if logits.ndim != 5:
            raise ValueError(f"logits must be (B, K, D, H, W), got {tuple(logits.shape)}")
        if not 0 <= self.class_index < logits.shape[1]:
            raise SegXAIInputError(f"target class {self.class_index} is not among the model's {logits.shape[1]} outputs")


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

    class_index: int
    mask: torch.Tensor

    def __post_init__(self) -> None:
        self.mask = _mask(self.mask, type(self).__name__)

    @property
    def support(self) -> torch.Tensor:  # type: ignore[override]
        return self.mask

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        return logits[:, self.class_index][:, self.mask.to(logits.device)].sum(dim=1)

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
    support: Optional[torch.Tensor] = field(default=None, init=False)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        values = logits[:, self.class_index]
        return (values * (values > self.threshold)).flatten(1).sum(dim=1)

    def describe(self) -> dict:
        return {**super().describe(), "threshold": float(self.threshold)}


@dataclass
class VoxelTarget(Target):
    """One output voxel ``f_c(x)_i``: the building block of per-voxel aggregation."""

    class_index: int
    index: Sequence[int]
    spatial_shape: Sequence[int]

    def __post_init__(self) -> None:
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
        return logits[(slice(None), self.class_index, *self.index)]

    def describe(self) -> dict:
        return {**super().describe(), "index": list(self.index)}
