"""Predictive uncertainty of a segmentation: samples of the prediction, streamed into voxel maps
and per-structure / per-instance tables (:mod:`.statistics`), all on the input grid.

Every sample runs the model's own inference (:func:`~SegXAILib.models.preprocessing.model_input`
once per model, then :func:`~SegXAILib.models.inference.sliding_window_logits`,
:func:`~SegXAILib.models.inference.activate` and the map back to the input grid exactly as
:func:`~SegXAILib.models.inference.segment` does), with the sources' transforms around it
(:mod:`.sources`). A sample without any change (e.g. noise of standard deviation 0) is the
plain prediction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..image import Image, SegXAIInputError
from ..models.card import ModelCard
from ..models.inference import Segmentation, activate, probabilities_on_input_grid, segment, sliding_window_logits
from ..models.loaders import LoadedModel
from ..models.preprocessing import model_input
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .sources import (SOURCES, Flipped, SourcesArgument, add_noise, apply_gamma, check_sources, flip_combinations,
                      mc_dropout, seeded_global_rng, spatial_matrix, warp_volume)
from .statistics import RegionUncertainty, UncertaintyAccumulator

__all__ = ["UncertaintyResult", "SamplePlan", "plan_samples", "iterate_samples", "estimate_uncertainty",
           "DEFAULT_STOCHASTIC_SAMPLES"]

#: samples drawn when a stochastic source is asked for and ``samples`` is not given
DEFAULT_STOCHASTIC_SAMPLES = 10


@dataclass
class UncertaintyResult:
    """Voxel maps (on the input grid) and tables of a case's predictive uncertainty.

    Attributes
    ----------
    mean_probability : Image
        ``(K, I, J, K)`` float32, mean of the samples' class probabilities (class names).
    variance : Image
        ``(K, I, J, K)`` float32, their variance over the samples (``ddof = 0``).
    predictive_entropy, expected_entropy, mutual_information : Image
        float32 in nats: one channel ``"entropy"`` for softmax models, one per foreground class
        (Bernoulli entropy) for sigmoid models.
    mask_frequency : Image
        ``(K - 1, I, J, K)`` float32, fraction of samples whose mask holds the voxel, per
        foreground class.
    structures : list of RegionUncertainty
        One row per foreground class.
    instances : list of RegionUncertainty
        One row per connected component of the main prediction's class masks (ids as
        :func:`~SegXAILib.instances.find_instances` numbers them, per class).
    samples : int
    sources : dict
        Source name -> checked parameters (defaults filled in).
    seed : int
    activation : str
        ``"softmax"`` or ``"sigmoid"``.
    settings : dict
        ``band_width``, ``region_width``, ``width_unit``, ``min_instance_voxels``.
    timings : dict
        Seconds: ``prediction`` (0 when given), ``preprocess``, ``samples``, ``tables``.
    """

    mean_probability: Image
    variance: Image
    predictive_entropy: Image
    expected_entropy: Image
    mutual_information: Image
    mask_frequency: Image
    structures: list[RegionUncertainty]
    instances: list[RegionUncertainty]
    samples: int
    sources: dict[str, dict[str, Any]]
    seed: int
    activation: str
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def maps(self) -> dict[str, Image]:
        """Map name -> Image."""
        return {name: getattr(self, name) for name in ("mean_probability", "variance", "predictive_entropy",
                                                      "expected_entropy", "mutual_information", "mask_frequency")}

    def structure_rows(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.structures]

    def instance_rows(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.instances]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (everything but the maps)."""
        return {"samples": self.samples, "sources": self.sources, "seed": self.seed, "activation": self.activation,
                "entropy_unit": "nats", "settings": self.settings, "timings": self.timings,
                "structures": self.structure_rows(), "instances": self.instance_rows()}


@dataclass
class SamplePlan:
    """What each sample draws from: the checked sources, the models, the flip axes and members."""

    sources: dict[str, dict[str, Any]]
    models: list[LoadedModel]
    flip_axes: tuple[int, ...]
    members: list[tuple[int, int]]  # (model index, network index) of every ensemble member
    samples: int
    enumerable: int
    seed: int


def _as_models(model: Union[LoadedModel, Sequence[LoadedModel]]) -> list[LoadedModel]:
    models = [model] if isinstance(model, LoadedModel) else list(model)
    if not models or not all(isinstance(m, LoadedModel) for m in models):
        raise SegXAIInputError("model: expected a LoadedModel or a non-empty list of LoadedModels")
    first = models[0].card
    for other in models[1:]:
        if other.card.class_names != first.class_names or other.card.output_activation != first.output_activation:
            raise SegXAIInputError(f"model: {other.card.name!r} predicts {other.card.class_names} "
                                   f"({other.card.output_activation}), {first.name!r} predicts {first.class_names} "
                                   f"({first.output_activation}); an ensemble needs the same classes and activation")
    return models


def plan_samples(model: Union[LoadedModel, Sequence[LoadedModel]], sources: SourcesArgument,
                 samples: Optional[int] = None, seed: int = 0) -> SamplePlan:
    """Check ``sources`` against the model(s) and settle the number of samples.

    The deterministic sources enumerate their samples (``flips``: ``2 ** len(axes)``
    combinations; ``ensemble``: every member of every model), sample ``s`` taking combination
    ``s`` (flips vary fastest). ``samples`` None means all combinations, or
    :data:`DEFAULT_STOCHASTIC_SAMPLES` when a stochastic source is asked for (then the
    combinations cycle). Without a stochastic source ``samples`` may not exceed the number of
    combinations (a repeated combination would be counted twice).

    Raises
    ------
    SegXAIInputError
        An invalid source request (:func:`~.sources.check_sources`); several models without
        the ``ensemble`` source; ``flips`` on a card without mirror axes and no ``axes``;
        ``samples`` below 2 or above what the sources can give; a card whose activation is
        not softmax or sigmoid; ``mc_dropout`` on a network without dropout layers.
    """
    checked = check_sources(sources)
    models = _as_models(model)
    card = models[0].card
    if card.output_activation not in ("softmax", "sigmoid"):
        raise SegXAIInputError(f"model {card.name!r}: output_activation {card.output_activation!r}; uncertainty "
                               "needs class probabilities (softmax or sigmoid)")
    if len(models) > 1 and "ensemble" not in checked:
        raise SegXAIInputError(f"model: {len(models)} models given; add the source 'ensemble' (each sample one "
                               "member) or give one model")
    axes: tuple[int, ...] = ()
    if "flips" in checked:
        axes = checked["flips"]["axes"] if checked["flips"]["axes"] is not None else card.mirror_axes
        if not axes:
            raise SegXAIInputError(f"source 'flips': model {card.name!r} allows no mirroring (its card's "
                                   "inference.mirror_axes is empty); give the parameter axes (model-grid axes 0, 1, 2) "
                                   "to flip anyway")
        checked["flips"]["axes"] = list(axes)
    if "mc_dropout" in checked:
        for loaded in models:
            with mc_dropout(loaded.networks, loaded.card.name, checked["mc_dropout"]["rate"]):
                pass  # refuses a network without dropout before any prediction runs
    members = [(m, n) for m, loaded in enumerate(models) for n in range(len(loaded.networks))]
    enumerable = (2 ** len(axes) if "flips" in checked else 1) * (len(members) if "ensemble" in checked else 1)
    stochastic = any(SOURCES[name].stochastic for name in checked)
    if samples is None:
        samples = max(enumerable, DEFAULT_STOCHASTIC_SAMPLES) if stochastic else enumerable
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise SegXAIInputError(f"samples: expected a whole number >= 2, got {samples!r}")
    if samples > 65535:
        raise SegXAIInputError(f"samples: at most 65535, got {samples}")
    if not stochastic and samples > enumerable:
        raise SegXAIInputError(f"samples: {', '.join(checked)} give {enumerable} distinct sample(s); {samples} would "
                               "repeat some (add a stochastic source or ask for fewer)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegXAIInputError(f"seed: expected a whole number >= 0, got {seed!r}")
    return SamplePlan(checked, models, tuple(axes), members, int(samples), enumerable, int(seed))


def _without_mirroring(card: ModelCard) -> ModelCard:
    """The card with its mirroring off: a flips sample is one flip, not the mean of all."""
    return dataclasses.replace(card, inference={**card.inference, "mirror_axes": []})


def iterate_samples(
    image: Image,
    plan: SamplePlan,
    amp: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    timings: Optional[dict[str, float]] = None,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yield ``(description, probabilities)`` per sample: what the sample drew (flip axes,
    member, gamma, factor, angles, ...) and its class probabilities ``(K, I, J, K)`` float32 on
    the input grid. One sample in memory at a time.

    Random numbers come from ``numpy.random.default_rng(plan.seed)`` (gamma, factors, angles,
    and one seed per sample for the noise, drawn on the CPU with a ``torch.Generator``, and for
    MC dropout, which draws from torch's global generator inside
    :func:`~.sources.seeded_global_rng`, restored afterwards): the same seed gives the same
    samples.
    """
    sources, models = plan.sources, plan.models
    rng = np.random.default_rng(plan.seed)
    inputs: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    flips = flip_combinations(plan.flip_axes) if "flips" in sources else [()]
    start = time.perf_counter()
    for m, loaded in enumerate(models):
        if "ensemble" in sources or m == 0:
            inputs[m] = model_input(image, loaded.card, loaded.device)
    if timings is not None:
        timings["preprocess"] = time.perf_counter() - start
    for index in range(plan.samples):
        if cancel is not None:
            cancel.raise_if_cancelled()
        combination = index % plan.enumerable
        flip = flips[combination % len(flips)]
        model_index, member = plan.members[combination // len(flips)] if "ensemble" in sources else (0, None)
        loaded = models[model_index]
        card, device = loaded.card, loaded.device
        use_amp = device.type == "cuda" if amp is None else amp
        members = list(loaded.networks) if member is None else [loaded.networks[member]]
        networks = members
        description: dict[str, Any] = {"index": index}
        if "ensemble" in sources:
            description.update(model=model_index, member=member)
        batch, model_affine = inputs[model_index]
        x = batch
        # the draws happen in one fixed order (gamma, factor, noise, spatial, dropout): the same
        # request gives the same samples in whatever order its sources were listed
        gamma = rng.uniform(sources["gamma"]["low"], sources["gamma"]["high"]) if "gamma" in sources else None
        factor = (rng.uniform(sources["intensity_scale"]["low"], sources["intensity_scale"]["high"])
                  if "intensity_scale" in sources else None)
        noise_seed = int(rng.integers(2 ** 62)) if "noise" in sources else None
        if "spatial" in sources:
            limit, relative = sources["spatial"]["rotation_degrees"], sources["spatial"]["scale"]
            angles = rng.uniform(-limit, limit, size=3)
            scale = rng.uniform(1 - relative, 1 + relative)
        dropout_seed = int(rng.integers(2 ** 62)) if "mc_dropout" in sources else None
        with torch.inference_mode():
            if gamma is not None:
                x = apply_gamma(x, float(gamma))
                description["gamma"] = float(gamma)
            if factor is not None:
                x = x * float(factor)
                description["intensity_scale"] = float(factor)
            if noise_seed is not None:
                x = add_noise(x, sources["noise"]["std"], torch.Generator().manual_seed(noise_seed))
                description["noise_seed"] = noise_seed
            matrix = None
            if "spatial" in sources:
                spacing = np.linalg.norm(np.asarray(model_affine, dtype=float)[:3, :3], axis=0)
                matrix = spatial_matrix(angles, scale, spacing)
                x = warp_volume(x, matrix)
                description.update(rotation_degrees=[float(a) for a in angles], scale=float(scale))
            sample_card = card
            if "flips" in sources:
                networks = [Flipped(network, flip) for network in networks]
                sample_card = _without_mirroring(card)
                description["flip_axes"] = list(flip)
            span = (index / plan.samples, (index + 1) / plan.samples)
            window_progress = sub_progress(progress, span[0], span[0] + 0.9 * (span[1] - span[0]))
            if dropout_seed is not None:
                description["dropout_seed"] = dropout_seed
                # eager dropout draws its masks on the CPU from this generator (the same on every
                # device); the global generators serve only layers that take no hooks
                with seeded_global_rng(dropout_seed, device), \
                        mc_dropout(members, card.name, sources["mc_dropout"]["rate"],
                                   torch.Generator().manual_seed(dropout_seed)):
                    output = sliding_window_logits(x, networks[0], sample_card, use_amp, window_progress, cancel,
                                                   networks=networks)
            else:
                output = sliding_window_logits(x, networks[0], sample_card, use_amp, window_progress, cancel,
                                               networks=networks)
            if matrix is not None:
                output = warp_volume(output, np.linalg.inv(matrix))  # back onto the model grid
            values = output[0].float().cpu().numpy() if card.format == "nnunetv2" else \
                activate(output, card)[0].float().cpu().numpy()
            probabilities = probabilities_on_input_grid(values, model_affine, image, card).array
        report(progress, span[1], f"sample {index + 1} of {plan.samples}")
        yield description, probabilities.astype(np.float32, copy=False)


def estimate_uncertainty(
    image: Image,
    model: Union[LoadedModel, Sequence[LoadedModel]],
    sources: SourcesArgument = "flips",
    samples: Optional[int] = None,
    seed: int = 0,
    prediction: Optional[Segmentation] = None,
    band_width: float = 2.0,
    region_width: float = 10.0,
    width_unit: str = "mm",
    min_instance_voxels: int = 1,
    amp: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_sample: Optional[Callable[[dict[str, Any], np.ndarray], None]] = None,
) -> UncertaintyResult:
    """Predictive uncertainty of ``model`` on ``image`` from prediction samples.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, channels in the card's order.
    model : LoadedModel or list of LoadedModel
        Several models (same classes and activation) need the ``ensemble`` source.
    sources : str, list of str, or mapping
        Sample sources and their parameters (:data:`~.sources.SOURCES`, :func:`~.sources.source_specs`),
        e.g. ``"flips"``, ``["mc_dropout", "noise"]`` or ``{"spatial": {"rotation_degrees": 5}}``.
        Several sources compose: every sample draws from each.
    samples : int, optional
        Number of samples (see :func:`plan_samples`; default: every flip / member combination,
        or 10 with a stochastic source).
    seed : int
        Seeds every random draw (same seed, same maps); torch's global generators are left as
        they were.
    prediction : Segmentation, optional
        The case's prediction, whose masks define the structures and instances of the tables;
        default :func:`~SegXAILib.models.inference.segment` of the first model.
    band_width : float
        Width of the boundary band (:mod:`.statistics`), in ``width_unit``.
    region_width : float
        Largest distance of an instance's region from the instance, in ``width_unit``.
    width_unit : str
        ``"mm"`` or ``"voxels"``.
    min_instance_voxels : int
        Smaller components of the prediction's masks are not instances.
    amp : bool, optional
        Mixed precision (default: on for CUDA), as :func:`segment`.
    progress, cancel
        Progress callback and cancel token (:mod:`SegXAILib.progress`); cancel is checked
        between samples and between window batches.
    on_sample : callable, optional
        Called with each sample's description and probabilities ``(K, I, J, K)`` (e.g. to save
        or show them); the array is not kept.

    Returns
    -------
    UncertaintyResult

    Raises
    ------
    SegXAIInputError
        Bad sources, parameters, samples or widths (naming them); MC dropout on a network
        without dropout (naming the model); an image that does not fit the card.
    """
    plan = plan_samples(model, sources, samples, seed)
    card = plan.models[0].card
    timings: dict[str, float] = {"prediction": 0.0}
    if min_instance_voxels < 1:
        raise SegXAIInputError(f"min_instance_voxels: expected a whole number >= 1, got {min_instance_voxels!r}")
    start = time.perf_counter()
    report(progress, 0.0, "prediction")
    if prediction is None:
        prediction = segment(image, plan.models[0], amp, sub_progress(progress, 0.0, 0.1), cancel)
        timings["prediction"] = time.perf_counter() - start
    if prediction.labels.spatial_shape != image.spatial_shape:
        raise SegXAIInputError(f"prediction: its grid {prediction.labels.spatial_shape} is not the image's "
                               f"{image.spatial_shape}")
    masks = np.stack([prediction.mask(c) for c in range(1, card.num_classes)])
    accumulator = UncertaintyAccumulator(image, card.class_names, card.output_activation, masks, band_width,
                                         region_width, width_unit, min_instance_voxels, max_samples=plan.samples)
    start = time.perf_counter()
    for description, probabilities in iterate_samples(image, plan, amp, sub_progress(progress, 0.1, 0.95), cancel,
                                                      timings):
        accumulator.add(probabilities)
        if on_sample is not None:
            on_sample(description, probabilities)
    timings["samples"] = time.perf_counter() - start - timings.get("preprocess", 0.0)
    report(progress, 0.95, "uncertainty tables")
    start = time.perf_counter()
    maps = accumulator.maps()
    structures, instances = accumulator.tables(maps)
    timings["tables"] = time.perf_counter() - start
    names = tuple(card.class_names)
    entropy_names = ("entropy",) if card.output_activation == "softmax" else names[1:]
    images = {name: image.with_array(values, names if name in ("mean_probability", "variance") else
                                     names[1:] if name == "mask_frequency" else entropy_names)
              for name, values in maps.items()}
    report(progress, 1.0, "done")
    return UncertaintyResult(
        **images, structures=structures, instances=instances, samples=plan.samples, sources=plan.sources,
        seed=plan.seed, activation=card.output_activation,
        settings={"band_width": float(band_width), "region_width": float(region_width), "width_unit": width_unit,
                  "min_instance_voxels": int(min_instance_voxels)},
        timings=timings)
