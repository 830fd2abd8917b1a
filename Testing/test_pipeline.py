"""The case pipeline: settings that validate and round-trip, one prediction per case, a case
folder whose manifest verifies and whose images keep the input geometry on every grid, and
the steps callable one by one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import read_image
from SegXAILib.pipeline import (
    CaseSettings,
    MethodSettings,
    add_instance_maps,
    add_maps,
    add_qa,
    load_case_model,
    read_manifest,
    run_case,
    start_case,
    write_case,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_voxelwise_card(tmp_path_factory.mktemp("model") / "m", orientation=None, threshold=50.0,
                                patch=(8, 8, 8))


def two_lesions(grid: str = "oblique") -> Image:
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 100.0 + np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    bright[8:10, 6:9, 5:7] = 120.0
    return Image(bright[None], grid_matrix(grid), ("ch0",))


def settings_for(card, **fields) -> CaseSettings:
    return CaseSettings.from_dict({"model": str(card), "device": "cpu", **fields})


# ---------------------------------------------------------------------------- settings


def test_settings_round_trip_through_json(tmp_path):
    settings = CaseSettings.demo()
    assert CaseSettings.from_json(settings.to_json()) == settings
    path = settings.save(tmp_path / "s.json")
    assert CaseSettings.load(path) == settings
    assert CaseSettings.quick_demo() != settings


@pytest.mark.parametrize("data, words", [
    ({"methods": [{"method": "smoothgrad", "params": {"n_sample": 3}}]},
     ["methods.0", "'smoothgrad'", "'n_sample'", "n_samples, noise_level"]),
    ({"methods": [{"method": "no_such"}]}, ["methods.0", "'no_such'", "available"]),
    ({"methods": [{"method": "smoothgrad", "params": {"n_samples": 0}}]}, ["methods.0", "n_samples", ">= 1"]),
    ({"instances": {"aggregation": ["max"]}}, ["instances.aggregation", "Extra inputs"]),
    ({"instances": {"aggregations": ["median"]}}, ["instances.aggregations.0"]),
    ({"device": "tpu"}, ["device", "'tpu'"]),
    ({"qa": {"method": "gradcam"}}, ["qa.method 'gradcam'"]),
    ({"methods": [{"method": "smoothgrad"}, {"method": "smoothgrad"}]}, ["appear twice"]),
])
def test_bad_settings_name_the_field(data, words):
    with pytest.raises(SegXAIInputError) as error:
        CaseSettings.from_dict(data, "s.json")
    message = str(error.value)
    assert message.startswith("s.json: ")
    for word in words:
        assert word in message, message


def test_the_risk_record_is_not_a_parameter_set():
    """The old Slicer Logic passed a risk model's record as method parameters: refused now."""
    record = {"params": {"layer": "bottleneck_decoder"}, "target": "class:lesion", "channel_reduction": "sum"}
    with pytest.raises(ValueError, match="has no parameters 'params', 'target', 'channel_reduction'"):
        MethodSettings(method="guided_gradcam", params=record)
    with pytest.raises(SegXAIInputError, match="methods.0: method 'guided_gradcam' has no parameters 'params'"):
        CaseSettings.from_dict({"methods": [{"method": "guided_gradcam", "params": record}]})


# ---------------------------------------------------------------------------- one prediction


def test_a_case_predicts_once(card, monkeypatch):
    """Segmentation runs once; no attribution step predicts again (explain's own prediction
    goes through ``activate``, the window-exact forward's does not)."""
    import SegXAILib.attribution.api as api
    import SegXAILib.models.inference as inference

    calls = {"segment": 0, "activate": 0}
    segment, activate = inference.sliding_window_logits, api.activate

    def counting_segment(*args, **kwargs):
        calls["segment"] += 1
        return segment(*args, **kwargs)

    def counting_activate(*args, **kwargs):
        calls["activate"] += 1
        return activate(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_logits", counting_segment)
    monkeypatch.setattr(api, "activate", counting_activate)
    settings = settings_for(card, methods=[{"method": "gradient_x_input"}, {"method": "smoothgrad",
                                                                             "params": {"n_samples": 2}}],
                            instances={"aggregations": ["mean"], "n_samples": 2}, qa={"method": "gradient_x_input"},
                            agg2exp={"enabled": True, "method": "vanilla_gradient"})
    case = run_case(two_lesions(), None, settings)
    assert calls == {"segment": 1, "activate": 0}
    assert set(case.maps) == {"gradient_x_input", "smoothgrad"} and sorted(case.instance_maps) == [1, 2]
    assert case.qa is not None and case.agg2exp is not None


def test_maps_equal_explain_and_the_steps_equal_run_case(card):
    """Independent oracle: ``explain`` predicting on its own; the incremental steps give what
    ``run_case`` gives."""
    from SegXAILib.attribution import explain

    image = two_lesions("lps_flipped")
    settings = settings_for(card, methods=[{"method": "gradient_x_input"}],
                            instances={"ids": [2], "aggregations": ["mean"], "n_samples": 1},
                            qa={"method": "gradient_x_input"})
    whole = run_case(image, None, settings)
    model = load_case_model(settings)
    oracle = explain(image, model, "gradient_x_input", target="class:bright", amp=False)
    np.testing.assert_array_equal(whole.maps["gradient_x_input"].maps.array, oracle.maps.array)
    # the per-voxel model: d(x - 50)/dx = 1 inside the class, so x * 1 there (softmax-free logit target)
    steps = start_case(image, model, settings)
    add_maps(steps, model)
    add_instance_maps(steps, model, [2])
    add_qa(steps, model)
    np.testing.assert_array_equal(steps.maps["gradient_x_input"].maps.array, whole.maps["gradient_x_input"].maps.array)
    np.testing.assert_array_equal(steps.instance_maps[2]["mean"].array, whole.instance_maps[2]["mean"].array)
    np.testing.assert_array_equal(steps.qa.curve, whole.qa.curve)
    assert steps.lesions == whole.lesions


def test_unknown_instance_ids_are_refused(card):
    settings = settings_for(card, instances={"ids": [3]})
    with pytest.raises(SegXAIInputError, match="instances.ids: no instance 3; the prediction has 2"):
        run_case(two_lesions(), None, settings)


# ---------------------------------------------------------------------------- the case folder


@pytest.mark.parametrize("grid", ["oblique", "lps_flipped", "oblique_left_handed"])
def test_case_folder_keeps_geometry_and_verifies(card, tmp_path, grid):
    image = two_lesions(grid)
    settings = settings_for(card, methods=[{"method": "gradient_x_input"}],
                            instances={"aggregations": ["mean"], "n_samples": 1}, qa={"method": "gradient_x_input"})
    case = run_case(image, None, settings)
    manifest_path = write_case(case, tmp_path)
    manifest = read_manifest(tmp_path)  # every checksum verified
    assert manifest_path == tmp_path / "case.json"
    listed = {entry["path"] for entry in manifest["files"]}
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()} - {"case.json"}
    assert listed == on_disk
    for path in tmp_path.rglob("*.nii.gz"):
        written = read_image(path)
        np.testing.assert_allclose(written.ijk_to_ras, image.ijk_to_ras, atol=1e-4, err_msg=str(path))
        assert written.spatial_shape == image.spatial_shape
    labels = read_image(tmp_path / "labels.nii.gz").array[0]
    np.testing.assert_array_equal(labels == 1, image.array[0] > 50)  # the per-voxel model's exact answer
    lesions = json.loads((tmp_path / "lesions.json").read_text(encoding="utf-8"))["instances"]
    assert [row["voxels"] for row in lesions] == [48, 12]
    assert manifest["settings"] == settings.to_dict() and manifest["summary"]["instances"] == 2
    # a changed file no longer verifies
    (tmp_path / "qa.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="qa.json"):
        read_manifest(tmp_path)


def test_a_case_without_the_structure_is_written_with_its_reason(card, tmp_path):
    """Nothing predicted: the segmentation is still a result; maps of the empty class and QA are
    skipped with a note, and the manifest says so (no error, no lost case)."""
    empty = Image(np.zeros((1, 12, 10, 8), np.float32), grid_matrix("oblique"), ("ch0",))
    settings = settings_for(card, methods=[{"method": "gradient_x_input"},
                                           {"method": "gradient_x_input", "target": "class:background",
                                            "label": "background_map"}],
                            qa={"method": "gradient_x_input"})
    case = run_case(empty, None, settings)
    assert list(case.maps) == ["background_map"] and case.qa is None and case.instances == []
    assert any("gradient_x_input" in note and "'bright'" in note for note in case.notes)
    write_case(case, tmp_path)
    summary = read_manifest(tmp_path)["summary"]
    assert summary["status"] == "empty_prediction" and summary["structure_voxels"] == 0
    assert len(summary["notes"]) == 2


@pytest.mark.parametrize("label", ["../escape", "a/b", ".hidden", "two words"])
def test_a_map_label_is_a_file_name(label):
    with pytest.raises(SegXAIInputError, match="methods.0.label"):
        CaseSettings.from_dict({"methods": [{"method": "smoothgrad", "label": label}]})


def test_a_binary_reference_means_the_structure(card):
    """A two-class model: any non-zero reference voxel is the structure (a map of lesion ids
    too), for the lesion table's groups and for Agg2Exp's reference column alike."""
    image = two_lesions()
    ids = np.zeros(image.spatial_shape, np.uint8)
    ids[1:5, 1:5, 1:4] = 1  # lesion 1 found
    ids[0:2, 8:10, 0:2] = 2  # a lesion the model missed
    settings = settings_for(card, instances={"ids": []}, agg2exp={"enabled": True, "method": "vanilla_gradient"})
    case = run_case(image, None, settings, reference=image.with_array(ids[None]))
    assert [(row["id"], row["group"]) for row in case.lesions] == [(1, "TP"), (2, "FP"), (None, "FN")]
    from SegXAILib.attribution import explain

    model = load_case_model(settings)
    mass = np.abs(explain(image, model, "vanilla_gradient", target="class:bright", amp=False).maps.array).sum(axis=0)
    expected = mass[ids > 0].sum() / mass.sum()  # paper 003's absolute mass share of the reference region
    value = case.agg2exp.values[case.agg2exp.rows.index("bright"), case.agg2exp.columns.index("reference:bright")]
    assert value == pytest.approx(expected, rel=1e-6)
