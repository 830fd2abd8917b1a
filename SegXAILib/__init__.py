"""SegXAILib: explainability and quality assurance for 3D medical segmentation models.

The logic layer of the SegXAI 3D Slicer extension; usable without Slicer. Submodules:
``image`` (the image type), ``io`` (reading and writing), ``models`` (model cards, loaders,
inference), ``phantoms``, ``report``, ``pipeline``, ``training``, ``cli``.
"""

from .image import Image, SegXAIInputError

__version__ = "0.1.0"

__all__ = ["Image", "SegXAIInputError", "__version__"]
