"""``read_case``: a case folder read back equals the in-memory case that was written (the
oracle): voxels bit for bit (the files are float32 / integer), geometry exactly (the
manifest's float64 matrix, on oblique and flipped grids too), tables, QA and settings; a
changed, missing, truncated or foreign file is an error naming it; and the Slicer nodes of a
read case are those of the in-memory case."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import read_image, write_image
from SegXAILib.pipeline import (
    Agg2ExpSettings,
    CaseSettings,
    InstanceSettings,
    MethodSettings,
    QASettings,
    find_case_instances,
    read_case,
    read_case_images,
    resolve_model_card,
    run_case,
    write_case,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUFFIXES = (".nii.gz", ".nrrd")
#: the bundled lesions model with the one risk model shipped for it (guided_gradcam): QA with
#: a band, PC1 and the calibration cohort's reference curve
SETTINGS = CaseSettings(
    model="lesions", device="cpu",
    methods=[MethodSettings(method="vanilla_gradient")],
    instances=InstanceSettings(ids=[1], aggregations=["mean"], n_samples=2, batch_size=2, seed=0),
    qa=QASettings(risk_model=str(Path(__file__).resolve().parent / "Data" / "risk_lesions_guided_gradcam_v2.json")),
    agg2exp=Agg2ExpSettings(enabled=True, method="vanilla_gradient"),
)


def run_from_files(image: Image, folder: Path, settings: CaseSettings, model=None):
    """Write the inputs, read them back as the engine process does, run the case and write it
    in each suffix: ``(case, {suffix: case folder})``."""
    card = resolve_model_card(settings.model)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_image(image.channel(name), folder / f"input_{name}.nii.gz") for name in image.channel_names]
    case = run_case(read_case_images(paths, card), model, settings)
    inputs = dict(zip(card.input_channels, paths))
    written = {suffix: write_case(case, folder / f"case{suffix.replace('.', '_')}", suffix=suffix, inputs=inputs).parent
               for suffix in SUFFIXES}
    return case, written


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    """The demo's 48 x 48 x 32 crop of the sample head (coronal grid, FLAIR + T1, two lesions)."""
    from SegXAILib.demo import DEMO_SEED, DemoSettings, demo_case

    image, _ = demo_case(DEMO_SEED, DemoSettings.reduced().crop_half)
    return run_from_files(image, tmp_path_factory.mktemp("read_lesions"), SETTINGS)


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """Two bright blocks on an oblique left-handed grid and the per-voxel model that segments
    them exactly (labels = input > 50)."""
    folder = tmp_path_factory.mktemp("read_oblique")
    card = write_voxelwise_card(folder / "model", orientation=None, threshold=50.0, patch=(8, 8, 8))
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 100.0 + np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    bright[8:10, 6:9, 5:7] = 120.0
    settings = CaseSettings.from_dict({"model": str(card), "device": "cpu", "methods": [{"method": "gradient_x_input"}],
                                       "instances": {"aggregations": ["mean", "max"], "n_samples": 1},
                                       "qa": {"method": "gradient_x_input"}})
    return run_from_files(Image(bright[None], grid_matrix("oblique_left_handed"), ("ch0",)), folder, settings)


def json_values(value):
    """The JSON data model of ``value`` (tuples as lists, numpy scalars as Python, NaN as None):
    what a JSON file can hold of an in-memory table."""
    if isinstance(value, dict):
        return {str(k): json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_values(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def assert_same_image(read: Image, expected: Image, what: str) -> None:
    assert read.array.dtype == expected.array.dtype, what
    np.testing.assert_array_equal(read.array, expected.array, err_msg=what)
    assert np.array_equal(read.ijk_to_ras, expected.ijk_to_ras), what  # exact, not float32 NIfTI geometry
    assert read.channel_names == expected.channel_names, what


def assert_same_case(read, case) -> None:
    assert_same_image(read.image, case.image, "image")
    assert read.settings == case.settings
    assert read.class_index == case.class_index and read.structure == case.structure
    assert read.card.checksum() == case.card.checksum() and read.device == case.device
    segmentation = read.segmentation
    assert_same_image(segmentation.labels, case.segmentation.labels, "labels")
    assert segmentation.model_labels is None
    probabilities, expected = segmentation.probabilities, case.segmentation.probabilities
    assert probabilities.channel_names == expected.channel_names and probabilities.array.dtype == np.float32
    np.testing.assert_array_equal(probabilities.array[1:], expected.array[1:])  # written float32
    # background: not written, rebuilt as 1 - foreground; the run's channels sum to 1 up to the
    # float32 rounding of the softmax and of the linear resampling (a few ulp of 1 each)
    np.testing.assert_allclose(probabilities.array[0], expected.array[0], rtol=0, atol=8 * np.finfo(np.float32).eps)
    assert segmentation.timings == {k: round(v, 3) for k, v in case.segmentation.timings.items()}

    assert (read.instance_labels is None) == (case.instance_labels is None)
    if case.instance_labels is not None:
        assert_same_image(read.instance_labels, case.instance_labels, "instance labels")
    assert len(read.instances) == len(case.instances) > 0
    for got, want in zip(read.instances, case.instances):
        assert (got.id, got.voxels, got.volume_mm3, got.bbox) == (want.id, want.voxels, want.volume_mm3, want.bbox)
        assert np.array_equal(got.centroid_ras, want.centroid_ras)
        assert got.mean_probability == want.mean_probability
    assert read.lesions == json_values(case.lesions)

    assert list(read.maps) == list(case.maps)
    for name, result in case.maps.items():
        got = read.maps[name]
        assert_same_image(got.maps, result.maps, f"map {name}")
        assert (got.method, got.target, got.postprocessing, got.model, got.model_checksum) == (
            result.method, result.target, result.postprocessing, result.model, result.model_checksum)
        assert got.parameters == json_values(result.parameters)
    assert list(read.instance_maps) == list(case.instance_maps)
    for identifier, per_aggregation in case.instance_maps.items():
        assert list(read.instance_maps[identifier]) == list(per_aggregation)
        for aggregation, maps in per_aggregation.items():
            assert_same_image(read.instance_maps[identifier][aggregation], maps, f"instance {identifier} {aggregation}")

    qa, want = read.qa, case.qa
    assert (qa.structure, qa.method, qa.band, qa.risk_model, qa.calibration_auroc_cv) == (
        want.structure, want.method, want.band, want.risk_model, want.calibration_auroc_cv)
    assert qa.risk == want.risk
    np.testing.assert_array_equal(qa.thresholds, want.thresholds)
    np.testing.assert_array_equal(qa.curve, want.curve)
    assert qa.saliency.dtype == want.saliency.dtype
    np.testing.assert_array_equal(qa.saliency, want.saliency)
    assert (qa.reference_curve is None) == (want.reference_curve is None)
    if want.reference_curve is not None:
        np.testing.assert_array_equal(qa.reference_curve, want.reference_curve)

    assert (read.agg2exp is None) == (case.agg2exp is None)
    if case.agg2exp is not None:
        assert (read.agg2exp.rows, read.agg2exp.columns, read.agg2exp.variant) == (
            case.agg2exp.rows, case.agg2exp.columns, case.agg2exp.variant)
        np.testing.assert_array_equal(read.agg2exp.values, case.agg2exp.values)  # NaN where NaN
    assert read.timings == {k: round(v, 3) for k, v in case.timings.items()}
    assert read.notes == case.notes and read.reference is None


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_lesions_case_reads_back_as_written(lesions, suffix):
    case, folders = lesions
    assert case.qa.risk is not None and case.qa.reference_curve is not None and case.agg2exp is not None
    assert_same_case(read_case(folders[suffix]), case)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_oblique_left_handed_case_reads_back_as_written(oblique, suffix):
    case, folders = oblique
    assert case.qa.risk is None and sorted(case.instance_maps) == [1, 2]  # EC curve only, two instances
    read = read_case(folders[suffix])
    assert_same_case(read, case)
    # the per-voxel model's exact answer, on the exact oblique grid
    np.testing.assert_array_equal(read.mask, read.image.array[0] > 50)
    assert np.allclose(read.image.ijk_to_ras, grid_matrix("oblique_left_handed"), atol=1e-5)  # float32 input file


def test_instances_equal_find_case_instances_on_the_read_case(oblique):
    """Independent of the written table: the components of the read labels."""
    case, folders = oblique
    read = read_case(folders[".nii.gz"])
    labels, instances = find_case_instances(case.segmentation, case.class_index)
    np.testing.assert_array_equal(read.instance_labels.array[0], labels)
    assert [(i.voxels, i.bbox) for i in read.instances] == [(48, ((1, 1, 1), (5, 5, 4))), (12, ((8, 6, 5), (10, 9, 7)))]
    for got, want in zip(read.instances, instances):
        np.testing.assert_array_equal(got.centroid_ras, want.centroid_ras)


# ---------------------------------------------------------------------------- refusals


@pytest.fixture
def copy(lesions, tmp_path):
    """A copy of the lesions case folder (.nii.gz) to damage."""
    return Path(shutil.copytree(lesions[1][".nii.gz"], tmp_path / "case"))


def edit_manifest(folder: Path, change) -> None:
    path = folder / "case.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    change(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def test_a_changed_file_is_refused_when_verified(copy):
    labels = read_image(copy / "labels.nii.gz")
    array = labels.array.copy()
    array[0, 0, 0, 0] = 1 - array[0, 0, 0, 0]
    write_image(labels.with_array(array), copy / "labels.nii.gz")
    with pytest.raises(SegXAIInputError, match=r"labels\.nii\.gz"):
        read_case(copy)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_truncated_image_is_refused_unverified(lesions, tmp_path, suffix):
    """ITK reads a truncated NIfTI without an error (the missing voxels zero): still refused."""
    copy = Path(shutil.copytree(lesions[1][suffix], tmp_path / "case"))
    path = copy / "maps" / f"vanilla_gradient_T1{suffix}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegXAIInputError, match=re.escape(str(path))):
        read_case(copy, verify=False)


def test_a_deleted_image_is_refused_unverified(copy):
    (copy / "instances" / "instance1_mean_FLAIR.nii.gz").unlink()
    with pytest.raises(SegXAIInputError, match=r"instance1_mean_FLAIR\.nii\.gz"):
        read_case(copy, verify=False)


def test_a_missing_input_image_is_named(copy, tmp_path):
    gone = tmp_path / "moved_FLAIR.nii.gz"
    edit_manifest(copy, lambda m: m["inputs"].update(FLAIR=str(gone)))
    with pytest.raises(SegXAIInputError, match=f"input image {gone} .channel 'FLAIR'. is missing"):
        read_case(copy)


def test_an_input_on_another_grid_is_refused(copy, tmp_path):
    """An input image replaced by one on another grid (moved 1 mm): not the case's image (the
    first channel sets the grid; the others are resampled onto it, as in the run)."""
    manifest = json.loads((copy / "case.json").read_text(encoding="utf-8"))
    moved = read_image(manifest["inputs"]["FLAIR"], "FLAIR")
    shift = np.eye(4)
    shift[0, 3] = 1.0
    path = write_image(Image(moved.array, shift @ moved.ijk_to_ras, ("FLAIR",)), tmp_path / "FLAIR_moved.nii.gz")
    edit_manifest(copy, lambda m: m["inputs"].update(FLAIR=str(path)))
    with pytest.raises(SegXAIInputError, match="not on the case's grid"):
        read_case(copy)


def test_a_case_of_another_model_is_refused(copy):
    edit_manifest(copy, lambda m: m["model"].update(checksum="0" * 64))
    expected = f"case folder {copy}: run with model 'segxai-lesions-demo' (checksum '{'0' * 64}'), but "
    with pytest.raises(SegXAIInputError, match=re.escape(expected)):
        read_case(copy)


def test_a_case_without_recorded_inputs_is_refused(copy):
    edit_manifest(copy, lambda m: m.update(inputs={}))
    with pytest.raises(SegXAIInputError, match="records no input images"):
        read_case(copy)


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(SegXAIInputError, match="case.json: not a readable case manifest"):
        read_case(tmp_path)


# ---------------------------------------------------------------------------- Slicer nodes


def test_show_case_of_a_read_case_makes_the_same_nodes(lesions):
    slicer = pytest.importorskip("slicer")
    pytest.importorskip("vtk")
    from SegXAILib import mrml
    from SegXAILib.mrml.logic import show_case

    case, folders = lesions
    read = read_case(folders[".nrrd"])

    def shown(which):
        scene = mrml.headless_scene()
        volume = mrml.image_to_volume_node(which.image.channel(0), scene, "FLAIR")
        return scene, show_case(scene, which, reference_volume=volume)

    (scene_a, a), (scene_b, b) = shown(case), shown(read)
    for name in case.card.class_names[1:]:
        np.testing.assert_array_equal(mrml.segment_mask(b.segmentation, name, case.image),
                                      mrml.segment_mask(a.segmentation, name, case.image))
    assert list(b.saliency) == list(a.saliency) and list(b.instance_saliency) == list(a.instance_saliency)
    pairs = [(x, y) for key in a.saliency for x, y in zip(a.saliency[key], b.saliency[key])]
    pairs += [(x, y) for key in a.instance_saliency for x, y in zip(a.instance_saliency[key], b.instance_saliency[key])]
    assert pairs
    for x, y in pairs:
        assert x.GetName() == y.GetName()
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(y), slicer.util.arrayFromVolume(x))
    def columns(node) -> dict:  # NaN (an empty cell) compares equal to itself
        return {name: ["NaN" if isinstance(v, float) and math.isnan(v) else v for v in values]
                for name, values in mrml.table_node_columns(node).items()}

    for table in ("lesion_table", "qa_table"):
        assert columns(getattr(b, table)) == columns(getattr(a, table))
    curves = [columns(scene.GetFirstNodeByName("SegXAI EC curves table")) for scene in (scene_a, scene_b)]
    assert curves[1] == curves[0] and "calibration mean" in curves[0]
