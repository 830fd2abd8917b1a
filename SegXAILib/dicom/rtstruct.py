"""DICOM RT Structure Sets (RTSTRUCT), written and read with pydicom.

Writing: each slice of a mask becomes closed planar polygons along the voxel edges (the
boundary between the structure's voxels and the others, vertices on voxel corners), one
Contour item per closed loop, each referencing the slice's SOP instance. Reading: the
polygons of a slice are rasterised on the reference grid by the even-odd rule (a voxel is
inside when a ray from its centre crosses the slice's polygons an odd number of times, so a
polygon inside another is a hole), and voxels whose centre lies on a polygon edge are inside.
With edges on voxel boundaries no centre lies on an edge, so a written mask reads back
exactly; contours drawn through boundary voxel centres (as many contouring tools draw them)
read back with those boundary voxels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..image import LPS_TO_RAS, SegXAIInputError
from .series import GRID_TOLERANCE, DicomSeries, check_masks, new_uid, now

__all__ = ["write_rtstruct", "read_rtstruct", "mask_polygons", "rasterise_polygons", "RT_STRUCTURE_SET_STORAGE"]

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: A voxel centre within this distance (in voxels) of a polygon edge lies on it.
EDGE_TOLERANCE = 0.01
#: distinct display colours of the ROIs, in order
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons along the voxel edges of a 2D mask.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(I, J)`` bool.

    Returns
    -------
    list of numpy.ndarray
        ``(N, 2)`` float vertices ``(i, j)`` at voxel corners (half-integers), one loop per
        array, first vertex not repeated, collinear vertices dropped. Each boundary edge of
        the mask is in exactly one loop, so the even-odd rule over all loops gives the mask
        back whichever way loops meeting at a corner are split.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    # corner (a, b) of the padded corner lattice is the point (a - 0.5, b - 0.5); the four
    # edges of voxel (i, j), counter-clockwise, each kept where the neighbour across is outside
    edges = []
    for (di, dj), start, end in (((0, -1), (0, 0), (1, 0)), ((1, 0), (1, 0), (1, 1)),
                                 ((0, 1), (1, 1), (0, 1)), ((-1, 0), (0, 1), (0, 0))):
        neighbour = padded[1 + di:padded.shape[0] - 1 + di, 1 + dj:padded.shape[1] - 1 + dj]
        i, j = np.nonzero(inside & ~neighbour)
        edges.append(np.stack([i + start[0], j + start[1], i + end[0], j + end[1]], axis=1))
    edges = np.concatenate(edges)
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for a, b, c, d in edges.tolist():
        outgoing.setdefault((a, b), []).append((c, d))
    polygons = []
    while outgoing:
        start = next(iter(outgoing))
        loop, point = [start], start
        while True:
            targets = outgoing[point]
            following = targets.pop()
            if not targets:
                del outgoing[point]
            if following == start:
                break
            loop.append(following)
            point = following
        vertices = np.array(loop, dtype=float)
        # drop vertices where the loop goes straight on
        before, after = vertices - np.roll(vertices, 1, axis=0), np.roll(vertices, -1, axis=0) - vertices
        turning = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 0
        polygons.append(vertices[turning] - 0.5)
    return polygons


def rasterise_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Voxels of a 2D grid inside closed polygons (even-odd rule; centres on an edge are inside).

    Parameters
    ----------
    polygons : sequence of numpy.ndarray
        ``(N, 2)`` vertices ``(i, j)`` in voxel units (voxel centres at integers).
    shape : tuple of int
        ``(I, J)``.

    Returns
    -------
    numpy.ndarray
        ``(I, J)`` bool.
    """
    size_i, size_j = shape
    closed = [np.asarray(p, dtype=float) for p in polygons if len(p) >= 3]
    result = np.zeros(shape, dtype=bool)
    if not closed:
        return result
    start = np.concatenate(closed)
    end = np.concatenate([np.roll(p, -1, axis=0) for p in closed])
    i0, j0, i1, j1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    # ray casting towards +j from each centre: an edge crosses the rows i with
    # min <= i < max (half-open, so a vertex on a row counts once); edges along j cross none
    low, high = np.minimum(i0, i1), np.maximum(i0, i1)
    first = np.clip(np.ceil(low), 0, size_i).astype(np.int64)
    stop = np.clip(np.ceil(high), 0, size_i).astype(np.int64)
    edge, rows = _expand(first, stop)
    if edge.size:
        crossing = j0[edge] + (rows - i0[edge]) * (j1[edge] - j0[edge]) / (i1[edge] - i0[edge])
        # centres j < crossing, i.e. j <= ceil(crossing) - 1, see this crossing
        last = np.minimum(np.ceil(crossing).astype(np.int64) - 1, size_j - 1)
        keep = last >= 0
        crossings = np.zeros((size_i, size_j), dtype=np.int64)
        np.add.at(crossings, (rows[keep], last[keep]), 1)
        result = np.cumsum(crossings[:, ::-1], axis=1)[:, ::-1] % 2 == 1
    # centres on an edge: lattice points on a segment have an integer coordinate along its longer axis
    swap = np.abs(j1 - j0) > np.abs(i1 - i0)
    a0, b0, a1, b1 = np.where(swap, j0, i0), np.where(swap, i0, j0), np.where(swap, j1, i1), np.where(swap, i1, j1)
    size_along = np.where(swap, size_j, size_i)
    first = np.clip(np.ceil(np.minimum(a0, a1) - EDGE_TOLERANCE), 0, size_along).astype(np.int64)
    stop = np.clip(np.floor(np.maximum(a0, a1) + EDGE_TOLERANCE) + 1, 0, size_along).astype(np.int64)
    edge, along = _expand(first, stop)
    slope = np.divide(b1 - b0, a1 - a0, out=np.zeros_like(a0), where=a1 != a0)
    across = b0[edge] + (along - a0[edge]) * slope[edge]
    hit = np.abs(across - np.rint(across)) <= EDGE_TOLERANCE
    along, across, flipped = along[hit], np.rint(across[hit]).astype(np.int64), swap[edge[hit]]
    i, j = np.where(flipped, across, along), np.where(flipped, along, across)
    inside = (i >= 0) & (i < size_i) & (j >= 0) & (j < size_j)
    result[i[inside], j[inside]] = True
    return result


def _expand(first: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ``(n, value)`` with ``first[n] <= value < stop[n]``: two flat int64 arrays."""
    counts = np.maximum(stop - first, 0)
    index = np.repeat(np.arange(len(first)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return index, first[index] + offsets


def _sequence_item(**values):
    import pydicom

    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _contour_data(points: np.ndarray):
    """Contour Data (3006,0050) of ``(N, 3)`` LPS points, as an encoded element.

    Encoded here rather than as a list of numbers: pydicom would build and validate one DS
    object per coordinate, which dominates the time of a structure set with many contours.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    # a DS holds at most 16 characters; 10 significant digits keep 1e-6 mm on a 1 m field
    value = "\\".join(f"{v:.10g}" for v in points.ravel()).encode("ascii")
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(0x30060050), "DS", len(value), value, 0, False, True)


def write_rtstruct(
    path: str | os.PathLike,
    masks: Mapping[str, np.ndarray],
    series: DicomSeries,
    series_description: str = "SegXAI structures",
    series_number: int = 902,
    label: str = "SegXAI",
) -> Path:
    """Write masks on a series' grid as an RT Structure Set referencing that series.

    Parameters
    ----------
    path : path-like
        The file to write (atomically: a temporary file beside it, then a rename).
    masks : mapping
        Structure name -> ``(I, J, K)`` bool (or 0 / 1) mask on ``series.image``'s grid; one
        ROI each (ROI numbers 1, 2, ... in the mapping's order). An empty mask is an ROI
        without contours.
    series : DicomSeries
        The source series (:func:`~SegXAILib.dicom.read_dicom_series`).
    series_description : str
    series_number : int
    label : str
        Structure Set Label.

    Returns
    -------
    Path
        ``path``.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    from .. import __version__
    from ..io import atomic_path

    masks = check_masks(dict(masks), series.image, "masks")
    source = series.datasets[0]
    to_lps = LPS_TO_RAS @ series.image.ijk_to_ras
    date, time = now()
    sop_uid = new_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # patient and study: those of the source series
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = new_uid(), int(series_number)
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "SegXAI", "SegXAI", __version__
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1

    def image_reference(k: int):
        return _sequence_item(ReferencedSOPClassUID=series.datasets[k].SOPClassUID,
                              ReferencedSOPInstanceUID=series.datasets[k].SOPInstanceUID)

    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_sequence_item(
        FrameOfReferenceUID=series.frame_of_reference_uid,
        RTReferencedStudySequence=DicomSequence([_sequence_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Study Component Management (retired, as written)
            ReferencedSOPInstanceUID=series.study_instance_uid,
            RTReferencedSeriesSequence=DicomSequence([_sequence_item(
                SeriesInstanceUID=series.series_instance_uid,
                ContourImageSequence=DicomSequence([image_reference(k) for k in range(len(series.datasets))]),
            )]),
        )]),
    )])
    rois, roi_contours, observations = [], [], []
    for number, (name, mask) in enumerate(masks.items(), start=1):
        rois.append(_sequence_item(ROINumber=number, ReferencedFrameOfReferenceUID=series.frame_of_reference_uid,
                                   ROIName=name, ROIGenerationAlgorithm="AUTOMATIC"))
        contours = []
        for k in np.nonzero(mask.any(axis=(0, 1)))[0]:
            for polygon in mask_polygons(mask[:, :, k]):
                ijk = np.column_stack([polygon, np.full(len(polygon), float(k))])
                points = ijk @ to_lps[:3, :3].T + to_lps[:3, 3]
                contour = _sequence_item(
                    ContourImageSequence=DicomSequence([image_reference(int(k))]),
                    ContourGeometricType="CLOSED_PLANAR",
                    NumberOfContourPoints=len(points),
                )
                contour[0x30060050] = _contour_data(points)
                contours.append(contour)
        roi = _sequence_item(ReferencedROINumber=number, ROIDisplayColor=list(_COLOURS[(number - 1) % len(_COLOURS)]))
        if contours:
            roi.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi)
        observations.append(_sequence_item(ObservationNumber=number, ReferencedROINumber=number,
                                           RTROIInterpretedType="ORGAN", ROIInterpreter=""))
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    path = Path(path)
    with atomic_path(path) as temporary:
        ds.save_as(temporary, enforce_file_format=True)
    return path


def read_rtstruct(
    path: str | os.PathLike,
    series: DicomSeries,
    require_same_series: bool = True,
) -> dict[str, np.ndarray]:
    """Read an RT Structure Set and rasterise every ROI on the grid of a series.

    Each closed planar contour must lie in a slice plane of the series (within
    :data:`~SegXAILib.dicom.series.GRID_TOLERANCE` voxel); its points are mapped to voxel
    indices through the series' geometry, so oblique and flipped series need no special case.
    The polygons of one ROI on one slice are combined by the even-odd rule (see the module).
    Point and open contours are skipped (a warning says so).

    Parameters
    ----------
    path : path-like
    series : DicomSeries
        The series the structures were drawn on.
    require_same_series : bool
        Refuse a structure set that does not reference ``series`` (true) or accept any in the
        same frame of reference whose contours lie in the series' slice planes (false).

    Returns
    -------
    dict
        ROI name -> ``(I, J, K)`` bool mask on ``series.image``'s grid, in the Structure Set
        ROI Sequence's order (an ROI without contours is all false). A repeated name gets
        `` #2``, `` #3`` appended.

    Raises
    ------
    SegXAIInputError
        Not an RTSTRUCT, another frame of reference, another series (see
        ``require_same_series``), or a contour off the series' slice planes.
    """
    import pydicom

    source = f"structure set {path}"
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise SegXAIInputError(f"{source}: cannot be read as DICOM ({error})") from None
    if str(ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise SegXAIInputError(f"{source}: not an RT Structure Set (SOP class {ds.get('SOPClassUID', '(none)')})")
    frames = {str(item.FrameOfReferenceUID) for item in ds.get("ReferencedFrameOfReferenceSequence", [])}
    roi_frames = {str(item.get("ReferencedFrameOfReferenceUID", "")) for item in ds.get("StructureSetROISequence", [])}
    if series.frame_of_reference_uid not in frames or roi_frames - {series.frame_of_reference_uid, ""}:
        raise SegXAIInputError(
            f"{source}: its frame of reference {sorted(frames | roi_frames - {''}) or '(none)'} is not the series' "
            f"{series.frame_of_reference_uid}; the contours belong to another patient position or scan")
    if require_same_series:
        referenced = {str(s.SeriesInstanceUID) for f in ds.ReferencedFrameOfReferenceSequence
                      for st in f.get("RTReferencedStudySequence", []) for s in st.get("RTReferencedSeriesSequence", [])}
        if series.series_instance_uid not in referenced:
            raise SegXAIInputError(
                f"{source}: references series {sorted(referenced) or '(none)'}, not the reference series "
                f"{series.series_instance_uid} (pass require_same_series=False to accept any series "
                "of the same frame of reference)")
    names: dict[int, str] = {}
    for item in ds.get("StructureSetROISequence", []):
        name, copy = str(item.ROIName), 2
        while name in names.values():
            name, copy = f"{item.ROIName} #{copy}", copy + 1
        if name != str(item.ROIName):
            log.warning("%s: ROI name %r repeated; read as %r", source, str(item.ROIName), name)
        names[int(item.ROINumber)] = name
    shape = series.image.spatial_shape
    to_ijk = np.linalg.inv(LPS_TO_RAS @ series.image.ijk_to_ras)
    masks = {name: np.zeros(shape, dtype=bool) for name in names.values()}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if number not in names:
            raise SegXAIInputError(f"{source}: contours of ROI {number}, which the structure set does not name")
        by_slice: dict[int, list[np.ndarray]] = {}
        for index, contour in enumerate(roi.get("ContourSequence", []), start=1):
            kind = str(contour.get("ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                log.warning("%s: ROI %r contour %d is %s, not CLOSED_PLANAR: skipped", source, names[number], index, kind)
                continue
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            ijk = points @ to_ijk[:3, :3].T + to_ijk[:3, 3]
            k = float(np.median(ijk[:, 2]))
            if np.abs(ijk[:, 2] - round(k)).max() > GRID_TOLERANCE:
                raise SegXAIInputError(
                    f"{source}: ROI {names[number]!r} contour {index} does not lie in a slice plane of the series "
                    f"(slice index {ijk[:, 2].min():.3f} to {ijk[:, 2].max():.3f}); resample the contours first")
            if not 0 <= round(k) < shape[2]:
                log.warning("%s: ROI %r contour %d lies outside the series (slice %d): skipped",
                            source, names[number], index, round(k))
                continue
            by_slice.setdefault(int(round(k)), []).append(ijk[:, :2])
        for k, polygons in by_slice.items():
            masks[names[number]][:, :, k] = rasterise_polygons(polygons, shape[:2])
    return masks
