"""A case's results as DICOM objects referencing the input series: SEG, RTSTRUCT and
Parametric Maps, written together into a new folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..image import SegXAIInputError
from .pmap import write_parametric_map
from .rtstruct import write_rtstruct
from .seg import write_seg
from .series import DicomSeries, atomic_folder

__all__ = ["write_dicom_results", "case_dicom_content"]


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "map"


def write_dicom_results(
    folder: str | os.PathLike,
    series: DicomSeries,
    masks: Mapping[str, np.ndarray],
    maps: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """Write structures as SEG and RTSTRUCT, and float maps as Parametric Maps, into a new folder.

    The folder is filled in a temporary folder beside it and renamed into place, so it either
    holds every object or does not exist.

    Parameters
    ----------
    folder : path-like
        Must not exist.
    series : DicomSeries
        The source series every object references.
    masks : mapping
        Structure name -> ``(I, J, K)`` bool mask on ``series.image``'s grid.
    maps : mapping, optional
        Map name -> ``(I, J, K)`` float values on the same grid (one Parametric Map each; the
        LUT label is the name's first 16 characters, the series description the whole name).

    Returns
    -------
    dict
        ``"seg"``, ``"rtstruct"`` and ``"map:<name>"`` -> final path of each file.
    """
    folder = Path(folder)
    written: dict[str, str] = {}
    with atomic_folder(folder) as temporary:
        written["seg"] = write_seg(temporary / "segmentation.seg.dcm", masks, series).name
        written["rtstruct"] = write_rtstruct(temporary / "structures.rtstruct.dcm", masks, series).name
        for number, (name, values) in enumerate((maps or {}).items(), start=1):
            path = temporary / f"map_{number:02d}_{_file_name(name)}.pm.dcm"
            write_parametric_map(path, values, series, label=name[:16], explanation=name[:64],
                                 series_description=name, series_number=903 + number - 1)
            written[f"map:{name}"] = path.name
    return {role: folder / name for role, name in written.items()}


def case_dicom_content(case: Any, series: DicomSeries) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The masks and maps of a :class:`~SegXAILib.pipeline.Case` for :func:`write_dicom_results`.

    Masks: every foreground class of the model (its card's class names). Maps: each class-level
    saliency map per input channel (``"saliency <map> <channel>"``) and, when the case has
    them, the uncertainty maps predictive entropy and mutual information per channel.

    Raises
    ------
    SegXAIInputError
        The case is not on the series' grid.
    """
    if not case.image.same_grid(series.image):
        raise SegXAIInputError("case: its image is not on the grid of the DICOM series")
    names = case.card.class_names
    masks = {str(names[c]): case.segmentation.mask(c) for c in range(1, len(names))}
    maps: dict[str, np.ndarray] = {}
    for name, result in case.maps.items():
        for channel, array in zip(result.maps.channel_names, result.maps.array):
            maps[f"saliency {name} {channel}"] = array
    if case.uncertainty is not None:
        for kind in ("predictive_entropy", "mutual_information"):
            image = getattr(case.uncertainty, kind)
            for channel, array in zip(image.channel_names, image.array):
                maps[f"{kind.replace('_', ' ')} {channel}"] = array
    return masks, maps
