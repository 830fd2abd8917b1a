"""The one image type of SegXAI: voxels plus geometry.

Conventions
-----------
* Voxel arrays are channel-first and indexed ``[c, i, j, k]``, shape ``(C, I, J, K)``, the
  order MONAI uses for its ``MetaTensor`` (ITK/SimpleITK arrays are ``[k, j, i]``).
* Geometry is the 4x4 ``ijk_to_ras`` matrix that maps a voxel index ``(i, j, k, 1)`` to a
  physical point in RAS millimetres, the convention of 3D Slicer and of MONAI's default
  affine. ITK and DICOM use LPS; :func:`to_sitk` and :func:`from_sitk` convert, and nothing
  else in the library needs to know about LPS.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "Image",
    "LPS_TO_RAS",
    "SegXAIInputError",
    "geometry_matrix",
    "decompose_geometry",
]

#: Flips the first two axes; its own inverse, so it also maps RAS to LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SegXAIInputError(ValueError):
    """Bad user input: a file, a parameter or an image that does not fit.

    The message names the offending file or parameter and what was expected; the CLI turns
    it into exit code 2.
    """


def geometry_matrix(spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> np.ndarray:
    """Build an IJK-to-RAS matrix from RAS ``spacing`` (3,), ``origin`` (3,) and ``direction`` (3, 3).

    ``direction`` holds the unit RAS axis of i, j, k in its columns.
    """
    spacing = np.asarray(spacing, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, dtype=float) @ np.diag(spacing)
    matrix[:3, 3] = np.asarray(origin, dtype=float)
    return matrix


def decompose_geometry(ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an IJK-to-RAS matrix into ``(spacing, origin, direction)``.

    Spacing is the length of each column; direction the normalised columns. Raises
    :class:`SegXAIInputError` for a singular or sheared matrix (not a voxel grid).
    """
    linear = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise SegXAIInputError(f"ijk_to_ras: voxel spacing must be positive and finite, got {spacing}")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise SegXAIInputError("ijk_to_ras: the axes are not orthogonal (sheared grids are not supported)")
    return spacing, np.asarray(ijk_to_ras, dtype=float)[:3, 3].copy(), direction


@dataclass(eq=False)
class Image:
    """Voxels ``(C, I, J, K)`` on a grid given by ``ijk_to_ras`` (4, 4).

    Parameters
    ----------
    array : numpy.ndarray
        Voxel values, shape ``(C, I, J, K)``; a 3D array ``(I, J, K)`` is taken as one channel.
    ijk_to_ras : numpy.ndarray
        Maps voxel indices to RAS millimetres; identity when omitted.
    channel_names : sequence of str, optional
        One name per channel (e.g. ``("FLAIR", "T1")``); defaults to ``ch0, ch1, ...``.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))
    channel_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise SegXAIInputError(
                f"Image array must be (I, J, K) or (C, I, J, K), got shape {array.shape}"
            )
        self.array = array
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4):
            raise SegXAIInputError(f"ijk_to_ras must be 4x4, got shape {matrix.shape}")
        decompose_geometry(matrix)  # validates the grid
        self.ijk_to_ras = matrix
        names = tuple(self.channel_names) or tuple(f"ch{c}" for c in range(array.shape[0]))
        if len(names) != array.shape[0]:
            raise SegXAIInputError(
                f"channel_names has {len(names)} names for {array.shape[0]} channels"
            )
        self.channel_names = names

    # ---- geometry -------------------------------------------------------------------------
    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k, shape (3,)."""
        return decompose_geometry(self.ijk_to_ras)[0]

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0) in mm, shape (3,)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit RAS axes of i, j, k in the columns, shape (3, 3)."""
        return decompose_geometry(self.ijk_to_ras)[2]

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(np.prod(self.spacing))

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(N, 3)`` (may be fractional) to RAS points ``(N, 3)``."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map RAS points ``(N, 3)`` to fractional voxel indices ``(N, 3)``."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        inverse = np.linalg.inv(self.ijk_to_ras)
        return ras @ inverse[:3, :3].T + inverse[:3, 3]

    def same_grid(self, other: "Image", atol: float = 1e-4) -> bool:
        """True when ``other`` has the same spatial shape and IJK-to-RAS matrix (to ``atol`` mm)."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=atol)
        )

    # ---- derived images -------------------------------------------------------------------
    def with_array(self, array: np.ndarray, channel_names: Sequence[str] = ()) -> "Image":
        """A new image on this grid with other voxels (spatial shape must match)."""
        array = np.asarray(array)
        if array.ndim == 3:
            array = array[None]
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise SegXAIInputError(
                f"with_array: spatial shape {tuple(array.shape[1:])} differs from the grid's {self.spatial_shape}"
            )
        if not channel_names and array.shape[0] == self.num_channels:
            channel_names = self.channel_names
        return Image(array, self.ijk_to_ras.copy(), tuple(channel_names))

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> "Image":
        """The voxels ``[start, stop)`` along i, j, k (clipped to the grid), geometry kept:
        every kept voxel stays at its physical position."""
        start = [max(0, int(a)) for a in start]
        stop = [min(s, int(b)) for s, b in zip(self.spatial_shape, stop)]
        if any(b <= a for a, b in zip(start, stop)):
            raise SegXAIInputError(f"crop: empty region {start} - {stop} of a grid {self.spatial_shape}")
        shift = np.eye(4)
        shift[:3, 3] = start
        array = self.array[(slice(None), *(slice(a, b) for a, b in zip(start, stop)))]
        return Image(np.ascontiguousarray(array), self.ijk_to_ras @ shift, self.channel_names)

    def channel(self, index: int | str) -> "Image":
        """One channel, by position or by name, as a single-channel image."""
        if isinstance(index, str):
            if index not in self.channel_names:
                raise SegXAIInputError(f"no channel named {index!r}; channels are {self.channel_names}")
            index = self.channel_names.index(index)
        return Image(self.array[index : index + 1], self.ijk_to_ras.copy(), (self.channel_names[index],))

    @staticmethod
    def stack(images: Sequence["Image"]) -> "Image":
        """Stack single- or multi-channel images on one grid into one multi-channel image."""
        if not images:
            raise SegXAIInputError("stack: no images given")
        first = images[0]
        for position, image in enumerate(images[1:], start=1):
            if not first.same_grid(image):
                raise SegXAIInputError(
                    f"stack: image {position} is not on the grid of image 0; resample it first"
                )
        names = tuple(name for image in images for name in image.channel_names)
        return Image(np.concatenate([image.array for image in images]), first.ijk_to_ras.copy(), names)

    def reoriented(self, axcodes: str = "RAS") -> "Image":
        """The same voxels with axes permuted and flipped so that i, j, k point closest to
        ``axcodes`` (``"RAS"``: i towards Right, j towards Anterior, k towards Superior).

        Exact: no interpolation, every voxel keeps its physical position. Used to show
        axial / coronal / sagittal planes of a scan acquired in any orientation.
        """
        axcodes = axcodes.upper()
        positive = {"R": 0, "A": 1, "S": 2}
        negative = {"L": 0, "P": 1, "I": 2}
        if len(axcodes) != 3 or {positive.get(c, negative.get(c)) for c in axcodes} != {0, 1, 2}:
            raise SegXAIInputError(f"axcodes must name each of R/L, A/P, S/I once, got {axcodes!r}")
        direction = self.direction
        # the RAS axis each array axis is assigned to: the assignment (a permutation) that
        # keeps the axes closest, as for oblique scans two axes may lean towards one RAS axis
        ras_axis = np.array(
            max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[p[a], a]) for a in range(3)))
        )
        array, matrix = self.array, self.ijk_to_ras.copy()
        order, flips = [], []
        for code in axcodes:
            target = positive.get(code, negative.get(code))
            axis = int(np.where(ras_axis == target)[0][0])
            sign = np.sign(direction[target, axis]) * (1 if code in positive else -1)
            order.append(axis)
            flips.append(sign < 0)
        array = array.transpose(0, *(a + 1 for a in order))
        permutation = np.eye(4)[:, order + [3]]
        matrix = matrix @ permutation
        shape = array.shape[1:]
        for axis, flip in enumerate(flips):
            if flip:
                array = np.flip(array, axis=axis + 1)
                # new index n maps to old index (size - 1 - n)
                step = np.eye(4)
                step[axis, axis] = -1
                step[axis, 3] = shape[axis] - 1
                matrix = matrix @ step
        return Image(np.ascontiguousarray(array), matrix, self.channel_names)

    # ---- SimpleITK ------------------------------------------------------------------------
    def to_sitk(self, channel: int | None = None):
        """A SimpleITK image (LPS geometry) of one channel, or a vector image of all channels.

        ``channel=None`` on a single-channel image gives a scalar image.
        """
        import SimpleITK as sitk

        spacing, origin, direction = decompose_geometry(LPS_TO_RAS @ self.ijk_to_ras)
        if channel is None and self.num_channels == 1:
            channel = 0
        if channel is not None:
            # SimpleITK wants [k, j, i]
            result = sitk.GetImageFromArray(np.ascontiguousarray(self.array[channel].transpose(2, 1, 0)))
        else:
            result = sitk.GetImageFromArray(
                np.ascontiguousarray(self.array.transpose(3, 2, 1, 0)), isVector=True
            )
        result.SetSpacing(tuple(float(s) for s in spacing))
        result.SetOrigin(tuple(float(o) for o in origin))
        result.SetDirection(tuple(float(d) for d in direction.ravel()))
        return result

    @classmethod
    def from_sitk(cls, image, channel_names: Sequence[str] = ()) -> "Image":
        """Wrap a 3D SimpleITK image (scalar or vector pixels) without touching its geometry."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise SegXAIInputError(f"expected a 3D image, got {image.GetDimension()}D")
        array = sitk.GetArrayFromImage(image)  # (K, J, I) or (K, J, I, C)
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = array.transpose(3, 2, 1, 0)
        else:
            array = array.transpose(2, 1, 0)[None]
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        lps = geometry_matrix(image.GetSpacing(), image.GetOrigin(), direction)
        return cls(np.ascontiguousarray(array), LPS_TO_RAS @ lps, tuple(channel_names))

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Image(channels={self.channel_names}, shape={self.spatial_shape}, spacing=({spacing}) mm, "
            f"dtype={self.array.dtype})"
        )
