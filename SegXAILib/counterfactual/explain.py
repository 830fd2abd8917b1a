"""Counterfactual relevance of one lesion or region (paper 004, section 2.6).

The image goes onto the model grid (:func:`~SegXAILib.models.preprocessing.model_input`); the
generators' patch is cut around the chosen centre (in 2D the slice through it), G+ and G-
rewrite it, and each result is pasted back into the model-grid volume, which is then mapped
onto the input grid as the attribution maps are
(:func:`~SegXAILib.models.preprocessing.to_input_grid`). Outside the patch G+(x) and G-(x)
equal the preprocessed image and ``R = G+(x) - G-(x)`` is zero. Values are in the model's
normalised intensity units (what the model sees), not the scanner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..image import Image, SegXAIInputError
from ..models.loaders import LoadedModel
from ..models.preprocessing import model_input, preprocess_labels, to_input_grid
from .domains import crop_context
from .scores import SegmentationScore
from .training import CounterfactualGenerators

__all__ = ["CounterfactualRelevance", "counterfactual_relevance"]


@dataclass
class CounterfactualRelevance:
    """G+(x), G-(x) and ``R = G+(x) - G-(x)`` on the input grid, ``(C, I, J, K)`` each.

    Attributes
    ----------
    plus, minus, relevance : Image
        One channel per input channel (the card's names), model intensity units.
    patch : Image
        ``(1, I, J, K)`` uint8: 1 where the generators rewrote the image.
    centre : tuple of int
        The patch centre on the model grid.
    scores : dict
        The frozen model's score (mean class logit over the geometry's central region) of
        ``x``, ``G+(x)`` and ``G-(x)``: ``{"original", "plus", "minus"}``.
    """

    plus: Image
    minus: Image
    relevance: Image
    patch: Image
    centre: tuple[int, int, int]
    scores: dict[str, float] = field(default_factory=dict)


def _centre_from_region(region: Image, model: LoadedModel, geometry) -> np.ndarray:
    mask = preprocess_labels(region, model.card).as_tensor()[0].numpy() > 0
    voxels = np.argwhere(mask)
    if not len(voxels):
        raise SegXAIInputError("region: the mask is empty on the model grid")
    centroid = voxels.mean(0)
    return voxels[np.argmin(((voxels - centroid) ** 2).sum(1))]  # a voxel of the region


def counterfactual_relevance(
    image: Image,
    model: LoadedModel,
    generators: CounterfactualGenerators,
    region: Optional[Image] = None,
    point_ras: Optional[Sequence[float]] = None,
) -> CounterfactualRelevance:
    """Explain one lesion (or any region) of ``image`` with the trained generator pair.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, channels in the card's order.
    model : LoadedModel
        The frozen model the generators were trained against (for the grid and the scores).
    generators : CounterfactualGenerators
    region : Image, optional
        ``(1, I, J, K)`` mask on ``image``'s grid (an instance's mask, a drawn region): the patch
        is centred on its voxel nearest its centroid (on the model grid).
    point_ras : sequence of 3 floats, optional
        Or a RAS point (mm) to centre the patch on. Exactly one of ``region`` and ``point_ras``.

    Returns
    -------
    CounterfactualRelevance
    """
    if not isinstance(generators, CounterfactualGenerators):
        raise SegXAIInputError("generators: expected CounterfactualGenerators (train_counterfactual or "
                               "load_counterfactual_generators)")
    if (region is None) == (point_ras is None):
        raise SegXAIInputError("region, point_ras: give exactly one of them")
    model.card.check_input_count(image.num_channels, "channel(s)")
    if generators.frame.channels != image.num_channels:
        raise SegXAIInputError(f"generators: trained on {generators.frame.channels} channel(s), the image has "
                               f"{image.num_channels}")
    geometry = generators.geometry
    batch, model_affine = model_input(image, model.card, model.device)
    x = batch[0]
    shape = x.shape[1:]
    if region is not None:
        if not isinstance(region, Image) or region.spatial_shape != image.spatial_shape:
            raise SegXAIInputError("region: expected a (1, I, J, K) mask Image on the image's grid")
        centre = _centre_from_region(region, model, geometry)
    else:
        point = np.asarray(point_ras, dtype=float).reshape(-1)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise SegXAIInputError(f"point_ras {point_ras!r}: expected three finite RAS coordinates")
        centre = np.round((np.linalg.inv(np.asarray(model_affine, dtype=float)) @ np.append(point, 1.0))[:3]).astype(int)
        if np.any(centre < 0) or np.any(centre >= np.asarray(shape)):
            raise SegXAIInputError(f"point_ras {list(point)}: outside the image")
    centre = tuple(int(c) for c in centre)

    context = crop_context(x, centre, geometry.context_size)[None]
    patch = geometry.to_generator(context[(slice(None), slice(None), *geometry.patch_slices)])
    plus_net, minus_net = generators.plus, generators.minus
    device = next(plus_net.parameters()).device
    with torch.no_grad():
        plus = plus_net(patch.to(device)).to(x.device)
        minus = minus_net(patch.to(device)).to(x.device)
        score = SegmentationScore(model, geometry, generators.class_index)
        scores = {name: float(score(context, value)[0])
                  for name, value in (("original", patch), ("plus", plus), ("minus", minus))}

    # paste the patch back into the model-grid volume, clipped at the volume's border
    starts = [c - s // 2 for c, s in zip(centre, geometry.patch_shape)]
    target, source = [], []
    for start, size, length in zip(starts, geometry.patch_shape, shape):
        begin, end = max(0, start), min(int(length), start + size)
        target.append(slice(begin, end))
        source.append(slice(begin - start, end - start))
    x_np = x.float().cpu().numpy()
    volumes = {}
    for name, value in (("plus", plus), ("minus", minus)):
        volume = x_np.copy()
        volume[(slice(None), *target)] = geometry.from_generator(value)[0].cpu().numpy()[(slice(None), *source)]
        volumes[name] = volume
    mask = np.zeros((1, *shape), dtype=np.float32)
    mask[(slice(None), *target)] = 1.0
    names = tuple(model.card.input_channels)
    plus_image = to_input_grid(volumes["plus"], model_affine, image, names)
    minus_image = to_input_grid(volumes["minus"], model_affine, image, names)
    relevance = to_input_grid(volumes["plus"] - volumes["minus"], model_affine, image, names)
    patch_image = to_input_grid(mask, model_affine, image, ("patch",), interpolation="nearest")
    patch_image = patch_image.with_array((patch_image.array > 0.5).astype(np.uint8), ("patch",))
    return CounterfactualRelevance(plus_image, minus_image, relevance, patch_image, centre, scores)
