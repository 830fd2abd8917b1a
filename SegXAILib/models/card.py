"""Model cards: the JSON file beside a model's weights that says how to run it.

A card names the architecture (a MONAI network and its arguments, a TorchScript file, or a
MONAI bundle folder), the input channels, the classes with their colours, the preprocessing
(orientation, spacing, intensity normalisation), the sliding-window settings, the output
activation, and the model's provenance and metrics. Paths in a card are relative to the card.

Example::

    {
      "schema_version": 1,
      "name": "segxai-lesions-demo",
      "architecture": {"format": "monai", "name": "UNet",
                       "kwargs": {"spatial_dims": 3, "in_channels": 2, "out_channels": 2,
                                  "channels": [16, 32, 64], "strides": [2, 2]},
                       "weights": "model.pt", "sha256": "..."},
      "input_channels": ["FLAIR", "T1"],
      "classes": [{"name": "background", "color": [0, 0, 0]},
                  {"name": "lesion", "color": [230, 70, 50]}],
      "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 3.0],
                        "intensity": [{"kind": "zscore", "nonzero": true}]},
      "inference": {"patch_size": [64, 64, 32], "overlap": 0.25, "blend": "gaussian",
                    "sw_batch_size": 2},
      "output_activation": "softmax"
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..image import SegXAIInputError

__all__ = ["ModelCard", "ClassInfo", "load_model_card", "sha256_of", "INTENSITY_KINDS", "ARCHITECTURE_FORMATS"]

CARD_SCHEMA_VERSION = 1
ARCHITECTURE_FORMATS = ("monai", "torchscript", "bundle")
INTENSITY_KINDS = {
    # kind: (required keys, optional keys)
    "zscore": ((), ("nonzero",)),
    "ct_window": (("center", "width"), ("b_min", "b_max")),
    "percentile": (("lower", "upper"), ("b_min", "b_max", "clip")),
    "affine": (("scale", "offset"), ()),
}
ACTIVATIONS = ("softmax", "sigmoid", "none")
BLEND_MODES = ("gaussian", "constant")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its name and display colour (RGB, 0-255)."""

    name: str
    color: tuple[int, int, int]


@dataclass
class ModelCard:
    """A parsed, validated model card. ``path`` is the card file (paths resolve against it)."""

    name: str
    architecture: dict[str, Any]
    input_channels: list[str]
    classes: list[ClassInfo]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    output_activation: str = "softmax"
    version: str = "0"
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    schema_version: int = CARD_SCHEMA_VERSION
    path: Path | None = None

    # ---- derived --------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return str(self.architecture["format"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.inference["patch_size"])  # type: ignore[return-value]

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        spacing = self.preprocessing.get("spacing")
        return None if spacing is None else tuple(float(s) for s in spacing)  # type: ignore[return-value]

    @property
    def orientation(self) -> str | None:
        return self.preprocessing.get("orientation")

    @property
    def output_channels(self) -> int:
        """Channels the network outputs: one per class (softmax/none), or one per foreground class (sigmoid)."""
        return self.num_classes - 1 if self.output_activation == "sigmoid" else self.num_classes

    def resolve(self, relative: str) -> Path:
        """A path from the card, resolved against the card's folder."""
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / relative).resolve()

    def checksum(self) -> str:
        """SHA-256 of the card's canonical JSON and of the weights it names: identifies the model.

        Later analyses (patterns, risk models) record it and refuse to mix models.
        """
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        weights = self.architecture.get("weights") or self.architecture.get("file")
        if weights and self.resolve(weights).is_file():
            digest.update(sha256_of(self.resolve(weights)).encode())
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data["classes"] = [{"name": c.name, "color": list(c.color)} for c in self.classes]
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Write the card as JSON (atomic)."""
        from ..io import atomic_path

        path = Path(path)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.path = path.resolve()
        return path

    def summary(self) -> str:
        """A few human-readable lines (``segxai info``)."""
        arch = self.architecture
        what = arch.get("name") or arch.get("file") or arch.get("path")
        lines = [
            f"{self.name} (version {self.version})",
            f"  architecture : {self.format} {what}",
            f"  inputs       : {', '.join(self.input_channels)}",
            f"  classes      : {', '.join(self.class_names)} ({self.output_activation})",
            f"  orientation  : {self.orientation or 'as acquired'}",
            f"  spacing      : {list(self.target_spacing) if self.target_spacing else 'as acquired'}"
            f"{' mm' if self.target_spacing else ''}",
            f"  patch        : {list(self.patch_size)} overlap {self.inference.get('overlap', 0.25)}",
        ]
        if self.description:
            lines.insert(1, f"  {self.description}")
        for key, value in self.metrics.items():
            lines.append(f"  metric       : {key} = {value}")
        return "\n".join(lines)


def _require(data: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in data:
        raise SegXAIInputError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SegXAIInputError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _check_triplet(value: Any, where: str, integer: bool) -> None:
    ok = isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
    )
    if ok and integer:
        ok = all(float(v).is_integer() for v in value)
    if not ok:
        raise SegXAIInputError(f"{where}: expected three positive {'integers' if integer else 'numbers'}, got {value!r}")


def model_card_from_dict(data: dict[str, Any], path: Path | None = None) -> ModelCard:
    """Validate a card's JSON content; errors name the card and the field."""
    where = f"model card {path}" if path else "model card"
    if not isinstance(data, dict):
        raise SegXAIInputError(f"{where}: expected a JSON object")
    name = _require(data, "name", str, where)
    architecture = _require(data, "architecture", dict, where)
    fmt = architecture.get("format")
    if fmt not in ARCHITECTURE_FORMATS:
        raise SegXAIInputError(f"{where}: architecture.format must be one of {ARCHITECTURE_FORMATS}, got {fmt!r}")
    if fmt == "monai":
        _require(architecture, "name", str, f"{where} architecture")
        _require(architecture, "weights", str, f"{where} architecture")
        if not isinstance(architecture.setdefault("kwargs", {}), dict):
            raise SegXAIInputError(f"{where}: architecture.kwargs must be an object")
    elif fmt == "torchscript":
        _require(architecture, "file", str, f"{where} architecture")
    else:
        _require(architecture, "path", str, f"{where} architecture")
    channels = _require(data, "input_channels", list, where)
    if not channels or not all(isinstance(c, str) and c for c in channels):
        raise SegXAIInputError(f"{where}: input_channels must be a non-empty list of names")
    raw_classes = _require(data, "classes", list, where)
    classes = []
    for index, entry in enumerate(raw_classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SegXAIInputError(f"{where}: classes[{index}] must be an object with a 'name'")
        color = entry.get("color", [128, 128, 128])
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
            raise SegXAIInputError(f"{where}: classes[{index}].color must be three integers 0-255")
        classes.append(ClassInfo(entry["name"], tuple(color)))  # type: ignore[arg-type]
    if len(classes) < 2:
        raise SegXAIInputError(f"{where}: classes must list the background and at least one class")
    activation = data.get("output_activation", "softmax")
    if activation not in ACTIVATIONS:
        raise SegXAIInputError(f"{where}: output_activation must be one of {ACTIVATIONS}, got {activation!r}")

    preprocessing = data.get("preprocessing", {}) or {}
    if not isinstance(preprocessing, dict):
        raise SegXAIInputError(f"{where}: preprocessing must be an object")
    if preprocessing.get("spacing") is not None:
        _check_triplet(preprocessing["spacing"], f"{where} preprocessing.spacing", integer=False)
    orientation = preprocessing.get("orientation")
    if orientation is not None and (not isinstance(orientation, str) or len(orientation) != 3):
        raise SegXAIInputError(f"{where}: preprocessing.orientation must be axis codes such as 'RAS'")
    intensity = preprocessing.setdefault("intensity", [])
    if isinstance(intensity, dict):
        intensity = preprocessing["intensity"] = [intensity]
    for index, step in enumerate(intensity):
        kind = step.get("kind") if isinstance(step, dict) else None
        if kind not in INTENSITY_KINDS:
            raise SegXAIInputError(
                f"{where}: preprocessing.intensity[{index}].kind must be one of {sorted(INTENSITY_KINDS)}, got {kind!r}"
            )
        required, optional = INTENSITY_KINDS[kind]
        missing = [key for key in required if key not in step]
        unknown = set(step) - set(required) - set(optional) - {"kind", "channels"}
        if missing or unknown:
            raise SegXAIInputError(
                f"{where}: preprocessing.intensity[{index}] ({kind}) missing {missing} / unknown {sorted(unknown)}"
            )

    inference = data.get("inference")
    if not isinstance(inference, dict):
        raise SegXAIInputError(f"{where}: missing field 'inference' (patch_size, overlap)")
    _check_triplet(inference.get("patch_size"), f"{where} inference.patch_size", integer=True)
    overlap = inference.setdefault("overlap", 0.25)
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise SegXAIInputError(f"{where}: inference.overlap must be in [0, 1), got {overlap!r}")
    if inference.setdefault("blend", "gaussian") not in BLEND_MODES:
        raise SegXAIInputError(f"{where}: inference.blend must be one of {BLEND_MODES}")
    inference.setdefault("sw_batch_size", 1)

    schema = data.get("schema_version", CARD_SCHEMA_VERSION)
    if schema != CARD_SCHEMA_VERSION:
        raise SegXAIInputError(f"{where}: schema_version {schema} is not supported (expected {CARD_SCHEMA_VERSION})")
    return ModelCard(
        name=name,
        architecture=architecture,
        input_channels=list(channels),
        classes=classes,
        preprocessing=preprocessing,
        inference=inference,
        output_activation=activation,
        version=str(data.get("version", "0")),
        description=str(data.get("description", "")),
        provenance=dict(data.get("provenance", {}) or {}),
        metrics=dict(data.get("metrics", {}) or {}),
        schema_version=schema,
        path=path.resolve() if path else None,
    )


def load_model_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate a model card; a folder means its ``model_card.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model_card.json"
    if not path.is_file():
        raise SegXAIInputError(f"model card {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SegXAIInputError(f"model card {path}: not valid JSON ({error})") from None
    return model_card_from_dict(data, path)
