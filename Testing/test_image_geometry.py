"""Geometry survives every round trip: SimpleITK conversion, NIfTI / NRRD / MHA / DICOM files,
reorientation, resampling. The oracle is SimpleITK's own TransformIndexToPhysicalPoint."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from SegXAILib.image import LPS_TO_RAS, Image, SegXAIInputError, decompose_geometry, geometry_matrix
from SegXAILib.io import read_channels, read_image, resample_to, write_dicom_series, write_image

from conftest import GRIDS, grid_matrix, random_image


def all_indices(image: Image) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s) for s in image.spatial_shape], indexing="ij"), -1).reshape(-1, 3)


def sitk_ras_points(volume: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """RAS points of voxel indices by SimpleITK's own index-to-physical transform (LPS -> RAS)."""
    lps = np.array([volume.TransformIndexToPhysicalPoint(tuple(int(v) for v in index)) for index in ijk])
    return lps * np.array([-1.0, -1.0, 1.0])


def assert_same_physical_content(original: Image, result: Image, atol: float = 1e-4) -> None:
    """Every voxel of ``original`` sits at a voxel centre of ``result`` with the same value."""
    ijk = all_indices(original)
    mapped = result.ras_to_ijk_points(original.ijk_to_ras_points(ijk))
    np.testing.assert_allclose(mapped, np.round(mapped), atol=atol)
    mapped = np.round(mapped).astype(int)
    assert np.all(mapped >= 0) and np.all(mapped < np.array(result.spatial_shape))
    np.testing.assert_array_equal(
        result.array[0][tuple(mapped.T)], original.array[0][tuple(ijk.T)]
    )


def test_to_sitk_positions_match_sitk_index_to_physical(grid_name):
    image = random_image(grid_name)
    volume = image.to_sitk()
    ijk = all_indices(image)
    np.testing.assert_allclose(image.ijk_to_ras_points(ijk), sitk_ras_points(volume, ijk), atol=1e-9)
    # voxel values follow the indices: sitk indexes [i, j, k] via GetPixel
    for index in ijk[:: max(1, len(ijk) // 17)]:
        assert volume.GetPixel(tuple(int(v) for v in index)) == pytest.approx(float(image.array[(0, *index)]))


def test_from_sitk_inverts_to_sitk(grid_name):
    image = random_image(grid_name, channels=3)
    for channel in range(3):
        back = Image.from_sitk(image.to_sitk(channel))
        np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-12)
        np.testing.assert_array_equal(back.array[0], image.array[channel])
    vector = Image.from_sitk(image.to_sitk())
    np.testing.assert_array_equal(vector.array, image.array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_round_trip_keeps_every_voxel_position(tmp_path, grid_name, suffix):
    image = random_image(grid_name)
    path = write_image(image, tmp_path / f"volume{suffix}")
    back = read_image(path)
    volume = sitk.ReadImage(str(path))
    ijk = all_indices(image)
    # the file's own geometry, as SimpleITK reads it, puts every voxel where we said
    np.testing.assert_allclose(sitk_ras_points(volume, ijk), image.ijk_to_ras_points(ijk), atol=1e-4)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(back.array, image.array)


def test_dicom_series_round_trip_keeps_every_voxel_position(tmp_path, grid_name):
    # DICOM stores right-handed slice stacks: a left-handed grid comes back with k reversed,
    # so compare by physical position, voxel by voxel
    image = random_image(grid_name, integer=True)
    folder = write_dicom_series(image, tmp_path / "series")
    back = read_image(folder)
    assert_same_physical_content(image, back)
    if np.linalg.det(image.direction) > 0:
        np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-4)


def test_read_process_write_keeps_geometry(tmp_path, grid_name):
    """read -> process (a voxelwise operation and an exact reorientation) -> write -> read."""
    image = random_image(grid_name)
    write_image(image, tmp_path / "in.nrrd")
    loaded = read_image(tmp_path / "in.nrrd")
    processed = loaded.with_array(loaded.array * 2 + 1).reoriented("RAS")
    write_image(processed, tmp_path / "out.nii.gz")
    final = read_image(tmp_path / "out.nii.gz")
    expected = image.with_array(image.array * 2 + 1)
    assert_same_physical_content(expected, final)


def test_reoriented_is_exact_and_points_to_axcodes(grid_name):
    image = random_image(grid_name)
    for codes in ("RAS", "LPS", "SAR", "IPL"):
        result = image.reoriented(codes)
        assert_same_physical_content(image, result, atol=1e-6)
        wanted = {"R": [1, 0, 0], "L": [-1, 0, 0], "A": [0, 1, 0], "P": [0, -1, 0], "S": [0, 0, 1], "I": [0, 0, -1]}
        for axis, code in enumerate(codes):
            assert np.dot(result.direction[:, axis], wanted[code]) > 0.5


def test_reoriented_rejects_bad_codes():
    with pytest.raises(SegXAIInputError, match="axcodes"):
        random_image("identity").reoriented("RRS")


def test_geometry_matrix_decomposes_back(grid_name):
    spacing, origin, direction = GRIDS[grid_name]
    recovered = decompose_geometry(geometry_matrix(spacing, origin, direction))
    np.testing.assert_allclose(recovered[0], spacing)
    np.testing.assert_allclose(recovered[1], origin)
    np.testing.assert_allclose(recovered[2], direction, atol=1e-12)


def test_sheared_matrix_is_rejected():
    matrix = np.eye(4)
    matrix[0, 1] = 0.5
    with pytest.raises(SegXAIInputError, match="orthogonal"):
        Image(np.zeros((2, 2, 2)), matrix)


@settings(max_examples=25, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    flip=st.booleans(),
)
def test_any_grid_survives_sitk_and_nifti(tmp_path_factory, angles, spacing, origin, flip):
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    if flip:
        direction = direction @ np.diag([1.0, 1.0, -1.0])
    image = Image(np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2), geometry_matrix(spacing, origin, direction))
    ijk = all_indices(image)
    np.testing.assert_allclose(image.ijk_to_ras_points(ijk), sitk_ras_points(image.to_sitk(), ijk), atol=1e-6)
    path = write_image(image, tmp_path_factory.mktemp("h") / "v.nii.gz")
    back = read_image(path)
    # NIfTI stores the matrix in float32 (sform): positions agree to float32 precision
    np.testing.assert_allclose(back.ijk_to_ras_points(ijk), image.ijk_to_ras_points(ijk), atol=1e-3)
    np.testing.assert_array_equal(back.array, image.array)


def test_lps_to_ras_is_its_own_inverse():
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


# ---- multi-channel inputs ------------------------------------------------------------------

def linear_field(image: Image, coefficients=(0.5, -1.25, 2.0), offset=3.0) -> Image:
    """A field linear in RAS position: linear interpolation reproduces it exactly."""
    points = image.ijk_to_ras_points(all_indices(image)).reshape(*image.spatial_shape, 3)
    return image.with_array((points @ np.asarray(coefficients) + offset).astype(np.float64)[None])


def test_read_channels_on_one_grid_stacks_them(tmp_path):
    flair = random_image("oblique", seed=1)
    t1 = random_image("oblique", seed=2)
    write_image(flair, tmp_path / "flair.nii.gz")
    write_image(t1, tmp_path / "t1.nii.gz")
    image = read_channels([tmp_path / "flair.nii.gz", tmp_path / "t1.nii.gz"], ["FLAIR", "T1"])
    assert image.channel_names == ("FLAIR", "T1")
    np.testing.assert_array_equal(image.array[1], t1.array[0])
    np.testing.assert_allclose(image.ijk_to_ras, flair.ijk_to_ras, atol=1e-4)


def test_read_channels_resamples_onto_the_first_grid(tmp_path, caplog):
    first = Image(np.zeros((20, 18, 16), np.float32), grid_matrix("anisotropic"))
    # the second channel: a different, oblique grid over a larger region, carrying a linear field
    spacing, origin, direction = GRIDS["oblique"]
    centre = first.ijk_to_ras_points(np.array(first.spatial_shape) / 2 - 0.5)[0]
    # a 64 mm cube around the first grid's centre covers all of it (its diagonal is 52 mm)
    other_matrix = geometry_matrix((1.6, 1.6, 1.6), np.zeros(3), direction)
    other_matrix[:3, 3] = centre - other_matrix[:3, :3] @ (np.array([40, 40, 40]) / 2)
    second = linear_field(Image(np.zeros((40, 40, 40)), other_matrix))
    write_image(first, tmp_path / "a.nii.gz")
    write_image(second.with_array(second.array.astype(np.float32)), tmp_path / "b.nrrd")
    with caplog.at_level("WARNING"):
        image = read_channels([tmp_path / "a.nii.gz", tmp_path / "b.nrrd"])
    assert "resampled" in caplog.text
    assert image.same_grid(first)
    expected = linear_field(first).array[0]
    np.testing.assert_allclose(image.array[1], expected, atol=2e-3)


def test_read_channels_refuses_grids_that_do_not_overlap(tmp_path):
    first = random_image("identity")
    far = Image(first.array, grid_matrix("identity") @ np.array(
        [[1, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    write_image(first, tmp_path / "a.nii.gz")
    write_image(far, tmp_path / "b.nii.gz")
    with pytest.raises(SegXAIInputError, match=r"b\.nii\.gz.*cannot be resampled"):
        read_channels([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])


def test_resample_to_same_grid_is_identity():
    image = random_image("oblique")
    np.testing.assert_allclose(resample_to(image, image).array, image.array, atol=1e-4)


def test_sample_head_geometry():
    from SegXAILib.sample_data import load_sample_head

    head = load_sample_head()
    assert head.t1.spatial_shape == (128, 128, 62)
    np.testing.assert_allclose(sorted(head.t1.spacing), [2.0, 2.0, 3.0])
    assert head.t1.same_grid(head.tissue) and head.t1.same_grid(head.brain)
    # coronal acquisition: j runs superior, k anterior
    np.testing.assert_allclose(np.abs(head.t1.direction), np.abs(GRIDS["coronal"][2]))
    assert 40_000 < head.white_matter.sum() < 60_000
