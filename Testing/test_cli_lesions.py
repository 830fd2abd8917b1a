"""``segxai lesions``: the instance label map, the lesion table and the instance saliency maps
on the input grid (equal to :func:`SegXAILib.instances.instance_smoothgrad` through the Python
API), ``--click`` picking the instance under a RAS point, the case pipeline's layout with a
``case.json`` whose checksums verify and whose rows are the pipeline's, and bad input -> exit 2
with nothing written. Case: the bundled lesion model on a 48x48x32 crop of a lesion phantom."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.image import Image
from SegXAILib.io import read_channels, read_image, write_image
from SegXAILib.pipeline import read_manifest


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """FLAIR / T1 files of a crop around one phantom lesion, and the reference lesion mask."""
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=2026)
    lesions = phantom.lesions.array[0]
    centre = np.argwhere(lesions == 1).mean(axis=0).round().astype(int)
    half = np.array([24, 24, 16])
    image = phantom.image.crop(centre - half, centre + half)
    assert image.spatial_shape == (48, 48, 32)
    folder = tmp_path_factory.mktemp("lesion_crop")
    paths = [write_image(image.channel(name), folder / f"{name}.nii.gz") for name in ("FLAIR", "T1")]
    reference = phantom.lesions.crop(centre - half, centre + half)
    reference_path = write_image(reference.with_array((reference.array > 0).astype(np.uint8)), folder / "reference.nii.gz")
    other_grid = write_image(Image(np.zeros((1, 40, 48, 32), np.uint8), image.ijk_to_ras), folder / "other_grid.nii.gz")
    return {"images": paths, "reference": reference_path, "other_grid": other_grid}


@pytest.fixture(scope="module")
def model():
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    return load_model(resolve_model_card("lesions"), device="cpu")


@pytest.fixture(scope="module")
def prediction(case, model):
    """The Python API's view: image, instance labels and instances on the input grid."""
    from SegXAILib.instances import find_instances
    from SegXAILib.models.inference import segment

    image = read_channels(case["images"], model.card.input_channels)
    segmentation = segment(image, model)
    labels, instances = find_instances(segmentation.mask(1), segmentation.probabilities.array[1], grid=image)
    assert len(instances) >= 2, "the crop should hold several predicted instances"
    return image, labels, instances


def run_lesions(case, out, *extra) -> int:
    return main(["-q", "lesions", *map(str, case["images"]), "--model", "lesions", "--out", str(out),
                 "--device", "cpu", *map(str, extra)])


def read_table(out: Path) -> tuple[dict, list[dict]]:
    document = json.loads((out / "lesions.json").read_text(encoding="utf-8"))
    with open(out / "lesions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return document, rows


def test_table_and_instances_without_saliency(tmp_path, case, prediction):
    image, labels, instances = prediction
    out = tmp_path / "out"
    assert run_lesions(case, out, "--reference", case["reference"]) == 0
    written = read_image(out / "instances.nii.gz")
    assert written.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(written.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(written.array[0], labels)
    document, rows = read_table(out)
    predicted = [r for r in document["instances"] if r["id"] is not None]
    assert [r["id"] for r in predicted] == [i.id for i in instances]
    for row, instance in zip(predicted, instances):
        assert row["voxels"] == instance.voxels
        assert row["volume_mm3"] == pytest.approx(instance.volume_mm3)
        np.testing.assert_allclose(row["centroid_ras"], instance.centroid_ras, atol=1e-6)
        assert row["mean_probability"] == pytest.approx(instance.mean_probability)
        assert row["group"] in ("TP", "FP") and "saliency" not in row
    assert all(r["group"] == "FN" and r["reference_id"] for r in document["instances"] if r["id"] is None)
    assert any(r["group"] == "TP" for r in predicted)
    assert len(rows) == len(document["instances"])
    assert [int(r["id"]) for r in rows if r["id"]] == [i.id for i in instances]
    assert not any(name.startswith("peak_") for name in rows[0])
    assert document["selected"] == [] and not (out / "instances").exists()
    # the case pipeline's layout: the prediction, the instances, the table and the manifest
    assert sorted(p.name for p in out.iterdir()) == ["case.json", "instances.nii.gz", "labels.nii.gz", "lesions.csv",
                                                     "lesions.json", "probability_lesion.nii.gz", "segmentation.json"]


def test_click_max_map_equals_python(tmp_path, case, model, prediction):
    """--click at an instance's centroid picks it; the written max map is instance_smoothgrad's."""
    import torch

    from SegXAILib.attribution.api import _model_grid_mask
    from SegXAILib.attribution.forward import SegmentationForward
    from SegXAILib.attribution.targets import InstanceTarget
    from SegXAILib.instances import instance_smoothgrad
    from SegXAILib.models.preprocessing import model_input, to_input_grid

    image, labels, instances = prediction
    chosen = instances[-1]  # the smallest: the fewest per-voxel terms
    ras = ",".join(f"{v:.4f}" for v in chosen.centroid_ras)
    out = tmp_path / "out"
    assert run_lesions(case, out, f"--click={ras}", "--click-radius", 10, "--n-samples", 1, "--seed", 3,
                       "--batch-size", 16, "--aggregation", "max") == 0
    document, rows = read_table(out)
    assert document["selected"] == [chosen.id]
    selection = read_manifest(out)["settings"]["instances"]
    assert selection["ids"] is None and selection["click_ras"] == pytest.approx(list(chosen.centroid_ras), abs=1e-4)

    x, model_affine = model_input(image, model.card, "cpu")
    mask = _model_grid_mask(labels == chosen.id, image, model.card)
    forward = SegmentationForward(model.network, model.card, x.shape[2:], InstanceTarget(1, mask, instance_id=chosen.id))
    saliency = instance_smoothgrad(forward, x, n_samples=1, noise_level=0.1, aggregation="max", batch_size=16, seed=3)
    expected = to_input_grid(saliency[0].detach().numpy(), model_affine, image, tuple(image.channel_names))
    for channel, name in enumerate(("FLAIR", "T1")):
        written = read_image(out / "instances" / f"instance{chosen.id}_max_{name}.nii.gz")
        assert written.spatial_shape == image.spatial_shape
        np.testing.assert_allclose(written.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
        reference = expected.array[channel]
        scale = float(np.abs(reference).max())
        assert scale > 0
        np.testing.assert_allclose(written.array[0], reference, rtol=1e-5, atol=1e-6 * scale)
        row = next(r for r in document["instances"] if r["id"] == chosen.id)
        peaks = row["saliency"]["max"][name]
        assert peaks["peak_positive"] == pytest.approx(max(0.0, float(reference.max())), rel=1e-5)
        assert peaks["peak_negative"] == pytest.approx(min(0.0, float(reference.min())), rel=1e-5)
        csv_row = next(r for r in rows if r["id"] == str(chosen.id))
        assert float(csv_row[f"peak_positive_max_{name}"]) == pytest.approx(peaks["peak_positive"])
    others = [r for r in rows if r["id"] and r["id"] != str(chosen.id)]
    assert others and all(r["peak_positive_max_FLAIR"] == "" for r in others)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # atomic writes: no temporary left
    del torch


def test_instances_mean_and_max(tmp_path, case, prediction):
    image, labels, instances = prediction
    chosen = instances[-1].id
    out = tmp_path / "out"
    assert run_lesions(case, out, "--instances", chosen, "--aggregation", "mean,max", "--n-samples", 1,
                       "--batch-size", 32) == 0
    names = {p.name for p in (out / "instances").iterdir()}
    for aggregation in ("mean", "max"):
        for channel in ("FLAIR", "T1"):
            assert f"instance{chosen}_{aggregation}_{channel}.nii.gz" in names
            assert read_image(out / "instances" / f"instance{chosen}_{aggregation}_{channel}.nii.gz").same_grid(image)
    document, _ = read_table(out)
    row = next(r for r in document["instances"] if r["id"] == chosen)
    assert set(row["saliency"]) == {"mean", "max"}
    # the max over the instance's voxels dominates their mean: the peaks say so
    assert row["saliency"]["max"]["FLAIR"]["peak_positive"] >= row["saliency"]["mean"]["FLAIR"]["peak_positive"] - 1e-6


def same_values(ours, theirs, path="row") -> None:
    """``ours`` (read back from JSON: NaN as null) equals ``theirs`` (the Python API's rows):
    ints and texts exactly, floats to float32 rounding (the maps are float32; sums of them are
    taken in float64)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), path
        for key in theirs:
            same_values(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        for n, (a, b) in enumerate(zip(ours, theirs)):
            same_values(a, b, f"{path}[{n}]")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        if np.isnan(theirs):
            assert ours is None, path
        else:
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12), path
    else:
        assert ours == theirs, path


def test_case_manifest_verifies_and_rows_equal_the_pipeline(tmp_path, case, model, prediction):
    """The folder is write_case's: case.json lists every file with a checksum that verifies
    (and a changed file fails), and lesions.json's rows are pipeline.lesion_rows of the same
    case run through the Python API (start_case + add_instance_maps)."""
    from SegXAILib.image import SegXAIInputError
    from SegXAILib.pipeline import CaseSettings, InstanceSettings, add_instance_maps, lesion_rows, start_case

    image, labels, instances = prediction
    chosen = instances[-1].id
    out = tmp_path / "out"
    assert run_lesions(case, out, "--reference", case["reference"], "--instances", chosen, "--aggregation", "max",
                       "--n-samples", 1, "--batch-size", 16, "--seed", 2) == 0

    manifest = read_manifest(out)  # verifies every file's SHA-256
    listed = {entry["path"] for entry in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in files_under(out)} - {"case.json"}
    assert listed == on_disk
    assert {"labels.nii.gz", "instances.nii.gz", "lesions.json", "lesions.csv",
            f"instances/instance{chosen}_max_FLAIR.nii.gz", f"instances/instance{chosen}_max_T1.nii.gz"} <= listed

    settings = CaseSettings(model="lesions", device="cpu", instances=InstanceSettings(
        ids=[chosen], aggregations=["max"], n_samples=1, batch_size=16, seed=2))
    assert manifest["settings"] == settings.to_dict()
    reference = read_image(case["reference"])
    python_case = add_instance_maps(start_case(image, model, settings, reference=reference), model)
    expected = lesion_rows(python_case)
    assert [row["group"] for row in expected].count("FN") == sum(r["id"] is None for r in expected)
    assert "saliency" in next(r for r in expected if r["id"] == chosen)
    document, rows = read_table(out)
    same_values(document["instances"], expected, "instances")
    assert len(rows) == len(expected)

    # a changed file no longer verifies
    (out / "lesions.csv").write_text("changed\n", encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="lesions.csv"):
        read_manifest(out)


@pytest.mark.parametrize("extra, message", [
    (["--instances", "99"], "no instance 99"),
    (["--instances", "1,x"], "--instances"),
    (["--instances", "0"], "--instances"),
    (["--click", "9999,9999,9999"], "no instance within"),
    (["--click", "1,2"], "--click"),
    (["--aggregation", "median"], "--aggregation"),
    (["--n-samples", "0"], "--n-samples"),
    (["--click-radius", "-1"], "--click-radius"),
    (["--device", "tpu"], "--device"),
    (["--reference", "OTHER_GRID"], "not on the input image's grid"),
    (["--reference", "missing.nii.gz"], "no such file"),
])
def test_bad_input_exit_2_nothing_written(tmp_path, case, capsys, extra, message):
    extra = [str(case["other_grid"]) if value == "OTHER_GRID" else value for value in extra]
    out = tmp_path / "out"
    assert run_lesions(case, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert files_under(out) == []


def test_instances_and_click_are_exclusive(tmp_path, case):
    with pytest.raises(SystemExit) as raised:
        run_lesions(case, tmp_path / "out", "--instances", "1", "--click", "0,0,0")
    assert raised.value.code == 2
    assert files_under(tmp_path / "out") == []


def run_context(case, out, *extra) -> int:
    return main(["-q", "lesion-context", *map(str, case["images"]), "--model", "lesions", "--out", str(out),
                 "--device", "cpu", *map(str, extra)])


def test_lesion_context_click_equals_python(tmp_path, case, model, prediction):
    """The command's context rows and transplant equal the library's on the clicked instance;
    the plot and the transplanted mask (on the input grid) are written."""
    from SegXAILib.instances import context_experiment, transplant_experiment

    image, labels, instances = prediction
    lesion = labels == instances[0].id
    click = ",".join(f"{v:.4f}" for v in instances[0].centroid_ras)
    # the transplant target: the lesion's centroid moved 6 voxels along I (inside the crop)
    centroid_ijk = np.argwhere(lesion).mean(axis=0)
    target_ijk = centroid_ijk + np.array([6.0, 0.0, 0.0]) if centroid_ijk[0] < 24 else centroid_ijk - [6.0, 0, 0]
    target_ras = image.ijk_to_ras_points(target_ijk)[0]
    out = tmp_path / "out"
    assert run_context(case, out, f"--click={click}", "--steps", "3", "--background", "min",
                       f"--transplant={','.join(f'{v:.6f}' for v in target_ras)}", "--margin", "0,2") == 0

    document = json.loads((out / "context.json").read_text(encoding="utf-8"))
    assert document["selection"]["instance"] == instances[0].id
    assert document["lesion_voxels"] == int(lesion.sum())
    expected = context_experiment(image, lesion, model, background="min", steps=3)
    assert len(document["context"]) == 4
    for row, want in zip(document["context"], expected):
        assert row["step"] == want["step"] and row["detected"] == want["detected"]
        assert row["restored_voxels"] == want["restored_voxels"]
        assert row["mean_probability"] == pytest.approx(want["mean_probability"], abs=1e-6)
        assert row["ring_mm"] == pytest.approx(want["ring_mm"])
    with open(out / "context.csv", newline="", encoding="utf-8") as handle:
        assert [int(r["restored_voxels"]) for r in csv.DictReader(handle)] == [r["restored_voxels"] for r in expected]
    assert (out / "context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert [t["margin_mm"] for t in document["transplants"]] == [0.0, 2.0]
    want = transplant_experiment(image, lesion, model, image.ras_to_ijk_points(target_ras)[0], margin_mm=2.0)
    got = document["transplants"][1]
    assert tuple(got["offset_ijk"]) == want["offset_ijk"]
    assert got["mean_probability"] == pytest.approx(want["mean_probability"], abs=1e-6)
    mask = read_image(out / got["mask_file"])
    assert mask.same_grid(image)
    assert np.array_equal(mask.array[0] > 0, want["transplanted_mask"])


def test_lesion_context_with_a_mask(tmp_path, case):
    """A user mask (here the reference lesions) is a target too, even where nothing is predicted."""
    out = tmp_path / "out"
    assert run_context(case, out, "--lesion-mask", case["reference"], "--steps", "1") == 0
    document = json.loads((out / "context.json").read_text(encoding="utf-8"))
    reference = read_image(case["reference"]).array[0] > 0
    assert document["lesion_voxels"] == int(reference.sum())
    assert document["context"][0]["restored_voxels"] == int(reference.sum())


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one of"),
    (["--instance", "0"], "--instance"),
    (["--instance", "99"], "--instance 99"),
    (["--instance", "1", "--margin", "-1"], "--margin"),
    (["--instance", "1", "--background", "grey"], "--background"),
    (["--instance", "1", "--transplant", "1,2"], "--transplant"),
    (["--instance", "1", "--transplant=9999,0,0"], "would leave the grid"),
    (["--lesion-mask", "OTHER_GRID"], "input image's grid"),
])
def test_lesion_context_bad_input_exit_2(tmp_path, case, capsys, extra, message):
    extra = [str(case["other_grid"]) if value == "OTHER_GRID" else value for value in extra]
    out = tmp_path / "out"
    assert run_context(case, out, "--steps", "1", *extra) == 2
    assert message in capsys.readouterr().err
    assert files_under(out) == []
