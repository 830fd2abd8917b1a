"""Explaining one case: input image + model + method + target -> maps on the input grid.

:func:`explain` preprocesses the image onto the model grid, predicts once when the target needs
it (class targets, and instance targets without the case's prediction; region, voxel and
threshold targets never do), runs the method through the window-exact forward, and maps the
result back onto the input grid (one map per input channel), with metadata (method,
parameters, target, seed, timings, model checksum). Attributions are taken with respect to
the network's input, i.e. the preprocessed (normalised) intensities, then placed on the input
grid.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from ..image import Image, SegXAIInputError
from ..models.inference import Segmentation, activate, class_masks, exact_float32
from ..models.loaders import LoadedModel
from ..models.preprocessing import model_input, preprocess, preprocess_labels, to_input_grid
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .forward import SegmentationForward
from .registry import check_params, get_method
from .targets import ClassTarget, ClassThresholdTarget, InstanceTarget, RegionTarget, Target, VoxelTarget

__all__ = ["TargetSpec", "AttributionResult", "explain", "prepare_target", "instance_labels", "PREDICTION_TARGETS"]


@dataclass
class TargetSpec:
    """What to explain, on the input grid.

    ``kind`` is ``class``, ``class_threshold``, ``instance``, ``region`` or ``voxel``;
    ``class_name`` names the class (the card's first foreground class when empty);
    ``instance_id`` (1 = largest component), ``mask`` (an Image on the input grid), ``ras``
    (a RAS point in mm for ``voxel``), ``threshold`` (for ``class_threshold``).
    """

    kind: str = "class"
    class_name: str = ""
    instance_id: int = 0
    mask: Optional[Image] = None
    ras: Optional[tuple[float, float, float]] = None
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "TargetSpec":
        """``class:NAME``, ``class_threshold:NAME:T``, ``instance:ID[:NAME]``, ``region:MASKFILE[:NAME]``,
        ``voxel:R,A,S[:NAME]`` (RAS mm)."""
        from ..io import read_image

        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == "class":
                return cls("class", class_name=parts[0] if parts else "")
            if kind == "class_threshold":
                return cls("class_threshold", class_name=parts[0], threshold=float(parts[1]) if len(parts) > 1 else 0.0)
            if kind == "instance":
                return cls("instance", instance_id=int(parts[0]), class_name=parts[1] if len(parts) > 1 else "")
            if kind == "region":
                return cls("region", mask=read_image(parts[0]), class_name=parts[1] if len(parts) > 1 else "")
            if kind == "voxel":
                ras = tuple(float(v) for v in parts[0].split(","))
                if len(ras) != 3:
                    raise ValueError
                return cls("voxel", ras=ras, class_name=parts[1] if len(parts) > 1 else "")  # type: ignore[arg-type]
        except SegXAIInputError:
            raise  # e.g. the region mask cannot be read: its own message says why
        except (IndexError, ValueError):
            pass
        raise SegXAIInputError(
            f"target {text!r}: expected class:NAME, class_threshold:NAME:T, instance:ID, region:MASK or voxel:R,A,S"
        )

    def class_index(self, class_names: list[str]) -> int:
        if not self.class_name:
            return 1
        if self.class_name not in class_names:
            raise SegXAIInputError(f"target: no class {self.class_name!r}; the model's classes are {class_names}")
        return class_names.index(self.class_name)


@dataclass
class AttributionResult:
    """Maps ``(C, I, J, K)`` on the input grid (one per input channel) and how they were made."""

    maps: Image
    method: str
    parameters: dict[str, Any]
    target: dict[str, Any]
    model: str
    model_checksum: str
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    postprocessing: str = "signed"

    def postprocessed(self, kind: str) -> "AttributionResult":
        """The same result with :func:`~SegXAILib.attribution.postprocess` ``kind`` applied to
        the maps (``signed`` leaves them as they are)."""
        from dataclasses import replace

        from .postprocess import postprocess

        return replace(self, maps=self.maps.with_array(postprocess(self.maps.array, kind), self.maps.channel_names),
                       postprocessing=kind)

    def metadata(self) -> dict[str, Any]:
        stochastic = get_method(self.method).stochastic
        return {
            "method": self.method,
            "seed": self.parameters.get("seed") if stochastic else None,
            "postprocessing": self.postprocessing,
            "parameters": {k: v for k, v in self.parameters.items() if not isinstance(v, torch.Tensor)},
            "target": self.target,
            "model": self.model,
            "model_checksum": self.model_checksum,
            "device": self.device,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "channels": list(self.maps.channel_names),
        }


#: the target kinds resolved from the case's prediction (its class masks); the others (region,
#: voxel, class_threshold) need no prediction
PREDICTION_TARGETS = ("class", "instance")


def instance_labels(mask: np.ndarray) -> np.ndarray:
    """Connected components (26-connectivity) of a boolean mask, numbered 1.. by decreasing size."""
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return components
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[order] = np.arange(1, count + 1)
    return relabel[components]


def _model_grid_mask(mask: np.ndarray, image: Image, card) -> torch.Tensor:
    return preprocess_labels(image.with_array(mask.astype(np.uint8)[None]), card).as_tensor()[0] > 0.5


def _resolve_target(spec: TargetSpec, image: Image, model: LoadedModel, x: torch.Tensor, model_affine: np.ndarray,
                    masks: Optional[torch.Tensor]) -> Target:
    """The model-grid target of ``spec``; ``masks`` ``(K, D, H, W)`` bool are the prediction's
    class masks on the model grid (:func:`~SegXAILib.models.inference.class_masks`), needed
    only by the kinds in :data:`PREDICTION_TARGETS` (None for the others)."""
    card = model.card
    if spec.kind in PREDICTION_TARGETS and masks is None:
        raise ValueError(f"target {spec.kind}: the prediction's class masks are needed")
    c = spec.class_index(card.class_names)
    channel = card.output_channel(c)  # a sigmoid model's background has none: refused here, named
    if spec.kind == "class":
        mask = masks[c].clone()  # a copy: segment's masks are inference tensors, which autograd refuses
        if not bool(mask.any()):
            raise SegXAIInputError(f"target class:{card.class_names[c]}: the model predicts no voxel of this class")
        return ClassTarget(c, mask, channel=channel)
    if spec.kind == "class_threshold":
        return ClassThresholdTarget(c, spec.threshold, channel=channel)
    if spec.kind == "instance":
        on_input = to_input_grid(masks[c][None].numpy().astype(np.uint8), model_affine, image, interpolation="nearest")
        instances = instance_labels(on_input.array[0] == 1)
        if not 1 <= spec.instance_id <= instances.max():
            raise SegXAIInputError(
                f"target instance:{spec.instance_id}: the prediction has {int(instances.max())} instance(s) of "
                f"{card.class_names[c]!r} (ids 1.. by decreasing size)"
            )
        return InstanceTarget(c, _model_grid_mask(instances == spec.instance_id, image, card), channel=channel,
                              instance_id=spec.instance_id)
    if spec.kind == "region":
        if spec.mask is None or not spec.mask.same_grid(image):
            raise SegXAIInputError("target region: the mask must be on the input image's grid")
        return RegionTarget(c, _model_grid_mask(spec.mask.array[0] > 0, image, card), channel=channel)
    if spec.kind == "voxel":
        # the model-grid voxel whose centre is nearest to the point
        inverse = np.linalg.inv(model_affine)
        index = np.round(inverse[:3, :3] @ np.asarray(spec.ras, float) + inverse[:3, 3]).astype(int)
        return VoxelTarget(c, tuple(index), tuple(x.shape[2:]), channel=channel)
    raise SegXAIInputError(f"target kind {spec.kind!r} is not one of class, class_threshold, instance, region, voxel")


def _one_hot(labels: torch.Tensor, count: int) -> torch.Tensor:
    """``(D, H, W)`` class indices -> ``(count, D, H, W)`` bool."""
    return labels[None] == torch.arange(count).view(-1, 1, 1, 1)


def _prediction_masks(prediction: Segmentation, image: Image, card, model_shape: tuple[int, ...]) -> torch.Tensor:
    """The model-grid class masks ``(K, D, H, W)`` of a prediction made by this model on this
    image (checked): its ``model_masks``, or the one-hot of its ``model_labels`` where classes
    cannot overlap (softmax, or one sigmoid output)."""
    labels = _prediction_labels(prediction, image, card, model_shape)
    masks = prediction.model_masks
    if masks is not None:
        if tuple(masks.shape) != (card.num_classes, *model_shape):
            raise SegXAIInputError(f"prediction: model-grid class masks of shape {(card.num_classes, *model_shape)} "
                                   f"are needed, got {tuple(masks.shape)}")
        return masks
    if card.output_activation == "sigmoid" and card.num_classes > 2:
        raise SegXAIInputError("prediction: a multi-label (sigmoid) model's model-grid class masks are needed "
                               "(model_masks, from SegXAILib.models.segment); its labels cannot show overlaps")
    return _one_hot(labels, card.num_classes)


def _prediction_labels(prediction: Segmentation, image: Image, card, model_shape: tuple[int, ...]) -> torch.Tensor:
    """The model-grid labels of a prediction made by this model on this image (checked)."""
    if prediction.card.checksum() != card.checksum():
        raise SegXAIInputError(
            f"prediction: made by model {prediction.card.name!r} ({prediction.card.checksum()[:12]}), "
            f"not by {card.name!r} ({card.checksum()[:12]})"
        )
    if not prediction.labels.same_grid(image):
        raise SegXAIInputError("prediction: not on the image's grid")
    labels = prediction.model_labels
    if labels is None or tuple(labels.shape) != model_shape:
        raise SegXAIInputError(
            f"prediction: model-grid labels of shape {model_shape} are needed (from SegXAILib.models.segment), "
            f"got {None if labels is None else tuple(labels.shape)}"
        )
    return labels


def prepare_target(
    image: Image,
    model: LoadedModel,
    target: Union[TargetSpec, str],
    prediction: Optional[Segmentation] = None,
    amp: bool = False,
    window_batch: int = 1,
) -> tuple[torch.Tensor, np.ndarray, Target]:
    """The model-grid input ``x`` ``(1, C, D, H, W)``, its IJK-to-RAS matrix and the resolved
    target, from ``prediction``'s model-grid class masks or, without it, one prediction here.

    Only class and instance targets (:data:`PREDICTION_TARGETS`) need the prediction: for
    the others none is made (a given ``prediction`` is still checked).

    The class masks are :func:`~SegXAILib.models.inference.class_masks`: the argmax's for a
    softmax model, ``probability > 0.5`` per foreground class for a sigmoid (multi-label)
    model, so that a class or instance target of one structure holds the voxels it shares with
    another. The target's scalar reads the class's logit channel
    (:meth:`~SegXAILib.models.card.ModelCard.output_channel`; see
    :mod:`~SegXAILib.attribution.targets`).
    """
    spec = TargetSpec.parse(target) if isinstance(target, str) else target
    card, device = model.card, model.device
    x, model_affine = model_input(image, card, device)
    # region, voxel and threshold targets (and an unknown kind, refused by _resolve_target) do
    # not read the prediction: predicting the whole volume would cost more than the attribution
    # of a small target itself (it runs only the windows the target touches)
    masks: Optional[torch.Tensor] = None
    if prediction is not None:  # checked whatever the target (cheap: no network call)
        masks = _prediction_masks(prediction, image, card, tuple(x.shape[2:]))
    elif spec.kind in PREDICTION_TARGETS:
        with torch.no_grad():
            from ..models.windows import WindowedForward

            logits = WindowedForward(model.network, card, x.shape[2:], amp=amp,
                                     networks=getattr(model, "networks", None))(x, window_batch=window_batch)
            masks = class_masks(activate(logits, card)[0], card).cpu()
    return x, model_affine, _resolve_target(spec, image, model, x, model_affine, masks)


def explain(
    image: Image,
    model: LoadedModel,
    method: str,
    target: Union[TargetSpec, str] = "class",
    params: Optional[dict[str, Any]] = None,
    amp: Optional[bool] = None,
    window_batch: int = 1,
    prediction: Optional[Segmentation] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> AttributionResult:
    """Attribute ``target`` of ``model`` on ``image`` with ``method`` (a registry name).

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)``, channels in the card's order.
    model : LoadedModel
    method : str
        See :func:`SegXAILib.attribution.registry.available_methods`.
    target : TargetSpec or str
        A spec or its text (``"class:lesion"``, ``"instance:2"``, ...). Its scalar sums the
        class's logit (a sigmoid model's output channel ``c - 1``) over the target voxels; a
        sigmoid model's class mask is ``probability > 0.5`` (see :func:`prepare_target`).
    params : dict
        The method's parameters (``n_samples``, ``seed``, ...). ``references`` (expected
        gradients) may be a list of Images on the input grid. An unknown parameter is an error
        naming the method and the parameters it takes.
    amp : bool, optional
        Mixed precision for the attribution's forward and backward passes; by default on for
        CUDA. Without it the attribution runs in exact float32 (TF32 off on CUDA).
    prediction : Segmentation, optional
        The case's prediction by ``model`` (:func:`~SegXAILib.models.segment` of ``image``):
        class and instance targets are resolved from its model-grid labels instead of
        predicting again (it is checked for every target). Region, voxel and threshold
        targets need no prediction: without one, none is made.
    """
    method_class = get_method(method)
    params = check_params(method, params or {})
    spec = TargetSpec.parse(target) if isinstance(target, str) else target
    card, device = model.card, model.device
    amp = device.type == "cuda" if amp is None else amp
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report(progress, 0.0, "preprocessing")
    x, model_affine, resolved = prepare_target(image, model, spec, prediction, amp, window_batch)
    timings["prediction"] = time.perf_counter() - start

    references = params.get("references")
    if isinstance(references, (list, tuple)):
        # reference volumes given as Images (input grids): onto the model grid like the input
        if not references or not all(isinstance(r, Image) for r in references):
            raise SegXAIInputError("references: expected a non-empty list of images")
        volumes = [preprocess(r, card).as_tensor() for r in references]
        if any(v.shape != x.shape[1:] for v in volumes):
            raise SegXAIInputError("references: every reference must be on the input image's grid")
        params["references"] = torch.stack(volumes).to(device)

    start = time.perf_counter()
    forward = SegmentationForward(model.network, card, x.shape[2:], resolved, amp=amp, window_batch=window_batch,
                                  networks=getattr(model, "networks", None))
    precision = contextlib.nullcontext() if amp else exact_float32(device)
    with precision:
        attribution = method_class(forward).attribute(x, progress=sub_progress(progress, 0.1, 0.95), cancel=cancel,
                                                      **params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    values = attribution[0].detach().float().cpu().numpy()
    maps = to_input_grid(values, model_affine, image, tuple(image.channel_names))
    timings["postprocess"] = time.perf_counter() - start
    report(progress, 1.0, "done")
    defaults = {p.name: p.default for p in method_class.parameters}
    return AttributionResult(
        maps=maps,
        method=method,
        parameters={**defaults, **params},
        target=resolved.describe() | {"spec": spec.kind, "class_name": card.class_names[resolved.class_index]},
        model=card.name,
        model_checksum=card.checksum(),
        device=str(device),
        timings=timings,
    )
