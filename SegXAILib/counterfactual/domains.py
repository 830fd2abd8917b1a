"""Patch geometry and the two training domains, taken from the model's own predictions.

On the model grid (the card's orientation, spacing and intensities) the model segments every
training image. The *lesion* domain holds patches centred on predicted lesions (in 2D, one
slice per lesion slice along ``slice_axis``; in 3D, one patch per lesion at its centre);
the *lesion-free* domain holds patches of the same tissue (centre inside the tissue mask) with
no predicted lesion voxel anywhere in the patch. No reference label is used, as in the paper.

Each patch comes with a *context crop* around it, as large as the model needs (by default
the card's patch size): the activation-maximisation score pastes a generated patch back into
its context and runs the frozen model on the crop (:mod:`SegXAILib.counterfactual.scores`).

For a classifier (paper 004's own setting) :func:`classifier_domains` builds the same
structure from labelled-or-not patches: the classifier's input is the whole patch, so the
context, the patch and the region are one box (:meth:`PatchGeometry.for_classifier`), each
patch is its own one-patch "volume", and the domains are the classifier's own predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Image, SegXAIInputError
from ..models.inference import activate, class_masks, sliding_window_logits
from ..models.loaders import LoadedModel
from ..models.preprocessing import model_input, preprocess_labels
from ..progress import CancelToken, ProgressCallback, track

__all__ = ["PatchGeometry", "CounterfactualDomains", "build_domains", "classifier_domains", "crop_context"]


def _ints(values, name: str, count: int) -> tuple[int, ...]:
    try:
        result = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"{name} {values!r}: expected {count} positive integers") from None
    if len(result) != count or any(v < 1 for v in result):
        raise SegXAIInputError(f"{name} {list(result)}: expected {count} positive integers")
    return result


@dataclass(frozen=True)
class PatchGeometry:
    """Where a generator works, on the model grid.

    Parameters
    ----------
    spatial_dims : int
        2: the generators see one slice ``(C, *patch_size)`` orthogonal to ``slice_axis``
        (the CPU default); 3: a patch ``(C, *patch_size)``.
    patch_size : sequence of int
        2 (2D, the in-plane sizes in axis order) or 3 (3D) sizes.
    context_size : sequence of int
        ``(D, H, W)`` of the crop the frozen model runs on, centred on the patch (at least the
        patch; by default the card's ``patch_size``).
    region_size : sequence of int
        Size of the central box (same layout as ``patch_size``) whose mean class logit is the
        score the generators push up or down.
    slice_axis : int
        Model-grid axis (0, 1, 2) orthogonal to the slices (2D only); 2 is axial on a RAS grid.
    """

    spatial_dims: int
    patch_size: tuple[int, ...]
    context_size: tuple[int, int, int]
    region_size: tuple[int, ...]
    slice_axis: int = 2

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise SegXAIInputError(f"spatial_dims {self.spatial_dims!r}: expected 2 or 3")
        if self.slice_axis not in (0, 1, 2):
            raise SegXAIInputError(f"slice_axis {self.slice_axis!r}: expected 0, 1 or 2")
        object.__setattr__(self, "patch_size", _ints(self.patch_size, "patch_size", self.spatial_dims))
        object.__setattr__(self, "context_size", _ints(self.context_size, "context_size", 3))
        object.__setattr__(self, "region_size", _ints(self.region_size, "region_size", self.spatial_dims))
        if any(r > p for r, p in zip(self.region_size, self.patch_size)):
            raise SegXAIInputError(f"region_size {list(self.region_size)} is larger than patch_size {list(self.patch_size)}")
        if any(p > c for p, c in zip(self.patch_shape, self.context_size)):
            raise SegXAIInputError(f"patch_size {list(self.patch_size)} does not fit in context_size "
                                   f"{list(self.context_size)}")

    def _in_3d(self, sizes: Sequence[int]) -> tuple[int, int, int]:
        if self.spatial_dims == 3:
            return tuple(sizes)  # type: ignore[return-value]
        sizes = list(sizes)
        sizes.insert(self.slice_axis, 1)
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """The patch as a 3D box (size 1 along ``slice_axis`` in 2D)."""
        return self._in_3d(self.patch_size)

    def _centred(self, shape: Sequence[int]) -> tuple[slice, slice, slice]:
        # the box's centre index s // 2 lands on the crop's centre index c // 2 (crop_context)
        return tuple(slice(c // 2 - s // 2, c // 2 - s // 2 + s) for c, s in zip(self.context_size, shape))  # type: ignore

    @property
    def patch_slices(self) -> tuple[slice, slice, slice]:
        """Where the patch sits in the context crop: its centre index ``size // 2`` on the crop's ``context // 2``."""
        return self._centred(self.patch_shape)

    def region_mask(self) -> torch.Tensor:
        """Bool ``context_size`` mask of the scored central box."""
        mask = torch.zeros(self.context_size, dtype=torch.bool)
        mask[self._centred(self._in_3d(self.region_size))] = True
        return mask

    def to_generator(self, patch: torch.Tensor) -> torch.Tensor:
        """``(B, C, *patch_shape)`` -> the generators' ``(B, C, *patch_size)``."""
        return patch.squeeze(2 + self.slice_axis) if self.spatial_dims == 2 else patch

    def from_generator(self, patch: torch.Tensor) -> torch.Tensor:
        """The generators' ``(B, C, *patch_size)`` -> ``(B, C, *patch_shape)``."""
        return patch.unsqueeze(2 + self.slice_axis) if self.spatial_dims == 2 else patch

    def paste(self, context: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """A copy of ``context`` ``(B, C, *context_size)`` with the generator-shaped ``patch``
        in its centre (differentiable in ``patch``)."""
        pasted = context.clone()
        pasted[(slice(None), slice(None), *self.patch_slices)] = self.from_generator(patch)
        return pasted

    def describe(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "patch_size": list(self.patch_size),
                "context_size": list(self.context_size), "region_size": list(self.region_size),
                "slice_axis": self.slice_axis}

    @classmethod
    def for_classifier(cls, patch_size: Sequence[int]) -> "PatchGeometry":
        """The geometry of a classifier whose input is the whole patch: context = patch = region.

        ``patch_size``: ``(H, W)`` (a 2D classifier; the patch is stored as a one-slice box
        ``(H, W, 1)`` along ``slice_axis`` 2) or ``(D, H, W)`` (3D).
        """
        if len(patch_size) not in (2, 3):
            raise SegXAIInputError(f"patch_size {list(patch_size)}: expected 2 (2D) or 3 (3D) sizes")
        sizes = _ints(patch_size, "patch_size", len(patch_size))
        context = (*sizes, 1) if len(sizes) == 2 else sizes
        return cls(len(sizes), sizes, context, sizes, 2)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchGeometry":
        return cls(int(data["spatial_dims"]), tuple(data["patch_size"]), tuple(data["context_size"]),
                   tuple(data["region_size"]), int(data.get("slice_axis", 2)))


def crop_context(volume: torch.Tensor, centre: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The ``(C, *size)`` crop of ``volume`` ``(C, D, H, W)`` with voxel ``centre`` at crop
    index ``size // 2`` (where :attr:`PatchGeometry.patch_slices` puts a patch's centre), the
    border repeated outside the volume."""
    spatial = volume.shape[1:]
    starts = [int(c) - s // 2 for c, s in zip(centre, size)]
    before = [max(0, -a) for a in starts]
    after = [max(0, a + s - n) for a, s, n in zip(starts, size, spatial)]
    window = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(starts, size, spatial))
    crop = volume[(slice(None), *window)]
    if any(before) or any(after):
        pad = []
        for axis in (2, 1, 0):
            pad.extend([before[axis], after[axis]])
        crop = F.pad(crop[None], pad, mode="replicate")[0]
    return crop


@dataclass
class CounterfactualDomains:
    """The two domains: model-grid volumes and the centres of their patches.

    Attributes
    ----------
    volumes : list of torch.Tensor
        ``(C, D, H, W)`` float32 preprocessed images (model grid, CPU).
    lesion, free : torch.Tensor
        ``(N, 4)`` int64 rows ``(volume, i, j, k)``: centres of the lesion / lesion-free patches.
    geometry : PatchGeometry
    class_index : int
        The card's class the lesions are of.
    """

    volumes: list[torch.Tensor]
    lesion: torch.Tensor
    free: torch.Tensor
    geometry: PatchGeometry
    class_index: int = 1
    _cache: dict = field(default_factory=dict, repr=False)

    def contexts(self, kind: str, rows: torch.Tensor) -> torch.Tensor:
        """Context crops ``(B, C, *context_size)`` of the ``kind`` (``"lesion"``/``"free"``) patches ``rows``."""
        key = (kind, "context")
        if key not in self._cache:  # crop once: sampling then only indexes
            centres = getattr(self, kind)
            self._cache[key] = torch.stack([crop_context(self.volumes[int(c[0])], c[1:].tolist(),
                                                         self.geometry.context_size) for c in centres]) \
                if len(centres) else torch.zeros((0, self.volumes[0].shape[0], *self.geometry.context_size))
        return self._cache[key][rows]

    def patches(self, kind: str, rows: torch.Tensor) -> torch.Tensor:
        """Generator-shaped patches ``(B, C, *patch_size)`` of ``rows``."""
        context = self.contexts(kind, rows)
        return self.geometry.to_generator(context[(slice(None), slice(None), *self.geometry.patch_slices)])

    def all_patches(self) -> torch.Tensor:
        """Every patch of both domains ``(N, C, *patch_size)`` (for the intensity frame)."""
        parts = [self.patches(kind, torch.arange(len(getattr(self, kind)))) for kind in ("lesion", "free")]
        return torch.cat(parts)

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed with these domains."""
        return {"lesion": len(self.lesion), "free": len(self.free), "volumes": len(self.volumes),
                "geometry": self.geometry.describe(), "class_index": self.class_index,
                "lesion_sum": int(self.lesion.sum()), "free_sum": int(self.free.sum())}


def _model_grid_prediction(image: Image, model: LoadedModel, class_index: int) -> tuple[torch.Tensor, np.ndarray]:
    """The preprocessed image ``(C, D, H, W)`` and the class mask ``(D, H, W)`` the model predicts."""
    batch, _ = model_input(image, model.card, model.device)
    with torch.inference_mode():
        logits = sliding_window_logits(batch, model.network, model.card, networks=model.networks)
        mask = class_masks(activate(logits, model.card)[0], model.card)[class_index]
    return batch[0].float().cpu(), mask.cpu().numpy()


def build_domains(
    images: Sequence[Image],
    model: LoadedModel,
    geometry: PatchGeometry,
    class_index: int = 1,
    tissue_masks: Optional[Sequence[Image]] = None,
    free_per_lesion: float = 1.0,
    min_lesion_voxels: int = 3,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> CounterfactualDomains:
    """Lesion and lesion-free patches from the model's predictions on ``images``.

    Parameters
    ----------
    images : sequence of Image
        ``(C, I, J, K)`` each, channels in the card's order.
    model : LoadedModel
        The frozen segmentation model.
    geometry : PatchGeometry
    class_index : int
        The card's class whose predicted components are the lesions.
    tissue_masks : sequence of Image, optional
        One ``(1, I, J, K)`` mask per image (on its grid) of the tissue lesion-free patches are
        taken from (e.g. white matter); default: voxels where any input channel is non-zero.
    free_per_lesion : float
        Lesion-free patches per lesion patch, per image (at least one per image with tissue).
    min_lesion_voxels : int
        Lesions (3D components; in 2D, their parts on one slice) smaller than this are skipped.
    seed : int
        Seeds the choice of lesion-free centres (the global RNG is not touched).

    Returns
    -------
    CounterfactualDomains
    """
    from scipy import ndimage

    if not images:
        raise SegXAIInputError("images: no training images")
    if tissue_masks is not None and len(tissue_masks) != len(images):
        raise SegXAIInputError(f"tissue_masks: {len(tissue_masks)} masks for {len(images)} images")
    if not 1 <= class_index < model.card.num_classes:
        raise SegXAIInputError(f"class_index {class_index}: expected a foreground class of the card "
                               f"(1..{model.card.num_classes - 1})")
    if not free_per_lesion > 0:
        raise SegXAIInputError(f"free_per_lesion {free_per_lesion}: expected a number > 0")
    generator = torch.Generator().manual_seed(int(seed))
    volumes, lesion_rows, free_rows = [], [], []
    for index, image in enumerate(track(list(images), progress, cancel, "segmenting the training images")):
        volume, mask = _model_grid_prediction(image, model, class_index)
        volumes.append(volume)
        # lesion centres: one per component (3D) or per component slice (2D)
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        found = 0
        for label in range(1, count + 1):
            voxels = np.argwhere(components == label)
            if geometry.spatial_dims == 3:
                groups = [voxels] if len(voxels) >= min_lesion_voxels else []
            else:
                axis = geometry.slice_axis
                groups = [voxels[voxels[:, axis] == s] for s in np.unique(voxels[:, axis])]
                groups = [g for g in groups if len(g) >= min_lesion_voxels]
            for group in groups:
                centroid = group.mean(0)
                centre = group[np.argmin(((group - centroid) ** 2).sum(1))]  # a lesion voxel
                lesion_rows.append([index, *centre.tolist()])
                found += 1
        # lesion-free centres: in tissue, no predicted lesion voxel in the patch around them
        if tissue_masks is None:
            tissue_image = image.with_array((image.array != 0).any(0)[None].astype(np.uint8))
        else:
            tissue_image = tissue_masks[index]
        tissue = preprocess_labels(tissue_image, model.card).as_tensor()[0].numpy() > 0
        if tissue.shape != mask.shape:
            raise SegXAIInputError(f"tissue_masks[{index}]: its grid does not match image {index}")
        near_lesion = ndimage.maximum_filter(mask.astype(np.uint8), size=geometry.patch_shape, mode="constant") > 0
        candidates = np.argwhere(tissue & ~near_lesion)
        if len(candidates):
            wanted = max(1, math.ceil(free_per_lesion * found))
            picks = torch.randperm(len(candidates), generator=generator)[:wanted].numpy()
            free_rows.extend([index, *candidates[p].tolist()] for p in sorted(picks))
    lesion = torch.tensor(lesion_rows, dtype=torch.int64).reshape(-1, 4)
    free = torch.tensor(free_rows, dtype=torch.int64).reshape(-1, 4)
    return CounterfactualDomains(volumes, lesion, free, geometry, class_index)


def classifier_domains(
    patches: np.ndarray | torch.Tensor,
    classifier: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    class_index: int = 1,
    batch_size: int = 256,
) -> CounterfactualDomains:
    """The two domains for a classifier: the patches it assigns to ``class_index`` and the rest.

    As :func:`build_domains` does for a segmentation model, the split comes from the frozen
    model's own predictions, never from reference labels (paper 004 uses none): the *lesion*
    domain holds the patches with ``P(class_index) > 1/2`` (for two classes, those whose argmax
    is ``class_index``), the *lesion-free* domain all others. Each patch becomes its own
    one-patch volume whose centre row is ``(patch index, *centre)``, so
    ``domains.lesion[:, 0]`` and ``domains.free[:, 0]`` index ``patches``. The geometry is
    :meth:`PatchGeometry.for_classifier`; :class:`~SegXAILib.counterfactual.ClassifierScore`
    ignores the context (it equals the patch) and runs the classifier on the generated patch.

    Parameters
    ----------
    patches : numpy.ndarray or torch.Tensor
        ``(N, C, H, W)`` (2D classifier) or ``(N, C, D, H, W)`` (3D) classifier inputs.
    classifier : torch.nn.Module or callable
        ``(B, C, *spatial) -> (B, K)`` logits (``K = 1``: one logit for class 1); used as it is
        (put it in eval mode first), without gradients, on the device of its parameters.
    class_index : int
        The class whose probability G+ raises (0 .. K-1; 0 or 1 for one logit).
    batch_size : int
        Patches per classifier call.

    Returns
    -------
    CounterfactualDomains
        ``volumes``: one ``(C, H, W, 1)`` (2D) or ``(C, D, H, W)`` tensor per patch (CPU, float32).
    """
    from .scores import ClassifierScore  # scores imports this module

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise SegXAIInputError(f"batch_size {batch_size!r}: expected an integer >= 1")
    x = torch.as_tensor(patches)
    if x.dtype == torch.bool or x.is_complex():
        raise SegXAIInputError(f"patches: expected real numbers, got {x.dtype}")
    if x.ndim not in (4, 5) or x.shape[0] < 1 or x.shape[1] < 1:
        raise SegXAIInputError(f"patches {tuple(x.shape)}: expected (N, C, H, W) or (N, C, D, H, W) with N, C >= 1")
    x = x.detach().to("cpu", torch.float32, copy=True).contiguous()  # the domains own their patches
    if not bool(torch.isfinite(x).all()):
        raise SegXAIInputError("patches: contain NaN or infinite values")
    geometry = PatchGeometry.for_classifier(tuple(x.shape[2:]))
    score = ClassifierScore(classifier, class_index)
    parameter = next(iter(classifier.parameters()), None) if isinstance(classifier, torch.nn.Module) else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        log_odds = torch.cat([score(None, x[s:s + batch_size].to(device)).cpu()
                              for s in range(0, len(x), int(batch_size))])
    positive = log_odds > 0  # P(class_index) > 1/2
    volumes = [geometry.from_generator(patch[None])[0] for patch in x]  # (C, *patch_shape) each
    centre = [s // 2 for s in geometry.patch_shape]  # crop_context puts this voxel at the crop's centre

    def rows(mask: torch.Tensor) -> torch.Tensor:
        index = torch.nonzero(mask).reshape(-1, 1)
        return torch.cat([index, torch.tensor(centre, dtype=torch.int64).expand(len(index), 3)], dim=1)

    return CounterfactualDomains(volumes, rows(positive), rows(~positive), geometry, int(class_index))
