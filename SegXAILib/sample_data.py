"""The bundled sample: a real head T1 MRI with its tissue maps, and the bundled models.

The T1 comes from ITK's examples (``Examples/Data/KmeansTest_T1*``, Apache-2.0, via Debian's
``insighttoolkit5-examples``); see ``Resources/Data/SampleT1/PROVENANCE.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image import Image, SegXAIInputError

__all__ = ["resources_dir", "SampleHead", "load_sample_head", "bundled_model_card", "BUNDLED_MODELS"]

#: Label of white matter in the k-means tissue map (its brightest class on T1).
WHITE_MATTER_LABEL = 6

#: Bundled demo models: name -> model card file under ``Resources/Models``.
BUNDLED_MODELS = {
    "lesions": "lesions/model_card.json",
    "parotid-S2": "parotid_S2/model_card.json",
    "parotid-S4": "parotid_S4/model_card.json",
    "parotid-S6": "parotid_S6/model_card.json",
}


def resources_dir() -> Path:
    """The ``Resources`` folder: ``$SEGXAI_RESOURCES`` if set, else the one beside the package."""
    override = os.environ.get("SEGXAI_RESOURCES")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "Resources"
    if not path.is_dir():
        raise SegXAIInputError(f"Resources folder {path} not found (set SEGXAI_RESOURCES to its location)")
    return path


@dataclass(frozen=True)
class SampleHead:
    """The bundled head T1 and its maps, all on one grid (128 x 128 x 62, 2 x 2 x 3 mm, coronal)."""

    t1: Image
    #: k-means tissue classes 0..6 (6 = white matter, 5 = grey matter)
    tissue: Image
    #: brain mask (skull-stripped region), uint8 0/1
    brain: Image

    @property
    def white_matter(self) -> np.ndarray:
        """Boolean white-matter mask ``(I, J, K)`` inside the brain."""
        return (self.tissue.array[0] == WHITE_MATTER_LABEL) & (self.brain.array[0] > 0)


def load_sample_head() -> SampleHead:
    """Read the bundled T1, tissue map and brain mask."""
    from .io import read_image

    folder = resources_dir() / "Data" / "SampleT1"
    t1 = read_image(folder / "KmeansTest_T1UCharRaw.nii.gz", "T1")
    tissue = read_image(folder / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz", "tissue")
    brain = read_image(folder / "KmeansTest_T1RawSkullStrip.nii.gz", "brain")
    brain = brain.with_array((brain.array > 0).astype(np.uint8))
    t1 = t1.with_array(t1.array.astype(np.float32))
    return SampleHead(t1=t1, tissue=tissue, brain=brain)


def bundled_model_card(name: str) -> Path:
    """Path of a bundled model's card (``lesions``, ``parotid-S2``, ``parotid-S4``, ``parotid-S6``)."""
    if name not in BUNDLED_MODELS:
        raise SegXAIInputError(f"no bundled model named {name!r}; bundled: {sorted(BUNDLED_MODELS)}")
    return resources_dir() / "Models" / BUNDLED_MODELS[name]
