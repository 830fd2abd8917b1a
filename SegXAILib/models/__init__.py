"""Model runtime: model cards, loaders, preprocessing and sliding-window inference."""

from .card import ClassInfo, ModelCard, load_model_card, model_card_from_dict, sha256_of
from .inference import Segmentation, segment, sliding_window_logits
from .loaders import LoadedModel, load_model, resolve_device
from .preprocessing import preprocess, to_input_grid

__all__ = [
    "ClassInfo",
    "ModelCard",
    "load_model_card",
    "model_card_from_dict",
    "sha256_of",
    "Segmentation",
    "segment",
    "sliding_window_logits",
    "LoadedModel",
    "load_model",
    "resolve_device",
    "preprocess",
    "to_input_grid",
]
