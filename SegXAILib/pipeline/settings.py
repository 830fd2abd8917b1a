"""One typed, validated description of a case run: :class:`CaseSettings`.

Every front end (the CLI, ``segxai run``, the demo, the Slicer Logic, cohort building) builds
a :class:`CaseSettings` and hands it to :func:`~SegXAILib.pipeline.run_case`; nothing else
decides what a run does. From JSON or a dict (:meth:`CaseSettings.from_dict`) a bad value is a
:class:`~SegXAILib.image.SegXAIInputError` naming the field path; built from Python, pydantic's
``ValidationError`` (a ``ValueError`` too) names it. Settings round-trip through JSON (:meth:`CaseSettings.to_json`,
:meth:`CaseSettings.from_json`, :meth:`CaseSettings.load`). An unknown key anywhere, an
unknown method, or a parameter the method does not take is an error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ..image import SegXAIInputError
from ..topology.risk import shipped_risk_model
from ..validation import input_error

__all__ = [
    "MethodSettings",
    "InstanceSettings",
    "QASettings",
    "Agg2ExpSettings",
    "PrecisionSettings",
    "UncertaintySettings",
    "CounterfactualSettings",
    "CaseSettings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class MethodSettings(_Strict):
    """One class-level attribution map: a registry method, its parameters and its target.

    ``target`` is a target text (``class:NAME``, ``class_threshold:NAME:T``, ``instance:ID``,
    ``region:MASKFILE``, ``voxel:R,A,S``); empty means the case's structure (``class:<CaseSettings.class_name>``).
    ``label`` names the map in outputs (``maps/<label>_<channel>.nii.gz``); the method name by
    default, so that one method can appear twice with other parameters.
    """

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    target: str = ""
    # a file-name part of the outputs (maps/<label>_<channel>.nii.gz): no path separators
    label: str = Field(default="", pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.+-]*)?$")

    @model_validator(mode="after")
    def _check_method(self) -> "MethodSettings":
        from ..attribution import check_params, get_method

        get_method(self.method)
        # typed and range-checked by the method's own parameter list; unknown names refused
        checked = check_params(self.method, self.params)
        if checked != self.params:
            object.__setattr__(self, "params", checked)
        return self

    @property
    def name(self) -> str:
        """The map's name in a :class:`~SegXAILib.pipeline.Case` and in the output files."""
        return self.label or self.method

    @classmethod
    def parse(cls, text: str) -> "MethodSettings":
        """``NAME`` or ``NAME:k=v,k=v`` (values parsed by the method's parameter types), as
        command lines give a method."""
        from ..attribution import parse_params

        name, _, rest = text.partition(":")
        params = parse_params(name, [p for p in rest.split(",") if p]) if rest else {}
        try:
            return cls(method=name, params=params)
        except ValidationError as error:
            raise input_error(f"method {text!r}", error) from None


class InstanceSettings(_Strict):
    """Instances of the structure and their saliency (paper 001, METHODS section 3).

    ``ids``: which instances get instance maps (``None``: every instance, largest first, at most
    ``max_instances``; ``[]``: none); or ``click_ras``: the instance at (or within
    ``click_radius_mm`` of) a RAS point in mm, as a click in a viewer gives it. ``aggregations``: ``mean`` (eq. 2) and / or ``max``
    (eq. 3). ``n_samples`` / ``noise_level`` / ``seed``: SmoothGrad's noise; ``batch_size``:
    samples (mean) or voxel terms (max) per backward (0: the largest that fits in the free
    memory, at most 8). ``min_voxels``: smaller components are
    not instances. ``shell_mm``: the lesion table's shell.
    """

    enabled: bool = True
    ids: Optional[list[int]] = None
    max_instances: Optional[int] = Field(default=None, ge=1)
    aggregations: list[Literal["mean", "max"]] = Field(default_factory=lambda: ["max"], min_length=1)
    n_samples: int = Field(default=20, ge=1)
    noise_level: float = Field(default=0.1, ge=0.0)
    batch_size: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)
    min_voxels: int = Field(default=1, ge=1)
    shell_mm: float = Field(default=5.0, ge=0.0)
    click_ras: Optional[tuple[float, float, float]] = None
    click_radius_mm: float = Field(default=5.0, ge=0.0)

    @model_validator(mode="after")
    def _one_selection(self) -> "InstanceSettings":
        if self.click_ras is not None and self.ids is not None:
            raise ValueError("give ids or click_ras, not both")
        return self

    @field_validator("ids")
    @classmethod
    def _positive_ids(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and any(i < 1 for i in value):
            raise ValueError("instance ids start at 1 (1 = the largest instance)")
        return value

    @field_validator("aggregations")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each aggregation at most once")
        return value


class QASettings(_Strict):
    """The QA risk of the structure's contour (paper 000, METHODS section 6).

    ``risk_model``: a risk model JSON (``risk_<method>.json``) or ``bundled:<model>/<method>``
    (a shipped one, e.g. ``bundled:lesions/feature:mean_entropy_foreground``). It fixes the method, its
    parameters, the target and the channel reduction it was calibrated with. Without a risk
    model, ``method`` (a class-level map's name in ``methods``) gives the EC curve alone.
    """

    risk_model: Optional[str] = None
    method: str = ""


class Agg2ExpSettings(_Strict):
    """Paper 003's RoI importance matrix of the case: each row a class explained with ``method``
    (its class target), each column a region (the predicted classes, the reference and the
    extra RoIs given to :func:`~SegXAILib.pipeline.run_case`)."""

    enabled: bool = False
    method: str = "smoothgrad"
    params: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["absolute", "positive", "negative"] = "absolute"

    @model_validator(mode="after")
    def _check_method(self) -> "Agg2ExpSettings":
        from ..attribution import check_params

        checked = check_params(self.method, self.params)
        if checked != self.params:
            object.__setattr__(self, "params", checked)
        return self


class UncertaintySettings(_Strict):
    """Predictive uncertainty of the case from prediction samples
    (:func:`~SegXAILib.uncertainty.estimate_uncertainty`).

    ``sources``: sample source -> its parameters (:func:`~SegXAILib.uncertainty.source_specs`):
    ``flips`` (the card's mirror axes by default), ``gamma``, ``noise``, ``intensity_scale``,
    ``spatial``, ``mc_dropout``, ``ensemble`` (the card's members, e.g. nnU-Net folds or a seed
    ensemble, and ``models``: more model cards of the same classes). ``samples``: None means
    every flip / member combination, or 10 with a random source. ``band_width_mm``: the
    boundary band of the per-structure and per-lesion entropy; ``region_width_mm``: how far a
    sample's version of a lesion may lie from it.
    """

    enabled: bool = False
    sources: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"flips": {}})
    samples: Optional[int] = Field(default=None, ge=2, le=65535)
    seed: int = Field(default=0, ge=0)
    models: list[str] = Field(default_factory=list)
    band_width_mm: float = Field(default=2.0, ge=0.0)
    region_width_mm: float = Field(default=10.0, ge=0.0)

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from ..uncertainty import check_sources

        check_sources(value)  # names, parameters, types and ranges; the defaults are filled in at run time
        return value

    @field_validator("models")
    @classmethod
    def _models_need_ensemble(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and "ensemble" not in (info.data.get("sources") or {}):
            raise ValueError("more models need the source 'ensemble' (each sample one member)")
        return value


class CounterfactualSettings(_Strict):
    """Counterfactual relevance of the case's instances (paper 004, METHODS section 7):
    a trained generator pair (:func:`~SegXAILib.counterfactual.train_counterfactual`) rewrites a
    patch around each chosen instance into G+(x) (more lesion) and G-(x) (less), and
    ``R = G+(x) - G-(x)``.

    ``generators``: the generators file (``generators.pt``) or the folder ``segxai
    counterfactual train`` wrote it into. ``ids`` / ``max_instances`` / ``click_ras`` /
    ``click_radius_mm`` choose the instances as :class:`InstanceSettings` does (``None``: every
    instance, largest first, at most ``max_instances``; ``[]``: none). The instances are the
    case's (``instances.enabled`` must be true).
    """

    enabled: bool = False
    generators: str = Field(default="", validate_default=True)
    ids: Optional[list[int]] = None
    max_instances: Optional[int] = Field(default=None, ge=1)
    click_ras: Optional[tuple[float, float, float]] = None
    click_radius_mm: float = Field(default=5.0, ge=0.0)

    @field_validator("ids")
    @classmethod
    def _positive_ids(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and any(i < 1 for i in value):
            raise ValueError("instance ids start at 1 (1 = the largest instance)")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each instance id at most once")
        return value

    @field_validator("click_ras")
    @classmethod
    def _finite_click(cls, value: Optional[tuple[float, float, float]]) -> Optional[tuple[float, float, float]]:
        import math

        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError("expected three finite RAS coordinates in mm")
        return value

    @field_validator("generators")
    @classmethod
    def _generators_when_enabled(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("enabled") and not value.strip():
            raise ValueError("required when counterfactual.enabled is true (a generators file or the folder "
                             "'segxai counterfactual train' wrote)")
        return value

    @model_validator(mode="after")
    def _one_selection(self) -> "CounterfactualSettings":
        if self.click_ras is not None and self.ids is not None:
            raise ValueError("give ids or click_ras, not both")
        return self


class PrecisionSettings(_Strict):
    """Numerics. ``segmentation``: ``auto`` is mixed precision on CUDA and float32 elsewhere.
    Attributions (class maps, instance maps, QA, Agg2Exp) always run in exact float32 with TF32
    off on CUDA, so that maps equal the CPU's to float32 rounding on every device."""

    segmentation: Literal["auto", "float32", "mixed"] = "auto"
    window_batch: int = Field(default=1, ge=1)


def _demo_uncertainty(samples: int) -> UncertaintySettings:
    """The demo presets' uncertainty: test-time flips of the left-right axis (the lesion card's
    model grid is RAS, so axis 0 is R-L; a brain is roughly mirror-symmetric about the
    mid-sagittal plane, not front-back or top-bottom) with mild Gaussian noise (5 % of each
    channel's standard deviation, after the card's z-score), seeded. The card has no mirror axes
    and no dropout, so these are the sources that make sense for it; a sample costs about one
    prediction."""
    return UncertaintySettings(enabled=True, sources={"flips": {"axes": [0]}, "noise": {"std": 0.05}},
                               samples=samples, seed=0)


class CaseSettings(_Strict):
    """What one case run does (see the module docstring).

    ``model``: a bundled name (``lesions``) or a model card file / folder. ``class_name``: the
    structure the instances, QA and default targets are about (the first foreground class when
    empty). ``methods``: class-level maps. ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``,
    ``mps``. ``trust_code``: allow the models whose loading runs their own code, MONAI bundles
    (their configs) and ``python`` model cards (their module is imported); ``trust_bundle``, its
    former name, is accepted in input. ``strict``: refuse an input that does not fit what the
    model card expects (:mod:`SegXAILib.models.expectations`) instead of recording a warning.
    ``resample_slices``: a DICOM series with missing or unevenly spaced slices is resampled onto
    a regular grid (:func:`SegXAILib.io.check_dicom_series`) instead of refused.
    """

    format: Literal["segxai-case-settings"] = "segxai-case-settings"
    version: Literal[1] = 1
    model: str = "lesions"
    class_name: str = ""
    methods: list[MethodSettings] = Field(default_factory=list)
    instances: InstanceSettings = Field(default_factory=InstanceSettings)
    qa: QASettings = Field(default_factory=QASettings)
    agg2exp: Agg2ExpSettings = Field(default_factory=Agg2ExpSettings)
    uncertainty: UncertaintySettings = Field(default_factory=UncertaintySettings)
    counterfactual: CounterfactualSettings = Field(default_factory=CounterfactualSettings)
    precision: PrecisionSettings = Field(default_factory=PrecisionSettings)
    device: str = "auto"
    # one name for the flag everywhere (load_model's trust_code, --trust-code); old files say trust_bundle
    trust_code: bool = Field(default=False, validation_alias=AliasChoices("trust_code", "trust_bundle"))
    # refuse an input the model card's expectations flag (SegXAILib.models.expectations) instead of warning
    strict: bool = False
    # a DICOM series with missing or unevenly spaced slices: resampled onto a regular grid, not refused
    resample_slices: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CaseSettings":
        names = [m.name for m in self.methods]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"methods: map name(s) {duplicated} appear twice; give each a distinct label")
        if self.qa.method and self.qa.method not in names:
            raise ValueError(f"qa.method {self.qa.method!r} is not one of the methods {names}")
        if self.counterfactual.enabled and not self.instances.enabled:
            raise ValueError("counterfactual.enabled: explains the case's instances; it needs instances.enabled")
        return self

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def trust_bundle(self) -> bool:
        """The former name of :attr:`trust_code` (read only)."""
        return self.trust_code

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "settings") -> "CaseSettings":
        """Validated settings from a JSON-ready dict; errors name ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise input_error(source, error) from None

    @classmethod
    def from_json(cls, text: str, source: str = "settings") -> "CaseSettings":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SegXAIInputError(f"{source}: not JSON ({error.msg}, line {error.lineno})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CaseSettings":
        """Settings from a JSON file (``segxai run SETTINGS.json``)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SegXAIInputError(f"settings {path}: cannot read ({error})") from None
        return cls.from_json(text, str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Union[str, os.PathLike]) -> Path:
        from ..io import atomic_path

        with atomic_path(path) as temporary:
            temporary.write_text(self.to_json(), encoding="utf-8")
        return Path(path)

    def method(self, name: str) -> MethodSettings:
        for method in self.methods:
            if method.name == name:
                return method
        raise SegXAIInputError(f"settings: no method named {name!r}; methods are {[m.name for m in self.methods]}")

    # ---- presets --------------------------------------------------------------------
    @classmethod
    def demo(cls, device: str = "auto") -> "CaseSettings":
        """The demo's run (``make demo``): four class-level maps of the lesion class, the max
        instance map of every lesion, the shipped guided Grad-CAM risk model, Agg2Exp, and the
        prediction's uncertainty from 8 samples (:func:`_demo_uncertainty`)."""
        return cls(
            model="lesions",
            methods=[
                MethodSettings(method="smoothgrad", params={"n_samples": 8, "noise_level": 0.1, "seed": 0}),
                MethodSettings(method="gradcam_plusplus", params={"layer": "bottleneck_decoder"}),
                MethodSettings(method="guided_gradcam", params={"layer": "bottleneck_decoder", "batch_size": 16}),
                MethodSettings(method="pattern_attribution"),
            ],
            instances=InstanceSettings(aggregations=["max"], n_samples=4, batch_size=4, seed=0),
            qa=QASettings(risk_model=shipped_risk_model("lesions")),
            agg2exp=Agg2ExpSettings(enabled=True, method="smoothgrad",
                                    params={"n_samples": 8, "noise_level": 0.1, "seed": 0}),
            uncertainty=_demo_uncertainty(samples=8),
            device=device,
        )

    @classmethod
    def quick_demo(cls, device: str = "auto") -> "CaseSettings":
        """The quick demo (``segxai demo --quick``, the test suite's setting): fewer samples, the
        guided map from one modified backward instead of paper 000's per-voxel sum, two
        instance maps, 4 uncertainty samples."""
        return cls(
            model="lesions",
            methods=[
                MethodSettings(method="smoothgrad", params={"n_samples": 2, "noise_level": 0.1, "seed": 0}),
                MethodSettings(method="gradcam_plusplus", params={"layer": "bottleneck_decoder"}),
                MethodSettings(method="guided_gradcam", params={"layer": "bottleneck_decoder", "aggregation": "target"}),
                MethodSettings(method="pattern_attribution"),
            ],
            instances=InstanceSettings(aggregations=["max"], n_samples=1, batch_size=4, seed=0, max_instances=2),
            qa=QASettings(risk_model=shipped_risk_model("lesions")),
            agg2exp=Agg2ExpSettings(enabled=True, method="smoothgrad",
                                    params={"n_samples": 2, "noise_level": 0.1, "seed": 0}),
            uncertainty=_demo_uncertainty(samples=4),
            device=device,
        )
