"""Instances of a binarised prediction: 26-connected components numbered by decreasing size.

Plain functions over numpy arrays and :class:`~SegXAILib.image.Image` grids (the input grid
or the model grid, whichever the mask lives on). Ids follow
:func:`SegXAILib.attribution.api.instance_labels`: 1 = largest component, ties broken by the
first voxel in raster (i, j, k) order; components below ``min_voxels`` or ``min_volume_mm3``
are dropped and the rest renumbered 1.. in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..attribution.api import instance_labels
from ..image import Image, SegXAIInputError

__all__ = ["Instance", "find_instances", "instance_at"]


@dataclass
class Instance:
    """One connected component.

    Attributes
    ----------
    id : int
        1 = largest.
    voxels : int
        Voxel count.
    volume_mm3 : float
        ``voxels * voxel volume`` (anisotropic spacing included).
    centroid_ras : numpy.ndarray
        ``(3,)`` mean RAS position (mm) of the voxel centres.
    bbox_start, bbox_stop : tuple of int
        IJK bounding box ``[start, stop)``.
    mean_probability : float or None
        Mean of ``probabilities`` over the voxels, when given.
    """

    id: int
    voxels: int
    volume_mm3: float
    centroid_ras: np.ndarray
    bbox_start: tuple[int, int, int]
    bbox_stop: tuple[int, int, int]
    mean_probability: Optional[float] = None

    @property
    def bbox(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(start, stop)`` in IJK."""
        return self.bbox_start, self.bbox_stop

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "id": int(self.id),
            "voxels": int(self.voxels),
            "volume_mm3": float(self.volume_mm3),
            "centroid_ras": [float(v) for v in self.centroid_ras],
            "bbox_start": list(self.bbox_start),
            "bbox_stop": list(self.bbox_stop),
            "mean_probability": None if self.mean_probability is None else float(self.mean_probability),
        }


def _grid_matrix(grid: Union[Image, np.ndarray, None], shape: Sequence[int]) -> Image:
    """A geometry-only Image for ``grid`` (an Image or a 4x4 IJK-to-RAS matrix)."""
    if grid is None:
        raise SegXAIInputError("find_instances: a bare mask array needs its grid (an Image or a 4x4 IJK-to-RAS matrix)")
    if isinstance(grid, Image):
        if tuple(grid.spatial_shape) != tuple(shape):
            raise SegXAIInputError(f"find_instances: the grid's shape {grid.spatial_shape} differs from the mask's {tuple(shape)}")
        return grid
    return Image(np.zeros((1, 1, 1, 1), np.uint8), np.asarray(grid, dtype=float))


def _as_3d(values: Union[Image, np.ndarray], name: str) -> np.ndarray:
    if isinstance(values, Image):
        if values.num_channels != 1:
            raise SegXAIInputError(f"{name}: expected a single-channel image, got {values.num_channels} channels")
        return values.array[0]
    values = np.asarray(values)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3:
        raise SegXAIInputError(f"{name}: expected a 3D array (I, J, K), got shape {values.shape}")
    return values


def find_instances(
    mask: Union[Image, np.ndarray],
    probabilities: Union[Image, np.ndarray, None] = None,
    min_voxels: int = 1,
    min_volume_mm3: float = 0.0,
    grid: Union[Image, np.ndarray, None] = None,
) -> tuple[np.ndarray, list[Instance]]:
    """Connected components (26-connectivity) of a binary mask.

    Parameters
    ----------
    mask : Image or numpy.ndarray
        Non-zero = foreground; a single-channel Image (its grid is used) or an ``(I, J, K)``
        array with ``grid``.
    probabilities : Image or numpy.ndarray, optional
        ``(I, J, K)`` class probability on the same grid; gives ``mean_probability``.
    min_voxels, min_volume_mm3 : int, float
        Components smaller than either are dropped.
    grid : Image or numpy.ndarray, optional
        The grid of an array mask (an Image on it, or its 4x4 IJK-to-RAS matrix).

    Returns
    -------
    labels : numpy.ndarray
        int32 ``(I, J, K)``, 0 = background, 1.. = instance ids by decreasing size.
    instances : list of Instance
        In id order.
    """
    foreground = _as_3d(mask, "find_instances: mask") != 0
    geometry = mask if isinstance(mask, Image) and grid is None else _grid_matrix(grid, foreground.shape)
    if min_voxels < 0 or min_volume_mm3 < 0:
        raise SegXAIInputError(f"find_instances: minimum sizes must be >= 0, got {min_voxels} voxels, {min_volume_mm3} mm^3")
    prob = None
    if probabilities is not None:
        prob = _as_3d(probabilities, "find_instances: probabilities").astype(np.float64)
        if prob.shape != foreground.shape:
            raise SegXAIInputError(f"find_instances: probabilities shape {prob.shape} differs from the mask's {foreground.shape}")
    labels = np.asarray(instance_labels(foreground), dtype=np.int32)
    count = int(labels.max()) if labels.size else 0
    if count == 0:
        return labels, []
    voxel_volume = geometry.voxel_volume
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = (sizes >= min_voxels) & (sizes * voxel_volume >= min_volume_mm3)
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)  # sizes are sorted: order kept
    labels = relabel[labels]
    kept = int(keep.sum())
    if kept == 0:
        return labels, []
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=kept + 1)[1:]
    ijk = np.nonzero(labels)
    ids = labels[ijk]
    sums = np.stack([np.bincount(ids, weights=axis.astype(np.float64), minlength=kept + 1)[1:] for axis in ijk], axis=1)
    centroids_ijk = sums / sizes[:, None]
    centroids_ras = geometry.ijk_to_ras_points(centroids_ijk)  # affine: RAS of the mean = mean of the RAS
    mean_prob = None
    if prob is not None:
        mean_prob = np.bincount(ids, weights=prob[ijk], minlength=kept + 1)[1:] / sizes
    from scipy import ndimage

    boxes = ndimage.find_objects(labels, max_label=kept)
    instances = []
    for n in range(kept):
        box = boxes[n]
        instances.append(
            Instance(
                id=n + 1,
                voxels=int(sizes[n]),
                volume_mm3=float(sizes[n] * voxel_volume),
                centroid_ras=centroids_ras[n],
                bbox_start=tuple(int(s.start) for s in box),
                bbox_stop=tuple(int(s.stop) for s in box),
                mean_probability=None if mean_prob is None else float(mean_prob[n]),
            )
        )
    return labels, instances


def instance_at(
    labels: Union[Image, np.ndarray],
    image_grid: Union[Image, np.ndarray],
    ras_point: Sequence[float],
    radius_mm: float = 5.0,
) -> int:
    """The instance id at a RAS point (a click in a viewer).

    The instance whose voxel contains the point; otherwise the instance of the nearest
    instance voxel centre within ``radius_mm`` (physical distance, anisotropic and oblique
    grids included).

    Raises
    ------
    SegXAIInputError
        No instance voxel within ``radius_mm``; names the nearest instance and its distance.
    """
    values = _as_3d(labels, "instance_at: labels")
    geometry = _grid_matrix(image_grid, values.shape) if not isinstance(image_grid, Image) else image_grid
    if isinstance(image_grid, Image) and tuple(image_grid.spatial_shape) != values.shape:
        raise SegXAIInputError(f"instance_at: the grid's shape {image_grid.spatial_shape} differs from the labels' {values.shape}")
    point = np.asarray(ras_point, dtype=float).reshape(3)
    if radius_mm < 0:
        raise SegXAIInputError(f"instance_at: radius_mm must be >= 0, got {radius_mm}")
    index = np.rint(geometry.ras_to_ijk_points(point)[0]).astype(int)
    if np.all(index >= 0) and np.all(index < np.array(values.shape)) and values[tuple(index)] > 0:
        return int(values[tuple(index)])
    voxels = np.argwhere(values > 0)
    if voxels.shape[0] == 0:
        raise SegXAIInputError("instance_at: there is no instance (the mask is empty)")
    distances = np.linalg.norm(geometry.ijk_to_ras_points(voxels) - point, axis=1)
    nearest = int(np.argmin(distances))
    identifier = int(values[tuple(voxels[nearest])])
    if distances[nearest] <= radius_mm:
        return identifier
    raise SegXAIInputError(
        f"instance_at: no instance within {radius_mm:g} mm of RAS ({point[0]:.1f}, {point[1]:.1f}, {point[2]:.1f}); "
        f"the nearest is instance {identifier} at {distances[nearest]:.1f} mm"
    )
