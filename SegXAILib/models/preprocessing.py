"""From an input image to the model's grid and intensities, and from the model's grid back.

Forward, with MONAI transforms: ``Orientation`` (axis codes of the card), ``Spacing`` (target
spacing of the card), the card's ``resize_to_shape`` (trilinear for images, nearest for labels,
voxel corners kept: the affine scales each voxel by ``old / new`` about the grid's outer
corner), then the card's intensity steps. The result is a ``MetaTensor`` whose
affine is the model grid's IJK-to-RAS matrix. Backward, :func:`to_input_grid` maps any
per-voxel output (probabilities, maps) onto the input grid: exactly (a permutation / flip /
crop of the array) when the two grids differ only by orientation, otherwise by linear
resampling in physical space (SimpleITK). ``nnunetv2`` cards use nnU-Net's own preprocessing and
its inverse (:mod:`SegXAILib.models.nnunet`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Image, SegXAIInputError
from .card import ModelCard

__all__ = ["preprocess", "model_input", "preprocess_labels", "intensity_transform", "to_input_grid", "resize_volume"]


def _intensity_step(step: dict):
    from monai.transforms import Lambda, NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    kind = step["kind"]
    if kind == "zscore":
        return NormalizeIntensity(nonzero=bool(step.get("nonzero", False)), channel_wise=True)
    if kind == "percentile":
        return ScaleIntensityRangePercentiles(
            lower=float(step["lower"]),
            upper=float(step["upper"]),
            b_min=float(step.get("b_min", 0.0)),
            b_max=float(step.get("b_max", 1.0)),
            clip=bool(step.get("clip", True)),
            channel_wise=True,
        )
    if kind == "ct_window":
        low = float(step["center"]) - float(step["width"]) / 2
        return ScaleIntensityRange(
            a_min=low,
            a_max=low + float(step["width"]),
            b_min=float(step.get("b_min", 0.0)),
            b_max=float(step.get("b_max", 1.0)),
            clip=True,
        )
    scale, offset = float(step["scale"]), float(step["offset"])
    return Lambda(lambda x: x * scale + offset)


def intensity_transform(card: ModelCard):
    """A callable ``(C, D, H, W) tensor -> tensor`` applying the card's intensity steps in order.

    A step with ``"channels": [indices]`` touches only those channels.
    """
    steps = [(step, _intensity_step(step)) for step in card.preprocessing.get("intensity", [])]

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step, transform in steps:
            channels = step.get("channels")
            if channels is None:
                x = transform(x)
            else:
                parts = [transform(x[c : c + 1]) if c in channels else x[c : c + 1] for c in range(x.shape[0])]
                x = torch.cat([torch.as_tensor(p) for p in parts])
        return x

    return apply


def preprocess(image: Image, card: ModelCard):
    """The image on the model's grid with the model's intensities, shape ``(C, D, H, W)``.

    Returns a ``monai.data.MetaTensor`` (float32) whose ``affine`` is the model grid's
    IJK-to-RAS matrix. An ``nnunetv2`` card uses nnU-Net's own preprocessing
    (:func:`~SegXAILib.models.nnunet.nnunet_model_input`; the model grid then depends on the
    image's non-zero region).
    """
    from monai.data import MetaTensor

    if card.format == "nnunetv2":
        from .nnunet import nnunet_model_input

        batch, grid = nnunet_model_input(image, card)
        return MetaTensor(batch[0], affine=torch.as_tensor(np.asarray(grid)))
    card.check_input_count(image.num_channels, "channel(s)")
    x = _to_model_grid(image, card, "bilinear")
    x = intensity_transform(card)(x)
    if not isinstance(x, MetaTensor):
        raise RuntimeError("preprocessing lost the image geometry")
    return x


def model_input(image: Image, card: ModelCard, device: torch.device | str = "cpu") -> tuple[torch.Tensor, np.ndarray]:
    """The network's input batch ``(1, C, D, H, W)`` on ``device`` and the model grid's
    IJK-to-RAS matrix (4, 4): :func:`preprocess` ready for a forward pass. For an ``nnunetv2``
    card the matrix is a :class:`~SegXAILib.models.nnunet.NNUNetModelGrid`, which
    :func:`to_input_grid` maps back through nnU-Net's own inverse."""
    if card.format == "nnunetv2":
        from .nnunet import nnunet_model_input

        return nnunet_model_input(image, card, device)
    x = preprocess(image, card)
    return x.as_tensor().unsqueeze(0).to(device), np.asarray(x.affine, dtype=float)


def preprocess_labels(labels: Image, card: ModelCard):
    """A label map ``(1, I, J, K)`` on the model's grid (same orientation and spacing as
    :func:`preprocess`, nearest-neighbour), for training and evaluation on that grid."""
    if card.format == "nnunetv2":
        # nnU-Net's model grid depends on the image's non-zero region, which a label map alone lacks
        raise SegXAIInputError(f"model {card.name!r}: label maps cannot be put on an nnU-Net model's grid without "
                               "their image (nnU-Net crops to the image's non-zero region)")
    return _to_model_grid(labels, card, "nearest")


def _to_model_grid(image: Image, card: ModelCard, mode: str):
    """MONAI ``Orientation``, ``Spacing`` then :func:`resize_volume` as the card says; a
    float32 ``MetaTensor``."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    x = MetaTensor(torch.as_tensor(image.array.astype(np.float32)), affine=torch.as_tensor(image.ijk_to_ras))
    if card.orientation:
        x = Orientation(axcodes=card.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
    if card.target_spacing:
        x = Spacing(pixdim=card.target_spacing, mode=mode, padding_mode="border")(x)
    if card.resize_to_shape:
        array, affine = resize_volume(x.as_tensor(), np.asarray(x.affine, dtype=float), card.resize_to_shape,
                                      "nearest" if mode == "nearest" else "trilinear")
        x = MetaTensor(array, affine=torch.as_tensor(affine))
    return x


def resize_volume(
    x: torch.Tensor, affine: np.ndarray, shape: tuple[int, int, int], mode: str = "trilinear"
) -> tuple[torch.Tensor, np.ndarray]:
    """Resize ``x`` ``(C, D, H, W)`` to ``(C, *shape)`` and give the resized grid's IJK-to-RAS.

    The volume's outer boundary (the voxels' outer corners) stays in place: output voxel
    ``i`` sits at input index ``(i + 0.5) * old / new - 0.5`` on each axis, which is what
    ``F.interpolate`` samples with ``align_corners=False`` (``"trilinear"``) and with
    ``"nearest-exact"`` (``mode="nearest"``, for labels). Mapping a prediction back through the
    returned affine is then the inverse resize.

    Returns
    -------
    array : torch.Tensor
        ``(C, *shape)`` float32.
    affine : np.ndarray
        ``(4, 4)``: ``affine @ [[diag(old / new), (old / new - 1) / 2], [0, 1]]``.
    """
    old = np.asarray(x.shape[1:], dtype=float)
    scale = old / np.asarray(shape, dtype=float)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1) / 2
    if mode == "nearest":
        resized = F.interpolate(x[None].float(), size=tuple(shape), mode="nearest-exact")[0]
    else:
        resized = F.interpolate(x[None].float(), size=tuple(shape), mode="trilinear", align_corners=False)[0]
    return resized, np.asarray(affine, dtype=float) @ index_map


def _signed_permutation(matrix: np.ndarray, atol: float = 1e-4):
    """(order, signs) if ``matrix`` (3, 3) is a signed permutation, else None."""
    rounded = np.round(matrix)
    if not np.allclose(matrix, rounded, atol=atol):
        return None
    if not (np.all(np.abs(rounded).sum(0) == 1) and np.all(np.abs(rounded).sum(1) == 1)):
        return None
    order = np.argmax(np.abs(rounded), axis=1)  # output axis a reads input axis order[a]
    signs = rounded[np.arange(3), order]
    return order, signs


def to_input_grid(
    values: np.ndarray,
    model_affine: np.ndarray,
    reference: Image,
    channel_names: tuple[str, ...] = (),
    interpolation: str = "linear",
) -> Image:
    """Map per-voxel ``values`` ``(C, D, H, W)`` on the model grid onto ``reference``'s grid.

    Exact (no interpolation) when the model grid is the reference grid up to an axis
    permutation, flips and a whole-voxel shift, which is the case whenever the card changes
    orientation but not spacing. Otherwise resampled in physical space (``interpolation``
    ``"linear"`` or ``"nearest"``), extrapolating the nearest value at the border. An nnU-Net
    model grid (:class:`~SegXAILib.models.nnunet.NNUNetModelGrid`) maps back as nnU-Net maps its
    predictions (its resampling function, the crop reverted with zeros outside, the transpose
    reverted).
    """
    from .nnunet import NNUNetModelGrid

    if isinstance(model_affine, NNUNetModelGrid):  # nnU-Net's resampling back, crop and transpose reverted
        from .nnunet import nnunet_to_input_grid

        return nnunet_to_input_grid(values, model_affine, reference, channel_names, interpolation)
    values = np.asarray(values)
    model_affine = np.asarray(model_affine, dtype=float)
    # model voxel index -> reference voxel index
    model_to_reference = np.linalg.inv(reference.ijk_to_ras) @ model_affine
    permutation = _signed_permutation(model_to_reference[:3, :3])
    offset = model_to_reference[:3, 3]
    if permutation is not None and np.allclose(offset, np.round(offset), atol=1e-3):
        return _exact_map(values, model_to_reference, permutation, reference, channel_names)
    return _resample_map(values, model_affine, reference, channel_names, interpolation)


def _exact_map(values, model_to_reference, permutation, reference, channel_names) -> Image:
    order, signs = permutation
    # reference axis a is model axis order[a] (scaled by signs[a])
    array = values.transpose(0, *(int(o) + 1 for o in order))
    offset = np.round(model_to_reference[:3, 3]).astype(int)
    starts = []
    for axis in range(3):
        size = array.shape[axis + 1]
        if signs[axis] < 0:
            array = np.flip(array, axis=axis + 1)
            # model index m -> reference index offset - m; after the flip m' = size-1-m
            starts.append(offset[axis] - (size - 1))
        else:
            starts.append(offset[axis])
    output = np.zeros((values.shape[0], *reference.spatial_shape), dtype=values.dtype)
    source, target = [slice(None)], [slice(None)]
    for axis in range(3):
        begin = max(0, starts[axis])
        end = min(reference.spatial_shape[axis], starts[axis] + array.shape[axis + 1])
        if end <= begin:
            raise SegXAIInputError("model grid and input grid do not overlap")
        target.append(slice(begin, end))
        source.append(slice(begin - starts[axis], end - starts[axis]))
    output[tuple(target)] = array[tuple(source)]
    return reference.with_array(output, channel_names)


def _resample_map(values, model_affine, reference, channel_names, interpolation) -> Image:
    from ..io import resample_to

    on_model_grid = Image(values.astype(np.float32, copy=False), model_affine, channel_names)
    resampled = resample_to(on_model_grid, reference, interpolation, extrapolate=True)
    return resampled.with_array(resampled.array.astype(values.dtype, copy=False), channel_names)
