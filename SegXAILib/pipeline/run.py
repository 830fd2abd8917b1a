"""``run_case``: one case, every step, one prediction."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from ..image import Image, SegXAIInputError
from ..models import LoadedModel
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .case import Case
from .settings import CaseSettings, MethodSettings
from .steps import (
    agg2exp_matrix,
    check_case_input,
    estimate_case_uncertainty,
    explain_counterfactuals,
    explain_instances,
    explain_map,
    find_case_instances,
    lesion_rows,
    load_case_generators,
    load_case_model,
    predict,
    resolve_model_card,
    score_contours,
    score_qa,
    select_counterfactual_instances,
    select_instances,
    structure_index,
)

__all__ = ["run_case", "start_case", "case_from_prediction", "reuse_prediction", "run_steps", "add_maps", "add_instance_maps", "add_qa", "add_contour_qa", "add_agg2exp",
           "add_uncertainty", "add_counterfactual"]


@contextmanager
def _timed(timings: dict, name: str) -> Iterator[None]:
    """Times step ``name``; memory running out inside it becomes a refusal naming the step,
    with the estimate (:func:`~SegXAILib.models.memory.memory_refusal`), not a traceback."""
    from ..models.memory import is_out_of_memory, memory_refusal

    start = time.perf_counter()
    refusal: Optional[SegXAIInputError] = None
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        refusal = memory_refusal(error, name)  # raised below, outside this block: the failed
        # step's frames (and their tensors) are freed with the error instead of kept as its context
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    if refusal is not None:
        raise refusal


def _expected_instances(selection) -> int:
    """How many instances a selection (``ids`` / ``click_ras`` / ``max_instances``) will likely pick."""
    if selection.ids is not None:
        return len(selection.ids)
    return 1 if selection.click_ras is not None else selection.max_instances or 4


def _weights(settings: CaseSettings, n_instances: int) -> dict[str, float]:
    """Rough shares of the run's time per step, for one progress bar over the whole case."""
    weights = {"segment": 1.0, "maps": 2.0 * len(settings.methods),
               "instances": 2.0 * n_instances * len(settings.instances.aggregations) if settings.instances.enabled else 0.0,
               "qa": 1.5 if (settings.qa.risk_model or settings.qa.method) else 0.0,
               "agg2exp": 1.0 if settings.agg2exp.enabled else 0.0,
               # a sample costs about one prediction
               "uncertainty": float(settings.uncertainty.samples or 8) if settings.uncertainty.enabled else 0.0,
               # a few forward passes of the model on a crop per instance
               "counterfactual": 0.5 * _expected_instances(settings.counterfactual)
               if settings.counterfactual.enabled else 0.0}
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def _labelled(callback: Optional[ProgressCallback], step: str) -> Optional[ProgressCallback]:
    """``"<step>: <message>"``: the engine process splits it into its step and message fields."""
    if callback is None:
        return None
    return lambda fraction, message="": callback(fraction, f"{step}: {message}" if message else step)


def _check_model(model: Optional[LoadedModel], settings: CaseSettings) -> LoadedModel:
    if model is None:
        return load_case_model(settings)
    if model.card.checksum() != resolve_model_card(settings.model).checksum():
        raise SegXAIInputError(f"model: the loaded model {model.card.name!r} is not settings.model {settings.model!r}")
    return model


def _empty_class(case: Case, target: str) -> str:
    """The class name of a ``class[:NAME]`` target the prediction has no voxel of, else ''."""
    kind, _, rest = target.partition(":")
    if kind != "class":
        return ""
    name = rest.split(":")[0] or case.card.class_names[1]
    if name in case.card.class_names and not case.segmentation.mask(case.card.class_names.index(name)).any():
        return name
    return ""


def start_case(
    image: Image,
    model: LoadedModel,
    settings: CaseSettings,
    reference: Optional[Image] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """The case's one prediction and (when ``settings.instances.enabled``) its instances and
    lesion table without instance maps. The ``add_*`` steps extend the returned case.

    The input is first compared with what the model card expects
    (:func:`~SegXAILib.pipeline.check_case_input`): the mismatches go to ``case.warnings``, or,
    with ``settings.strict``, the input is refused before the prediction."""
    card = model.card
    # before any work: a mismatch is a warning the case carries, or with settings.strict a refusal
    warnings = check_case_input(image, card, settings.strict)
    structure_index(card, settings.class_name)  # a wrong class name is refused before the prediction
    _check_reference(reference, image)
    timings: dict[str, float] = {}
    with _timed(timings, "segment"):
        segmentation = predict(image, model, settings, progress=_labelled(progress, "segment"), cancel=cancel)
    return case_from_prediction(image, segmentation, settings, reference, warnings, timings)


def _check_reference(reference: Optional[Image], image: Image) -> None:
    if reference is not None and (reference.num_channels != 1 or not reference.same_grid(image)):
        raise SegXAIInputError("reference: expected one label map on the input image's grid")


def case_from_prediction(
    image: Image,
    segmentation,
    settings: CaseSettings,
    reference: Optional[Image] = None,
    warnings: Optional[Sequence[str]] = None,
    timings: Optional[dict] = None,
) -> Case:
    """A case of ``settings`` on a prediction already made (``segmentation``: labels
    ``(1, I, J, K)``, probabilities ``(K, I, J, K)`` on ``image``'s grid): with
    ``settings.instances.enabled`` its instances and lesion table (no instance maps yet)."""
    class_index = structure_index(segmentation.card, settings.class_name)
    _check_reference(reference, image)
    timings = {} if timings is None else timings
    case = Case(image=image, settings=settings, segmentation=segmentation, class_index=class_index,
                reference=reference, timings=timings, warnings=list(warnings or []))
    if settings.instances.enabled:
        with _timed(timings, "instances"):
            labels, case.instances = find_case_instances(segmentation, class_index, settings.instances.min_voxels)
            case.instance_labels = image.with_array(labels.astype(np.int32)[None], ("instances",))
            case.lesions = lesion_rows(case)
    return case


def reuse_prediction(
    saved: Case,
    model: LoadedModel,
    settings: CaseSettings,
    reference: Optional[Image] = None,
) -> Case:
    """A new case of ``settings`` on the prediction of ``saved`` (a case folder read back with
    :func:`~SegXAILib.pipeline.read_case`), with no prediction made: the steps that need only
    the input-grid prediction (instance maps, counterfactuals, uncertainty) then give what
    :func:`run_case` gives, since the written labels and float32 probabilities read back
    exactly. Maps, QA and Agg2Exp (their targets read the model-grid labels, not written) are
    refused.

    ``saved`` must have been predicted as ``settings`` and ``model`` would predict: the same
    model card (checksum), device, ``precision.segmentation`` and ``resample_slices``; else
    :class:`~SegXAILib.image.SegXAIInputError` (never a silent prediction of another model).
    Its instances are found again under ``settings.instances`` (cheap: connected components)."""
    card = resolve_model_card(settings.model)
    if saved.card.checksum() != card.checksum() or model.card.checksum() != card.checksum():
        raise SegXAIInputError(f"case: predicted with model {saved.card.name!r} (checksum {saved.card.checksum()!r}), "
                               f"not settings.model {settings.model!r} ({card.name!r}, checksum {card.checksum()!r})")
    if str(saved.device) != str(model.device):
        raise SegXAIInputError(f"case: predicted on device {saved.device!r}, this run's model is on "
                               f"{str(model.device)!r} (settings.device {settings.device!r}): predict again")
    for name in ("precision.segmentation", "resample_slices"):
        before = _setting(saved.settings, name)
        if before != _setting(settings, name):
            raise SegXAIInputError(f"case: predicted with {name} {before!r}, settings.{name} is "
                                   f"{_setting(settings, name)!r}: predict again")
    needs = [name for name, wanted in (("methods", bool(settings.methods)),
                                       ("qa", bool(settings.qa.risk_model or settings.qa.method)),
                                       ("agg2exp", settings.agg2exp.enabled)) if wanted]
    if needs:
        # their targets read the model-grid labels, which a case folder does not hold
        raise SegXAIInputError(f"case: settings.{', settings.'.join(needs)} need the model-grid prediction, which a "
                               "saved case does not hold: predict again")
    # the input check of this run's settings (cheap); with settings.strict a refusal
    warnings = check_case_input(saved.image, card, settings.strict)
    case = case_from_prediction(saved.image, saved.segmentation, settings, reference, warnings)
    return case


def _setting(settings: CaseSettings, dotted: str):
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def add_maps(
    case: Case,
    model: LoadedModel,
    methods: Optional[Sequence[MethodSettings]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """Class-level maps of ``methods`` (``case.settings.methods`` by default) into ``case.maps``;
    a map of the same name is replaced."""
    methods = list(case.settings.methods if methods is None else methods)
    for n, method in enumerate(methods):
        if cancel is not None:
            cancel.raise_if_cancelled()
        empty = _empty_class(case, method.target or f"class:{case.structure}")
        if empty:
            case.notes.append(f"map {method.name}: not computed, the model predicts no {empty!r} voxel")
            continue
        step = _labelled(sub_progress(progress, n / len(methods), (n + 1) / len(methods)), f"map {method.name}")
        with _timed(case.timings, f"map {method.name}"):
            case.maps[method.name] = explain_map(case.image, model, case.segmentation, method, case.structure,
                                                 case.settings.precision.window_batch, step, cancel)
    return case


def add_instance_maps(
    case: Case,
    model: LoadedModel,
    instance_ids: Optional[Sequence[int]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """Instance maps of ``instance_ids`` (those ``case.settings.instances`` selects by default)
    into ``case.instance_maps``; the lesion table is refreshed."""
    if case.instance_labels is None:
        raise SegXAIInputError("instance maps: the case has no instances (settings.instances.enabled is false)")
    chosen = select_instances(case) if instance_ids is None else [int(i) for i in instance_ids]
    if chosen:
        with _timed(case.timings, "instance maps"):
            case.instance_maps.update(explain_instances(case, model, chosen, _labelled(progress, "instance maps"),
                                                        cancel))
    case.lesions = lesion_rows(case)
    return case


def add_qa(
    case: Case,
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """The QA of the structure under ``case.settings.qa`` into ``case.qa`` (none, with a note,
    when the structure has no predicted voxel: there is no contour to score)."""
    if not case.mask.any():
        case.notes.append(f"QA: not computed, the model predicts no {case.structure!r} voxel")
        return case
    with _timed(case.timings, "QA"):
        case.qa = score_qa(case, model, _labelled(progress, "QA"), cancel)
    return case


def add_contour_qa(
    case: Case,
    model: LoadedModel,
    contours: Mapping[str, np.ndarray],
    classes: Optional[Mapping[str, str]] = None,
    band_mm: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """QA of contours the model did not draw (a clinician's edit, another tool's output) into
    ``case.contour_qa``: per structure, its agreement with the model's own prediction of the
    class, the model's confidence inside it and along its border, the samples' agreement (with
    ``case.uncertainty``) and its saliency EC curve, scored by the case's risk model when that
    applies; the review list is sorted most suspicious first (:func:`score_contours`).

    ``contours``: structure name -> ``(I, J, K)`` bool mask on the case's grid; a name maps to the
    model class of that exact name, or through ``classes`` (name -> class name)."""
    with _timed(case.timings, "contour QA"):
        case.contour_qa = score_contours(case, model, contours, classes, band_mm, _labelled(progress, "contour QA"),
                                         cancel)
    return case


def add_agg2exp(
    case: Case,
    model: LoadedModel,
    rois: Optional[Mapping[str, np.ndarray]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """The Agg2Exp matrix under ``case.settings.agg2exp`` into ``case.agg2exp``."""
    with _timed(case.timings, "Agg2Exp"):
        case.agg2exp = agg2exp_matrix(case, model, rois, _labelled(progress, "Agg2Exp"), cancel)
    return case


def add_uncertainty(
    case: Case,
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """The prediction's uncertainty under ``case.settings.uncertainty`` into ``case.uncertainty``;
    the lesion table gains each lesion's uncertainty columns."""
    with _timed(case.timings, "uncertainty"):
        case.uncertainty = estimate_case_uncertainty(case, model, _labelled(progress, "uncertainty"), cancel)
    if case.instance_labels is not None:
        case.lesions = lesion_rows(case)
    return case


def add_counterfactual(
    case: Case,
    model: LoadedModel,
    instance_ids: Optional[Sequence[int]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """Counterfactual relevance (paper 004) of ``instance_ids`` (those ``case.settings.counterfactual``
    selects by default) into ``case.counterfactuals``, with the generators of
    ``case.settings.counterfactual.generators``; their description (file checksum included) into
    ``case.counterfactual_generators``. The instances are the case's (its one prediction)."""
    chosen = select_counterfactual_instances(case) if instance_ids is None else [int(i) for i in instance_ids]
    if not chosen:
        if not case.instances:
            case.notes.append(f"counterfactual: not computed, the model predicts no {case.structure!r} instance")
        return case
    with _timed(case.timings, "counterfactual"):
        generators, info = load_case_generators(case, model)
        case.counterfactuals.update(explain_counterfactuals(case, model, generators, chosen,
                                                            _labelled(progress, "counterfactual"), cancel))
        case.counterfactual_generators = info
    return case


def run_case(
    image: Image,
    model: Optional[LoadedModel],
    settings: CaseSettings,
    reference: Optional[Image] = None,
    rois: Optional[Mapping[str, np.ndarray]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """Run one case: segment once, then every step ``settings`` asks for, reusing that prediction.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, one channel per model input in the card's order.
    model : LoadedModel or None
        The network of ``settings.model`` (None: loaded here from ``settings``). A loaded model
        whose card is not ``settings.model``'s is refused.
    settings : CaseSettings
    reference : Image, optional
        ``(1, I, J, K)`` reference labels on the image's grid: TP / FP / FN groups in the lesion
        table and a reference column in Agg2Exp.
    rois : dict, optional
        Extra Agg2Exp regions, name -> ``(I, J, K)`` bool on the image's grid.
    progress, cancel
        One progress callback over the whole run; the token is checked between and inside steps.

    Returns
    -------
    Case
        Everything on the input grid; :func:`~SegXAILib.pipeline.write_case` writes it.
    """
    model = _check_model(model, settings)
    segment_share = _weights(settings, _expected_instances(settings.instances))["segment"]
    report(progress, 0.0, "segment")
    case = start_case(image, model, settings, reference, sub_progress(progress, 0.0, segment_share), cancel)
    return run_steps(case, model, rois, sub_progress(progress, segment_share, 1.0), cancel)


def run_steps(
    case: Case,
    model: LoadedModel,
    rois: Optional[Mapping[str, np.ndarray]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Case:
    """Every step ``case.settings`` asks for after the prediction (maps, instance maps,
    uncertainty, counterfactuals, QA, Agg2Exp), on ``case``'s prediction: what :func:`run_case`
    runs after :func:`start_case`, or on a saved prediction (:func:`reuse_prediction`).
    ``progress`` spans these steps alone; returns ``case``, extended."""
    settings = case.settings
    weights = _weights(settings, _expected_instances(settings.instances))
    rest = 1.0 - weights["segment"]
    # nothing after the prediction (rest 0): every step's share is empty
    shares = {k: v / rest if rest > 0 else 0.0 for k, v in weights.items() if k != "segment"}
    position = [0.0]

    def share(step: str) -> Optional[ProgressCallback]:
        start = position[0]
        position[0] = min(1.0, start + shares[step])
        return sub_progress(progress, start, position[0])

    add_maps(case, model, None, share("maps"), cancel)
    if settings.instances.enabled:
        add_instance_maps(case, model, None, share("instances"), cancel)
    if settings.uncertainty.enabled:
        add_uncertainty(case, model, share("uncertainty"), cancel)
    if settings.counterfactual.enabled:
        add_counterfactual(case, model, None, share("counterfactual"), cancel)
    if settings.qa.risk_model or settings.qa.method:
        add_qa(case, model, share("qa"), cancel)
    if settings.agg2exp.enabled:
        add_agg2exp(case, model, rois, share("agg2exp"), cancel)
    report(progress, 1.0, "done")
    return case
