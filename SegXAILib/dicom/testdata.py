"""DICOM test series written with pydicom from the bundled head T1, with realistic MR headers.

Three variants of the same voxels, for the geometry the SEG / RTSTRUCT paths must keep:

* ``"native"``: the T1's own grid (coronal slices, 2 x 2 x 3 mm);
* ``"oblique"``: the grid rotated (20 degrees about one axis, 10 about another), as an
  oblique acquisition's Image Orientation (Patient) is;
* ``"flipped"``: the same physical image with the row direction reversed, so the slice normal
  (row x column) points against the slices' order: ITK sorts the files the other way round,
  and the instance numbers run against the slice normal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..image import LPS_TO_RAS, Image, SegXAIInputError
from .series import atomic_folder, new_uid

__all__ = ["VARIANTS", "variant_image", "write_test_series"]

VARIANTS = ("native", "oblique", "flipped")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    a, b = [n for n in range(3) if n != axis]
    rotation = np.eye(3)
    rotation[a, a] = rotation[b, b] = np.cos(angle)
    rotation[a, b], rotation[b, a] = -np.sin(angle), np.sin(angle)
    return rotation


def variant_image(image: Image, variant: str) -> Image:
    """The single-channel ``image`` ``(1, I, J, K)`` as the ``variant`` writes it (see the module).

    ``"flipped"`` reverses the ``i`` axis (voxels and geometry), so it is the same physical
    image; ``"oblique"`` keeps the voxels and rotates the grid about its centre.
    """
    if variant not in VARIANTS:
        raise SegXAIInputError(f"variant {variant!r}: expected one of {VARIANTS}")
    matrix = image.ijk_to_ras.copy()
    array = image.array
    if variant == "oblique":
        centre = image.ijk_to_ras_points((np.array(image.spatial_shape) - 1) / 2.0)[0]
        rotation = _rotation(0, 20.0) @ _rotation(2, 10.0)
        matrix[:3, :3] = rotation @ matrix[:3, :3]
        matrix[:3, 3] = rotation @ (matrix[:3, 3] - centre) + centre
    elif variant == "flipped":
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, image.spatial_shape[0] - 1
        matrix = matrix @ flip  # new voxel i is old voxel I-1-i
        array = array[:, ::-1]
    return Image(np.ascontiguousarray(array), matrix, image.channel_names)


def write_test_series(
    folder: str | os.PathLike,
    variant: str = "native",
    image: Image | None = None,
    patient_id: str = "SEGXAI-0001",
    frame_of_reference_uid: str | None = None,
) -> Path:
    """Write a single-channel image as an MR DICOM series (one file per slice) into a new folder.

    Parameters
    ----------
    folder : path-like
        The series folder; must not exist (written to a temporary folder, then renamed).
    variant : str
        ``"native"``, ``"oblique"`` or ``"flipped"`` (see the module).
    image : Image, optional
        ``(1, I, J, K)`` intensities (rounded to unsigned 16 bits); the bundled T1 when omitted.
    patient_id : str
    frame_of_reference_uid : str, optional
        A new one when omitted.

    Returns
    -------
    Path
        ``folder``.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if image is None:
        from ..sample_data import load_sample_head

        image = load_sample_head().t1
    if image.num_channels != 1:
        raise SegXAIInputError("image: expected a single-channel image")
    image = variant_image(image, variant)
    lps = LPS_TO_RAS @ image.ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_direction, column_direction = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    voxels = np.clip(np.rint(image.array[0]), 0, 65535).astype(np.uint16)
    study_uid, series_uid = new_uid(), new_uid()
    frame_uid = frame_of_reference_uid or new_uid()
    count = image.spatial_shape[2]
    with atomic_folder(folder) as temporary:
        for k in range(count):
            sop_uid = new_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240315"
            ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
            ds.AccessionNumber = "ACC0001"
            ds.Modality = "MR"
            ds.Manufacturer = "SegXAI test data"
            ds.InstitutionName = "SegXAI"
            ds.ReferringPhysicianName = "Referrer^Test"
            ds.StudyDescription = "MRI head"
            ds.SeriesDescription = f"T1 {variant}"
            ds.ManufacturerModelName = "pydicom writer"
            ds.PatientName = "Phantom^Head"
            ds.PatientID = patient_id
            ds.PatientBirthDate = "19700101"
            ds.PatientSex = "O"
            ds.PatientAge = "054Y"
            ds.BodyPartExamined = "HEAD"
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
            ds.MRAcquisitionType = "3D"
            ds.SliceThickness = f"{spacing[2]:.6g}"
            ds.SpacingBetweenSlices = f"{spacing[2]:.6g}"
            ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "8.1", "3.7", "1.5"
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.StudyID, ds.SeriesNumber = "1", 3
            # along k: in the flipped variant, against the slice normal
            ds.InstanceNumber = k + 1
            position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
            ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*row_direction, *column_direction)]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{float(np.dot(position, np.cross(row_direction, column_direction))):.10g}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = image.spatial_shape[1], image.spatial_shape[0]
            ds.PixelSpacing = [f"{spacing[1]:.10g}", f"{spacing[0]:.10g}"]  # between rows, between columns
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.WindowCenter, ds.WindowWidth = "128", "256"
            ds.PixelData = np.ascontiguousarray(voxels[:, :, k].T).tobytes()  # rows = j, columns = i
            ds.save_as(temporary / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return Path(folder)
