"""DICOM Parametric Maps of float voxel maps (saliency, uncertainty), written with highdicom.

The values are stored as 32-bit floats (Float Pixel Data) with an identity Real World Value
Mapping, one frame per slice of the source series, so reading back gives the float32 values
themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..image import Image, SegXAIInputError
from .series import DicomSeries, frames_to_grid, new_uid

__all__ = ["write_parametric_map", "read_parametric_map", "PARAMETRIC_MAP_STORAGE"]

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def write_parametric_map(
    path: str | os.PathLike,
    values: np.ndarray | Image,
    series: DicomSeries,
    label: str,
    explanation: str = "",
    series_description: str | None = None,
    series_number: int = 903,
) -> Path:
    """Write a float map on a series' grid as a DICOM Parametric Map referencing that series.

    Parameters
    ----------
    path : path-like
        The file to write (atomically: a temporary file beside it, then a rename).
    values : numpy.ndarray or Image
        ``(I, J, K)`` (or one channel ``(1, I, J, K)``) finite values on ``series.image``'s grid;
        stored as float32. An Image must be on the series' grid.
    series : DicomSeries
        The source series (:func:`~SegXAILib.dicom.read_dicom_series`).
    label : str
        What the values are (e.g. ``"saliency"``); the Real World Value Mapping's LUT label
        (at most 16 characters) and the default series description.
    explanation : str
        A longer description (LUT explanation, at most 64 characters).
    series_description : str, optional
    series_number : int

    Returns
    -------
    Path
        ``path``.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    from .. import __version__
    from ..io import atomic_path

    if isinstance(values, Image):
        if not values.same_grid(series.image):
            raise SegXAIInputError("values: not on the grid of the series")
        if values.num_channels != 1:
            raise SegXAIInputError(f"values: {values.num_channels} channels; expected one")
        values = values.array[0]
    array = np.asarray(values)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.shape != series.image.spatial_shape:
        raise SegXAIInputError(f"values: shape {array.shape}; expected the series grid {series.image.spatial_shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise SegXAIInputError("values: must be finite numbers")
    if not label or len(label) > 16:
        raise SegXAIInputError(f"label {label!r}: must be 1 to 16 characters")
    frames = np.ascontiguousarray(array.astype(np.float32).transpose(2, 1, 0))  # (K, rows = J, columns = I)
    low, high = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=(explanation or label)[:64],
        unit=Code("1", "UCUM", "no units"),
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    width = max(high - low, 1e-6)
    parametric_map = hd.pm.ParametricMap(
        source_images=list(series.datasets),
        pixel_array=frames,
        series_instance_uid=new_uid(),
        series_number=int(series_number),
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer="SegXAI",
        manufacturer_model_name="SegXAI",
        software_versions=__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(low + high) / 2, window_width=width)],
        content_label=_content_label(label),
        series_description=series_description or label,
    )
    path = Path(path)
    with atomic_path(path) as temporary:
        parametric_map.save_as(temporary)
    return path


def _content_label(label: str) -> str:
    """A Content Label (VR CS) from a LUT label: upper case, characters outside ``A-Z 0-9 _``
    as ``_``, at most 16, no trailing underscore (highdicom refuses one, e.g. the 16 first
    characters of ``saliency guided_gradcam FLAIR``)."""
    import re

    return re.sub(r"[^A-Z0-9_]", "_", label.upper())[:16].rstrip("_") or "MAP"


def read_parametric_map(path: str | os.PathLike, series: DicomSeries) -> Image:
    """Read a Parametric Map onto the grid of its source series.

    Stored values are returned through the first Real World Value Mapping (slope and
    intercept); frames are placed by their own positions (see
    :func:`~SegXAILib.dicom.series.frames_to_grid`).

    Returns
    -------
    Image
        ``(1, I, J, K)`` float32 on ``series.image``'s grid, NaN where no frame lies; the
        channel is named after the mapping's LUT label.

    Raises
    ------
    SegXAIInputError
        Not a Parametric Map, another frame of reference, or frames off the series' voxels.
    """
    import pydicom

    from .seg import _check_references, _frame_attribute

    source = f"parametric map {path}"
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise SegXAIInputError(f"{source}: cannot be read as DICOM ({error})") from None
    if str(dataset.get("SOPClassUID", "")) != PARAMETRIC_MAP_STORAGE:
        raise SegXAIInputError(f"{source}: not a Parametric Map (SOP class {dataset.get('SOPClassUID', '(none)')})")
    _check_references(dataset, series, source, require_same_series=False)
    count = int(dataset.NumberOfFrames)
    frames = dataset.pixel_array.reshape(count, int(dataset.Rows), int(dataset.Columns)).astype(np.float32)
    mapping = _frame_attribute(dataset, 0, "RealWorldValueMappingSequence", "RealWorldValueSlope"), \
        _frame_attribute(dataset, 0, "RealWorldValueMappingSequence", "RealWorldValueIntercept")
    slope, intercept = float(mapping[0]), float(mapping[1])
    if (slope, intercept) != (1.0, 0.0):
        frames = frames * np.float32(slope) + np.float32(intercept)
    label = str(_frame_attribute(dataset, 0, "RealWorldValueMappingSequence", "LUTLabel"))
    volume = frames_to_grid(
        frames,
        [_frame_attribute(dataset, f, "PlanePositionSequence", "ImagePositionPatient") for f in range(count)],
        [_frame_attribute(dataset, f, "PlaneOrientationSequence", "ImageOrientationPatient") for f in range(count)],
        [_frame_attribute(dataset, f, "PixelMeasuresSequence", "PixelSpacing") for f in range(count)],
        series.image, np.float32(np.nan), source)
    return series.image.with_array(volume[None], (label,))
