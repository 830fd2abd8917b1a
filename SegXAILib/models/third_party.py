"""Cards for third-party models that ship inside their own Python packages.

deepbet (Fisch et al., MIT licence, PyPI ``deepbet``) ships two TorchScript brain-extraction
UNets in its wheel. Its first stage (``bbox_model.pt``) takes the whole head resampled to
about 2 mm and returns brain probabilities: a sliding-window model our runtime can run as is.
Its second stage needs deepbet's own crop-and-resize of the brain's bounding box to 256^3,
which is not a fixed-spacing grid, so it is not offered here.
"""

from __future__ import annotations

from pathlib import Path

from ..image import SegXAIInputError
from .card import ModelCard, model_card_from_dict

__all__ = ["deepbet_model_file", "deepbet_model_card"]


def deepbet_model_file() -> Path:
    """Path of deepbet's first-stage TorchScript model inside the installed package."""
    try:
        from deepbet import utils
    except ImportError:
        raise SegXAIInputError("deepbet is not installed (pip install deepbet)") from None
    path = Path(utils.DATA_PATH) / "models" / "bbox_model.pt"
    if not path.is_file():
        raise SegXAIInputError(f"deepbet is installed but its model {path} is missing")
    return path


def deepbet_model_card() -> ModelCard:
    """A model card that runs deepbet's whole-head brain model through SegXAI's runtime.

    Intensities follow deepbet's ``normalize``: 0.5-99.5 percentile range to [0, 1] (clipped),
    z-score, then ``0.226 x + 0.449``. The network outputs probabilities (no activation).
    """
    path = deepbet_model_file()
    card = model_card_from_dict(
        {
            "name": "deepbet-brain-stage1",
            "version": "1.0.2",
            "description": "deepbet brain extraction, first stage (whole head, ~2 mm)",
            "architecture": {"format": "torchscript", "file": str(path)},
            "input_channels": ["T1"],
            "classes": [
                {"name": "background", "color": [0, 0, 0]},
                {"name": "brain", "color": [250, 200, 60]},
            ],
            "preprocessing": {
                "orientation": "RAS",
                "spacing": [2.0, 2.0, 2.0],
                "intensity": [
                    {"kind": "percentile", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},
                    {"kind": "zscore"},
                    {"kind": "affine", "scale": 0.226, "offset": 0.449},
                ],
            },
            "inference": {"patch_size": [128, 128, 128], "overlap": 0.25},
            "output_activation": "none",
            "provenance": {"source": "PyPI package deepbet (MIT), data/models/bbox_model.pt"},
        }
    )
    return card
