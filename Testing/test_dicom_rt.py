"""DICOM SEG, RTSTRUCT and Parametric Maps: round trips voxel for voxel on native, oblique and
flipped series written from the bundled T1; references to the source series; refusals.

The geometry oracles are independent of SegXAILib.dicom: the T1 voxels the test series hold
(a structure "bright" is a threshold of them, so each source file's own pixels, read with
pydicom, say where it must be), and each file's Image Position / Orientation (Patient) and
Pixel Spacing turned into pixel coordinates here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.draw import polygon as draw_polygon
from skimage.measure import points_in_poly

from SegXAILib.dicom import (
    read_dicom_series,
    read_parametric_map,
    read_rtstruct,
    read_seg,
    write_dicom_results,
    write_parametric_map,
    write_rtstruct,
    write_seg,
)
from SegXAILib.dicom.rtstruct import mask_polygons, rasterise_polygons
from SegXAILib.dicom.testdata import VARIANTS, write_test_series
from SegXAILib.image import Image, SegXAIInputError

from conftest import write_voxelwise_card

#: T1 intensity above which the "bright" structure is (T1 is 0..255)
THRESHOLD = 110


@pytest.fixture(scope="module")
def head():
    """A crop of the bundled head (64 x 64 x 20 voxels, brain inside) and its tissue masks."""
    from SegXAILib.sample_data import load_sample_head

    sample = load_sample_head()
    start, stop = (32, 40, 20), (96, 104, 40)
    t1 = sample.t1.crop(start, stop)
    white = sample.white_matter[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    brain = sample.brain.array[0, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] > 0
    return t1, {"white matter": white, "brain": brain}


@pytest.fixture(scope="module")
def series_of(head, tmp_path_factory):
    """Variant -> (DicomSeries, structures on its grid)."""
    t1, tissue = head
    root = tmp_path_factory.mktemp("dicom")
    result = {}
    for variant in VARIANTS:
        series = read_dicom_series(write_test_series(root / variant, variant, image=t1))
        result[variant] = (series, structures_on(series, t1, tissue))
    return result


def structures_on(series, t1: Image, tissue: dict) -> dict[str, np.ndarray]:
    """The tissue masks carried onto the series' grid through physical space (each series voxel
    centre must be a T1 voxel centre), a threshold of the voxels, a polygon-built shape, an empty one."""
    shape = series.image.spatial_shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    source = t1.ras_to_ijk_points(series.image.ijk_to_ras_points(grid))
    index = np.rint(source).astype(int)
    if np.abs(source - index).max() < 1e-4:  # native and flipped: the same physical voxels
        masks = {name: mask[index[:, 0], index[:, 1], index[:, 2]].reshape(shape) for name, mask in tissue.items()}
    else:  # oblique: the same voxel array on a rotated grid
        masks = dict(tissue)
    masks["bright"] = series.image.array[0] > THRESHOLD
    drawn = np.zeros(shape, dtype=bool)
    for k in range(2, shape[2] - 2, 3):  # a triangle and a quadrilateral drawn every third slice
        rr, cc = draw_polygon([5, 30 + k, 12], [6, 20, 40 - k], shape[:2])
        drawn[rr, cc, k] = True
        rr, cc = draw_polygon([40, 60, 55, 42], [40, 44, 60, 58], shape[:2])
        drawn[rr, cc, k] = True
    masks["drawn"] = drawn
    masks["empty"] = np.zeros(shape, dtype=bool)
    return masks


def source_pixels(series) -> dict[str, tuple[pydicom.Dataset, np.ndarray]]:
    """SOP Instance UID -> (its file's dataset, its pixels (rows, columns)), read with pydicom."""
    result = {}
    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        result[str(ds.SOPInstanceUID)] = (ds, ds.pixel_array)
    return result


def pixel_coordinates(ds: pydicom.Dataset, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) of LPS points in the plane of image ``ds`` (PS3.3 C.7.6.2.1.1)."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    offset = points - np.asarray(ds.ImagePositionPatient, dtype=float)
    spacing = np.asarray(ds.PixelSpacing, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    assert np.abs(offset @ normal).max() < 1e-4, "contour not in the plane of its image"
    return offset @ orientation[:3] / spacing[1], offset @ orientation[3:] / spacing[0]


def test_test_series_keep_the_t1_geometry(head, series_of):
    t1, _ = head
    native, oblique, flipped = (series_of[v][0].image for v in VARIANTS)
    np.testing.assert_array_equal(native.array, t1.array)
    np.testing.assert_allclose(native.ijk_to_ras, t1.ijk_to_ras, atol=1e-6)
    # flipped: the row direction reversed, so ITK orders the slices the other way as well
    np.testing.assert_array_equal(flipped.array[0], t1.array[0][::-1, :, ::-1])
    corners = np.array([[0, 0, 0], [63, 0, 0], [0, 63, 19], [63, 63, 19]], dtype=float)
    np.testing.assert_allclose(flipped.ijk_to_ras_points(corners),
                               t1.ijk_to_ras_points(np.array([63, 0, 19]) - corners * [1, -1, 1]), atol=1e-6)
    instance_numbers = [int(ds.InstanceNumber) for ds in series_of["flipped"][0].datasets]
    assert instance_numbers == sorted(instance_numbers, reverse=True)
    # oblique: same voxels, the grid rotated (orientation away from every axis) but still orthogonal
    np.testing.assert_array_equal(oblique.array, t1.array)
    direction = oblique.direction
    assert np.abs(np.abs(direction) - 1).min() > 0.01
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(oblique.spacing, t1.spacing, atol=1e-6)
    ds = series_of["oblique"][0].datasets[0]
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "PixelSpacing", "SliceThickness"):
        assert keyword in ds


@pytest.mark.parametrize("variant", VARIANTS)
def test_seg_round_trip(series_of, tmp_path, variant):
    import highdicom as hd

    series, masks = series_of[variant]
    path = write_seg(tmp_path / "seg.dcm", masks, series)
    assert read_seg(path, series).keys() == masks.keys()
    for name, mask in read_seg(path, series).items():
        np.testing.assert_array_equal(mask, masks[name], err_msg=name)

    # the file, read with pydicom and highdicom, references the series and sits on its images
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.StudyInstanceUID == series.study_instance_uid and ds.PatientID == series.datasets[0].PatientID
    assert [str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence] == [series.series_instance_uid]
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(series.sop_instance_uids)
    segmentation = hd.seg.Segmentation.from_dataset(ds)
    assert [segmentation.get_segment_description(n).segment_label for n in segmentation.segment_numbers] == list(masks)
    bright = list(masks).index("bright") + 1
    sources = source_pixels(series)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    voxels = 0
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        if int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != bright:
            continue
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source, pixels = sources[uid]
        assert list(map(float, group.PlanePositionSequence[0].ImagePositionPatient)) == pytest.approx(
            list(map(float, source.ImagePositionPatient)), abs=1e-6)
        np.testing.assert_array_equal(frame.astype(bool), pixels > THRESHOLD)
        voxels += int(frame.sum())
    assert voxels == int(masks["bright"].sum()) > 1000


@pytest.mark.parametrize("variant", VARIANTS)
def test_rtstruct_round_trip(series_of, tmp_path, variant):
    """Contours along voxel edges: no voxel centre lies on one, so rasterising gives the masks exactly."""
    series, masks = series_of[variant]
    path = write_rtstruct(tmp_path / "rt.dcm", masks, series)
    back = read_rtstruct(path, series)
    assert back.keys() == masks.keys()
    for name, mask in back.items():
        np.testing.assert_array_equal(mask, masks[name], err_msg=name)

    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == series.study_instance_uid
    reference = ds.ReferencedFrameOfReferenceSequence[0]
    assert reference.FrameOfReferenceUID == series.frame_of_reference_uid
    referenced_series = reference.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == series.series_instance_uid
    assert [str(i.ReferencedSOPInstanceUID) for i in referenced_series.ContourImageSequence] == series.sop_instance_uids
    assert [str(r.ROIName) for r in ds.StructureSetROISequence] == list(masks)
    assert all(r.ReferencedFrameOfReferenceUID == series.frame_of_reference_uid for r in ds.StructureSetROISequence)
    # independent oracle: each "bright" contour in its own image's pixel coordinates, even-odd
    # over the contours of one image, is that image's pixels over the threshold
    sources = source_pixels(series)
    roi = ds.ROIContourSequence[list(masks).index("bright")]
    inside: dict[str, np.ndarray] = {}
    for contour in roi.ContourSequence:
        uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
        source, pixels = sources[uid]
        column, row = pixel_coordinates(source, np.asarray(contour.ContourData, dtype=float).reshape(-1, 3))
        rows, columns = np.meshgrid(np.arange(pixels.shape[0]), np.arange(pixels.shape[1]), indexing="ij")
        centres = np.column_stack([columns.ravel(), rows.ravel()])
        hit = points_in_poly(centres, np.column_stack([column, row])).reshape(pixels.shape)
        inside[uid] = inside.get(uid, np.zeros(pixels.shape, dtype=bool)) ^ hit
    for uid, (source, pixels) in sources.items():
        np.testing.assert_array_equal(inside.get(uid, np.zeros(pixels.shape, dtype=bool)), pixels > THRESHOLD)


def test_polygons_of_any_mask_rasterise_back_exactly():
    rng = np.random.default_rng(7)
    for _ in range(100):
        mask = rng.random((11, 8)) < rng.uniform(0.2, 0.8)  # holes, touching corners, islands
        np.testing.assert_array_equal(rasterise_polygons(mask_polygons(mask), mask.shape), mask)
    assert rasterise_polygons(mask_polygons(np.zeros((4, 4), bool)), (4, 4)).sum() == 0


def test_rasterising_general_polygons_matches_point_in_polygon():
    """Random polygons (vertices off the lattice): the even-odd rule of skimage's point-in-polygon."""
    rng = np.random.default_rng(3)
    shape = (30, 25)
    centres = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1).reshape(-1, 2)
    for _ in range(30):
        polygons = [rng.uniform(-3, 32, size=(rng.integers(3, 9), 2)) for _ in range(2)]
        expected = np.zeros(shape, dtype=bool)
        for polygon in polygons:
            expected ^= points_in_poly(centres, polygon).reshape(shape)
        # centres within EDGE_TOLERANCE of an edge count as on it (inside): compared elsewhere
        off_edge = np.min([segment_distance(centres, p, q) for polygon in polygons
                           for p, q in zip(polygon, np.roll(polygon, -1, axis=0))], axis=0).reshape(shape) > 0.01
        assert off_edge.mean() > 0.95
        np.testing.assert_array_equal(rasterise_polygons(polygons, shape)[off_edge], expected[off_edge])


def segment_distance(points: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of ``points`` (N, 2) to the segment p-q."""
    t = np.clip((points - p) @ (q - p) / max(float((q - p) @ (q - p)), 1e-300), 0, 1)
    return np.linalg.norm(points - (p + t[:, None] * (q - p)), axis=1)


@pytest.mark.parametrize("variant", ["oblique", "flipped"])
def test_contours_through_voxel_centres_include_those_voxels(series_of, tmp_path, variant):
    """Contouring tools often draw through the centres of the structure's boundary voxels: the
    voxels on the contour belong to it. A hole drawn on voxel corners removes exactly its voxels."""
    series, _ = series_of[variant]
    k = 7
    source = series.datasets[k]
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
    spacing = np.asarray(source.PixelSpacing, dtype=float)

    def lps(columns_rows) -> list[str]:  # pixel (column, row) of slice k -> Contour Data
        points = [np.asarray(source.ImagePositionPatient, dtype=float) + c * spacing[1] * orientation[:3]
                  + r * spacing[0] * orientation[3:] for c, r in columns_rows]
        return [f"{v:.10g}" for v in np.ravel(points)]

    path = write_rtstruct(tmp_path / "rt.dcm", {"box": np.zeros(series.image.spatial_shape, bool)}, series)
    ds = pydicom.dcmread(path)
    contours = []
    for corners in ([(10, 20), (30, 20), (30, 35), (10, 35)], [(14.5, 24.5), (16.5, 24.5), (16.5, 27.5), (14.5, 27.5)]):
        item = pydicom.Dataset()
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(corners)
        item.ContourData = lps(corners)
        contours.append(item)
    ds.ROIContourSequence[0].ContourSequence = pydicom.Sequence(contours)
    ds.save_as(path)
    box = read_rtstruct(path, series)["box"]
    expected = np.zeros(series.image.spatial_shape, bool)
    expected[10:31, 20:36, k] = True  # i = column, j = row; both ends included
    expected[15:17, 25:28, k] = False
    np.testing.assert_array_equal(box, expected)

    # a contour between two slice planes belongs to neither: refused, not snapped
    normal = np.cross(orientation[:3], orientation[3:]) * float(source.SliceThickness) * 0.4
    shifted = np.asarray(contours[0].ContourData, dtype=float).reshape(-1, 3) + normal
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [f"{v:.10g}" for v in shifted.ravel()]
    ds.save_as(path)
    with pytest.raises(SegXAIInputError, match="'box' contour 1 does not lie in a slice plane"):
        read_rtstruct(path, series)


def test_objects_of_another_frame_of_reference_or_series_are_refused(head, series_of, tmp_path):
    t1, _ = head
    series, masks = series_of["native"]
    seg = write_seg(tmp_path / "seg.dcm", masks, series)
    rt = write_rtstruct(tmp_path / "rt.dcm", masks, series)
    other_frame = read_dicom_series(write_test_series(tmp_path / "other", "native", image=t1))
    for reader, path in ((read_seg, seg), (read_rtstruct, rt)):
        with pytest.raises(SegXAIInputError, match="frame of reference .* is not the series'"):
            reader(path, other_frame)
        with pytest.raises(SegXAIInputError, match="frame of reference"):
            reader(path, other_frame, require_same_series=False)
    # same frame of reference (same scanner session), another series on the same grid
    sibling = read_dicom_series(write_test_series(tmp_path / "sibling", "native", image=t1,
                                                  frame_of_reference_uid=series.frame_of_reference_uid))
    for reader, path in ((read_seg, seg), (read_rtstruct, rt)):
        with pytest.raises(SegXAIInputError, match="references series"):
            reader(path, sibling)
        for name, mask in reader(path, sibling, require_same_series=False).items():
            np.testing.assert_array_equal(mask, masks[name])
    # a series of the same frame of reference on part of the grid: the frames' voxels, exactly;
    # one with other voxels (twice the spacing) cannot hold the frames without resampling
    part = read_dicom_series(write_test_series(tmp_path / "part", "native", image=t1.crop((4, 0, 2), (60, 64, 18)),
                                               frame_of_reference_uid=series.frame_of_reference_uid))
    for reader, path in ((read_seg, seg), (read_rtstruct, rt)):
        for name, mask in reader(path, part, require_same_series=False).items():
            np.testing.assert_array_equal(mask, masks[name][4:60, :, 2:18], err_msg=name)
    coarse_grid = t1.ijk_to_ras @ np.diag([2.0, 2.0, 1.0, 1.0])
    coarse = read_dicom_series(write_test_series(
        tmp_path / "coarse", "native", image=Image(t1.array[:, ::2, ::2], coarse_grid),
        frame_of_reference_uid=series.frame_of_reference_uid))
    with pytest.raises(SegXAIInputError, match="does not lie on the voxels of the reference image"):
        read_seg(seg, coarse, require_same_series=False)
    with pytest.raises(SegXAIInputError, match="not a DICOM Segmentation"):
        read_seg(rt, series)
    with pytest.raises(SegXAIInputError, match="not an RT Structure Set"):
        read_rtstruct(seg, series)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parametric_map_round_trip(series_of, tmp_path, variant):
    import highdicom as hd

    series, _ = series_of[variant]
    rng = np.random.default_rng(0)
    values = series.image.array[0].astype(np.float64) * 0.0137 - 0.9 + rng.normal(0, 1e-3, series.image.spatial_shape)
    path = write_parametric_map(tmp_path / "pm.dcm", values, series, label="saliency")
    back = read_parametric_map(path, series)
    assert back.array.dtype == np.float32 and back.channel_names == ("saliency",)
    assert back.same_grid(series.image)
    np.testing.assert_array_equal(back.array[0], values.astype(np.float32))  # stored as float32
    # float32 rounding: half a unit in the last place
    assert np.all(np.abs(back.array[0] - values) <= np.abs(values) * 2.0 ** -24)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and ds.BitsAllocated == 32 and "FloatPixelData" in ds
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert [str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence] == [series.series_instance_uid]
    hd.pm.ParametricMap.from_dataset(ds)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = series.sop_instance_uids.index(uid)
        np.testing.assert_array_equal(frame, values[:, :, k].T.astype(np.float32))


def test_results_folder_is_written_whole_or_not_at_all(series_of, tmp_path):
    series, masks = series_of["native"]
    maps = {"saliency gradient T1": series.image.array[0] / 255.0}
    files = write_dicom_results(tmp_path / "out", series, {"bright": masks["bright"]}, maps)
    assert sorted(files) == ["map:saliency gradient T1", "rtstruct", "seg"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in files.values())
    with pytest.raises(SegXAIInputError, match="already exists"):
        write_dicom_results(tmp_path / "out", series, {"bright": masks["bright"]})
    with pytest.raises(SegXAIInputError, match="values: shape"):  # fails after the SEG and RTSTRUCT are written
        write_dicom_results(tmp_path / "bad", series, {"bright": masks["bright"]}, {"x": np.zeros((3, 3, 3))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(SegXAIInputError, match="structure 'bright' has shape"):
        write_seg(tmp_path / "s.dcm", {"bright": masks["bright"][1:]}, series)
    with pytest.raises(SegXAIInputError, match="structure name"):
        write_rtstruct(tmp_path / "r.dcm", {"": masks["bright"]}, series)


@pytest.fixture()
def small_series(tmp_path):
    """A small oblique series with two bright blocks, and the voxel-wise model that segments them."""
    from conftest import grid_matrix

    bright = np.full((14, 12, 8), 10.0, np.float32)
    bright[2:6, 1:5, 1:4] = 100.0
    bright[8:12, 6:10, 4:7] = 100.0
    folder = write_test_series(tmp_path / "series", "oblique", image=Image(bright[None], grid_matrix("oblique")))
    card = write_voxelwise_card(tmp_path / "model", orientation=None, threshold=50.0, patch=(8, 8, 8))
    return folder, card


def test_cli_segment_writes_dicom_referencing_the_series(small_series, tmp_path, capsys):
    from SegXAILib.cli import main

    folder, card = small_series
    series = read_dicom_series(folder)
    truth = series.image.array[0] > 50
    out = tmp_path / "dicom_out"
    assert main(["-q", "segment", str(folder), "--model", str(card), "--out", str(tmp_path / "case"),
                 "--dicom-out", str(out)]) == 0
    assert "dicom rtstruct:" in capsys.readouterr().out
    np.testing.assert_array_equal(read_seg(out / "segmentation.seg.dcm", series)["bright"], truth)
    np.testing.assert_array_equal(read_rtstruct(out / "structures.rtstruct.dcm", series)["bright"], truth)

    # a NIfTI input has no series to reference: refused before anything is written
    from SegXAILib.io import write_image

    nifti = write_image(series.image, tmp_path / "scan.nii.gz")
    assert main(["-q", "segment", str(nifti), "--model", str(card), "--out", str(tmp_path / "case2"),
                 "--dicom-out", str(tmp_path / "dicom2")]) == 2
    assert "--dicom-out: the first image" in capsys.readouterr().err
    assert not (tmp_path / "case2").exists() and not (tmp_path / "dicom2").exists()


def test_cli_run_writes_seg_rtstruct_and_saliency_maps(small_series, tmp_path, capsys):
    from SegXAILib.cli import main
    from SegXAILib.io import read_image

    folder, card = small_series
    series = read_dicom_series(folder)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model": str(card), "device": "cpu", "methods": [{"method": "gradient_x_input"}],
                                    "instances": {"enabled": False}}), encoding="utf-8")
    out = tmp_path / "dicom_out"
    assert main(["run", str(settings), str(folder), "--out", str(tmp_path / "case"), "--dicom-out", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines[-2:]] == ["done", "dicom"]
    files = {role: Path(path) for role, path in lines[-1]["files"].items()}
    assert sorted(files) == ["map:saliency gradient_x_input ch0", "rtstruct", "seg"]
    np.testing.assert_array_equal(read_seg(files["seg"], series)["bright"], series.image.array[0] > 50)
    saliency = read_parametric_map(files["map:saliency gradient_x_input ch0"], series)
    written = read_image(tmp_path / "case" / "maps" / "gradient_x_input_ch0.nii.gz")
    assert np.abs(written.array[0]).max() > 0
    np.testing.assert_array_equal(saliency.array[0], written.array[0].astype(np.float32))
