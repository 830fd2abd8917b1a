"""Instance-level Grad-CAM++ (paper 001, eqs. 8-10; METHODS section 2).

For a layer with activations ``A`` ``(K, d, h, w)`` and ``g = dT/dA`` of the *instance* (or
region) target ``T = sum_{i in L} f_c,i``:

* ``alpha_k,i = g_k,i^2 / (2 g_k,i^2 + sum_space(A_k) g_k,i^3)`` (0 where the denominator is
  0), the Grad-CAM++ coefficient (eq. 7), exactly as :func:`~SegXAILib.attribution.cam.cam_from_layer`;
* per-element weights ``w_k,i = alpha_k,i relu(g_k,i)`` (the spatial sum of the class-level
  ``w_k`` is removed, eq. 10), so activations of other instances, where ``g`` vanishes, do
  not enter the map;
* ``map_i = relu(sum_k w_k,i A_k,i)`` (eq. 8).

Layers (``layer``), upsampling (trilinear, ``align_corners=False``, to the window) and the
sliding-window blending (``sum_w m_w map_w / sum_w m_w``, cropped to the input) are those of
the class-level CAMs in :mod:`SegXAILib.attribution.cam` (its :func:`resolve_layers`, hooks
and window bookkeeping); the map is per window, like the class-level weights.

:func:`~SegXAILib.attribution.cam.windowed_cam` runs the hooks and the window bookkeeping with
:func:`instance_cam_from_layer` as its per-layer map.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attribution.base import check_inputs
from ..attribution.cam import gradcam_plusplus_alpha, resolve_layers, windowed_cam
from ..attribution.forward import SegmentationForward
from ..attribution.targets import RegionTarget
from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report

__all__ = ["instance_cam_from_layer", "instance_gradcam_plusplus"]


def instance_cam_from_layer(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Instance Grad-CAM++ of one layer ``(B, 1, *space)`` from ``A``, ``g`` ``(B, K, *space)``:
    ``relu(sum_k alpha_k,i relu(g_k,i) A_k,i)`` (per-element weights, no spatial sum)."""
    a = activations.float()
    weights = gradcam_plusplus_alpha(a, gradients) * F.relu(gradients.float())
    return F.relu((weights * a).sum(dim=1, keepdim=True))


def instance_gradcam_plusplus(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    layer: str = "bottleneck_decoder",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> torch.Tensor:
    """Instance Grad-CAM++ ``(1, C, D, H, W)`` of ``inputs`` ``(1, C, D, H, W)`` (model grid).

    Parameters
    ----------
    forward : SegmentationForward
        Its target is a :class:`~SegXAILib.attribution.targets.RegionTarget` (an
        ``InstanceTarget`` or any region ``L``).
    layer : str
        ``"final"``, ``"bottleneck_decoder"`` (default), ``"all_conv"`` or a dotted module name,
        as for the class-level CAMs; several layers are averaged.

    Returns
    -------
    torch.Tensor
        One map for the volume, repeated over the ``C`` input channels.
    """
    inputs = check_inputs(inputs)
    if not isinstance(forward.target, RegionTarget):
        raise SegXAIInputError(
            f"instance Grad-CAM++ needs an instance or region target (a voxel mask), got {type(forward.target).__name__}"
        )
    names = resolve_layers(forward.network, layer, int(inputs.shape[1]), forward.card.patch_size, inputs.device)
    cam = windowed_cam(forward, inputs, names, instance_cam_from_layer, cancel)
    report(progress, 1.0, "instance Grad-CAM++")
    return cam.repeat(1, inputs.shape[1], 1, 1, 1)
