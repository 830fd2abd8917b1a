"""Model cards: the JSON file beside a model's weights that says how to run it.

A card names the architecture (a MONAI network and its arguments, a TorchScript file, a
MONAI bundle folder, or any eager PyTorch network given by its Python class), the input
channels, the classes with their colours, the preprocessing (orientation, spacing, intensity
normalisation), the sliding-window settings, the output activation, and the model's
provenance and metrics. Paths in a card are relative to the card.

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

A fold ensemble (nnU-Net style): ``"weights"`` may list several state dicts of the same
architecture (formats ``monai`` and ``python``; ``"sha256"`` then lists one checksum per file);
the prediction averages the members' logits. Inference may also average mirrored predictions
(``"mirror_axes"``: model-grid axes 0, 1, 2 = D, H, W of the network input; every combination
of flips, as nnU-Net's mirroring) and place windows as nnU-Net v2 does (``"window_scheme":
"nnunet"``: its patch positions, zero padding and Gaussian importance map; ``"monai"`` by
default). ``"resize_to_shape": [D, H, W]`` in the preprocessing resizes the model-grid image
(after orientation and spacing) to a fixed shape (trilinear); predictions map back::

    "architecture": {"format": "python", "name": "my_package.networks:MyNet", "kwargs": {},
                     "weights": ["fold_0.pt", "fold_1.pt", "fold_2.pt"]},
    "preprocessing": {"orientation": "RAS", "resize_to_shape": [64, 64, 64]},
    "inference": {"patch_size": [64, 64, 64], "overlap": 0.5, "mirror_axes": [0, 1, 2],
                  "window_scheme": "nnunet"}

Any PyTorch network (format ``python``): the class as ``"module:Class"`` (importable, e.g.
an installed package) or as ``"name": "Class"`` with ``"file"``, a ``.py`` file beside the
card (imported on its own: what it imports must be installed); ``kwargs`` are its constructor's keyword
arguments and ``weights`` its ``state_dict()`` saved with ``torch.save`` (read with
``weights_only=True``). Importing the class runs its code, so such a card loads only with
``trust_code=True`` (``load_model``; ``"trust_code": true`` in case settings, ``--trust-code``
on the command line)::

    "architecture": {"format": "python", "file": "my_net.py", "name": "MyNet",
                     "kwargs": {"in_channels": 2, "out_channels": 2, "width": 16},
                     "weights": "my_net.pt"}

    "architecture": {"format": "python", "name": "my_package.networks:MyNet",
                     "kwargs": {"in_channels": 2, "out_channels": 2}, "weights": "my_net.pt"}

nnU-Net v2 (format ``nnunetv2``): a results folder (``dataset.json``, ``plans.json``,
``fold_X/checkpoint_final.pth``); everything else is read from it
(:func:`SegXAILib.models.nnunet.nnunet_card_data`), so a one-line card, or the folder itself
given to :func:`load_model_card`, is enough; ``configuration``, ``folds`` and ``checkpoint``
default to the checkpoint's configuration, every fold found and ``checkpoint_final.pth``::

    "architecture": {"format": "nnunetv2", "results_folder": ".", "configuration": "3d_fullres",
                     "folds": [0, 1, 2, 3, 4], "checkpoint": "checkpoint_final.pth"}

Save the weights with ``torch.save(network.state_dict(), "my_net.pt")``. Guided backprop and
deconvolution apply their rules to the network's activation modules and to the activation
functions its ``forward`` calls (``F.relu``, ``F.leaky_relu``, ...; see
:mod:`SegXAILib.attribution.guided`); Grad-CAM hooks its modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..image import SegXAIInputError
from ..validation import problem, validate

__all__ = ["ModelCard", "ClassInfo", "load_model_card", "sha256_of", "INTENSITY_KINDS", "ARCHITECTURE_FORMATS",
           "CODE_FORMATS", "EAGER_HINT"]

CARD_SCHEMA_VERSION = 1
ARCHITECTURE_FORMATS = ("monai", "torchscript", "bundle", "python", "nnunetv2")
#: formats whose loading runs code from the model's files (load only with ``trust_code=True``)
CODE_FORMATS = ("bundle", "python")
#: how to give a TorchScript model as an eager network (the methods that need one say it)
EAGER_HINT = (
    "load the model as an eager network: a model card with architecture format 'python' naming the network's class "
    "('module:Class', or 'Class' with a .py 'file'), its 'kwargs' and its state dict 'weights', loaded with "
    "trust_code=True (see SegXAILib.models.card)"
)
INTENSITY_KINDS = {
    # kind: (required keys, optional keys)
    "zscore": ((), ("nonzero",)),
    "ct_window": (("center", "width"), ("b_min", "b_max")),
    "percentile": (("lower", "upper"), ("b_min", "b_max", "clip")),
    "affine": (("scale", "offset"), ()),
}
ACTIVATIONS = ("softmax", "sigmoid", "none")
BLEND_MODES = ("gaussian", "constant")
WINDOW_SCHEMES = ("monai", "nnunet")


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
    #: what the model expects of its inputs (:mod:`SegXAILib.models.expectations`); not hashed
    input_expectations: dict[str, Any] = field(default_factory=dict)
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
    def resize_to_shape(self) -> tuple[int, int, int] | None:
        """Fixed model-grid shape the preprocessing resizes to, or None."""
        shape = self.preprocessing.get("resize_to_shape")
        return None if shape is None else tuple(int(s) for s in shape)  # type: ignore[return-value]

    @property
    def weights_files(self) -> list[str]:
        """The ``weights`` entry as a list (one state dict per ensemble member; empty if none)."""
        weights = self.architecture.get("weights")
        if weights is None:
            return []
        return [weights] if isinstance(weights, str) else list(weights)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Model-grid spatial axes (0, 1, 2 = D, H, W) whose flips the prediction averages."""
        return tuple(int(a) for a in self.inference.get("mirror_axes", []) or [])

    @property
    def window_scheme(self) -> str:
        """``"monai"`` or ``"nnunet"``: how sliding windows are placed, padded and weighted."""
        return str(self.inference.get("window_scheme", "monai"))

    @property
    def orientation(self) -> str | None:
        return self.preprocessing.get("orientation")

    @property
    def output_channels(self) -> int:
        """Channels the network outputs: one per class (softmax/none), or one per foreground class (sigmoid)."""
        return self.num_classes - 1 if self.output_activation == "sigmoid" else self.num_classes

    def output_channel(self, class_index: int) -> int:
        """The network output channel holding class ``class_index``'s logit.

        Softmax / none: channel ``c`` (one channel per class, background included). Sigmoid:
        channel ``c - 1`` (one channel per foreground class, each its own yes / no logit); the
        background has no channel (its probability is ``1 - max`` of the foreground's), so it
        cannot be a target.

        Raises
        ------
        SegXAIInputError
            ``class_index`` is not one of the card's classes, or is a sigmoid model's background.
        """
        if not 0 <= class_index < self.num_classes:
            raise SegXAIInputError(f"class_index {class_index}: the model {self.name!r} has {self.num_classes} classes "
                                   f"{self.class_names}")
        if self.output_activation != "sigmoid":
            return class_index
        if class_index == 0:
            raise SegXAIInputError(
                f"class {self.class_names[0]!r}: the sigmoid model {self.name!r} has no output channel for its "
                f"background (its probability is 1 - max of the foreground classes'); explain one of "
                f"{self.class_names[1:]}"
            )
        return class_index - 1

    def resolve(self, relative: str) -> Path:
        """A path from the card, resolved against the card's folder."""
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / relative).resolve()

    def check_input_count(self, count: int, what: str = "image(s)") -> None:
        """An error unless ``count`` inputs (images, volume nodes, channels) match the card's
        input channels; the one check every front end and step makes."""
        if count != len(self.input_channels):
            raise SegXAIInputError(
                f"model {self.name!r} takes {len(self.input_channels)} {what} "
                f"({', '.join(self.input_channels)}), got {count}"
            )

    def checksum(self) -> str:
        """SHA-256 of the card's canonical JSON and of the weights it names: identifies the model.

        Later analyses (patterns, risk models) record it and refuse to mix models.
        """
        identity = self.to_dict()
        # the input statistics describe the training data, not the model: adding or refining
        # them keeps the checksum (and every risk model, pattern and counterfactual recorded with it)
        identity.pop("input_expectations", None)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        if self.format == "nnunetv2":  # the plans, the labels and every fold's checkpoint
            folder = self.resolve(self.architecture["results_folder"])
            files = [folder / "plans.json", folder / "dataset.json"] + [
                folder / f"fold_{fold}" / self.architecture.get("checkpoint", "checkpoint_final.pth")
                for fold in self.architecture.get("folds", [])]
            for path in files:
                if path.is_file():
                    digest.update(sha256_of(path).encode())
            return digest.hexdigest()
        files = self.weights_files or ([self.architecture["file"]] if self.architecture.get("file") else [])
        for weights in files:  # every ensemble member's weights, in the card's order
            if self.resolve(weights).is_file():
                digest.update(sha256_of(self.resolve(weights)).encode())
        source = self.architecture.get("file")
        if self.format == "python" and source and self.resolve(source).is_file():
            digest.update(sha256_of(self.resolve(source)).encode())  # the network's code is part of the model
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        if not data["input_expectations"]:
            data.pop("input_expectations")
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
        if self.format == "python" and arch.get("file"):
            what = f"{arch['file']}:{arch['name']}"
        if self.format == "nnunetv2":
            what = str(self.resolve(arch["results_folder"]))
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
        if len(self.weights_files) > 1:
            lines.append(f"  ensemble     : {len(self.weights_files)} members (logits averaged)")
        if self.mirror_axes:
            lines.append(f"  mirroring    : axes {list(self.mirror_axes)} ({2 ** len(self.mirror_axes)} flips averaged)")
        if self.window_scheme != "monai":
            lines.append(f"  windows      : {self.window_scheme}")
        if self.resize_to_shape:
            lines.append(f"  resize to    : {list(self.resize_to_shape)}")
        if self.format == "nnunetv2":
            from .nnunet import nnunet_summary_lines

            # nnU-Net preprocesses with its own plans (no orientation; its spacing and normalisation)
            lines[4:6] = []
            lines.extend(nnunet_summary_lines(self))
        if self.input_expectations:
            expected = self.input_expectations
            made_for = " ".join(p for p in (expected.get("anatomy", ""), expected.get("modality", "")) if p)
            cases = f" (statistics of {expected['cases']} training cases)" if expected.get("cases") else ""
            lines.append(f"  expects      : {made_for or 'see input_expectations'}{cases}")
        if self.description:
            lines.insert(1, f"  {self.description}")
        for key, value in self.metrics.items():
            lines.append(f"  metric       : {key} = {value}")
        return "\n".join(lines)


# ---- schema (pydantic): validates a card's JSON; the ModelCard is built from the raw JSON ------
# strict: no coercion ("3" is not a number, true is not an integer), as the hand checks were;
# unknown keys are allowed (an architecture may name loader options such as network_key),
# except in intensity steps, whose keys depend on the kind
_STRICT = ConfigDict(strict=True, extra="allow")


def _whole(value: float) -> float:
    if not float(value).is_integer():
        raise problem("Input should be a whole number")
    return value


_Positive = Annotated[float, Field(gt=0)]
_PositiveWhole = Annotated[float, Field(gt=0), AfterValidator(_whole)]
# formats -> architecture fields they need
_ARCHITECTURE_NEEDS = {"monai": ("name", "weights"), "torchscript": ("file",), "bundle": ("path",),
                       "python": ("name", "weights"), "nnunetv2": ("results_folder",)}
# format "python": a class "module.path:Class" (importable), or "Class" with a file (dotted: nested classes)
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_IMPORTABLE_CLASS = re.compile(rf"{_DOTTED}:{_DOTTED}")
_CLASS_NAME = re.compile(_DOTTED)


class _ArchitectureSchema(BaseModel):
    model_config = _STRICT

    format: Literal[ARCHITECTURE_FORMATS]  # type: ignore[valid-type]  # first: the validators below read it
    name: Optional[str] = Field(None, validate_default=True)
    # one state dict, or a fold ensemble: one per member (formats monai and python)
    weights: Optional[Union[str, Annotated[list[str], Field(min_length=1)]]] = Field(None, validate_default=True)
    file: Optional[str] = Field(None, validate_default=True)
    path: Optional[str] = Field(None, validate_default=True)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    sha256: Optional[Union[str, list[str]]] = None
    # format nnunetv2: the results folder, its configuration, the folds ensembled, the checkpoint file name
    results_folder: Optional[str] = Field(None, validate_default=True)
    configuration: Optional[str] = None
    folds: Optional[Annotated[list[Union[Annotated[int, Field(ge=0)], Literal["all"]]], Field(min_length=1)]] = None
    checkpoint: Optional[str] = None

    @model_validator(mode="after")
    def _ensemble(self) -> "_ArchitectureSchema":
        if isinstance(self.weights, list) and self.format not in ("monai", "python"):
            raise PydanticCustomError("ensemble_format", f"weights: a list of state dicts (a fold ensemble) needs "
                                      f"format 'monai' or 'python', not {self.format!r}")
        if isinstance(self.sha256, list) and (not isinstance(self.weights, list) or len(self.sha256) != len(self.weights)):
            raise PydanticCustomError("ensemble_checksums", "sha256: a list needs one checksum per weights file")
        return self

    @field_validator("name", "weights", "file", "path", "results_folder")
    @classmethod
    def _needed_by_format(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        fmt = info.data.get("format")
        if value is None and info.field_name in _ARCHITECTURE_NEEDS.get(fmt, ()):
            raise PydanticCustomError("missing", f"Field required for format {fmt!r}")
        return value

    @model_validator(mode="after")
    def _python_class(self) -> "_ArchitectureSchema":
        if self.format != "python" or self.name is None:
            return self
        if self.file is None and not _IMPORTABLE_CLASS.fullmatch(self.name):
            raise ValueError(f"format 'python': name {self.name!r} should be 'module.path:Class' (or 'Class' with a "
                          "'file': a .py file beside the card)")
        if self.file is not None:
            if not _CLASS_NAME.fullmatch(self.name):
                raise ValueError(f"format 'python': name {self.name!r} should be the class name in the file {self.file!r}")
            if not self.file.endswith(".py"):
                raise ValueError(f"format 'python': file {self.file!r} should be a .py file")
        return self


class _ClassSchema(BaseModel):
    model_config = _STRICT

    name: str
    color: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)] = [128, 128, 128]


_INTENSITY_KEYS = ("nonzero", "center", "width", "lower", "upper", "b_min", "b_max", "clip", "scale", "offset")


class _IntensitySchema(BaseModel):
    """One step; which of the optional fields a step may / must have depends on its kind
    (:data:`INTENSITY_KINDS`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    kind: Literal[tuple(INTENSITY_KINDS)]  # type: ignore[valid-type]  # first: the validators below read it
    channels: Optional[list[Annotated[int, Field(ge=0)]]] = None
    nonzero: Optional[bool] = Field(None, validate_default=True)
    center: Optional[float] = Field(None, validate_default=True)
    width: Optional[Annotated[float, Field(gt=0)]] = Field(None, validate_default=True)
    lower: Optional[float] = Field(None, validate_default=True)
    upper: Optional[float] = Field(None, validate_default=True)
    b_min: Optional[float] = Field(None, validate_default=True)
    b_max: Optional[float] = Field(None, validate_default=True)
    clip: Optional[bool] = Field(None, validate_default=True)
    scale: Optional[float] = Field(None, validate_default=True)
    offset: Optional[float] = Field(None, validate_default=True)

    @field_validator(*_INTENSITY_KEYS)
    @classmethod
    def _fits_the_kind(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind is None:  # the kind itself is wrong: reported once, there
            return value
        required, optional = INTENSITY_KINDS[kind]
        if value is None and info.field_name in required:
            raise PydanticCustomError("missing", f"Field required for kind {kind!r}")
        if value is not None and info.field_name not in required + optional:
            raise PydanticCustomError("extra_forbidden", f"Extra inputs are not permitted for kind {kind!r}")
        return value


class _PreprocessingSchema(BaseModel):
    model_config = _STRICT

    orientation: Optional[Annotated[str, Field(min_length=3, max_length=3)]] = None  # axis codes, e.g. RAS
    spacing: Optional[Annotated[list[_Positive], Field(min_length=3, max_length=3)]] = None
    intensity: list[_IntensitySchema] = Field(default_factory=list)
    resize_to_shape: Optional[Annotated[list[_PositiveWhole], Field(min_length=3, max_length=3)]] = None

    @field_validator("intensity", mode="before")
    @classmethod
    def _one_step(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value  # a single step may stand alone


class _InferenceSchema(BaseModel):
    model_config = _STRICT

    patch_size: Annotated[list[_PositiveWhole], Field(min_length=3, max_length=3)]
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    blend: Literal[BLEND_MODES] = "gaussian"  # type: ignore[valid-type]
    sw_batch_size: Annotated[int, Field(ge=1)] = 1
    mirror_axes: list[Annotated[int, Field(ge=0, le=2)]] = Field(default_factory=list)
    window_scheme: Literal[WINDOW_SCHEMES] = "monai"  # type: ignore[valid-type]

    @field_validator("mirror_axes")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise PydanticCustomError("duplicate", "each axis at most once")
        return value


class _RangeSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    min: Annotated[list[_Positive], Field(min_length=3, max_length=3)]
    max: Annotated[list[_Positive], Field(min_length=3, max_length=3)]


class _ChannelStatisticsSchema(BaseModel):
    model_config = ConfigDict(strict=False, extra="allow")  # JSON numbers: ints are floats here

    percentile_00_5: float
    median: float
    percentile_99_5: float
    negative_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0


class _ExpectationsSchema(BaseModel):
    """``input_expectations`` (:mod:`SegXAILib.models.expectations`); every part optional."""

    model_config = _STRICT

    modality: str = ""
    anatomy: str = ""
    cases: Optional[Annotated[int, Field(ge=1)]] = None
    source: str = ""
    channels: dict[str, _ChannelStatisticsSchema] = Field(default_factory=dict)
    spacing_mm: Optional[_RangeSchema] = None
    extent_mm: Optional[_RangeSchema] = None


class _CardSchema(BaseModel):
    model_config = _STRICT

    name: str
    architecture: _ArchitectureSchema
    input_channels: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    classes: list[_ClassSchema]
    output_activation: Literal[ACTIVATIONS] = "softmax"  # type: ignore[valid-type]
    preprocessing: Optional[_PreprocessingSchema] = None
    inference: _InferenceSchema
    version: Any = "0"  # any JSON value, kept as its str()
    description: str = ""
    provenance: Optional[dict[str, Any]] = None
    metrics: Optional[dict[str, Any]] = None
    schema_version: Literal[CARD_SCHEMA_VERSION] = CARD_SCHEMA_VERSION  # type: ignore[valid-type]
    input_expectations: Optional[_ExpectationsSchema] = None

    @field_validator("classes")
    @classmethod
    def _background_and_one(cls, value: list[_ClassSchema]) -> list[_ClassSchema]:
        if len(value) < 2:
            raise PydanticCustomError("too_short", "must list the background and at least one class")
        return value


def model_card_from_dict(data: dict[str, Any], path: Path | None = None) -> ModelCard:
    """Validate a card's JSON content (:class:`_CardSchema`) and build the card.

    Raises
    ------
    SegXAIInputError
        Naming the card and every offending field path, e.g. ``classes.1.color.0``.

    Notes
    -----
    The card keeps the JSON's own ``architecture`` / ``preprocessing`` / ``inference`` objects
    (with the defaults filled in, as before): :meth:`ModelCard.checksum` hashes them, so the
    validated (coerced) values must not replace them.
    """
    where = f"model card {path}" if path else "model card"
    architecture = data.get("architecture") if isinstance(data, dict) else None
    if isinstance(architecture, dict) and architecture.get("format") == "nnunetv2":
        from .nnunet import nnunet_card_data

        data = nnunet_card_data(data, path)  # the rest of the card from the results folder
    validate(_CardSchema, data, where)
    architecture = data["architecture"]
    if architecture["format"] in ("monai", "python"):
        architecture.setdefault("kwargs", {})
    preprocessing = data.get("preprocessing", {}) or {}
    intensity = preprocessing.setdefault("intensity", [])
    if isinstance(intensity, dict):
        preprocessing["intensity"] = [intensity]
    inference = data["inference"]
    inference.setdefault("overlap", 0.25)
    inference.setdefault("blend", "gaussian")
    inference.setdefault("sw_batch_size", 1)
    classes = [ClassInfo(entry["name"], tuple(entry.get("color", [128, 128, 128]))) for entry in data["classes"]]
    return ModelCard(
        name=data["name"],
        architecture=architecture,
        input_channels=list(data["input_channels"]),
        classes=classes,  # type: ignore[arg-type]
        preprocessing=preprocessing,
        inference=inference,
        output_activation=data.get("output_activation", "softmax"),
        version=str(data.get("version", "0")),
        description=str(data.get("description", "")),
        provenance=dict(data.get("provenance", {}) or {}),
        metrics=dict(data.get("metrics", {}) or {}),
        schema_version=data.get("schema_version", CARD_SCHEMA_VERSION),
        input_expectations=dict(data.get("input_expectations", {}) or {}),
        path=path.resolve() if path else None,
    )


def load_model_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate a model card; a folder means its ``model_card.json``, or, without one,
    the card a MONAI bundle's ``configs/metadata.json`` and inference config describe
    (:func:`SegXAILib.models.bundle.bundle_card_dict`) or the card built from an nnU-Net v2
    results folder (``dataset.json`` and ``plans.json``)."""
    path = Path(path)
    if path.is_dir():
        from .bundle import bundle_card_dict, is_bundle_folder
        from .nnunet import is_results_folder

        if not (path / "model_card.json").is_file():
            # the card is the folder: paths resolve against it as if a model_card.json sat there
            if is_bundle_folder(path):
                return model_card_from_dict(bundle_card_dict(path), path / "model_card.json")
            if is_results_folder(path):
                return model_card_from_dict({"architecture": {"format": "nnunetv2", "results_folder": "."}},
                                            path / "model_card.json")
        path = path / "model_card.json"
    if not path.is_file():
        raise SegXAIInputError(f"model card {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SegXAIInputError(f"model card {path}: not valid JSON ({error})") from None
    return model_card_from_dict(data, path)
