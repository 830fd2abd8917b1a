"""A DICOM image series with the identifiers derived objects reference, and the geometry
shared by the SEG, RTSTRUCT and Parametric Map readers and writers.

The voxel grid of a series is the one :func:`SegXAILib.io.read_image` reads (``(1, I, J, K)``,
RAS): ``i`` runs along a slice's columns (the first vector of Image Orientation (Patient)),
``j`` along its rows, ``k`` across slices in the order ITK sorts them (along the slice normal,
whatever the files' instance numbers). Every file of the series is tied to its ``k`` from its
own Image Position (Patient), never from file or instance order, so flipped series (slice
normal against the instance order, or a reversed row direction) keep their geometry.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..image import LPS_TO_RAS, Image, SegXAIInputError

__all__ = ["DicomSeries", "read_dicom_series", "atomic_folder", "frames_to_grid", "new_uid", "MAX_LABEL"]

#: Longest structure name a SEG segment label / RTSTRUCT ROI name holds (DICOM LO).
MAX_LABEL = 64
#: Largest distance (in voxels) of a file's position or a frame's pixel centre from the
#: reference grid that still counts as on it: positions are decimal strings of at most 16
#: characters, so files written by other software round them (to 0.01 mm at worst, which is
#: under 0.02 voxel for voxels of 0.5 mm and more).
GRID_TOLERANCE = 0.02


def new_uid() -> str:
    """A new DICOM UID (pydicom's root)."""
    from pydicom.uid import generate_uid

    return str(generate_uid())


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM image series read from a folder.

    Attributes
    ----------
    folder : Path
    image : Image
        ``(1, I, J, K)`` voxels and their RAS geometry, as :func:`~SegXAILib.io.read_image` reads them.
    datasets : tuple of pydicom.Dataset
        The headers (no pixel data) of the ``K`` files, dataset ``k`` holding slice ``k``.
    """

    folder: Path
    image: Image
    datasets: tuple

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UID of slice ``k`` at index ``k``."""
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def sop_class_uid(self) -> str:
        return str(self.datasets[0].SOPClassUID)


def _frame_to_lps(position: Sequence[float], orientation: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    """The 4x4 matrix mapping a frame's ``(column, row, 0, 1)`` to LPS millimetres.

    ``spacing`` is Pixel Spacing: (between rows, between columns).
    """
    row_direction = np.asarray(orientation[:3], dtype=float)  # along a row: columns increase
    column_direction = np.asarray(orientation[3:6], dtype=float)
    matrix = np.eye(4)
    matrix[:3, 0] = row_direction * float(spacing[1])
    matrix[:3, 1] = column_direction * float(spacing[0])
    matrix[:3, 2] = np.cross(row_direction, column_direction)
    matrix[:3, 3] = np.asarray(position, dtype=float)
    return matrix


def frame_to_ijk(reference: Image, position: Sequence[float], orientation: Sequence[float],
                 spacing: Sequence[float]) -> np.ndarray:
    """The 4x4 matrix mapping a frame's ``(column, row, 0, 1)`` to ``reference`` voxel indices."""
    return np.linalg.inv(reference.ijk_to_ras) @ LPS_TO_RAS @ _frame_to_lps(position, orientation, spacing)


def read_dicom_series(folder: str | os.PathLike) -> DicomSeries:
    """Read a folder holding one DICOM image series: voxels, geometry and the headers.

    Parameters
    ----------
    folder : path-like
        The series folder (other DICOM objects such as a SEG or RTSTRUCT may lie beside it;
        only the files of the series ITK reads are kept).

    Raises
    ------
    SegXAIInputError
        Not a folder of one series, a file without the identifiers derived objects
        reference (SOP / Series / Study Instance UID, Frame of Reference UID), or files whose
        positions are not the slices of the grid ITK read.
    """
    import pydicom

    from ..io import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise SegXAIInputError(f"series {folder}: not a folder holding a DICOM series")
    image = read_image(folder, "image")
    series_uid = _itk_series_uid(folder)
    by_slice: dict[int, Any] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file: not part of the series
            continue
        if str(dataset.get("SeriesInstanceUID", "")) != series_uid or "ImagePositionPatient" not in dataset:
            continue
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if not str(dataset.get(keyword, "")):
                raise SegXAIInputError(f"series {folder}: file {path.name} has no {keyword}")
        to_ijk = frame_to_ijk(image, dataset.ImagePositionPatient, dataset.ImageOrientationPatient, dataset.PixelSpacing)
        k = float(to_ijk[2, 3])
        # the file's corner voxel must be voxel (0, 0, k) and its rows / columns the grid's i / j
        expected = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
        if (abs(k - round(k)) > GRID_TOLERANCE or np.abs(to_ijk[:2, 3]).max() > GRID_TOLERANCE
                or np.abs(to_ijk[:2, :2] - expected[:, :2]).max() > 1e-3):
            raise SegXAIInputError(f"series {folder}: file {path.name} is not a slice of the series' grid")
        by_slice[int(round(k))] = dataset
    shape = image.spatial_shape
    if sorted(by_slice) != list(range(shape[2])):
        raise SegXAIInputError(f"series {folder}: found files for {len(by_slice)} of its {shape[2]} slices")
    frames = {str(ds.FrameOfReferenceUID) for ds in by_slice.values()}
    if len(frames) != 1:
        raise SegXAIInputError(f"series {folder}: its files name {len(frames)} frames of reference")
    return DicomSeries(folder=folder, image=image, datasets=tuple(by_slice[k] for k in range(shape[2])))


def _itk_series_uid(folder: Path) -> str:
    import SimpleITK as sitk

    return sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))[0]


def frames_to_grid(
    frames: np.ndarray,
    positions: Sequence[Sequence[float]],
    orientations: Sequence[Sequence[float]],
    spacings: Sequence[Sequence[float]],
    reference: Image,
    fill: Any,
    source: str,
) -> np.ndarray:
    """Place 2D frames (``(F, rows, columns)``) on the voxels of ``reference`` they lie on.

    Each frame's pixel centres must be voxel centres of ``reference`` (same planes and
    in-plane spacing, any crop, order, flip or transposition): they are copied, exactly;
    pixels outside the grid are dropped. A frame off the grid is refused rather than
    interpolated, since interpolation would quietly change a contour.

    Returns
    -------
    numpy.ndarray
        ``(I, J, K)``, ``fill`` where no frame lies, of the frames' dtype.
    """
    shape = reference.spatial_shape
    volume = np.full(shape, fill, dtype=frames.dtype)
    for index, frame in enumerate(frames):
        to_ijk = frame_to_ijk(reference, positions[index], orientations[index], spacings[index])
        linear, offset = to_ijk[:3, :2], to_ijk[:3, 3]
        # each frame axis must step one voxel along one grid axis, from a voxel centre
        steps = np.rint(linear)
        if (np.abs(linear - steps).max() > 1e-3 or not np.array_equal(np.abs(steps).sum(axis=0), [1, 1])
                or np.abs(offset - np.rint(offset)).max() > GRID_TOLERANCE):
            raise SegXAIInputError(
                f"{source}: frame {index + 1} does not lie on the voxels of the reference image "
                "(other planes or spacing); resample it onto the series first")
        rows, columns = frame.shape
        c, r = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
        ijk = (steps[:, 0, None, None] * c + steps[:, 1, None, None] * r + np.rint(offset)[:, None, None]).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(shape)[:, None, None]), axis=0)
        volume[ijk[0][inside], ijk[1][inside], ijk[2][inside]] = frame[inside]
    return volume


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; rename it onto ``folder`` on success.

    ``folder`` must not exist yet (a new folder of DICOM files is never merged into an old
    one). On any exception the temporary folder is removed.
    """
    from ..io import check_writable_dir

    folder = Path(folder)
    if folder.exists():
        raise SegXAIInputError(f"output {folder}: already exists; DICOM objects are written to a new folder")
    check_writable_dir(folder.parent)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield temporary
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def now() -> tuple[str, str]:
    """DICOM date and time of now: ``("YYYYMMDD", "HHMMSS")``."""
    stamp = datetime.datetime.now()
    return stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S")


def check_names(masks: dict, what: str) -> None:
    """Structure names must be non-empty DICOM labels (at most 64 characters, no backslash)."""
    if not masks:
        raise SegXAIInputError(f"{what}: no structures given")
    for name in masks:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_LABEL or "\\" in name:
            raise SegXAIInputError(
                f"{what}: structure name {name!r} must be 1 to {MAX_LABEL} characters without a backslash")


def check_masks(masks: dict, reference: Image, what: str) -> dict[str, np.ndarray]:
    """The masks as ``(I, J, K)`` bool arrays on ``reference``'s grid; a clear error otherwise."""
    check_names(masks, what)
    result = {}
    for name, mask in masks.items():
        array = np.asarray(mask)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.shape != reference.spatial_shape:
            raise SegXAIInputError(
                f"{what}: structure {name!r} has shape {array.shape}; expected the series grid {reference.spatial_shape}")
        if array.dtype != np.bool_:
            if not np.isin(array, (0, 1)).all():
                raise SegXAIInputError(f"{what}: structure {name!r} holds values other than 0 and 1")
            array = array.astype(bool)
        result[name] = array
    return result
