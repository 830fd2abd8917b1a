"""Streaming statistics of prediction samples: voxel maps, per-structure and per-instance tables.

Memory is bounded by a few arrays of the volume's size, whatever the number of samples: no
stack of samples is ever held. Each sample's class probabilities ``p_s`` ``(K, I, J, K)`` (on
the input grid) update

* the running mean and sum of squared deviations of ``p`` (Welford, per voxel and class),
* the running sum of the sample entropies ``H(p_s)``,
* per foreground class, the per-voxel count ``n_v`` of samples whose mask holds the voxel,
* per foreground class and per instance region, the running mean and squared deviations of the
  sample's volume (Welford).

Definitions (entropies in nats, natural logarithm; ``N`` samples):

* mean probability ``p̄ = (1/N) Σ_s p_s``; variance ``(1/N) Σ_s (p_s - p̄)^2`` (population
  variance, ``ddof = 0``), per class.
* softmax models: predictive entropy ``H(p̄) = -Σ_k p̄_k log p̄_k``, expected entropy
  ``(1/N) Σ_s H(p_s)``, mutual information ``MI = H(p̄) - (1/N) Σ_s H(p_s)``: one channel each,
  ``0 <= MI <= log K``.
* sigmoid (multi-label) models: each foreground class is its own yes / no question, so each
  gets the Bernoulli entropy ``h(q) = -q log q - (1 - q) log(1 - q)`` of its probability:
  ``K - 1`` channels (one per foreground class), ``0 <= MI <= log 2`` per channel.
* MI is non-negative (entropy is concave, Jensen); float32 rounding can make the difference
  a few 1e-7 negative, and the map is clipped at 0.
* the mask of a sample: for softmax models ``argmax p_s == c``; for sigmoid models
  ``p_s,c > 0.5`` (as :class:`~SegXAILib.models.inference.Segmentation` defines masks).

Tables, per foreground class (``structure``) and per connected component of the main
prediction's class mask (``instance``, numbered as :func:`~SegXAILib.instances.find_instances`):

* the instance's *region*: the voxels nearer to this instance than to any other instance of
  its class, and within ``region_width`` of it (Euclidean distance between voxel centres). A
  sample's mask inside the region is that sample's version of the instance. For a structure
  the region is the whole volume.
* ``mean_confidence``: the mean over the main mask of ``max_k p̄_k`` (softmax: the mean
  max-softmax of the mean prediction) or of ``p̄_c`` (sigmoid).
* ``mean_entropy``, ``mean_mutual_information``: means over the main mask of the predictive
  entropy and MI maps (sigmoid: the class's channel).
* ``boundary_entropy``: mean predictive entropy over the boundary band: the voxels of the mask
  whose centre is within ``band_width`` of a voxel outside it, and the voxels outside within
  ``band_width`` of a mask voxel (Euclidean between voxel centres, in mm with the grid's spacing
  or in voxels; ``band_width = 1`` voxel is one voxel layer on either side, face neighbours
  only), restricted to the instance's region.
* ``pairwise_dice``: the pooled pairwise Dice of the samples' masks,
  ``2 Σ_{i<j} |A_i ∩ A_j| / Σ_{i<j} (|A_i| + |A_j|)``. With ``n_v`` samples holding voxel
  ``v``: ``Σ_{i<j} |A_i ∩ A_j| = Σ_v n_v (n_v - 1) / 2`` and ``Σ_{i<j} (|A_i| + |A_j|) = (N - 1)
  Σ_v n_v``, so it is ``Σ_v n_v (n_v - 1) / ((N - 1) Σ_v n_v)``, computed from the per-voxel
  counts alone. It weighs pairs by their size (unlike the mean of the pairwise Dice values);
  1 when every sample has the same mask, None when no sample has a voxel.
* ``volume_mean_mm3``, ``volume_cv``: mean and coefficient of variation (population standard
  deviation / mean) of the samples' mask volume in the region (None when the mean is 0).
* ``soft_dice_confidence``: Soft Dice Confidence (Borges, Pacheco and Silva, "Soft Dice
  Confidence: A Near-Optimal Confidence Estimator for Selective Prediction in Semantic
  Segmentation", arXiv:2402.10665): ``SDC = 2 Σ_v ŷ_v p_v / Σ_v (ŷ_v + p_v)``, the soft Dice
  between the hard prediction ``ŷ`` (the main prediction's mask) and the estimated marginal
  probability ``p`` of the class (here the samples' mean ``p̄_c``, the paper's plug-in
  estimate), summed over the region. None when both sums are 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError
from ..instances import find_instances

__all__ = ["entropy", "bernoulli_entropy", "pooled_pairwise_dice", "UncertaintyAccumulator", "RegionUncertainty",
           "InstanceRegions", "instance_regions", "boundary_band", "WIDTH_UNITS"]

WIDTH_UNITS = ("mm", "voxels")
_TINY = np.finfo(np.float32).tiny


def _plogp(p: np.ndarray) -> np.ndarray:
    """``p log p`` with ``0 log 0 = 0`` (``p`` clipped to [0, 1] first)."""
    p = np.clip(p, 0.0, 1.0)
    return p * np.log(np.maximum(p, _TINY))


def entropy(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """Categorical entropy ``-Σ_k p_k log p_k`` (nats) along ``axis``."""
    return -np.sum(_plogp(probabilities), axis=axis)


def bernoulli_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Bernoulli entropy ``-q log q - (1 - q) log(1 - q)`` (nats) of each value."""
    return -(_plogp(probabilities) + _plogp(1.0 - np.asarray(probabilities)))


def pooled_pairwise_dice(counts: np.ndarray, samples: int) -> Optional[float]:
    """``Σ_v n_v (n_v - 1) / ((N - 1) Σ_v n_v)`` of per-voxel counts ``n_v`` of ``N`` samples:
    the pooled pairwise Dice ``2 Σ_{i<j} |A_i ∩ A_j| / Σ_{i<j} (|A_i| + |A_j|)``; None when no
    sample has a voxel."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0 or samples < 2:
        return None
    return float(np.sum(counts * (counts - 1)) / ((samples - 1) * total))


@dataclass
class RegionUncertainty:
    """Uncertainty of one structure (``instance`` None) or one instance of it (see the module
    docstring for the definitions). ``voxels`` / ``volume_mm3`` are the main prediction's."""

    class_index: int
    structure: str
    instance: Optional[int]
    voxels: int
    volume_mm3: float
    mean_confidence: Optional[float]
    mean_entropy: Optional[float]
    mean_mutual_information: Optional[float]
    boundary_entropy: Optional[float]
    boundary_voxels: int
    pairwise_dice: Optional[float]
    volume_mean_mm3: float
    volume_cv: Optional[float]
    soft_dice_confidence: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (floats, ints, None)."""
        return asdict(self)


@dataclass
class InstanceRegions:
    """The instances of one foreground class of the main prediction and their regions.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 ``(I, J, K)`` instance ids (1 = largest), 0 elsewhere.
    regions : numpy.ndarray
        int32 ``(I, J, K)``: the id of the instance whose region holds the voxel, 0 if none.
    count : int
    """

    labels: np.ndarray
    regions: np.ndarray
    count: int


def _sampling(grid: Image, unit: str) -> Optional[np.ndarray]:
    if unit not in WIDTH_UNITS:
        raise SegXAIInputError(f"width_unit {unit!r}: expected one of {', '.join(WIDTH_UNITS)}")
    return np.asarray(grid.spacing, dtype=float) if unit == "mm" else None


def _margin(width: float, sampling: Optional[np.ndarray]) -> np.ndarray:
    """Voxels per axis that ``width`` spans, plus one."""
    steps = np.ones(3) if sampling is None else sampling
    return np.ceil(width / steps).astype(int) + 1


def _box(mask: np.ndarray, margin: np.ndarray) -> Optional[tuple[slice, ...]]:
    """The bounding box of ``mask`` widened by ``margin`` voxels per axis (clipped), or None."""
    where = np.nonzero(mask)
    if where[0].size == 0:
        return None
    return tuple(slice(max(0, int(w.min()) - int(m)), min(size, int(w.max()) + int(m) + 1))
                 for w, m, size in zip(where, margin, mask.shape))


def boundary_band(mask: np.ndarray, width: float, sampling: Optional[np.ndarray]) -> np.ndarray:
    """Bool ``(I, J, K)``: mask voxels within ``width`` of a non-mask voxel and non-mask voxels
    within ``width`` of a mask voxel (voxel centres, Euclidean; ``sampling`` the spacing in mm, or
    None for voxel units). Computed on the mask's bounding box widened by the width (exact:
    nothing farther can be within ``width``)."""
    from scipy import ndimage

    band = np.zeros(mask.shape, dtype=bool)
    box = _box(mask, _margin(width, sampling))
    if box is None:
        return band
    crop = mask[box]
    inside = ndimage.distance_transform_edt(crop, sampling=sampling) if not crop.all() else None
    outside = ndimage.distance_transform_edt(~crop, sampling=sampling)
    local = ~crop & (outside <= width)
    if inside is not None:
        local |= crop & (inside <= width)
    band[box] = local
    return band


def instance_regions(mask: np.ndarray, grid: Image, region_width: float, unit: str = "mm",
                     min_voxels: int = 1) -> InstanceRegions:
    """Connected components of ``mask`` (:func:`~SegXAILib.instances.find_instances`) and each
    one's region: the voxels nearer to it than to any other component and within
    ``region_width`` (ties go to one of them, as the distance transform finds it)."""
    from scipy import ndimage

    sampling = _sampling(grid, unit)
    labels, instances = find_instances(mask, grid=grid, min_voxels=min_voxels)
    regions = np.zeros(labels.shape, dtype=np.int32)
    if instances:
        box = _box(labels > 0, _margin(region_width, sampling))
        crop = labels[box]
        distance, nearest = ndimage.distance_transform_edt(crop == 0, sampling=sampling, return_indices=True)
        regions[box] = np.where(distance <= region_width, crop[tuple(nearest)], 0)
    return InstanceRegions(labels.astype(np.int32), regions, len(instances))


class _Welford:
    """Running mean and sum of squared deviations of vectors (float64)."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def add(self, values: np.ndarray) -> None:
        self.count += 1
        delta = values - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (values - self.mean)

    def cv(self) -> list[Optional[float]]:
        std = np.sqrt(np.maximum(self.m2 / max(self.count, 1), 0.0))
        return [None if m <= 0 else float(s / m) for s, m in zip(std, self.mean)]


class UncertaintyAccumulator:
    """Streaming voxel maps and tables of prediction samples on one grid.

    Parameters
    ----------
    grid : Image
        The input grid (any channels; only its geometry is used).
    class_names : sequence of str
        ``K`` names, background first.
    activation : str
        ``"softmax"`` or ``"sigmoid"`` (see the module docstring).
    reference_masks : numpy.ndarray
        Bool ``(K - 1, I, J, K)``: the main prediction's mask of each foreground class.
    band_width, region_width : float
        Boundary band and instance region widths, in ``width_unit``.
    width_unit : str
        ``"mm"`` (physical, the grid's spacing) or ``"voxels"``.
    min_instance_voxels : int
        Components of the main masks smaller than this are not instances.
    max_samples : int
        Upper bound on the samples (sizes the per-voxel counters: uint8 up to 255).
    """

    def __init__(self, grid: Image, class_names: Sequence[str], activation: str, reference_masks: np.ndarray,
                 band_width: float = 2.0, region_width: float = 10.0, width_unit: str = "mm",
                 min_instance_voxels: int = 1, max_samples: int = 255) -> None:
        if activation not in ("softmax", "sigmoid"):
            raise SegXAIInputError(f"output activation {activation!r}: uncertainty needs class probabilities "
                                   "(softmax or sigmoid)")
        self.grid = grid
        self.class_names = tuple(class_names)
        self.activation = activation
        k = len(self.class_names)
        shape = tuple(grid.spatial_shape)
        reference_masks = np.asarray(reference_masks, dtype=bool)
        if reference_masks.shape != (k - 1, *shape):
            raise SegXAIInputError(f"reference_masks: expected shape {(k - 1, *shape)}, got {reference_masks.shape}")
        for name, value in (("band_width", band_width), ("region_width", region_width)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SegXAIInputError(f"{name}: expected a finite number >= 0, got {value!r}")
        if max_samples > 65535:
            raise SegXAIInputError(f"samples: at most 65535, got {max_samples}")
        self.sampling = _sampling(grid, width_unit)
        self.width_unit = width_unit
        self.band_width = float(band_width)
        self.region_width = float(region_width)
        self.reference_masks = reference_masks
        self.samples = 0
        self.max_samples = int(max_samples)
        self.mean = np.zeros((k, *shape), dtype=np.float32)
        self.m2 = np.zeros((k, *shape), dtype=np.float32)
        channels = 1 if activation == "softmax" else k - 1
        self.entropy_sum = np.zeros((channels, *shape), dtype=np.float32)
        self.counts = np.zeros((k - 1, *shape), dtype=np.uint8 if max_samples <= 255 else np.uint16)
        self.voxel_volume = grid.voxel_volume
        self.instances = [instance_regions(mask, grid, self.region_width, width_unit, min_instance_voxels)
                          for mask in reference_masks]
        self._structure_volumes = _Welford(k - 1)
        self._instance_volumes = [_Welford(regions.count) for regions in self.instances]

    # ---- streaming ----------------------------------------------------------------------------------
    def sample_entropy(self, probabilities: np.ndarray) -> np.ndarray:
        """Entropy channels of one sample (softmax: 1, sigmoid: K - 1)."""
        if self.activation == "softmax":
            return entropy(probabilities)[None]
        return bernoulli_entropy(probabilities[1:])

    def sample_masks(self, probabilities: np.ndarray) -> np.ndarray:
        """Bool ``(K - 1, ...)`` masks of the foreground classes of one sample."""
        if self.activation == "sigmoid":
            return probabilities[1:] > 0.5
        labels = np.argmax(probabilities, axis=0)
        return labels[None] == np.arange(1, len(self.class_names)).reshape(-1, 1, 1, 1)

    def add(self, probabilities: np.ndarray) -> None:
        """Fold in one sample's probabilities ``(K, I, J, K)`` (float, on the grid)."""
        p = np.asarray(probabilities, dtype=np.float32)
        if p.shape != self.mean.shape:
            raise SegXAIInputError(f"sample probabilities: expected shape {self.mean.shape}, got {p.shape}")
        if self.samples >= self.max_samples:
            raise SegXAIInputError(f"samples: more than the {self.max_samples} this accumulator was made for")
        self.samples += 1
        delta = p - self.mean
        self.mean += delta / np.float32(self.samples)
        delta *= p - self.mean
        self.m2 += delta
        self.entropy_sum += self.sample_entropy(p)
        masks = self.sample_masks(p)
        self.counts += masks.astype(self.counts.dtype)
        self._structure_volumes.add(masks.reshape(masks.shape[0], -1).sum(axis=1) * self.voxel_volume)
        for c, regions in enumerate(self.instances):
            if regions.count:
                voxels = np.bincount(regions.regions[masks[c]], minlength=regions.count + 1)[1:]
                self._instance_volumes[c].add(voxels * self.voxel_volume)

    # ---- results ------------------------------------------------------------------------------------------
    def maps(self) -> dict[str, np.ndarray]:
        """``mean_probability`` and ``variance`` ``(K, ...)``, ``predictive_entropy``,
        ``expected_entropy`` and ``mutual_information`` ``(1 or K - 1, ...)``, ``mask_frequency``
        ``(K - 1, ...)`` (fraction of samples whose mask holds the voxel); float32."""
        if self.samples == 0:
            raise SegXAIInputError("no samples were added")
        n = np.float32(self.samples)
        predictive = self.sample_entropy(self.mean)
        expected = self.entropy_sum / n
        return {
            "mean_probability": self.mean.copy(),
            "variance": np.maximum(self.m2 / n, 0.0),
            "predictive_entropy": predictive.astype(np.float32),
            "expected_entropy": expected.astype(np.float32),
            "mutual_information": np.maximum(predictive - expected, 0.0).astype(np.float32),
            "mask_frequency": (self.counts / n).astype(np.float32),
        }

    def _region_row(self, c: int, instance: Optional[int], box: tuple[slice, ...], mask: np.ndarray,
                    region: Optional[np.ndarray], maps: dict[str, np.ndarray], volumes: tuple[float, Optional[float]],
                    band: np.ndarray) -> RegionUncertainty:
        """One row from the voxels in ``box``: ``mask`` (the main mask), ``region`` (bool, None =
        all of the box) and ``band`` are cropped to it."""
        channel = 0 if self.activation == "softmax" else c - 1
        mean = maps["mean_probability"][(slice(None), *box)]
        confidence = mean.max(axis=0) if self.activation == "softmax" else mean[c]
        entropy_map = maps["predictive_entropy"][(channel, *box)]
        information = maps["mutual_information"][(channel, *box)]
        counts, probability, hard = self.counts[(c - 1, *box)], mean[c], mask
        if region is not None:
            counts, probability, hard = counts[region], probability[region], mask[region]

        def mean_over(values: np.ndarray, where: np.ndarray) -> Optional[float]:
            return float(values[where].astype(np.float64).mean()) if where.any() else None

        denominator = float(hard.sum()) + float(probability.astype(np.float64).sum())
        sdc = None if denominator == 0 else float(2 * probability[hard].astype(np.float64).sum() / denominator)
        voxels = int(mask.sum())
        return RegionUncertainty(
            class_index=c, structure=self.class_names[c], instance=instance, voxels=voxels,
            volume_mm3=float(voxels * self.voxel_volume),
            mean_confidence=mean_over(confidence, mask),
            mean_entropy=mean_over(entropy_map, mask),
            mean_mutual_information=mean_over(information, mask),
            boundary_entropy=mean_over(entropy_map, band),
            boundary_voxels=int(band.sum()),
            pairwise_dice=pooled_pairwise_dice(counts, self.samples),
            volume_mean_mm3=float(volumes[0]), volume_cv=volumes[1],
            soft_dice_confidence=sdc,
        )

    def tables(self, maps: Optional[dict[str, np.ndarray]] = None) -> tuple[list[RegionUncertainty],
                                                                          list[RegionUncertainty]]:
        """``(structures, instances)``: one row per foreground class, one per instance (class
        order, then instance id)."""
        from scipy import ndimage

        maps = self.maps() if maps is None else maps
        structures, instances = [], []
        structure_cv = self._structure_volumes.cv()
        whole = tuple(slice(0, size) for size in self.grid.spatial_shape)
        margin = _margin(self.band_width, self.sampling)
        for c in range(1, len(self.class_names)):
            mask = self.reference_masks[c - 1]
            band = boundary_band(mask, self.band_width, self.sampling)
            volumes = (self._structure_volumes.mean[c - 1], structure_cv[c - 1])
            structures.append(self._region_row(c, None, whole, mask, None, maps, volumes, band))
            regions = self.instances[c - 1]
            welford = self._instance_volumes[c - 1]
            instance_cv = welford.cv()
            for number, found in enumerate(ndimage.find_objects(regions.regions, max_label=regions.count), start=1):
                # the region's box, widened so that the band's distances see past the instance
                box = tuple(slice(max(0, s.start - int(m)), min(size, s.stop + int(m)))
                            for s, m, size in zip(found, margin, mask.shape))
                region = regions.regions[box] == number
                instance_mask = regions.labels[box] == number
                instance_band = boundary_band(instance_mask, self.band_width, self.sampling) & region
                volumes = (welford.mean[number - 1], instance_cv[number - 1])
                instances.append(self._region_row(c, number, box, instance_mask, region, maps, volumes,
                                                  instance_band))
        return structures, instances
