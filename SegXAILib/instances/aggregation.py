"""SmoothGrad aggregated over an instance's voxels (paper 001, METHODS section 3), model grid.

With ``L`` the instance's voxels, ``c`` its class (``f_c`` its logit, output channel
``c - 1`` for a sigmoid model: :mod:`SegXAILib.attribution.targets`), ``e_k ~ N(0, sigma^2)``
(``sigma = noise_level (max x - min x)``, the draws of :class:`~SegXAILib.attribution.gradient.SmoothGrad`):

* mean (eq. 2): ``(1/n) sum_k (1/|L|) sum_{i in L} d f_c,i/dx (x + e_k)``. Gradients are
  linear, so this is SmoothGrad of the instance target divided by ``|L|``: one backward per
  noise sample.
* max (eq. 3): ``(1/n) sum_k max_{i in L} d f_c,i/dx (x + e_k)``, the max element-wise (per
  input voxel and channel) over the ``|L|`` per-voxel gradient maps, folded into a running
  max. Exact: one forward per noise sample through the windows that touch ``L``
  (:func:`torch.func.vjp`), then the per-voxel gradients as batched vector-Jacobian products of
  that one forward (:func:`torch.func.vmap` over ``batch_size`` one-hot cotangents at a time).
  Cost: ``n`` forwards and ``n |L|`` single-voxel backwards. On the CPU the networks' 3-D
  kernels are held channels-last meanwhile (:func:`_channels_last_weights`): a batch of
  backwards then runs oneDNN's channels-last convolutions, 1.5-2x faster than the default
  layout's for a segmentation U-Net (the same values to float32 rounding). When ``L``
  touches more than ``forward.max_graph_windows`` windows, the forward's graph would not fit
  that budget: the gradients then come from replica batches instead (the noisy input
  replicated ``b`` times, replica ``j``'s scalar the logit of its voxel ``i_j``, one forward
  and backward per batch over the windows that touch the batch's voxels).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional, Sequence

import numpy as np

import torch

from ..attribution.base import check_inputs, log_estimate, memory_batch_size
from ..attribution.forward import SegmentationForward
from ..attribution.gradient import noise_sigma, seeded_normal
from ..attribution.targets import RegionTarget
from ..image import Image, SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report

__all__ = ["instance_smoothgrad", "instance_saliency", "AGGREGATIONS"]

AGGREGATIONS = ("mean", "max")


def _noisy(inputs: torch.Tensor, k: int, sigma: float, seed: Optional[int]) -> torch.Tensor:
    """``x + e_k`` ``(C, D, H, W)``, the draw SmoothGrad makes for sample ``k``."""
    return inputs[0] + seeded_normal(inputs.shape[1:], seed, k, inputs.device, inputs.dtype) * sigma


@contextlib.contextmanager
def _channels_last_weights(networks: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """On the CPU, the networks' 5-D weights (3-D convolution kernels) in the channels-last
    memory layout for the duration, then their own layout back (the same values).

    Why: a batch of input gradients (``b`` cotangents, ``b`` replicas) of a 3-D convolution
    runs oneDNN's channels-last kernels when the weight is channels-last, several times faster
    on the CPU than the default layout's kernels for the few-channel full-resolution layers of
    a segmentation network (2 -> 2 channels at 48^3, 4 items, one thread: about 30 ms per item
    down to about 5). Only the strides change: every result is the same to float32 rounding.
    Other devices are left as they are (cuDNN picks its own layouts).
    """
    if device.type != "cpu":
        yield
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for network in networks:
            for tensor in list(network.parameters()) + list(network.buffers()):
                # a tensor shared by two members is channels-last by its second visit
                if tensor.dim() != 5 or tensor.is_contiguous(memory_format=torch.channels_last_3d):
                    continue
                saved.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
        yield
    finally:
        for tensor, data in reversed(saved):
            tensor.data = data


def instance_smoothgrad(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    n_samples: int = 20,
    noise_level: float = 0.1,
    aggregation: str = "mean",
    batch_size: int = 0,
    seed: Optional[int] = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> torch.Tensor:
    """Instance saliency ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

    Parameters
    ----------
    forward : SegmentationForward
        Its target is a :class:`~SegXAILib.attribution.targets.RegionTarget` (an
        ``InstanceTarget``, or any region): mask ``L``, class ``c``.
    n_samples, noise_level, seed
        SmoothGrad's noise: the same draws (for the same seed) as ``SmoothGrad``; every voxel
        of ``L`` sees the same noise ``e_k``.
    aggregation : str
        ``"mean"`` (eq. 2) or ``"max"`` (eq. 3).
    batch_size : int
        ``"mean"``: noisy samples per backward; ``"max"``: replicas (voxel terms) per backward,
        or one-hot cotangents per batched VJP. 0: the largest that fits in the free memory, at
        most 8 (:func:`~SegXAILib.attribution.base.memory_batch_size`); an explicit value that
        cannot fit is refused with the estimate.
    """
    inputs = check_inputs(inputs)
    if aggregation not in AGGREGATIONS:
        raise SegXAIInputError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if n_samples < 1:
        raise SegXAIInputError(f"n_samples must be >= 1, got {n_samples}")
    if batch_size < 0:
        raise SegXAIInputError(f"batch_size must be >= 1 (or 0: the largest that fits in memory), got {batch_size}")
    target = forward.target
    if not isinstance(target, RegionTarget):
        raise SegXAIInputError(
            f"instance saliency needs an instance or region target (a voxel mask), got {type(target).__name__}"
        )
    sigma = noise_sigma(inputs, noise_level)
    voxels = torch.nonzero(target.mask.cpu())  # (|L|, 3), raster order
    size = voxels.shape[0]
    if aggregation == "mean":
        # the estimate is logged, not reported: this function's progress reports one fraction per batch
        batch_size = memory_batch_size(forward, inputs, batch_size, n_samples, "instance saliency (mean)", cap=8)
        total: Optional[torch.Tensor] = None
        for start in range(0, n_samples, batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            chunk = range(start, min(n_samples, start + batch_size))
            samples = torch.stack([_noisy(inputs, k, sigma, seed) for k in chunk])
            contribution = forward.gradient(samples).sum(dim=0, keepdim=True)
            total = contribution if total is None else total + contribution
            report(progress, chunk.stop / n_samples, "instance saliency (mean)")
        assert total is not None
        return total / (n_samples * size)

    channel = int(target.channel)  # the class's logit channel (c - 1 for a sigmoid model)
    # a replica, or a batched VJP's cotangent, holds about one whole graph of the windows of L
    windows = len(forward.windowed.windows_for(target.mask.cpu()))
    shared = windows <= max(forward.window_batch, forward.max_graph_windows)
    # the shared-forward path's items (batched VJPs) cost a fraction of a window pass: it checks
    # the time limit itself, from its first measured forward and VJP batch
    batch_size = memory_batch_size(forward, inputs, batch_size, n_samples * size, "instance saliency (max)", cap=8,
                                   whole_graph=True, check_time=not shared)
    with _channels_last_weights(forward.networks, inputs.device):
        if shared:
            return _max_by_shared_forward(forward, inputs, voxels, channel, n_samples, sigma, batch_size, seed,
                                          progress, cancel)
        return _max_by_replicas(forward, inputs, voxels, channel, n_samples, sigma, batch_size, seed, progress,
                                cancel)


def _max_by_replicas(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    voxels: torch.Tensor,
    channel: int,
    n_samples: int,
    sigma: float,
    batch_size: int,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelToken],
) -> torch.Tensor:
    """Eq. 3 by replica batches (see the module docstring), when the windows of ``L`` are too
    many for one forward's graph."""
    size = voxels.shape[0]
    # terms (k, voxel) in sample-major order, batch_size replicas per backward
    terms = n_samples * size
    running: dict[int, torch.Tensor] = {}  # sample k -> running max over its voxels done so far
    noisy: dict[int, torch.Tensor] = {}
    total = torch.zeros_like(inputs)
    for start in range(0, terms, batch_size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        stop = min(terms, start + batch_size)
        term = torch.arange(start, stop)
        samples, voxel_rows = term // size, term % size
        for k in torch.unique(samples).tolist():
            if k not in noisy:
                noisy[k] = _noisy(inputs, k, sigma, seed)
        replicas = torch.stack([noisy[k] for k in samples.tolist()]).requires_grad_(True)
        index = voxels[voxel_rows]
        support = torch.zeros(forward.spatial_shape, dtype=torch.bool)
        support[tuple(index.T)] = True
        with torch.enable_grad():
            logits = forward.windowed(replicas, support, forward.window_batch)
            rows = torch.arange(stop - start, device=logits.device)
            index_on = index.to(logits.device)
            values = logits[rows, channel, index_on[:, 0], index_on[:, 1], index_on[:, 2]]
            (gradient,) = torch.autograd.grad(values.sum(), replicas)
        for k in torch.unique(samples).tolist():
            rows_k = (samples == k).nonzero().flatten().to(gradient.device)
            batch_max = gradient.index_select(0, rows_k).amax(dim=0)
            running[k] = batch_max if k not in running else torch.maximum(running[k], batch_max)
            if (k + 1) * size <= stop:  # sample k's voxels are all done
                total[0] += running.pop(k)
                noisy.pop(k)
        report(progress, stop / terms, "instance saliency (max)")
    assert not running
    return total / n_samples


def _max_by_shared_forward(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    voxels: torch.Tensor,
    channel: int,
    n_samples: int,
    sigma: float,
    batch_size: int,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelToken],
) -> torch.Tensor:
    """Eq. 3 with one forward per noise sample and batched VJPs of it (see the module docstring);
    ``channel`` is the output channel of the instance's class."""
    from torch.func import vjp, vmap

    support = torch.zeros(forward.spatial_shape, dtype=torch.bool)
    support[tuple(voxels.T)] = True
    size = voxels.shape[0]
    total = torch.zeros_like(inputs)
    started = time.perf_counter()
    forward_seconds = 0.0
    for k in range(n_samples):
        noisy = _noisy(inputs, k, sigma, seed)[None]
        with torch.enable_grad():
            logits, pullback = vjp(lambda z: forward.windowed(z, support, forward.window_batch), noisy)
        if k == 0:
            forward_seconds = time.perf_counter() - started
        running: Optional[torch.Tensor] = None
        # one buffer of one-hot cotangents per sample: its ones are set, used, then cleared
        # (the pullback keeps no reference), instead of a volume-sized fill per batch
        buffer = torch.zeros((min(batch_size, size), *logits.shape), dtype=logits.dtype, device=logits.device)
        for start in range(0, size, batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            index = voxels[start:start + batch_size].to(logits.device)
            rows = torch.arange(index.shape[0], device=logits.device)
            cotangents = buffer[:index.shape[0]]
            ones = (rows, 0, channel, index[:, 0], index[:, 1], index[:, 2])
            cotangents[ones] = 1
            (gradients,) = vmap(pullback)(cotangents)  # (b, 1, C, D, H, W)
            cotangents[ones] = 0
            batch_max = gradients[:, 0].detach().amax(dim=0)
            running = batch_max if running is None else torch.maximum(running, batch_max)
            if k == 0 and start == 0:  # measured: refused now if the whole is over the time limit
                _check_shared_forward_time(forward_seconds, time.perf_counter() - started - forward_seconds,
                                           n_samples, size, batch_size,
                                           batch_size * forward.gradient_cost(inputs).graph_bytes)
            report(progress, (k * size + start + index.shape[0]) / (n_samples * size), "instance saliency (max)")
        assert running is not None
        total[0] += running
    return total / n_samples


def _check_shared_forward_time(
    forward_seconds: float,
    batch_seconds: float,
    n_samples: int,
    size: int,
    batch_size: int,
    memory_bytes: float,
) -> None:
    """The time of the shared-forward max from its first forward and first VJP batch
    (``n_samples`` forwards, ``n_samples * ceil(size / batch_size)`` VJP batches): logged (the
    front ends show it; not a progress report, which counts batches) and refused over the time
    limit in force (:func:`~SegXAILib.models.memory.check_cost`)."""
    from ..models.memory import check_cost, format_bytes, note_estimate

    batches = -(-size // batch_size)
    seconds = n_samples * (forward_seconds + batches * batch_seconds)
    what = f"instance saliency (max): {n_samples * size} sample(s) x voxel, {n_samples} forward(s) + batched VJPs"
    duration = f"{seconds / 60:.0f} min" if seconds >= 120 else (f"{seconds:.0f} s" if seconds >= 1 else
                                                                   "under a second")
    text = (f"{what}: batch {batch_size}, about {format_bytes(memory_bytes)} and {duration} (measured on the first "
            "forward and VJP batch)")
    note_estimate(text)
    log_estimate(text, seconds, memory_bytes, n_samples * size)
    check_cost(what, seconds, memory_bytes, n_samples * size, text,
               'aggregation "mean" (one backward per noise sample instead of one per sample and voxel of the '
               "instance), or fewer samples (n_samples)")


def instance_saliency(
    image,
    model,
    labels: np.ndarray,
    instance_ids: Sequence[int],
    class_index: int = 1,
    aggregations: Sequence[str] = ("max",),
    n_samples: int = 20,
    noise_level: float = 0.1,
    batch_size: int = 0,
    seed: Optional[int] = 0,
    window_batch: int = 1,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[int, dict[str, Image]]:
    """Instance saliency maps on the input grid: :func:`instance_smoothgrad` of each instance.

    Parameters
    ----------
    image : Image
        ``(C, I, J, K)`` in the card's channel order.
    model : LoadedModel
    labels : numpy.ndarray
        ``(I, J, K)`` instance ids on the image's grid (:func:`~SegXAILib.instances.find_instances`).
    instance_ids : sequence of int
    class_index : int
        The instances' class in the card (background 0); its logit is read from
        :meth:`~SegXAILib.models.card.ModelCard.output_channel` (channel ``class_index - 1``
        for a sigmoid model).
    aggregations, n_samples, noise_level, batch_size, seed
        As :func:`instance_smoothgrad`; each aggregation is computed separately.
    window_batch : int
        Sliding windows per network call.

    Returns
    -------
    dict
        ``{instance id: {aggregation: Image (C, I, J, K)}}``: the model-grid maps brought onto
        the input grid (a signed permutation when the card only reorients).
    """
    from ..attribution.api import _model_grid_mask
    from ..attribution.targets import InstanceTarget
    from ..models.preprocessing import model_input, to_input_grid
    from ..progress import sub_progress

    labels = np.asarray(labels)
    if labels.shape != tuple(image.spatial_shape):
        raise SegXAIInputError(f"labels: shape {labels.shape} differs from the image's {tuple(image.spatial_shape)}")
    channel = model.card.output_channel(class_index)  # checked before any work
    x, model_affine = model_input(image, model.card, model.device)
    steps = max(1, len(instance_ids) * len(aggregations))
    maps: dict[int, dict] = {}
    step = 0
    for identifier in instance_ids:
        mask = _model_grid_mask(labels == identifier, image, model.card)
        if not bool(mask.any()):
            raise SegXAIInputError(f"instance {identifier} has no voxel on the model's grid (too small)")
        forward = SegmentationForward(model.network, model.card, x.shape[2:],
                                      InstanceTarget(class_index, mask, channel=channel, instance_id=identifier),
                                      window_batch=window_batch, networks=model.networks)
        for aggregation in aggregations:
            saliency = instance_smoothgrad(
                forward, x, n_samples=n_samples, noise_level=noise_level, aggregation=aggregation,
                batch_size=batch_size, seed=seed, cancel=cancel,
                progress=sub_progress(progress, step / steps, (step + 1) / steps),
            )
            maps.setdefault(identifier, {})[aggregation] = to_input_grid(
                saliency[0].detach().float().cpu().numpy(), model_affine, image, tuple(image.channel_names))
            step += 1
    return maps
