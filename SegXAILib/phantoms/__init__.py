"""Synthetic phantoms with known ground truth (METHODS.md section 8).

* :func:`make_lesion_phantom`: white-matter lesions (FLAIR hyperintense, T1 hypointense) in
  the bundled head T1, randomly deformed, with optional degradations (paper 001).
* :func:`make_parotid_phantom`: the sphere-and-rod parotid situations S1-S6 (paper 000).
* :mod:`SegXAILib.phantoms.failures`: failures that keep the predicted volume uninformative
  (k-space ghosting and spikes, channel misregistration, similarity transforms of image and
  reference, contours perturbed at constant volume) for QA calibration cohorts.
* :func:`make_shape_patches`: 2D patches with one blob whose shape (round / elongated) is the
  class (issue 20's classifier case); its tiny CNN classifier is in
  :mod:`SegXAILib.phantoms.shape_classifier` (not imported here: it needs torch).

Every function draws its randomness from its ``seed`` only: the same seed gives bit-identical
output, and there is no global state.
"""

from .failures import (
    PERTURBATIONS,
    kspace_ghosting,
    kspace_spikes,
    misregister_channel,
    perturb_contour,
    random_similarity,
    similarity_matrix,
    transform_case,
)
from .lesions import LesionPhantom, make_lesion_phantom
from .parotid import PAROTID_VARIANTS, ParotidPhantom, ParotidVariant, make_parotid_phantom, parotid_grid
from .shapes import SHAPE_RULE, ShapePatches, make_shape_patches

__all__ = [
    "kspace_ghosting",
    "kspace_spikes",
    "misregister_channel",
    "similarity_matrix",
    "random_similarity",
    "transform_case",
    "perturb_contour",
    "PERTURBATIONS",
    "LesionPhantom",
    "make_lesion_phantom",
    "PAROTID_VARIANTS",
    "ParotidPhantom",
    "ParotidVariant",
    "make_parotid_phantom",
    "parotid_grid",
    "ShapePatches",
    "make_shape_patches",
    "SHAPE_RULE",
]
