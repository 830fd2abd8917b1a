"""The fitted patterns of one model and estimator (:class:`PatternSet`), their file
(``patterns_<estimator>.pt`` beside the model card, readable with
``torch.load(weights_only=True)``) and the check against the model's weights and layers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ...image import SegXAIInputError
from ...models.card import ModelCard, sha256_of
from .algebra import pattern_layers
from .statistics import ESTIMATORS

__all__ = ["FILE_FORMAT", "FILE_VERSION", "PatternSet", "weights_sha256", "default_patterns_path", "load_patterns"]

FILE_FORMAT = "segxai-patterns"
FILE_VERSION = 1


def weights_sha256(card: ModelCard) -> str:
    """SHA-256 of the card's weights file (the card's ``sha256`` when it states one, which
    :func:`~SegXAILib.models.load_model` has checked); empty when there is no file."""
    arch = card.architecture
    if isinstance(arch.get("weights"), list):  # a fold ensemble: every member's file, in order
        paths = [card.resolve(relative) for relative in card.weights_files()]
        return ",".join(sha256_of(path) if path.is_file() else "" for path in paths)
    if arch.get("sha256"):
        return str(arch["sha256"])
    if card.format == "bundle":
        path = card.resolve(arch["path"]) / arch.get("weights", "models/model.pt")
    else:
        relative = arch.get("weights") or arch.get("file")
        if not relative:
            return ""
        path = card.resolve(relative)
    return sha256_of(path) if path.is_file() else ""


@dataclass
class PatternSet:
    """Fitted patterns of one model and estimator, with their provenance.

    ``patterns`` maps a layer name to ``{"all": a}`` (linear) or ``{"positive": a_+,
    "negative": a_-}`` (two_component), each shaped like the layer's weight.
    """

    estimator: str
    patterns: dict[str, dict[str, torch.Tensor]]
    layer_shapes: dict[str, tuple[int, ...]]
    weights_sha256: str = ""
    model_name: str = ""
    card_checksum: str = ""
    volumes: int = 0
    windows: int = 0
    voxels: int = 0
    seed: int = 0
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return (f"PatternSet({self.estimator}, model={self.model_name!r}, layers={len(self.patterns)}, "
                f"volumes={self.volumes}, voxels={self.voxels})")

    def to_dict(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "format_version": FILE_VERSION,
            "estimator": self.estimator,
            "model_name": self.model_name,
            "weights_sha256": self.weights_sha256,
            "card_checksum": self.card_checksum,
            "volumes": int(self.volumes),
            "windows": int(self.windows),
            "voxels": int(self.voxels),
            "seed": int(self.seed),
            "layers": list(self.patterns),
            "layer_shapes": {name: list(shape) for name, shape in self.layer_shapes.items()},
            "patterns": {name: {k: v.detach().cpu().float().contiguous() for k, v in p.items()}
                         for name, p in self.patterns.items()},
        }

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the set atomically (``torch.save`` of tensors, strings and numbers)."""
        from ...io import atomic_path

        path = Path(path)
        with atomic_path(path) as temporary:
            torch.save(self.to_dict(), temporary)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PatternSet":
        path = Path(path)
        if not path.is_file():
            raise SegXAIInputError(f"patterns {path}: no such file")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # zip / pickle errors
            raise SegXAIInputError(f"patterns {path}: cannot be read ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise SegXAIInputError(f"patterns {path}: not a SegXAI patterns file")
        if data.get("format_version") != FILE_VERSION:
            raise SegXAIInputError(f"patterns {path}: format version {data.get('format_version')} is not supported")
        if data.get("estimator") not in ESTIMATORS:
            raise SegXAIInputError(f"patterns {path}: unknown estimator {data.get('estimator')!r}")
        return cls(
            estimator=data["estimator"],
            patterns={name: dict(p) for name, p in data["patterns"].items()},
            layer_shapes={name: tuple(shape) for name, shape in data["layer_shapes"].items()},
            weights_sha256=data.get("weights_sha256", ""),
            model_name=data.get("model_name", ""),
            card_checksum=data.get("card_checksum", ""),
            volumes=int(data.get("volumes", 0)),
            windows=int(data.get("windows", 0)),
            voxels=int(data.get("voxels", 0)),
            seed=int(data.get("seed", 0)),
            source=str(path),
        )

    def check(self, network: torch.nn.Module, card: Optional[ModelCard] = None) -> None:
        """Refuse (SegXAIInputError) patterns fitted for other weights or other layers."""
        where = f"patterns {self.source or '(in memory)'}"
        if card is not None:
            expected = weights_sha256(card)
            if self.weights_sha256 and expected and self.weights_sha256 != expected:
                raise SegXAIInputError(
                    f"{where} were fitted for a model whose weights have SHA-256 {self.weights_sha256[:16]}..., but "
                    f"model {card.name!r} has {expected[:16]}...; fit patterns for this model: segxai patterns fit"
                )
        layers = {name: tuple(module.weight.shape) for name, module in pattern_layers(network)}
        if layers != self.layer_shapes:
            missing = sorted(set(layers) - set(self.layer_shapes))
            extra = sorted(set(self.layer_shapes) - set(layers))
            shapes = sorted(n for n in set(layers) & set(self.layer_shapes) if layers[n] != self.layer_shapes[n])
            raise SegXAIInputError(
                f"{where} do not match the network's layers (no pattern for {missing[:3]}, patterns of absent "
                f"layers {extra[:3]}, other weight shapes {shapes[:3]}); fit patterns for this model: segxai patterns fit"
            )
        for name, pattern in self.patterns.items():
            keys = {"all"} if self.estimator == "linear" else {"positive", "negative"}
            if set(pattern) != keys or any(tuple(v.shape) != layers[name] for v in pattern.values()):
                raise SegXAIInputError(f"{where}: layer {name!r} has malformed patterns for the {self.estimator} estimator")


def default_patterns_path(card: ModelCard, estimator: str) -> Path:
    """``patterns_<estimator>.pt`` in the model card's folder."""
    if card.path is None:
        raise SegXAIInputError("patterns: the model card has no folder; pass patterns=PATH")
    return card.path.parent / f"patterns_{estimator}.pt"


_CACHE: dict[tuple[str, int, int], PatternSet] = {}


def load_patterns(path: Union[str, os.PathLike]) -> PatternSet:
    """:meth:`PatternSet.load` with a small cache keyed by path, size and modification time."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SegXAIInputError(f"patterns {path}: no such file")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = PatternSet.load(path)
    return _CACHE[key]
