"""Synthetic phantoms with known ground truth (METHODS.md section 8).

* :func:`make_lesion_phantom`: white-matter lesions (FLAIR hyperintense, T1 hypointense) in
  the bundled head T1, randomly deformed, with optional degradations (paper 001).
* :func:`make_parotid_phantom`: the sphere-and-rod parotid situations S1-S6 (paper 000).
* :func:`make_shape_patches`: 2D patches with one blob whose shape (round / elongated) is the
  class (issue 20's classifier case); its tiny CNN classifier is in
  :mod:`SegXAILib.phantoms.shape_classifier` (not imported here: it needs torch).

Every function draws its randomness from its ``seed`` only: the same seed gives bit-identical
output, and there is no global state.
"""

from .lesions import LesionPhantom, make_lesion_phantom
from .parotid import PAROTID_VARIANTS, ParotidPhantom, ParotidVariant, make_parotid_phantom, parotid_grid
from .shapes import SHAPE_RULE, ShapePatches, make_shape_patches

__all__ = [
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
