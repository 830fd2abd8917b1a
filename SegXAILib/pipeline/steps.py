"""The steps of a case run, each callable on its own (scikit-image style plain functions).

:func:`~SegXAILib.pipeline.run_case` chains them; a notebook or a front end may call one at a
time. Every attribution step reuses the case's one prediction
(:attr:`Segmentation.model_labels <SegXAILib.models.Segmentation>`) and runs in exact float32
(TF32 off on CUDA): :data:`ATTRIBUTION_AMP` is the one precision policy of attributions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..image import Image, SegXAIInputError
from ..models import LoadedModel, Segmentation, load_model, load_model_card, segment
from ..models.card import ModelCard
from ..models.inference import exact_float32
from ..progress import CancelToken, ProgressCallback, report
from ..qa.scores import UNCERTAINTY_PREFIXES
from ..topology.cohort import DOMAIN_FEATURES, QA_TTA_SOURCES
from ..topology.risk import FEATURE_PREFIX
from .case import Case, ContourQA, QAResult
from .settings import CaseSettings, MethodSettings, UncertaintySettings

__all__ = [
    "ATTRIBUTION_AMP",
    "resolve_model_card",
    "load_case_model",
    "ModelCache",
    "check_channels",
    "check_case_input",
    "read_case_images",
    "predict",
    "explain_map",
    "channel_sum",
    "find_case_instances",
    "select_instances",
    "explain_instances",
    "lesion_rows",
    "LESION_UNCERTAINTY_KEYS",
    "estimate_case_uncertainty",
    "GENERATORS_FILE",
    "resolve_generators_path",
    "load_case_generators",
    "select_counterfactual_instances",
    "explain_counterfactuals",
    "resolve_risk_model",
    "score_qa",
    "contour_classes",
    "score_contours",
    "agg2exp_case",
    "agg2exp_matrix",
]

#: attributions never run in mixed precision: maps equal the CPU's to float32 rounding
ATTRIBUTION_AMP = False


# ---------------------------------------------------------------------------- model, images


def resolve_model_card(model: Union[str, Path, ModelCard]) -> ModelCard:
    """A model given by name or path: a bundled name (``lesions``, ``parotid-S2``...),
    ``deepbet`` (its first stage, shipped in the deepbet wheel), or a card file / folder."""
    from ..sample_data import BUNDLED_MODELS, bundled_model_card

    if isinstance(model, ModelCard):
        return model
    if str(model) in BUNDLED_MODELS:
        return load_model_card(bundled_model_card(str(model)))
    if str(model) == "deepbet":
        from ..models.third_party import deepbet_model_card

        return deepbet_model_card()
    return load_model_card(model)


def load_case_model(settings: CaseSettings) -> LoadedModel:
    """The network of ``settings.model`` on ``settings.device``."""
    return load_model(resolve_model_card(settings.model), device=settings.device, trust_code=settings.trust_code)


class ModelCache:
    """Keeps the last loaded network between runs (a GUI session, a batch worker), keyed by the
    card file, its contents and the device. ``loads`` counts the networks built."""

    def __init__(self) -> None:
        self._model: Optional[LoadedModel] = None
        self._key: Optional[tuple] = None
        self.loads = 0

    def get(self, settings: CaseSettings) -> LoadedModel:
        from ..models import resolve_device

        card = resolve_model_card(settings.model)
        device = resolve_device(settings.device)
        stamp = card.path.stat().st_mtime_ns if card.path is not None and card.path.exists() else None
        key = (str(card.path), stamp, card.checksum(), str(device), settings.trust_code)
        if self._key != key:
            self._model = None  # release the previous network before building the next
            self._model = load_model(card, device=device, trust_code=settings.trust_code)
            self._key = key
            self.loads += 1
        assert self._model is not None
        return self._model


def check_channels(image: Image, card: ModelCard) -> Image:
    """``image`` if it has one channel per model input, else an error naming both counts."""
    card.check_input_count(image.num_channels, "input volume(s)")
    return image


def check_case_input(image: Image, card: ModelCard, strict: bool = False) -> list[str]:
    """Is ``image`` the scan ``card``'s model was made for? The one input check of every front end.

    The channel count must match; then the input is compared with the card's
    ``input_expectations`` (modality, intensities, spacing, extent:
    :func:`SegXAILib.models.expectations.compare_with_card`).

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, one channel per model input in the card's order.
    card : ModelCard
    strict : bool
        Refuse a mismatch instead of returning it.

    Returns
    -------
    list of str
        One sentence per mismatch (empty when the input fits); each is also logged as a warning
        on the ``SegXAILib.input`` logger (the command line prints them on standard error).

    Raises
    ------
    SegXAIInputError
        A wrong channel count; with ``strict``, any mismatch (the message lists them).
    """
    import logging

    from ..models.expectations import check_input

    check_channels(image, card)
    warnings = check_input(image, card, strict)
    for warning in warnings:
        logging.getLogger("SegXAILib.input").warning("%s", warning)
    return warnings


def read_case_images(paths: Sequence[Union[str, Path]], card: ModelCard, resample_slices: bool = False) -> Image:
    """One file (or DICOM series folder) per model input channel, in the card's order;
    ``resample_slices`` (``CaseSettings.resample_slices``): a DICOM series with missing or
    unevenly spaced slices is resampled onto a regular grid instead of refused."""
    from ..io import read_channels

    card.check_input_count(len(paths), "image(s)")
    return read_channels(list(paths), card.input_channels, resample_slices=resample_slices)


def structure_index(card: ModelCard, class_name: str) -> int:
    """The class index of ``class_name`` (the first foreground class when empty)."""
    if not class_name:
        return 1
    if class_name not in card.class_names[1:]:
        raise SegXAIInputError(f"class_name {class_name!r}: the model's foreground classes are {card.class_names[1:]}")
    return card.class_names.index(class_name)


def predict(
    image: Image,
    model: LoadedModel,
    settings: Optional[CaseSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Segmentation:
    """The case's one prediction (labels and probabilities on the input grid, labels on the
    model grid for the attribution steps)."""
    check_channels(image, model.card)
    policy = (settings or CaseSettings()).precision.segmentation
    amp = None if policy == "auto" else policy == "mixed"
    return segment(image, model, amp=amp, progress=progress, cancel=cancel)


# ---------------------------------------------------------------------------- class-level maps


def _target_text(method: MethodSettings, structure: str) -> str:
    return method.target or f"class:{structure}"


def explain_map(
    image: Image,
    model: LoadedModel,
    segmentation: Segmentation,
    method: MethodSettings,
    structure: str,
    window_batch: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
):
    """One class-level map (:class:`~SegXAILib.attribution.AttributionResult`, ``(C, I, J, K)``
    on the input grid) of ``method`` with the prediction ``segmentation`` (no second prediction)."""
    from ..attribution import explain

    return explain(image, model, method.method, target=_target_text(method, structure), params=dict(method.params),
                   amp=ATTRIBUTION_AMP, window_batch=window_batch, prediction=segmentation, progress=progress,
                   cancel=cancel)


def channel_sum(maps: Image) -> np.ndarray:
    """``(I, J, K)`` float32: the per-channel maps summed (in float64)."""
    return maps.array.astype(np.float64).sum(axis=0).astype(np.float32)


def _same_map(result, method: str, params: Mapping[str, Any], target: str) -> bool:
    """Whether an AttributionResult was made by ``method`` with ``params`` (defaults included)
    for the class target ``target`` (``class:NAME``)."""
    from ..attribution import get_method

    if result.method != method:
        return False
    defaults = {p.name: p.default for p in get_method(method).parameters}
    wanted = json.loads(json.dumps({**defaults, **params}, default=str))
    made = json.loads(json.dumps(result.parameters, default=str))
    kind = result.target.get("spec")
    return made == wanted and kind == "class" and f"class:{result.target.get('class_name')}" == target


# ---------------------------------------------------------------------------- instances


def find_case_instances(segmentation: Segmentation, class_index: int, min_voxels: int = 1):
    """``(labels (I, J, K) int32, instances)``: 26-connected components of the class, 1 = largest."""
    from ..instances import find_instances

    return find_instances(segmentation.mask(class_index), segmentation.probabilities.array[class_index],
                          min_voxels=min_voxels, grid=segmentation.labels)


def select_instances(case: Case) -> list[int]:
    """The instance ids that get instance maps under ``case.settings.instances``."""
    return _chosen_instances(case, case.settings.instances, "instances")


def _chosen_instances(case: Case, chosen: Any, section: str) -> list[int]:
    """The instance ids a selection (``ids``, ``max_instances``, ``click_ras``,
    ``click_radius_mm``) of the settings' ``section`` picks; errors name its fields."""
    from ..instances import instance_at

    count = len(case.instances)
    if chosen.click_ras is not None:
        if count == 0:
            raise SegXAIInputError(f"{section}.click_ras: the prediction has no instance of {case.structure!r}")
        labels = case.instance_labels.array[0]
        try:
            return [instance_at(labels, case.image, chosen.click_ras, radius_mm=chosen.click_radius_mm)]
        except SegXAIInputError as error:
            raise SegXAIInputError(f"{section}.click_ras {list(chosen.click_ras)}: {error}") from None
    if chosen.ids is not None:
        unknown = [i for i in chosen.ids if i > count]
        if unknown:
            raise SegXAIInputError(
                f"{section}.ids: no instance {', '.join(map(str, unknown))}; the prediction has {count} instance(s) of "
                f"{case.structure!r} (ids 1.. by decreasing size, at least {case.settings.instances.min_voxels} voxels)"
            )
        return list(chosen.ids)
    return [i.id for i in case.instances][: chosen.max_instances]


def explain_instances(
    case: Case,
    model: LoadedModel,
    instance_ids: Sequence[int],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[int, dict[str, Image]]:
    """Paper 001's instance saliency of each instance: ``{id: {aggregation: Image (C, I, J, K)}}``."""
    from ..instances import instance_saliency

    chosen = case.settings.instances
    if case.instance_labels is None:
        raise SegXAIInputError("instance saliency: find the case's instances first")
    with exact_float32(model.device):
        return instance_saliency(
            case.image, model, case.instance_labels.array[0], list(instance_ids), class_index=case.class_index,
            aggregations=tuple(chosen.aggregations), n_samples=chosen.n_samples, noise_level=chosen.noise_level,
            batch_size=chosen.batch_size, seed=chosen.seed, window_batch=case.settings.precision.window_batch,
            progress=progress, cancel=cancel,
        )


def reference_classes(case: Case) -> Optional[np.ndarray]:
    """``(I, J, K)`` int64 class indices of ``case.reference``: a label map of the card's classes;
    for a model with one foreground class any non-zero voxel is that class (a binary mask, or a
    map of lesion ids, means the structure)."""
    if case.reference is None:
        return None
    values = case.reference.array[0]
    if len(case.card.classes) == 2:
        return (values != 0).astype(np.int64)
    return np.rint(values).astype(np.int64)


def lesion_rows(case: Case) -> list[dict]:
    """The case's lesion table: :func:`SegXAILib.instances.lesion_rows` of its instances, their
    instance maps, its reference and ``settings.instances.shell_mm`` (one row per predicted
    instance, then one per missed reference lesion; [] without instances)."""
    from ..instances import lesion_rows as instance_rows

    if case.instance_labels is None:
        return []
    classes = reference_classes(case)
    rows = instance_rows(case.instances, case.instance_labels.array[0], case.image, case.instance_maps,
                         reference_mask=None if classes is None else classes == case.class_index,
                         shell_mm=case.settings.instances.shell_mm)
    if case.uncertainty is not None:
        # the uncertainty's instances are the same components of the same mask (same min_voxels)
        per_instance = {row.instance: row for row in case.uncertainty.instances if row.class_index == case.class_index}
        for row in rows:
            found = per_instance.get(row.get("id"))
            if found is not None:
                row["uncertainty"] = {key: getattr(found, key) for key in LESION_UNCERTAINTY_KEYS}
    return rows


#: per-lesion uncertainty columns of the lesion table (:class:`~SegXAILib.uncertainty.RegionUncertainty`)
LESION_UNCERTAINTY_KEYS = ("mean_confidence", "mean_entropy", "mean_mutual_information", "boundary_entropy",
                           "pairwise_dice", "volume_cv", "soft_dice_confidence")


def estimate_case_uncertainty(
    case: Case,
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
):
    """:func:`~SegXAILib.uncertainty.estimate_uncertainty` of the case under
    ``case.settings.uncertainty``, its instances those of the case (the prediction and
    ``instances.min_voxels`` are the case's)."""
    from ..uncertainty import estimate_uncertainty

    chosen = case.settings.uncertainty
    models = [model]
    for text in chosen.models:
        card = resolve_model_card(text)
        models.append(load_model(card, device=model.device, trust_code=case.settings.trust_code))
    amp = {"auto": None, "float32": False, "mixed": True}[case.settings.precision.segmentation]
    return estimate_uncertainty(
        case.image, models if len(models) > 1 else model, sources=chosen.sources, samples=chosen.samples,
        seed=chosen.seed, prediction=case.segmentation, band_width=chosen.band_width_mm,
        region_width=chosen.region_width_mm, width_unit="mm", min_instance_voxels=case.settings.instances.min_voxels,
        amp=amp, progress=progress, cancel=cancel)


# ---------------------------------------------------------------------------- counterfactuals

#: the generators file ``segxai counterfactual train`` writes into its folder
GENERATORS_FILE = "generators.pt"


def resolve_generators_path(text: Union[str, Path]) -> Path:
    """The generators file of ``counterfactual.generators``: a file, or a folder holding
    :data:`GENERATORS_FILE`."""
    path = Path(text)
    if path.is_dir():
        path = path / GENERATORS_FILE
    if not path.is_file():
        raise SegXAIInputError(f"counterfactual.generators {text}: no generators file (a file, or a folder holding "
                               f"{GENERATORS_FILE} as 'segxai counterfactual train' writes it)")
    return path


def load_case_generators(case: Case, model: LoadedModel):
    """``(generators, info)``: the pair of ``case.settings.counterfactual.generators`` on the
    model's device (read with ``weights_only=True``), checked to be trained for the case's model
    and structure; ``info`` (path, SHA-256 of the file, model, class, geometry, training config)
    is what ``counterfactual.json`` records."""
    from ..counterfactual import load_counterfactual_generators
    from .write import file_sha256

    path = resolve_generators_path(case.settings.counterfactual.generators)
    try:
        generators = load_counterfactual_generators(path, model.device)
    except SegXAIInputError as error:  # "generators <path>: ..." -> the settings field
        raise SegXAIInputError(f"counterfactual.{error}") from None
    if generators.model_name and generators.model_name != case.card.name:
        raise SegXAIInputError(f"counterfactual.generators {path}: trained against model {generators.model_name!r}, "
                               f"the case's model is {case.card.name!r}")
    if generators.class_index != case.class_index:
        trained = case.card.class_names[generators.class_index] if generators.class_index < len(case.card.classes) \
            else str(generators.class_index)
        raise SegXAIInputError(f"counterfactual.generators {path}: trained for class {trained!r}, the case's "
                               f"structure is {case.structure!r}")
    info = {"path": str(path.resolve()), "sha256": file_sha256(path), "model_name": generators.model_name,
            "class_index": generators.class_index, "geometry": generators.geometry.describe(),
            "config": generators.config.to_dict()}
    return generators, info


def select_counterfactual_instances(case: Case) -> list[int]:
    """The instance ids ``case.settings.counterfactual`` selects (as :func:`select_instances`
    does for instance maps)."""
    if case.instance_labels is None:
        raise SegXAIInputError("counterfactual: the case has no instances (settings.instances.enabled is false)")
    return _chosen_instances(case, case.settings.counterfactual, "counterfactual")


def explain_counterfactuals(
    case: Case,
    model: LoadedModel,
    generators: Any,
    instance_ids: Sequence[int],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict:
    """:func:`~SegXAILib.counterfactual.counterfactual_relevance` of each instance (its mask
    the region): ``{id: CounterfactualRelevance}``, maps ``(C, I, J, K)`` on the input grid."""
    from ..counterfactual import counterfactual_relevance
    from ..progress import track

    if case.instance_labels is None:
        raise SegXAIInputError("counterfactual: the case has no instances (settings.instances.enabled is false)")
    labels = case.instance_labels.array[0]
    results = {}
    with exact_float32(model.device):
        for identifier in track([int(i) for i in instance_ids], progress, cancel, "counterfactual relevance"):
            if not 1 <= identifier <= len(case.instances):
                raise SegXAIInputError(f"counterfactual: no instance {identifier}; the prediction has "
                                       f"{len(case.instances)} instance(s) of {case.structure!r}")
            region = case.instance_labels.with_array((labels == identifier).astype(np.uint8)[None], ("instance",))
            try:
                results[identifier] = counterfactual_relevance(case.image, model, generators, region=region)
            except SegXAIInputError as error:
                raise SegXAIInputError(f"counterfactual: instance {identifier}: {error}") from None
    return results


# ---------------------------------------------------------------------------- QA


def resolve_risk_model(text: str):
    """``(RiskModel, name)`` of a risk model path or ``bundled:<model>/<method>``."""
    from ..topology import RiskModel, bundled_risk_model

    if text.startswith("bundled:"):
        name, _, method = text[len("bundled:"):].partition("/")
        if not name or not method:
            raise SegXAIInputError(f"qa.risk_model {text!r}: expected bundled:<model>/<method>")
        return RiskModel.load(bundled_risk_model(name, method)), text
    return RiskModel.load(text), text


def score_qa(
    case: Case,
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> QAResult:
    """The QA of the structure's contour (paper 000, METHODS section 6).

    With a risk model: it must belong to this model (card checksum) and this structure
    (its target); its map is the risk model's method with its calibration parameters and
    target (a class-level map of the case is reused when it was made exactly so), its
    per-channel maps summed; the EC curve on its thresholds is projected and scored.
    Without one: the EC curve of ``settings.qa.method``'s map on 100 thresholds.
    """
    from ..topology import default_thresholds, saliency_curve

    settings = case.settings.qa
    card = model.card
    mask = case.mask
    if not mask.any():
        raise SegXAIInputError(f"QA: the model predicts no {case.structure!r} voxel in this image: no contour to score")
    if settings.risk_model is None:
        if not settings.method:
            raise SegXAIInputError("QA: give qa.risk_model, or qa.method (the name of one of the methods)")
        result = case.maps.get(settings.method)
        if result is None:
            raise SegXAIInputError(f"QA: qa.method {settings.method!r} has no map in this case")
        saliency = channel_sum(result.maps)
        thresholds = default_thresholds(100)
        report(progress, 1.0, "EC curve")
        return QAResult(case.structure, settings.method, thresholds, saliency_curve(saliency, mask, thresholds),
                        saliency)

    risk, name = resolve_risk_model(settings.risk_model)
    if card.checksum() != risk.model_checksum:
        raise SegXAIInputError(
            f"qa.risk_model {name}: calibrated for model checksum {risk.model_checksum!r}, the model "
            f"{card.name!r} has {card.checksum()!r}"
        )
    record = risk.method_parameters
    if risk.method.startswith(FEATURE_PREFIX):
        return _score_feature(case, model, risk, name, progress, cancel)
    target = str(record.get("target", ""))
    if target != f"class:{case.structure}":
        raise SegXAIInputError(f"qa.risk_model {name}: calibrated for target {target!r}, the case's structure is "
                               f"{case.structure!r}")
    if record.get("channel_reduction", "sum") != "sum":
        raise SegXAIInputError(f"qa.risk_model {name}: channel_reduction {record.get('channel_reduction')!r} "
                               "is not supported (sum)")
    params = record.get("params")
    if not isinstance(params, dict):
        raise SegXAIInputError(f"qa.risk_model {name}: method_parameters.params must be an object")
    from ..attribution.registry import recorded_params

    # the map made as the calibration cohort made it (parameters added since at their former value)
    wanted = recorded_params(risk.method, params)
    reused = next((r for r in case.maps.values() if _same_map(r, risk.method, wanted, target)), None)
    if reused is None:
        method = MethodSettings(method=risk.method, params=wanted, target=target)
        reused = explain_map(case.image, model, case.segmentation, method, case.structure,
                             case.settings.precision.window_batch, progress, cancel)
    saliency = channel_sum(reused.maps)
    curve = saliency_curve(saliency, mask, risk.thresholds)
    made = json.loads(json.dumps(reused.parameters, default=str))
    if _same_map(reused, risk.method, wanted, target):
        made = params  # made as recorded: the record's own words, which the risk model checks
    domain, _ = case_quality_scores(case, model, uncertainty=False)
    scored = risk.score(curve, risk.method, card.checksum(),
                        method_parameters={"params": made, "target": target, "channel_reduction": "sum"},
                        features={f: domain.get(f) for f in DOMAIN_FEATURES})
    report(progress, 1.0, f"{scored['band']} risk")
    return QAResult(case.structure, risk.method, np.asarray(risk.thresholds, float), curve, saliency, risk=dict(scored),
                    risk_model=name, reference_curve=np.asarray(risk.pca_mean, float),
                    calibration_auroc_cv=risk.auroc_cv_mean)


def _score_feature(case: Case, model: LoadedModel, risk, name: str, progress: Optional[ProgressCallback],
                   cancel: Optional[CancelToken]) -> QAResult:
    """A feature risk model (``feature:<score>``): the case's score, made as in its calibration
    cohort (:func:`case_quality_scores`, the same test-time flips), is the one-point curve."""
    feature = risk.method[len(FEATURE_PREFIX):]
    sources = risk.method_parameters.get("uncertainty_sources", QA_TTA_SOURCES)
    if sources != QA_TTA_SOURCES:
        raise SegXAIInputError(f"qa.risk_model {name}: its uncertainty sources {sources!r} are not the QA "
                               f"cohorts' {QA_TTA_SOURCES!r}")
    report(progress, 0.0, f"QA score {feature}")
    scores, notes = case_quality_scores(case, model, uncertainty=feature.startswith(UNCERTAINTY_PREFIXES),
                                        cancel=cancel)
    value = scores.get(feature)
    if value is None:
        raise SegXAIInputError(f"qa.risk_model {name}: the case has no {feature!r} score"
                               + (f" ({'; '.join(notes)})" if notes else ""))
    curve = np.array([float(value)])
    scored = risk.score(curve, risk.method, model.card.checksum(),
                        features={f: scores.get(f) for f in DOMAIN_FEATURES})
    report(progress, 1.0, f"{scored['band']} risk")
    return QAResult(case.structure, risk.method, np.asarray(risk.thresholds, float), curve, None, risk=dict(scored),
                    risk_model=name, reference_curve=np.asarray(risk.pca_mean, float),
                    calibration_auroc_cv=risk.auroc_cv_mean)


def case_quality_scores(
    case: Case,
    model: LoadedModel,
    contour: Optional[np.ndarray] = None,
    uncertainty: bool = True,
    cancel: Optional[CancelToken] = None,
) -> tuple[dict[str, Optional[float]], list[str]]:
    """Reference-free scores of the case's contour (QA_PROTOCOL.md rows 1-4 and 6,
    :func:`SegXAILib.qa.case_scores`): mask shape, the model's probabilities (softmax or
    sigmoid models), image quality and, with ``uncertainty``, the agreement of the samples of
    the test-time flips :data:`~SegXAILib.topology.cohort.QA_TTA_SOURCES` (``tta_``), MC dropout
    (``mc_dropout_``, networks with active dropout) and the card's ensemble members
    (``ensemble_``, several networks). The QA cohorts and the QA step both call this, so a
    feature risk model scores a case exactly as its calibration cases were scored.

    Returns the scores (None where undefined) and notes on what could not be computed.
    """
    from ..qa import case_scores, uncertainty_scores

    contour = case.mask if contour is None else np.asarray(contour, dtype=bool)
    notes: list[str] = []
    activation = model.card.output_activation
    probabilities = case.segmentation.probabilities.array
    if activation == "sigmoid":
        probabilities = probabilities[case.class_index]
    elif activation != "softmax":
        probabilities = None  # raw network outputs (e.g. deepbet's): no probability scores
        notes.append(f"probability scores: the model's output activation is {activation!r}")
    scores: dict[str, Any] = dict(case_scores(mask=contour, spacing=case.image.spacing, probabilities=probabilities,
                                              image=case.image.array[0], class_index=case.class_index))
    if uncertainty:
        base = case.settings
        sources = [("tta", QA_TTA_SOURCES, None), ("mc_dropout", {"mc_dropout": {}}, 8)]
        if len(model.networks) > 1:
            sources.append(("ensemble", {"ensemble": {}}, None))
        for prefix, chosen, samples in sources:
            # fixed settings (not the run's): a case is scored as the calibration cases were
            case.settings = base.model_copy(update={"uncertainty": UncertaintySettings(
                enabled=True, sources=chosen, samples=samples, seed=0)})
            try:
                result = estimate_case_uncertainty(case, model, cancel=cancel)
            except SegXAIInputError as error:
                notes.append(f"{prefix}: {error}")
                continue
            finally:
                case.settings = base
            scores.update(uncertainty_scores(result, structure=case.structure, prefix=prefix))
    clean = {k: (None if v is None or not np.isfinite(float(v)) else float(v)) for k, v in scores.items()}
    return clean, notes
# ---------------------------------------------------------------------------- QA of given contours


def contour_classes(card: ModelCard, names: Sequence[str],
                    classes: Optional[Mapping[str, str]] = None) -> dict[str, int]:
    """The model class index of each contour name: ``classes[name]`` when given, else the
    foreground class of that exact name.

    Raises
    ------
    SegXAIInputError
        A name neither mapped nor a foreground class, a mapping to an unknown or background
        class, or a mapping of a name that is not among the contours.
    """
    classes = dict(classes or {})
    foreground = list(card.class_names[1:])
    stray = sorted(set(classes) - set(names))
    if stray:
        raise SegXAIInputError(f"classes: {stray} are not among the contours {list(names)}")
    found: dict[str, int] = {}
    for name in names:
        target = classes.get(name, name)
        if target not in foreground and name in classes:
            raise SegXAIInputError(f"classes: structure {name!r} is mapped to {target!r}, which is not one of the "
                                   f"model's foreground classes {foreground}")
        if target not in foreground:
            raise SegXAIInputError(f"contours: structure {name!r} is not one of the model's foreground classes "
                                   f"{foreground}; map it to one with classes={{{name!r}: CLASS}}")
        found[name] = card.class_names.index(target)
    return found


def _contour_probabilities(case: Case) -> Optional[np.ndarray]:
    """The probabilities :func:`~SegXAILib.qa.probability_scores` takes: every softmax channel,
    or None for raw network outputs (the sigmoid class channel is picked per class)."""
    if case.card.output_activation in ("softmax", "sigmoid"):
        return case.segmentation.probabilities.array
    return None


def _contour_saliency(case: Case, model: LoadedModel, class_name: str, risk,
                      progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
    """``(method, map name, AttributionResult, thresholds)`` of the class ``class_name``:
    the risk model's method (its parameters, target ``class:<class_name>``) when ``risk`` belongs to
    the model, else ``settings.qa.method``'s; a case map made exactly so is reused. None when
    neither is set."""
    from ..topology import default_thresholds

    target = f"class:{class_name}"
    if risk is not None:
        params = dict(risk.method_parameters.get("params") or {})
        method = MethodSettings(method=risk.method, params=params, target=target)
        thresholds = np.asarray(risk.thresholds, float)
    elif case.settings.qa.method:
        chosen = next((m for m in case.settings.methods if m.name == case.settings.qa.method), None)
        if chosen is None:
            raise SegXAIInputError(f"contour QA: qa.method {case.settings.qa.method!r} is not one of the methods "
                                   f"{[m.name for m in case.settings.methods]}")
        method = MethodSettings(method=chosen.method, params=dict(chosen.params), target=target)
        thresholds = default_thresholds(100)
    else:
        return None
    name = next((n for n, r in case.maps.items() if _same_map(r, method.method, method.params, target)), "")
    result = case.maps[name] if name else explain_map(case.image, model, case.segmentation, method, class_name,
                                                      case.settings.precision.window_batch, progress, cancel)
    return method, name, result, thresholds


def score_contours(
    case: Case,
    model: LoadedModel,
    contours: Mapping[str, Any],
    classes: Optional[Mapping[str, str]] = None,
    band_mm: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> ContourQA:
    """QA of contours the model did not draw, per structure, as a review list.

    For each contour: :func:`~SegXAILib.qa.contours.contour_scores` against the model's own
    prediction of its class (the fair baseline of QA_PROTOCOL.md C4: Dice, volume ratio, mean
    and 95 % surface distance; the model's mean probability and entropy inside the contour and
    in its ``band_mm`` boundary band); with ``case.uncertainty``,
    :func:`~SegXAILib.qa.contours.uncertainty_agreement` inside it; the superlevel EC curve
    (:func:`~SegXAILib.topology.saliency_curve`) inside the contour of the class's saliency map,
    scored by the case's risk model (``settings.qa.risk_model``) when it belongs to this model
    (card checksum) and was calibrated for that class, else the curve alone (with
    ``settings.qa.method``'s method when there is no usable risk model; no curve without either).
    Rows are ordered by :func:`~SegXAILib.qa.contours.review_order` (most suspicious first).

    Parameters
    ----------
    case : Case
    model : LoadedModel
        The case's model (its card is the case's).
    contours : mapping
        Structure name -> ``(I, J, K)`` bool mask on the case's grid (an array, or an
        :class:`~SegXAILib.image.Image` on the grid).
    classes : mapping, optional
        Structure name -> model class name, for names that are not a class name.
    band_mm : float, optional
        Width of the boundary band in mm (the largest voxel size by default).

    Returns
    -------
    ContourQA
    """
    from ..progress import sub_progress
    from ..qa.contours import contour_scores, review_order, uncertainty_agreement
    from ..topology import saliency_curve

    if model.card.checksum() != case.card.checksum():
        raise SegXAIInputError(f"model: {model.card.name!r} is not the case's model {case.card.name!r}")
    if not contours:
        raise SegXAIInputError("contours: give at least one structure (name -> mask)")
    indices = contour_classes(case.card, list(contours), classes)
    shape = case.image.spatial_shape
    masks: dict[str, np.ndarray] = {}
    for name, value in contours.items():
        if isinstance(value, Image):
            if value.num_channels != 1 or not value.same_grid(case.image):
                raise SegXAIInputError(f"contours[{name!r}]: not one channel on the case's grid")
            value = value.array[0]
        mask = np.asarray(value)
        if mask.shape != shape:
            raise SegXAIInputError(f"contours[{name!r}]: shape {mask.shape}, the case's grid is {shape}")
        if mask.dtype != bool:
            if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
                raise SegXAIInputError(f"contours[{name!r}]: must be boolean (or 0/1)")
            mask = mask.astype(bool)
        if not mask.any():
            raise SegXAIInputError(f"contours[{name!r}]: empty, nothing to score")
        masks[name] = mask

    notes: list[str] = []
    risk, risk_name = None, ""
    if case.settings.qa.risk_model:
        loaded, name = resolve_risk_model(case.settings.qa.risk_model)
        if loaded.model_checksum != case.card.checksum():
            notes.append(f"risk model {name}: calibrated for another model (checksum {loaded.model_checksum[:16]}...), "
                         "not applied")
        elif loaded.method_parameters.get("channel_reduction", "sum") != "sum":
            notes.append(f"risk model {name}: channel_reduction "
                         f"{loaded.method_parameters.get('channel_reduction')!r} is not supported, not applied")
        else:
            risk, risk_name = loaded, name
    probabilities = _contour_probabilities(case)
    sigmoid = case.card.output_activation == "sigmoid"
    spacing = case.image.spacing
    rows = []
    used_risk = False
    for position, (name, mask) in enumerate(masks.items()):
        if cancel is not None:
            cancel.raise_if_cancelled()
        step = sub_progress(progress, position / len(masks), (position + 1) / len(masks))
        index = indices[name]
        class_name = case.card.class_names[index]
        values = None if probabilities is None else (probabilities[index] if sigmoid else probabilities)
        scores = contour_scores(mask, case.segmentation.mask(index), spacing, values, class_index=index,
                                band_mm=band_mm)
        uncertainty = None
        if case.uncertainty is not None:
            information = case.uncertainty.mutual_information.array
            uncertainty = uncertainty_agreement(case.uncertainty.mask_frequency.array[index - 1],
                                                information[index - 1] if sigmoid else information[0], mask)
        row: dict[str, Any] = {"structure": name, "class_name": class_name, "class_index": index, "scores": scores,
                               "uncertainty": uncertainty, "saliency": None, "risk": None}
        if not case.segmentation.mask(index).any():
            notes.append(f"{name}: the model predicts no {class_name!r} voxel: no saliency map of the class")
        else:
            found = _contour_saliency(case, model, class_name, risk, step, cancel)
            if found is None:
                if position == 0:
                    notes.append("saliency: no risk model of this model and no qa.method: no EC curve")
            else:
                method, map_name, result, thresholds = found
                curve = saliency_curve(channel_sum(result.maps), mask, thresholds)
                row["saliency"] = {"method": method.method, "map": map_name, "thresholds": thresholds,
                                   "curve": curve.astype(float)}
                target = str(risk.method_parameters.get("target", "")) if risk is not None else ""
                if risk is not None and target == f"class:{class_name}":
                    made = json.loads(json.dumps(result.parameters, default=str))
                    row["risk"] = dict(risk.score(curve, risk.method, case.card.checksum(), method_parameters={
                        "params": made, "target": target, "channel_reduction": "sum"}))
                    used_risk = True
                elif risk is not None:
                    notes.append(f"{name}: risk model {risk_name} was calibrated for {target!r}, not "
                                 f"'class:{class_name}': EC curve only")
        rows.append(row)
        report(step, 1.0, name)
    return ContourQA(rows=review_order(rows), risk_model=risk_name if used_risk else "", notes=notes)


# ---------------------------------------------------------------------------- Agg2Exp


def agg2exp_case(
    case: Case,
    model: LoadedModel,
    classes: Optional[Sequence[str]] = None,
    rois: Optional[Mapping[str, Any]] = None,
    variants: Optional[Sequence[str]] = None,
    name: str = "",
    keep_maps: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
):
    """Paper 003's RoI importance of the case (:class:`~SegXAILib.evaluation.CaseImportance`).

    Rows: ``classes`` (every class of the card by default, background included, except for a
    sigmoid model, whose background has no output to explain), each
    explained with ``settings.agg2exp.method`` and its class target; a class map of the case
    made exactly so is reused, and a class without a predicted voxel gets a row of NaN.
    Columns: the predicted classes, ``reference:<class>`` for every foreground class present in
    ``case.reference`` (class indices; its Dice per class is kept), then ``rois`` (name ->
    mask on the input grid, an Image or an array). ``variants``: absolute / positive /
    negative mass (``settings.agg2exp.mode`` by default).
    """
    import time

    from ..evaluation import CaseImportance, class_rois, local_matrix
    from ..evaluation.agg2exp import IMPORTANCE_VARIANTS, _mask_on
    from ..metrics import dice_score
    from ..progress import sub_progress

    start = time.perf_counter()
    settings = case.settings.agg2exp
    names = list(model.card.class_names)
    sigmoid = model.card.output_activation == "sigmoid"
    classes = list(classes) if classes is not None else (names[1:] if sigmoid else names)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise SegXAIInputError(f"classes: {unknown} are not among the model's classes {names}")
    variants = list(variants) if variants is not None else [settings.mode]
    for variant in variants:
        if variant not in IMPORTANCE_VARIANTS:
            raise SegXAIInputError(f"variants: expected any of {IMPORTANCE_VARIANTS}, got {variant!r}")
    labels = case.segmentation.labels.array[0]
    columns = class_rois(labels, names)
    dice: dict[str, float] = {}
    truth = reference_classes(case)
    if truth is not None:
        for index, class_name in enumerate(names[1:], start=1):
            dice[class_name] = dice_score(labels == index, truth == index)
            if bool((truth == index).any()):
                columns[f"reference:{class_name}"] = truth == index
    for roi, mask in (rois or {}).items():
        if roi in columns:
            raise SegXAIInputError(f"RoI name {roi!r} is already used (class names and reference:<class> are taken)")
        columns[roi] = _mask_on(case.image, mask, roi) > 0
    maps: dict[str, Optional[np.ndarray]] = {}
    kept: dict[str, Image] = {}
    for position, class_name in enumerate(classes):
        target = f"class:{class_name}"
        result = next((r for r in case.maps.values() if _same_map(r, settings.method, settings.params, target)), None)
        if result is None and columns[class_name].any():
            method = MethodSettings(method=settings.method, params=settings.params, target=target)
            step = sub_progress(progress, position / len(classes), (position + 1) / len(classes))
            try:
                result = explain_map(case.image, model, case.segmentation, method, class_name,
                                     case.settings.precision.window_batch, step, cancel)
            except SegXAIInputError as error:
                if "predicts no voxel" not in str(error):
                    raise
                # predicted on the input grid but not on the model grid (resampling): no row
        maps[class_name] = None if result is None else result.maps.array
        if keep_maps and result is not None:
            kept[class_name] = result.maps
    matrices = {variant: local_matrix(maps, columns, variant) for variant in variants}
    report(progress, 1.0, "Agg2Exp")
    return CaseImportance(name, matrices, dice, time.perf_counter() - start, kept)


def agg2exp_matrix(
    case: Case,
    model: LoadedModel,
    rois: Optional[Mapping[str, Any]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
):
    """The case's Agg2Exp matrix of ``settings.agg2exp.mode`` over every class
    (:func:`agg2exp_case`), as :class:`~SegXAILib.evaluation.ImportanceMatrix`."""
    mode = case.settings.agg2exp.mode
    return agg2exp_case(case, model, rois=rois, variants=[mode], progress=progress, cancel=cancel).matrices[mode]
