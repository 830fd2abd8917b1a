"""2D patch phantoms whose class follows a known shape rule (issue 20's classification case).

Each patch (``size x size`` pixels, one channel) is a smooth random tissue texture with one
bright blob near its centre: a filled ellipse with partial-volume edges. The ground-truth rule
is the blob's **shape**:

    class 1 ("elongated") iff the blob's aspect ratio ``a / b`` (major over minor semi-axis)
    is at least :data:`ASPECT_THRESHOLD`; class 0 ("round") otherwise.

Class 0 draws the aspect ratio from ``ROUND_ASPECT`` (1.0-1.3), class 1 from
``ELONGATED_ASPECT`` (2.2-3.2), so there is a margin around the threshold (1.75). Everything
else is drawn from the *same* distribution for both classes and carries no information about
the label: the blob's area (``AREA``, pixels), its contrast over the tissue, its orientation
(uniform), its centre (within ``CENTRE_JITTER`` pixels of the patch centre), the texture and
the noise. Only the shape can separate the classes, so a classifier that separates them
uses the blob's shape, and a counterfactual that changes its decision must change the blob
(paper 004's setting: a lesion classifier whose decision lives in the lesion's appearance).

Everything random comes from ``seed`` (:class:`numpy.random.Generator`): the same seed gives
bit-identical patches, and there is no global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..image import SegXAIInputError

__all__ = ["ShapePatches", "make_shape_patches", "ASPECT_THRESHOLD", "ROUND_ASPECT", "ELONGATED_ASPECT", "AREA",
           "CONTRAST", "CENTRE_JITTER", "SHAPE_RULE"]

#: aspect ratio ranges (major / minor semi-axis) of the two classes
ROUND_ASPECT = (1.0, 1.3)
ELONGATED_ASPECT = (2.2, 3.2)
#: the rule's threshold: the middle of the gap between the two ranges
ASPECT_THRESHOLD = 1.75
#: blob area ``pi a b`` in pixels, the same range for both classes (size is no shortcut)
AREA = (28.0, 60.0)
#: blob intensity above the tissue (tissue mean 1), the same range for both classes
CONTRAST = (0.6, 1.0)
#: largest offset (pixels, per axis) of the blob centre from the patch centre
CENTRE_JITTER = 2.0
#: tissue texture: Gaussian-smoothed white noise (sigma in pixels) scaled to this std, plus pixel noise
TEXTURE_SIGMA, TEXTURE_STD, NOISE_STD = 1.5, 0.15, 0.05
#: sub-samples per axis for the blob's partial-volume occupancy
_SUPERSAMPLING = 4
#: the ground-truth rule in words (written into reports)
SHAPE_RULE = (f"class 1 iff the blob's aspect ratio (major / minor semi-axis) >= {ASPECT_THRESHOLD} "
              f"(drawn from {ROUND_ASPECT} for class 0, {ELONGATED_ASPECT} for class 1); area, contrast, "
              "orientation, position and texture have the same distribution in both classes")


@dataclass(frozen=True)
class ShapePatches:
    """A set of shape phantoms and their ground truth.

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, 1, size, size)`` float32 patches (tissue about 1, blob about 1 + contrast).
    labels : numpy.ndarray
        ``(N,)`` int64 class by the rule (1: elongated, 0: round).
    blobs : numpy.ndarray
        ``(N, size, size)`` float32 partial-volume occupancy of the blob in [0, 1] (the image
        is ``texture + contrast * blob``).
    aspect, area, contrast, angle : numpy.ndarray
        ``(N,)`` float64 drawn aspect ratio ``a / b``, area ``pi a b`` (pixels), contrast and
        major-axis angle (radians, from axis 0 towards axis 1).
    centre : numpy.ndarray
        ``(N, 2)`` float64 blob centre (pixel coordinates, axis order).
    """

    images: np.ndarray
    labels: np.ndarray
    blobs: np.ndarray
    aspect: np.ndarray
    area: np.ndarray
    contrast: np.ndarray
    angle: np.ndarray
    centre: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, rows) -> "ShapePatches":
        """The patches ``rows`` (an index array or slice)."""
        return ShapePatches(*(getattr(self, name)[rows] for name in
                              ("images", "labels", "blobs", "aspect", "area", "contrast", "angle", "centre")))


def _ellipse_occupancy(size: int, centre: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    """Fraction of each pixel (centres at integer coordinates) inside the ellipse, from a
    ``_SUPERSAMPLING``-fold regular sub-grid."""
    n = _SUPERSAMPLING
    offsets = (np.arange(n) + 0.5) / n - 0.5
    fine = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)
    u, v = np.meshgrid(fine - centre[0], fine - centre[1], indexing="ij")
    cos, sin = np.cos(angle), np.sin(angle)
    major, minor = u * cos + v * sin, -u * sin + v * cos
    inside = ((major / a) ** 2 + (minor / b) ** 2 <= 1.0).astype(np.float32)
    return inside.reshape(size, n, size, n).mean(axis=(1, 3))


def make_shape_patches(count: int, seed: int = 0, size: int = 32, positive_fraction: float = 0.5) -> ShapePatches:
    """``count`` shape phantoms (see the module docstring for the rule).

    Parameters
    ----------
    count : int
        Number of patches (>= 1).
    seed : int
        Non-negative seed of every random draw.
    size : int
        Patch edge in pixels (>= 24: the longest blob, about 16 pixels, must fit with its jitter).
    positive_fraction : float
        Probability of class 1 for each patch (in [0, 1]); the labels are drawn, not balanced exactly.

    Returns
    -------
    ShapePatches
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise SegXAIInputError(f"count {count!r}: expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegXAIInputError(f"seed {seed!r}: expected a non-negative integer")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 24:
        raise SegXAIInputError(f"size {size!r}: expected an integer >= 24")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise SegXAIInputError(f"positive_fraction {positive_fraction!r}: expected a number in [0, 1]")
    count, size = int(count), int(size)
    rng = np.random.default_rng(int(seed))
    labels = (rng.random(count) < float(positive_fraction)).astype(np.int64)
    low = np.where(labels == 1, ELONGATED_ASPECT[0], ROUND_ASPECT[0])
    high = np.where(labels == 1, ELONGATED_ASPECT[1], ROUND_ASPECT[1])
    aspect = rng.uniform(low, high)
    area = rng.uniform(*AREA, count)
    contrast = rng.uniform(*CONTRAST, count)
    angle = rng.uniform(0.0, np.pi, count)
    centre = (size - 1) / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, (count, 2))
    images = np.empty((count, 1, size, size), np.float32)
    blobs = np.empty((count, size, size), np.float32)
    for n in range(count):
        # area = pi a b and aspect = a / b fix both semi-axes
        b = np.sqrt(area[n] / (np.pi * aspect[n]))
        blobs[n] = _ellipse_occupancy(size, centre[n], aspect[n] * b, b, angle[n])
        texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), TEXTURE_SIGMA, mode="wrap")
        texture *= TEXTURE_STD / texture.std()
        noise = rng.normal(0.0, NOISE_STD, (size, size))
        images[n, 0] = 1.0 + texture + noise + contrast[n] * blobs[n]
    return ShapePatches(images, labels, blobs, aspect, area, contrast, angle, centre)
