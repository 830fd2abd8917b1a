"""The frozen model's score that the generators push up (G+) or down (G-).

A score maps a batch of generated patches (and their real context crops) to one log-odds per
sample ``(B,)``; :func:`~SegXAILib.counterfactual.losses.activation_loss` turns it into the
paper's cross-entropy towards the generator's label.

- :class:`SegmentationScore`: the patch is pasted back into its context crop, the frozen
  segmentation model runs on the crop through the project's window-exact forward
  (:class:`~SegXAILib.attribution.forward.SegmentationForward`, ensemble members and mirror
  flips included) and the target is a :class:`~SegXAILib.attribution.targets.RegionTarget`
  over the geometry's central region, divided by its voxel count: the mean class logit of the
  region (METHODS section 1's region target, normalised to the region's size).
- :class:`ClassifierScore`: a classifier's class probability as a log-odds,
  ``f_c - logsumexp_{k != c} f_k`` (``sigmoid`` of it is ``softmax(f)_c`` exactly), or the
  logit itself for a one-output classifier.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..attribution.forward import SegmentationForward
from ..attribution.targets import RegionTarget
from ..image import SegXAIInputError
from ..models.loaders import LoadedModel
from .domains import PatchGeometry

__all__ = ["Score", "SegmentationScore", "ClassifierScore"]


class Score(Protocol):
    """``score(context (B, C, *context_size), generated (B, C, *patch_size)) -> (B,)`` log-odds."""

    def __call__(self, context: torch.Tensor, generated: torch.Tensor) -> torch.Tensor: ...


class SegmentationScore:
    """Mean class-``class_index`` logit of the frozen segmentation model over the central region.

    Parameters
    ----------
    model : LoadedModel
        Its networks must be in eval mode; their weights are never updated (the training only
        back-propagates into the generators).
    geometry : PatchGeometry
    class_index : int
        The card's class (its logit channel from :meth:`ModelCard.output_channel`).
    """

    def __init__(self, model: LoadedModel, geometry: PatchGeometry, class_index: int = 1) -> None:
        card = model.card
        if not 1 <= class_index < card.num_classes:
            raise SegXAIInputError(f"class_index {class_index}: expected a foreground class of the card "
                                   f"(1..{card.num_classes - 1})")
        self.geometry = geometry
        self.class_index = int(class_index)
        region = geometry.region_mask()
        self.voxels = int(region.sum())
        target = RegionTarget(self.class_index, region, channel=card.output_channel(self.class_index))
        self.forward = SegmentationForward(model.network, card, geometry.context_size, target,
                                           networks=model.networks)

    def __call__(self, context: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return self.forward(self.geometry.paste(context, generated)) / self.voxels


class ClassifierScore:
    """Class ``class_index``'s log-odds of a classifier ``network(patch) -> (B, K)`` logits."""

    def __init__(self, network: torch.nn.Module, class_index: int = 1) -> None:
        self.network = network
        self.class_index = int(class_index)

    def __call__(self, context: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        logits = self.network(generated)
        if logits.ndim != 2:
            raise SegXAIInputError(f"classifier output {tuple(logits.shape)}: expected (B, K) logits")
        if logits.shape[1] == 1:
            if self.class_index not in (0, 1):
                raise SegXAIInputError(f"class_index {self.class_index}: a one-output classifier has classes 0 and 1")
            return logits[:, 0] if self.class_index == 1 else -logits[:, 0]
        if not 0 <= self.class_index < logits.shape[1]:
            raise SegXAIInputError(f"class_index {self.class_index}: the classifier has {logits.shape[1]} classes")
        others = torch.cat([logits[:, : self.class_index], logits[:, self.class_index + 1:]], dim=1)
        return logits[:, self.class_index] - torch.logsumexp(others, dim=1)
