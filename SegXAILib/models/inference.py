"""Segmenting an image with a loaded model: preprocessing, sliding-window inference, mapping back.

The label map and the class probabilities are returned on the input image's grid, with its
geometry untouched.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..image import Image
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .card import ModelCard
from .loaders import LoadedModel
from .preprocessing import model_input, to_input_grid

__all__ = ["Segmentation", "segment", "sliding_window_logits", "count_windows", "activate", "labels_from_probabilities",
           "class_masks", "probabilities_on_input_grid", "MULTI_LABEL_THRESHOLD"]

#: a sigmoid (multi-label) model predicts class c where its probability exceeds this
MULTI_LABEL_THRESHOLD = 0.5


@dataclass
class Segmentation:
    """A prediction on the input grid.

    Labels and masks: ``labels`` is the argmax of ``probabilities`` whatever the activation,
    one class per voxel. A sigmoid model is multi-label (one yes / no output per foreground
    class; structures may overlap): a voxel of two structures is labelled with the more
    probable one (ties: the lower index), while :meth:`mask` of either class holds it, since
    for a sigmoid model the mask of foreground class ``c`` is ``probability_c > 0.5``
    (:data:`MULTI_LABEL_THRESHOLD`), not ``labels == c``. The two differ only where
    structures overlap (a voxel whose highest foreground probability is at most 0.5 is
    background in both), so never for a model with one foreground class.

    Attributes
    ----------
    labels : Image
        ``(1, I, J, K)`` uint8 class indices (0 = background), on the input grid.
    probabilities : Image
        ``(K, I, J, K)`` float32, one channel per class of the card (for sigmoid models the
        background channel is ``1 - max`` of the foreground channels).
    card : ModelCard
    device : str
    timings : dict
        Seconds spent in ``preprocess``, ``inference`` and ``postprocess``.
    model_labels : torch.Tensor, optional
        ``(D, H, W)`` int64 class indices on the model grid (CPU): the argmax the attribution
        targets are resolved from, kept so that explaining the case needs no second prediction.
    model_masks : torch.Tensor, optional
        ``(K, D, H, W)`` bool per-class masks on the model grid (CPU), :func:`class_masks` of
        the model-grid probabilities: the voxels class and instance targets sum over. Needed
        for a sigmoid model with several foreground classes (they may overlap); otherwise they
        are the one-hot of ``model_labels``.
    """

    labels: Image
    probabilities: Image
    card: ModelCard
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    model_labels: Optional[torch.Tensor] = None
    model_masks: Optional[torch.Tensor] = None

    def mask(self, class_index: int = 1) -> np.ndarray:
        """Boolean ``(I, J, K)`` mask of one class: ``labels == class_index``, or for a sigmoid
        model's foreground class ``probability > 0.5`` (overlapping structures; see the class
        docstring)."""
        if self.card.output_activation == "sigmoid" and class_index >= 1:
            return self.probabilities.array[class_index] > MULTI_LABEL_THRESHOLD
        return self.labels.array[0] == class_index



@contextlib.contextmanager
def exact_float32(device: torch.device):
    """Full float32 convolutions and matrix products on CUDA within the block (TF32 off).

    PyTorch lets cuDNN convolutions use TF32 on Ampere and later GPUs by default (about 1e-3
    relative error). Attributions without mixed precision should equal the CPU's to float32
    rounding, so :func:`SegXAILib.attribution.explain` runs them inside this block; it does
    nothing on other devices.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul

def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows ``monai.inferers.sliding_window_inference`` runs for one image."""
    total = 1
    for size, roi in zip(image_size, roi_size):
        roi = min(roi, size)
        interval = max(1, int(roi * (1 - overlap))) if roi < size else roi
        total *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return total


def sliding_window_logits(
    x: torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    card: ModelCard,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    networks: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
) -> torch.Tensor:
    """Run ``network`` (or the ensemble ``networks``) over ``x`` ``(B, C, D, H, W)`` in the
    card's sliding windows.

    Each window's output is the mean over the members and the card's mirror flips of the
    logits (:func:`~SegXAILib.models.windows.ensemble_window_logits`), blended with the card's
    window scheme: MONAI's ``sliding_window_inference``, or nnU-Net v2's placement and
    Gaussian (:class:`~SegXAILib.models.windows.WindowedForward`). Returns the blended logits
    ``(B, K, D, H, W)`` as float32 on ``x``'s device. Progress is reported per window batch;
    ``cancel`` is checked before each.
    """
    from monai.inferers import sliding_window_inference

    from .windows import WindowedForward, ensemble_window_logits, mirror_combinations

    members = list(networks) if networks else [network]
    settings = card.inference
    roi = card.patch_size
    sw_batch_size = int(settings.get("sw_batch_size", 1))
    if card.window_scheme == "nnunet":
        def on_batch(done: int, total: int) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            report(progress, done / max(1, total), "sliding-window inference")

        windowed = WindowedForward(members[0], card, x.shape[2:], amp=amp, networks=members)
        output = windowed(x, window_batch=sw_batch_size, on_batch=on_batch)
        report(progress, 1.0, "sliding-window inference")
        return output

    mirrors = mirror_combinations(card.mirror_axes)
    total = max(1, math.ceil(count_windows(x.shape[2:], roi, settings["overlap"]) / sw_batch_size)) * x.shape[0]
    done = [0]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        if cancel is not None:
            cancel.raise_if_cancelled()
        output = ensemble_window_logits(members, mirrors, window, amp)
        done[0] += 1
        report(progress, done[0] / total, "sliding-window inference")
        return output

    return sliding_window_inference(
        x,
        roi_size=roi,
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=settings["overlap"],
        mode=settings.get("blend", "gaussian"),
        padding_mode="replicate",
    )


def activate(output: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """Network output ``(B, K', ...)`` -> class probabilities ``(B, K, ...)`` per the card."""
    if card.output_activation == "softmax":
        return torch.softmax(output, dim=1)
    if card.output_activation == "sigmoid":
        foreground = torch.sigmoid(output)
        background = 1 - foreground.max(dim=1, keepdim=True).values
        return torch.cat([background, foreground], dim=1)
    return output


def class_masks(probabilities: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """``(K, ...)`` class probabilities (:func:`activate` of one sample) -> ``(K, ...)`` bool,
    the predicted mask of each class.

    Softmax / none: the one-hot of the argmax (classes exclude each other). Sigmoid: the
    foreground class ``c`` where ``probability_c > 0.5`` (structures may overlap), the
    background where the argmax is (no foreground class above 0.5). See :class:`Segmentation`.
    """
    labels = probabilities.argmax(0)
    masks = labels[None] == torch.arange(probabilities.shape[0], device=labels.device).view(
        -1, *([1] * labels.ndim))
    if card.output_activation == "sigmoid":
        masks[1:] = probabilities[1:] > MULTI_LABEL_THRESHOLD
    return masks


def probabilities_on_input_grid(values: np.ndarray, model_affine: np.ndarray, image: Image, card: ModelCard) -> Image:
    """Model-grid values ``(K', D, H, W)`` -> class probabilities ``(K, I, J, K)`` on ``image``'s grid.

    ``values`` are the network's logits for an nnU-Net card (as nnU-Net: the logits resampled
    back, then the activation, then the crop reverted) and the activated probabilities
    (:func:`activate`) for every other card (mapped back by :func:`to_input_grid`).
    """
    if card.format == "nnunetv2":
        from .nnunet import nnunet_logits_to_probabilities

        return nnunet_logits_to_probabilities(values, model_affine, image, card)
    return to_input_grid(values, model_affine, image, tuple(card.class_names))


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``(K, ...)`` probabilities -> ``(1, ...)`` uint8 labels by argmax."""
    return np.argmax(probabilities, axis=0)[None].astype(np.uint8)


def segment(
    image: Image,
    model: LoadedModel,
    amp: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Segmentation:
    """Segment ``image`` (channels in the card's order) and map the result onto its grid.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)`` with C = the card's input channels.
    model : LoadedModel
    amp : bool, optional
        Mixed precision; defaults to on for CUDA, off elsewhere.
    progress, cancel
        Progress callback and cancel token (see :mod:`SegXAILib.progress`).
    """
    card, device = model.card, model.device
    amp = device.type == "cuda" if amp is None else amp
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report(progress, 0.0, "preprocessing")
    batch, model_affine = model_input(image, card, device)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode():
        output = sliding_window_logits(batch, model.network, card, amp, sub_progress(progress, 0.05, 0.9), cancel,
                                       networks=getattr(model, "networks", None))
        activated = activate(output, card)[0]
        model_labels = activated.argmax(0).cpu()
        model_masks = class_masks(activated, card).cpu()
        probabilities = activated.float().cpu().numpy()
        logits = output[0].float().cpu().numpy() if card.format == "nnunetv2" else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    report(progress, 0.9, "mapping back to the input grid")
    if cancel is not None:
        cancel.raise_if_cancelled()
    probability_image = probabilities_on_input_grid(logits if card.format == "nnunetv2" else probabilities,
                                                    model_affine, image, card)
    labels = image.with_array(labels_from_probabilities(probability_image.array), ("labels",))
    timings["postprocess"] = time.perf_counter() - start
    report(progress, 1.0, "done")
    return Segmentation(labels, probability_image, card, str(device), timings, model_labels=model_labels,
                        model_masks=model_masks)
