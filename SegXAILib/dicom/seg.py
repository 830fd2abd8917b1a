"""DICOM Segmentation (SEG) objects, written and read with highdicom.

One segment per structure name (Segment Label = the name), binary, one frame per slice of the
source series that holds voxels of the segment; every frame references its source image (SOP
instance) and the SEG references the source series, study and frame of reference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..image import SegXAIInputError
from .series import DicomSeries, check_masks, frames_to_grid, new_uid

__all__ = ["write_seg", "read_seg", "SEGMENTATION_STORAGE"]

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def write_seg(
    path: str | os.PathLike,
    masks: Mapping[str, np.ndarray],
    series: DicomSeries,
    series_description: str = "SegXAI segmentation",
    series_number: int = 901,
    algorithm: str = "SegXAI",
) -> Path:
    """Write masks on a series' grid as one DICOM SEG file referencing that series.

    Parameters
    ----------
    path : path-like
        The file to write (atomically: a temporary file beside it, then a rename).
    masks : mapping
        Structure name -> ``(I, J, K)`` bool (or 0 / 1) mask on ``series.image``'s grid; one
        segment each, in the mapping's order (segment numbers 1, 2, ...).
    series : DicomSeries
        The source series (:func:`~SegXAILib.dicom.read_dicom_series`).
    series_description : str
    series_number : int
    algorithm : str
        Name of the algorithm recorded in each segment's Algorithm Identification.

    Returns
    -------
    Path
        ``path``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..io import atomic_path

    masks = check_masks(dict(masks), series.image, "masks")
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=__version__)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,  # the structure's own code is not known here
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
        )
        for number, name in enumerate(masks, start=1)
    ]
    # (I, J, K) -> frames (K, rows = J, columns = I), one frame per source file, segments last
    pixels = np.stack([mask.transpose(2, 1, 0) for mask in masks.values()], axis=-1).astype(np.uint8)
    segmentation = hd.seg.Segmentation(
        source_images=list(series.datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=new_uid(),
        series_number=int(series_number),
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer="SegXAI",
        manufacturer_model_name=algorithm,
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
        # an all-empty segmentation still needs frames to be a valid object
        omit_empty_frames=bool(pixels.any()),
    )
    path = Path(path)
    with atomic_path(path) as temporary:
        segmentation.save_as(temporary)
    return path


def _check_references(dataset, series: DicomSeries, source: str, require_same_series: bool) -> None:
    frame_uid = str(dataset.get("FrameOfReferenceUID", ""))
    if frame_uid != series.frame_of_reference_uid:
        raise SegXAIInputError(
            f"{source}: its frame of reference {frame_uid or '(none)'} is not the series' "
            f"{series.frame_of_reference_uid}; the contours belong to another patient position or scan")
    if require_same_series:
        referenced = {str(item.SeriesInstanceUID) for item in dataset.get("ReferencedSeriesSequence", [])}
        if series.series_instance_uid not in referenced:
            raise SegXAIInputError(
                f"{source}: references series {sorted(referenced) or '(none)'}, not the reference series "
                f"{series.series_instance_uid} (pass require_same_series=False to accept any series "
                "of the same frame of reference)")


def _frame_attribute(dataset, frame: int, sequence: str, keyword: str):
    """An attribute of a functional group of one frame: per-frame first, then shared."""
    for groups in (dataset.PerFrameFunctionalGroupsSequence[frame], dataset.SharedFunctionalGroupsSequence[0]):
        if sequence in groups and keyword in groups[sequence][0]:
            return groups[sequence][0][keyword].value
    raise SegXAIInputError(f"frame {frame + 1} has no {keyword}")


def read_seg(
    path: str | os.PathLike,
    series: DicomSeries,
    require_same_series: bool = True,
) -> dict[str, np.ndarray]:
    """Read a DICOM SEG file onto the grid of its source series.

    Each frame is placed on the voxels its own Image Position / Orientation (Patient) and
    Pixel Spacing give, so the frames' order, a crop or a flip of the series does not matter.

    Parameters
    ----------
    path : path-like
    series : DicomSeries
        The series the SEG was drawn on.
    require_same_series : bool
        Refuse a SEG that does not reference ``series`` (true) or accept any SEG in the same
        frame of reference whose frames lie on the series' voxels (false).

    Returns
    -------
    dict
        Segment label -> ``(I, J, K)`` bool mask on ``series.image``'s grid, in segment-number
        order. A FRACTIONAL segment is the voxels over half its maximum value. A repeated label
        gets `` #2``, `` #3`` appended.

    Raises
    ------
    SegXAIInputError
        Not a SEG, another frame of reference, another series (see ``require_same_series``),
        or frames off the series' voxels.
    """
    import highdicom as hd
    import pydicom

    source = f"segmentation {path}"
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise SegXAIInputError(f"{source}: cannot be read as DICOM ({error})") from None
    if str(dataset.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise SegXAIInputError(f"{source}: not a DICOM Segmentation (SOP class {dataset.get('SOPClassUID', '(none)')})")
    _check_references(dataset, series, source, require_same_series)
    segmentation = hd.seg.Segmentation.from_dataset(dataset, copy=False)
    fractional = str(dataset.SegmentationType) == "FRACTIONAL"
    maximum = float(dataset.get("MaximumFractionalValue", 1))
    numbers = [int(item.SegmentNumber) for item in dataset.SegmentSequence]
    labels: dict[int, str] = {}
    for item in dataset.SegmentSequence:
        label, copy = str(item.SegmentLabel), 2
        while label in labels.values():
            label, copy = f"{item.SegmentLabel} #{copy}", copy + 1
        if label != str(item.SegmentLabel):
            log.warning("%s: segment label %r repeated; read as %r", source, str(item.SegmentLabel), label)
        labels[int(item.SegmentNumber)] = label
    frames_of: dict[int, list[int]] = {number: [] for number in numbers}
    for frame in range(int(dataset.NumberOfFrames)):
        number = int(_frame_attribute(dataset, frame, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
        frames_of.setdefault(number, []).append(frame)
    masks = {}
    for number in numbers:
        frames = frames_of[number]
        stored = np.stack([segmentation.get_stored_frame(f + 1) for f in frames]) if frames else np.zeros((0, 1, 1))
        stored = stored > maximum / 2 if fractional else stored > 0
        masks[labels[number]] = frames_to_grid(
            stored,
            [_frame_attribute(dataset, f, "PlanePositionSequence", "ImagePositionPatient") for f in frames],
            [_frame_attribute(dataset, f, "PlaneOrientationSequence", "ImageOrientationPatient") for f in frames],
            [_frame_attribute(dataset, f, "PixelMeasuresSequence", "PixelSpacing") for f in frames],
            series.image, False, source)
    return masks
