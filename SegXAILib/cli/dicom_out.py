"""``--dicom-out FOLDER`` of ``segxai segment`` and ``segxai run``: the case's results as DICOM
objects (SEG, RTSTRUCT, Parametric Maps) that reference the input DICOM series.

The first IMAGE must be a DICOM series folder: the objects reference its study, series, SOP
instances and frame of reference, which a NIfTI input does not have. Inventing a series for
it would give PACS and planning systems objects that point to images nobody has, so such an
input is refused (convert the image to a series first, e.g. with
:func:`SegXAILib.io.write_dicom_series`, and segment that series).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..image import SegXAIInputError

__all__ = ["dicom_out_option", "dicom_source", "write_dicom_out"]


def dicom_out_option(command: argparse.ArgumentParser, maps: bool) -> None:
    what = "SEG and RTSTRUCT of every structure" + (", Parametric Maps of the saliency / uncertainty maps" if maps else "")
    command.add_argument("--dicom-out", type=Path, default=None, metavar="FOLDER",
                         help=f"also write the results as DICOM ({what}) into this new folder, referencing the "
                              "input series; the first IMAGE must be a DICOM series folder")


def dicom_source(args: argparse.Namespace):
    """The :class:`~SegXAILib.dicom.DicomSeries` of the first IMAGE, checked before any work."""
    from ..dicom import read_dicom_series

    folder = Path(args.dicom_out)
    if folder.exists():
        raise SegXAIInputError(f"--dicom-out {folder}: already exists; DICOM results are written to a new folder")
    source = Path(args.images[0])
    if not source.is_dir():
        raise SegXAIInputError(
            f"--dicom-out: the first image {source} is not a DICOM series folder; the DICOM objects must reference "
            "the series they were made on (write the image as a DICOM series first and segment that)")
    return read_dicom_series(source)


def write_dicom_out(case, series, folder: Path) -> dict[str, Path]:
    """Write ``case``'s structures and maps as DICOM into ``folder`` (see the module)."""
    from ..dicom import case_dicom_content, write_dicom_results

    masks, maps = case_dicom_content(case, series)
    return write_dicom_results(folder, series, masks, maps)
