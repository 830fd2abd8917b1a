"""DICOM interoperability for radiotherapy and PACS: SEG, RTSTRUCT and Parametric Maps.

Contours come in and go out on the grid of a DICOM image series (:func:`read_dicom_series`):

* :func:`read_seg` / :func:`write_seg`: DICOM Segmentation (highdicom), one segment per structure;
* :func:`read_rtstruct` / :func:`write_rtstruct`: RT Structure Sets (pydicom), polygons
  rasterised on the series' grid;
* :func:`write_parametric_map` / :func:`read_parametric_map`: float maps (saliency, uncertainty);
* :func:`write_dicom_results`: all of them for one case, into a new folder.

Every object written references the source series (study, series and SOP instance UIDs, frame
of reference); every reader refuses an object of another frame of reference or series. Masks
are ``(I, J, K)`` bool arrays on the series' :class:`~SegXAILib.image.Image` grid (``i`` along
a slice's columns, ``j`` along its rows, ``k`` across slices); frames and contours are placed by
their own patient coordinates, so oblique and flipped series keep their geometry.
:mod:`SegXAILib.dicom.testdata` writes test series from the bundled T1.
"""

from .export import case_dicom_content, write_dicom_results
from .pmap import read_parametric_map, write_parametric_map
from .rtstruct import mask_polygons, rasterise_polygons, read_rtstruct, write_rtstruct
from .seg import read_seg, write_seg
from .series import DicomSeries, read_dicom_series

__all__ = [
    "DicomSeries",
    "read_dicom_series",
    "read_seg",
    "write_seg",
    "read_rtstruct",
    "write_rtstruct",
    "mask_polygons",
    "rasterise_polygons",
    "read_parametric_map",
    "write_parametric_map",
    "write_dicom_results",
    "case_dicom_content",
]
