"""Reading and writing images with SimpleITK: NIfTI, NRRD, MetaImage and DICOM series.

Every reader returns an :class:`~SegXAILib.image.Image` with its geometry; every writer is
atomic (a temporary file in the destination folder, then a rename), so a failed or
interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .image import Image, SegXAIInputError

__all__ = [
    "check_nifti_complete",
    "check_dicom_series",
    "read_image",
    "read_channels",
    "write_image",
    "write_dicom_series",
    "resample_to",
    "atomic_path",
    "check_writable_dir",
    "check_output_dir",
    "first_missing_folder",
    "IMAGE_SUFFIXES",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SegXAIInputError(f"output {path}: folder {parent} does not exist")
    # O_EXCL on a random name, with mode 0666: the process umask applies as for a plain
    # open() (mkstemp would make an owner-only file), and no umask juggling across threads
    while True:
        temporary_path = parent / f".{path.name}.{uuid.uuid4().hex[:12]}{_suffix(path) or '.tmp'}"
        try:
            os.close(os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise SegXAIInputError(f"output {path}: cannot be written ({error.strerror})") from None
    try:
        yield temporary_path
        os.replace(temporary_path, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary_path.unlink()
        # a full disk (ENOSPC), a quota, a vanished folder: the file named, nothing half-written left
        raise SegXAIInputError(f"output {path}: cannot be written ({error.strerror or error})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            temporary_path.unlink()
        raise


def check_writable_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Make sure ``path`` is (or, with ``create``, is made) a writable folder; a clear error otherwise.

    Writability is tested by writing (a probe file made and removed), not by permission bits
    alone, so the answer is the same for every user: a folder without any write permission
    bit (``chmod 555``) is refused even where the kernel would let root write into it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SegXAIInputError(f"output folder {path} exists and is not a folder")
    if create and not path.exists():
        check_output_dir(path)  # the parent's writability, with its reason, before making anything
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SegXAIInputError(f"output folder {path} cannot be created: {error.strerror}") from None
    if not path.is_dir():
        raise SegXAIInputError(f"output folder {path} does not exist")
    _probe_writable(path, f"output folder {path}")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a writable folder or can be created as one, without creating it.

    Front ends call this before any work so that a refused run leaves nothing behind; the
    writers create the folder when they write the first file. For a folder that does not
    exist yet, the nearest existing folder above it must be writable (tested by writing).
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SegXAIInputError(f"output folder {path} exists and is not a folder")
        _probe_writable(path, f"output folder {path}")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SegXAIInputError(f"output folder {path} cannot be created: {ancestor} is not a folder")
    _probe_writable(ancestor, f"output folder {path} cannot be created: {ancestor}")
    return path


def first_missing_folder(path: str | os.PathLike) -> Path | None:
    """The outermost folder of ``path`` (itself or an ancestor) that does not exist yet: what a
    run writing into ``path`` creates, and so what a refused run removes. None if ``path`` exists."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str) -> None:
    """Refuse ``folder`` unless a file can be made in it (made, then removed at once)."""
    import stat

    mode = folder.stat().st_mode
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        # no write bit for anyone: read-only on purpose, even for root (whom the kernel lets write)
        raise SegXAIInputError(f"{what} is not writable (read-only, mode {stat.S_IMODE(mode):o})")
    probe = folder / f".segxai-write-test.{uuid.uuid4().hex[:12]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise SegXAIInputError(f"{what} is not writable ({error.strerror})") from None
    with contextlib.suppress(OSError):
        probe.unlink()


def _check_voxels(image: Image, source: str) -> None:
    if not np.issubdtype(image.array.dtype, np.number):
        raise SegXAIInputError(f"{source}: voxel type {image.array.dtype} is not numeric")
    if np.issubdtype(image.array.dtype, np.floating) and not np.all(np.isfinite(image.array)):
        nan = int(np.count_nonzero(np.isnan(image.array)))
        raise SegXAIInputError(_non_finite_message(source, nan, int(np.count_nonzero(~np.isfinite(image.array))) - nan))


def check_nifti_complete(path: str | os.PathLike) -> None:
    """A NIfTI file must hold every voxel its header promises, a ``.nii.gz`` must be a whole
    gzip stream, and floating-point voxels must be finite: ITK's reader fills a truncated file
    with zeros, and turns NaN and Inf voxels into 0, without an error (NRRD and MetaImage
    readers do raise / keep them). The raw voxels are checked here, before any conversion.
    Other formats pass unchecked.

    Raises
    ------
    SegXAIInputError
        A truncated or corrupt stream, fewer bytes than the header needs, or NaN / Inf voxels
        (with their count), naming the file.
    """
    import gzip
    import zlib

    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    size = 0
    header = b""
    counter: _NonFinite | None = None
    try:
        with opener(path, "rb") as handle:
            # the header first, on its own: a cut stream still yields it before its end fails
            while len(header) < 540:
                block = handle.read(540 - len(header))
                if not block:
                    break
                header += block
            size = len(header)
            counter = _NonFinite.of_header(header)
            if counter is not None:
                counter.feed(header)
            for block in iter(lambda: handle.read(1 << 20), b""):
                size += len(block)
                if counter is not None:
                    counter.feed(block)
    except (OSError, EOFError, zlib.error) as error:
        if _nifti_bytes(header) is None:
            return  # not a NIfTI at all (not gzip, no header): ITK's reader says what it is
        raise SegXAIInputError(f"image {path}: truncated or corrupt ({error})") from None
    expected = _nifti_bytes(header)
    if expected is None:
        return  # no NIfTI header: ITK's reader refuses it with its own message
    dims = _nifti_dims(header)
    if any(d < 1 for d in dims):
        # ITK reads a negative or zero size as 1: a volume of another shape, silently
        raise SegXAIInputError(f"image {path}: corrupt NIfTI header (dimensions {list(dims)}; each must be >= 1)")
    if size < expected:
        raise SegXAIInputError(f"image {path}: truncated or corrupt NIfTI ({size} bytes, its header needs "
                               f"{expected})")
    if counter is not None and counter.nan + counter.inf:
        raise SegXAIInputError(_non_finite_message(f"image {path}", counter.nan, counter.inf))


def _non_finite_message(source: str, nan: int, inf: int) -> str:
    return (f"{source}: {nan + inf} voxels are NaN or Inf ({nan} NaN, {inf} Inf); expected finite intensities")


class _NonFinite:
    """Counts NaN and Inf among a NIfTI file's raw floating-point voxels, fed its bytes in order."""

    # NIfTI datatype codes of the floating-point voxel types (complex types are refused by ITK's reader)
    _FLOAT_TYPES = {16: "f4", 64: "f8"}

    def __init__(self, dtype: np.dtype, offset: int, count: int) -> None:
        self.dtype, self.skip, self.left = dtype, offset, count
        self.rest = b""
        self.nan = self.inf = 0

    @classmethod
    def of_header(cls, header: bytes) -> "_NonFinite | None":
        """A counter for the file whose header this is; None for integer voxels or no NIfTI header."""
        import struct

        for order in "<>":
            if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:  # NIfTI-1
                code = struct.unpack(f"{order}h", header[70:72])[0]
                dims = struct.unpack(f"{order}8h", header[40:56])
                offset = int(struct.unpack(f"{order}f", header[108:112])[0])
            elif len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:  # NIfTI-2
                code = struct.unpack(f"{order}h", header[12:14])[0]
                dims = struct.unpack(f"{order}8q", header[16:80])
                offset = struct.unpack(f"{order}q", header[168:176])[0]
            else:
                continue
            if code not in cls._FLOAT_TYPES or not 1 <= dims[0] <= 7:
                return None
            count = int(np.prod([max(1, d) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
            return cls(np.dtype(order + cls._FLOAT_TYPES[code]), max(0, offset), count)
        return None

    def feed(self, block: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(block))
            block, self.skip = block[cut:], self.skip - cut
        data = self.rest + block
        usable = len(data) // self.dtype.itemsize * self.dtype.itemsize
        values = np.frombuffer(data[:usable], self.dtype)[: max(0, self.left)]
        self.left -= len(values)
        self.rest = data[usable:]
        if len(values):
            finite = np.isfinite(values)
            if not finite.all():
                nan = int(np.count_nonzero(np.isnan(values)))
                self.nan += nan
                self.inf += int(np.count_nonzero(~finite)) - nan


#: slice positions closer than this (mm) are one position (duplicated slices)
DICOM_SAME_POSITION_MM = 1e-3
#: how far a slice gap may differ from the series' typical gap, relative to it: DICOM stores
#: positions as decimal strings of at most 16 characters, so rounding is far below this
DICOM_GAP_RTOL = 0.01
#: direction cosines of two slices closer than this are one orientation
DICOM_ORIENTATION_ATOL = 1e-4


def check_dicom_series(files: Sequence[str], folder: str | os.PathLike, resample_slices: bool = False):
    """Refuse a DICOM series whose slices do not make one regular grid (or, when asked,
    resample missing or unevenly spaced slices onto one).

    ITK stacks the files it is given and takes the slice spacing from the first two, so a
    missing slice, a duplicated one, uneven gaps or slices of another orientation give a
    volume whose geometry is silently wrong. Every file's Image Orientation (Patient) and
    Image Position (Patient) are read (headers only) and compared.

    Parameters
    ----------
    files : sequence of str
        The series' files (any order).
    folder : path-like
        The series' folder (named in messages).
    resample_slices : bool
        Missing slices or uneven gaps: resample the slices linearly along the slice normal onto
        a regular grid (the series' median gap, from the first slice to the last) instead of
        refusing; a warning says so. Duplicates and mixed orientations are always refused.

    Returns
    -------
    SimpleITK.Image or None
        None when the series is regular (read it as usual); the resampled volume otherwise.

    Raises
    ------
    SegXAIInputError
        Naming the folder and the reason: mixed orientations, duplicate slices, missing
        slices (a gap of about a whole number of slice spacings), or uneven spacing.
    """
    import SimpleITK as sitk

    if len(files) < 2:
        return None  # one file (a multi-frame object or a single slice): nothing to compare
    positions, orientations = [], []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        reader.LoadPrivateTagsOff()
        reader.ReadImageInformation()
        keys = set(reader.GetMetaDataKeys())
        if "0020|0032" not in keys or "0020|0037" not in keys:
            if not positions:
                continue
            raise SegXAIInputError(f"image {folder}: DICOM file {Path(name).name} has no Image Position / "
                                   "Orientation (Patient); the slices cannot be placed")
        try:
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        except ValueError:
            raise SegXAIInputError(f"image {folder}: DICOM file {Path(name).name}: unreadable Image Position / "
                                   "Orientation (Patient)") from None
    if not positions:
        return None  # no geometry tags at all: ITK's own defaults, nothing to check against
    if len(positions) != len(files):
        raise SegXAIInputError(f"image {folder}: {len(files) - len(positions)} of {len(files)} DICOM files have no "
                               "Image Position / Orientation (Patient)")
    orientation = np.asarray(orientations, dtype=float)
    if orientation.shape[1] != 6 or np.asarray(positions).shape[1] != 3:
        raise SegXAIInputError(f"image {folder}: malformed Image Position / Orientation (Patient)")
    differs = np.abs(orientation - orientation[0]).max(axis=1) > DICOM_ORIENTATION_ATOL
    if differs.any():
        raise SegXAIInputError(
            f"image {folder}: mixed slice orientations ({int(differs.sum())} of {len(files)} slices differ from "
            f"{Path(files[0]).name}'s {np.round(orientation[0], 4).tolist()}, e.g. {Path(files[int(np.argmax(differs))]).name}: "
            f"{np.round(orientation[int(np.argmax(differs))], 4).tolist()}); one series must have one orientation")
    normal = np.cross(orientation[0, :3], orientation[0, 3:])
    along = np.asarray(positions, dtype=float) @ normal
    order = np.argsort(along, kind="stable")
    along, names, origin = along[order], [Path(files[i]).name for i in order], positions[int(order[0])]
    gaps = np.diff(along)
    duplicate = np.flatnonzero(gaps < DICOM_SAME_POSITION_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise SegXAIInputError(f"image {folder}: duplicate slices ({duplicate.size} pair(s) at one position, e.g. "
                               f"{names[i]} and {names[i + 1]} at {along[i]:.3f} mm)")
    typical = float(np.median(gaps))
    uneven = np.abs(gaps - typical) > DICOM_GAP_RTOL * typical
    if uneven.any() and resample_slices:
        # the input check's logger: the command line and the engine show it as an input warning
        logging.getLogger("SegXAILib.input").warning(
            "image %s: missing or unevenly spaced slices (gaps %.3f to %.3f mm): resampled (linear) onto a regular "
            "grid of %.3f mm slices", folder, gaps.min(), gaps.max(), typical)
        return _resample_slices([files[i] for i in order], along, origin, orientation[0], typical)
    if uneven.any():
        i = int(np.argmax(np.abs(gaps - typical)))
        ratio = gaps[i] / typical
        if abs(ratio - round(ratio)) <= DICOM_GAP_RTOL * ratio and round(ratio) >= 2:
            missing = int(sum(max(0, round(g / typical) - 1) for g in gaps))
            raise SegXAIInputError(f"image {folder}: missing slices (about {missing}): a gap of {gaps[i]:.3f} mm between "
                                   f"{names[i]} and {names[i + 1]}, the slice spacing is {typical:.3f} mm")
        raise SegXAIInputError(f"image {folder}: uneven slice spacing (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm, "
                               f"typically {typical:.3f} mm; e.g. between {names[i]} and {names[i + 1]}); "
                               "resample the series to a regular grid first (resample_slices)")
    return None


def _resample_slices(files: Sequence[str], along: np.ndarray, origin: Sequence[float], orientation: np.ndarray,
                     spacing: float):
    """The slices (sorted by ``along``, their positions on the normal in mm) linearly resampled
    onto a regular grid of ``spacing`` from the first slice to the last, as a SimpleITK image
    (LPS: origin the first slice's Image Position, directions the Image Orientation and normal)."""
    import SimpleITK as sitk

    slices = [sitk.ReadImage(str(name)) for name in files]
    stack = np.stack([sitk.GetArrayFromImage(s).reshape(s.GetSize()[1], s.GetSize()[0]) for s in slices]
                     ).astype(np.float32)  # (K, rows, columns)
    count = int(round((along[-1] - along[0]) / spacing)) + 1
    step = (along[-1] - along[0]) / (count - 1)  # ends on the last slice exactly
    targets = along[0] + step * np.arange(count)
    below = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, len(along) - 2)
    weight = ((targets - along[below]) / (along[below + 1] - along[below])).astype(np.float32)[:, None, None]
    volume = sitk.GetImageFromArray((1 - weight) * stack[below] + weight * stack[below + 1])
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    direction = np.stack([row, column, np.cross(row, column)], axis=1)
    volume.SetSpacing((slices[0].GetSpacing()[0], slices[0].GetSpacing()[1], float(step)))
    volume.SetOrigin(tuple(float(v) for v in origin))
    volume.SetDirection(tuple(float(v) for v in direction.ravel()))
    return volume


def _nifti_dims(header: bytes) -> tuple[int, ...]:
    """The sizes a NIfTI-1 / NIfTI-2 header declares (``dim[1..dim[0]]``); empty if none."""
    import struct

    for order in "<>":
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", header[40:56])
        elif len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:
            dims = struct.unpack(f"{order}8q", header[16:80])
        else:
            continue
        return tuple(int(d) for d in dims[1 : dims[0] + 1]) if 1 <= dims[0] <= 7 else ()
    return ()


def _nifti_bytes(header: bytes) -> int | None:
    """Header plus voxel bytes a NIfTI-1 / NIfTI-2 header declares; None if not a NIfTI header."""
    import struct

    for order in "<>":
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = int(struct.unpack(f"{order}f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:  # NIfTI-2
            bitpix = struct.unpack(f"{order}h", header[14:16])[0]
            dims = struct.unpack(f"{order}8q", header[16:80])
            offset = struct.unpack(f"{order}q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return offset + int(np.prod([max(1, d) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8
    return None


def read_image(path: str | os.PathLike, channel_name: str | None = None, resample_slices: bool = False) -> Image:
    """Read a 3D image file or a DICOM series folder.

    Parameters
    ----------
    path : path-like
        A NIfTI / NRRD / MetaImage file, or a folder holding one DICOM series.
    channel_name : str, optional
        Name of the (single) channel; defaults to the file name without suffix.
    resample_slices : bool
        A DICOM series with missing or unevenly spaced slices is resampled onto a regular grid
        instead of refused (:func:`check_dicom_series`).

    Raises
    ------
    SegXAIInputError
        Missing or unreadable file, a truncated or corrupt NIfTI or NaN / Inf in its raw voxels
        (:func:`check_nifti_complete`), a DICOM series with missing, duplicate or unevenly spaced
        slices or mixed orientations (:func:`check_dicom_series`), not an image, not 3D (2D, or
        4D with more than one volume), non-numeric or non-finite voxels.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise SegXAIInputError(f"image {path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise SegXAIInputError(f"image {path}: folder holds no DICOM series")
            if len(series) > 1:
                raise SegXAIInputError(
                    f"image {path}: folder holds {len(series)} DICOM series; point to a folder with one"
                )
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            # ITK would stack a broken series into a wrong grid
            image = check_dicom_series(files, path, resample_slices)
            if image is None:
                reader.SetFileNames(files)
                image = reader.Execute()
        else:
            check_nifti_complete(path)  # before ITK, which would read the missing voxels as zeros
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise SegXAIInputError(f"image {path}: cannot be read as an image ({first_line})") from None

    dimension = image.GetDimension()
    if dimension == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise SegXAIInputError(
                f"image {path}: 4D with {size[3]} volumes; expected one 3D volume "
                "(give each channel as its own 3D file)"
            )
        image = image[:, :, :, 0]
        dimension = 3
    if dimension != 3:
        raise SegXAIInputError(f"image {path}: {dimension}D; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SegXAIInputError(
            f"image {path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar volume (give each channel as its own file)"
        )
    if min(image.GetSize()) < 2:
        raise SegXAIInputError(f"image {path}: size {image.GetSize()} is a 2D slice; expected a 3D volume")
    name = channel_name or _stem(path)
    result = Image.from_sitk(image, (name,))
    _check_voxels(result, f"image {path}")
    return result


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.name


def resample_to(
    image: Image,
    reference: Image,
    interpolation: str = "linear",
    default: float = 0.0,
    extrapolate: bool = False,
) -> Image:
    """Resample every channel of ``image`` onto the grid of ``reference`` (physical space).

    ``interpolation`` is ``"linear"``, ``"nearest"`` or ``"bspline"``. Voxels of the reference
    grid outside ``image`` get ``default``, or with ``extrapolate`` the nearest voxel's value.
    """
    import SimpleITK as sitk

    modes = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    if interpolation not in modes:
        raise SegXAIInputError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    target = reference.to_sitk(0)
    channels = []
    for channel in range(image.num_channels):
        moving = image.to_sitk(channel)
        if interpolation != "nearest":
            moving = sitk.Cast(moving, sitk.sitkFloat32)
        resampled = sitk.Resample(
            moving, target, sitk.Transform(), modes[interpolation], float(default), moving.GetPixelID(), extrapolate
        )
        channels.append(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0))
    return reference.with_array(np.stack(channels), image.channel_names)


def _physical_overlap(image: Image, reference: Image) -> float:
    """Share of the reference grid's voxel centres that fall inside ``image``'s grid."""
    shape = np.array(reference.spatial_shape)
    axes = [np.linspace(0, s - 1, min(s, 12)) for s in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = image.ras_to_ijk_points(reference.ijk_to_ras_points(grid))
    limit = np.array(image.spatial_shape) - 0.5
    return float(np.mean(np.all((inside >= -0.5) & (inside <= limit), axis=1)))


def read_channels(
    paths: Sequence[str | os.PathLike],
    channel_names: Sequence[str] | None = None,
    resample: bool = True,
    min_overlap: float = 0.5,
    resample_slices: bool = False,
) -> Image:
    """Read one file per channel (e.g. FLAIR and T1) into one multi-channel image.

    All channels must share the grid of the first. When one does not and ``resample`` is
    true, it is resampled (linear) onto the first channel's grid and a message says so; when
    it covers less than ``min_overlap`` of that grid, or ``resample`` is false, it is an error.
    ``resample_slices``: as :func:`read_image`'s, for every DICOM series.
    """
    if not paths:
        raise SegXAIInputError("no input images given")
    if channel_names is not None and len(channel_names) != len(paths):
        raise SegXAIInputError(f"{len(paths)} images but {len(channel_names)} channel names")
    names = list(channel_names) if channel_names is not None else [None] * len(paths)
    images = [read_image(path, name, resample_slices) for path, name in zip(paths, names)]
    reference = images[0]
    aligned = [reference]
    for path, image in zip(paths[1:], images[1:]):
        if image.same_grid(reference):
            aligned.append(image)
            continue
        overlap = _physical_overlap(image, reference)
        if not resample or overlap < min_overlap:
            reason = "resampling is off" if not resample else f"it covers only {overlap:.0%} of it"
            raise SegXAIInputError(
                f"image {path} is not on the grid of {paths[0]} and cannot be resampled onto it: {reason}"
            )
        log.warning("image %s is not on the grid of %s: resampled onto it (linear)", path, paths[0])
        aligned.append(resample_to(image, reference))
    if len(aligned) > 1:
        dtype = np.result_type(*[image.array.dtype for image in aligned], np.float32)
        aligned = [image.with_array(image.array.astype(dtype)) for image in aligned]
    return Image.stack(aligned)


def write_image(image: Image, path: str | os.PathLike, channel: int | None = None, compress: bool = True) -> Path:
    """Write one channel (or, with ``channel=None`` and several channels, a vector image).

    The format follows the suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``). The write is
    atomic. Returns the path.
    """
    import SimpleITK as sitk

    path = Path(path)
    if _suffix(path) not in IMAGE_SUFFIXES:
        raise SegXAIInputError(f"output {path}: unknown image suffix; use one of {IMAGE_SUFFIXES}")
    array = image.array
    if array.dtype == np.bool_:
        image = image.with_array(array.astype(np.uint8))
    elif array.dtype == np.float16:
        image = image.with_array(array.astype(np.float32))
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image.to_sitk(channel), str(temporary), compress)
        except RuntimeError as error:
            raise SegXAIInputError(f"output {path}: cannot be written ({str(error).strip().splitlines()[-1]})") from None
    return path


def write_dicom_series(image: Image, folder: str | os.PathLike, series_description: str = "SegXAI") -> Path:
    """Write a single-channel image as a DICOM series (one file per k-slice) into ``folder``.

    Geometry is written in the DICOM tags (Image Position / Orientation (Patient), Pixel
    Spacing, Slice Thickness), so reading the folder back gives the same grid. Voxels are
    stored as 16-bit integers (rounded); the folder is filled in a temporary folder first
    and renamed into place.
    """
    import SimpleITK as sitk

    if image.num_channels != 1:
        raise SegXAIInputError("write_dicom_series: expected a single-channel image")
    folder = Path(folder)
    if folder.exists():
        raise SegXAIInputError(f"output {folder}: already exists; DICOM series are written to a new folder")
    check_writable_dir(folder.parent)
    volume = image.to_sitk(0)
    volume = sitk.Cast(sitk.Round(sitk.Cast(volume, sitk.sitkFloat64)), sitk.sitkInt16)
    direction = volume.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(np.random.default_rng().integers(10**12, 10**13))
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(volume.GetDepth()):
            slice_image = volume[:, :, k]
            position = volume.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": "MR",
                "0008|103e": series_description,
                "0020|000e": series_uid,
                "0020|000d": series_uid + ".1",
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{p:.10g}" for p in position),
                "0020|0037": orientation,
                "0018|0050": f"{volume.GetSpacing()[2]:.10g}",
                "0028|0030": f"{volume.GetSpacing()[1]:.10g}\\{volume.GetSpacing()[0]:.10g}",
                "0008|0018": f"{series_uid}.{k + 1}",
            }
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(temporary / f"slice_{k:04d}.dcm"))
            writer.Execute(slice_image)
        os.replace(temporary, folder)
    except BaseException:
        for child in temporary.glob("*"):
            child.unlink()
        temporary.rmdir()
        raise
    return folder
