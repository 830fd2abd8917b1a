"""`segxai demo --quick` (the demo's pipeline on the reduced setting): every output exists and
opens, keeps the case's geometry, and the report references only files that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from SegXAILib.cli import main
from SegXAILib.demo import DEMO_SEED, DemoSettings, demo_case
from SegXAILib.io import read_image


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def case():
    return demo_case(DEMO_SEED, DemoSettings.reduced().crop_half)


def test_report_references_only_existing_files(demo_dir):
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', html)
    assert sources
    for source in sources:
        assert (demo_dir / source).is_file(), source
    assert not re.findall(r'href="(?!#)([^"]+)"', html) or all(
        (demo_dir / h).exists() for h in re.findall(r'href="(?!#)([^"]+)"', html))
    for section in ("Class-level maps", "instance saliency", "Lesion table", "Timings"):
        assert section in html


def test_every_image_output_is_on_the_case_grid(demo_dir, case):
    image, _ = case
    written = sorted(demo_dir.rglob("*.nii.gz"))
    methods = {method.name for method in DemoSettings.reduced().case.methods}
    maps = sorted((demo_dir / "maps").glob("*.nii.gz"))
    assert {p.name[: -len(".nii.gz")].rsplit("_", 1)[0] for p in maps} == methods
    assert len(maps) == len(methods) * image.num_channels
    for path in written:
        opened = read_image(path)
        np.testing.assert_allclose(opened.ijk_to_ras, image.ijk_to_ras, atol=1e-4, err_msg=str(path))
        assert opened.spatial_shape == image.spatial_shape, path
        assert np.isfinite(opened.array).all(), path


def test_lesion_table_matches_the_instance_maps(demo_dir, case):
    image, truth = case
    document = json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))
    rows = document["instances"]
    labels = read_image(demo_dir / "instances.nii.gz").array[0]
    with_maps = [row for row in rows if "saliency" in row]
    assert 1 <= len(with_maps) <= DemoSettings.reduced().case.instances.max_instances
    assert [row["id"] for row in rows if row["id"] is not None] == list(range(1, int(labels.max()) + 1))
    for row in rows:
        if row["id"] is None:  # an inserted lesion the model missed
            assert row["group"] == "FN"
            continue
        lesion = labels == row["id"]
        assert row["volume_mm3"] == pytest.approx(lesion.sum() * image.voxel_volume)
        # a TP overlaps the inserted truth, an FP does not
        assert row["group"] == ("TP" if (truth.array[0][lesion] > 0).any() else "FP")
        if "saliency" not in row:
            continue
        # the local peak is the max of the lesion's own map over the lesion and a 5 mm shell
        flair = read_image(demo_dir / "instances" / f"instance{row['id']}_max_FLAIR.nii.gz").array[0]
        near = distance_transform_edt(~lesion, sampling=image.spacing) <= 5.0
        peaks = row["saliency"]["max"]["FLAIR"]
        assert peaks["peak_positive_local"] == pytest.approx(max(float(flair[near].max()), 0.0), rel=1e-5, abs=1e-9)
        assert peaks["peak_positive"] == pytest.approx(max(float(flair.max()), 0.0), rel=1e-5, abs=1e-9)


def test_demo_finds_the_inserted_lesions(demo_dir):
    from SegXAILib.metrics import dice_score

    truth = read_image(demo_dir / "truth_lesions.nii.gz").array[0] > 0
    labels = read_image(demo_dir / "labels.nii.gz").array[0] == 1
    assert dice_score(labels, truth) > 0.4
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    assert f"{dice_score(labels, truth):.3f}"[:4] in html


def test_scene_bundle_opens_with_the_case(demo_dir, case):
    """The .mrb loads in a slicer-core scene: the input volumes on the case grid, the
    segmentation with the QA band as the lesion segment's tag, tables and the EC chart."""
    from SegXAILib.mrml import load_scene_bundle, segment_risk_tags, volume_node_to_image

    image, _ = case
    scene = load_scene_bundle(demo_dir / "scene.mrb")
    volumes = {scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName(): scene.GetNthNodeByClass(
        i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))}
    flair = volume_node_to_image(volumes["SegXAI demo FLAIR"])
    np.testing.assert_allclose(flair.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(flair.array[0], image.array[0], rtol=1e-6, atol=1e-6)
    segmentations = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
                     for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    segmentation = next(s for s in segmentations if s.GetName() == "SegXAI segmentation")
    qa = json.loads((demo_dir / "qa.json").read_text(encoding="utf-8"))
    assert segment_risk_tags(segmentation, "lesion")["band"] == qa["band"]
    assert qa["band"] in ("low", "moderate", "high")
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") >= 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") >= 1


def test_agg2exp_matrix_rows_share_the_mass(demo_dir):
    """The predicted background and lesion regions partition the volume: each row's two class
    columns sum to 1; the inserted-lesion column is a share of the mass too."""
    matrix = json.loads((demo_dir / "agg2exp.json").read_text(encoding="utf-8"))
    assert matrix["rows"] == ["background", "lesion"]
    columns = matrix["columns"]
    for row in matrix["values"]:
        assert row[columns.index("background")] + row[columns.index("lesion")] == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= value <= 1.0 for value in row)


def test_the_case_folder_manifest_verifies(demo_dir):
    from SegXAILib.pipeline import read_manifest

    manifest = read_manifest(demo_dir)  # every file's SHA-256 checked
    listed = {entry["path"] for entry in manifest["files"]}
    written = {p.relative_to(demo_dir).as_posix() for p in demo_dir.rglob("*") if p.is_file()}
    figures = {p for p in written if p.startswith("figures/")}
    assert listed == written - figures - {"case.json"}
    assert {"report", "scene", "qa", "lesions", "agg2exp"} <= {entry["role"] for entry in manifest["files"]}
    assert manifest["settings"]["qa"]["risk_model"] == "bundled:lesions/guided_gradcam"


def test_the_demo_equals_the_pipeline(demo_dir, case):
    """The demo is a caller of the pipeline: its written maps, lesion table and QA equal a
    ``run_case`` of the quick-demo settings on the same case through the Python API."""
    from SegXAILib.pipeline import CaseSettings, run_case

    image, truth = case
    api = run_case(image, None, CaseSettings.quick_demo(device="cpu"), reference=truth)
    for name, result in api.maps.items():
        for channel in image.channel_names:
            expected = result.maps.channel(channel).array[0]
            written = read_image(demo_dir / "maps" / f"{name}_{channel}.nii.gz").array[0]
            assert float(np.abs(written - expected).max()) <= 1e-6 * float(np.abs(expected).max()), name
    for identifier, maps in api.instance_maps.items():
        expected = maps["max"].channel("FLAIR").array[0]
        written = read_image(demo_dir / "instances" / f"instance{identifier}_max_FLAIR.nii.gz").array[0]
        assert float(np.abs(written - expected).max()) <= 1e-6 * float(np.abs(expected).max())
    rows = json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))["instances"]
    assert [(r["id"], r["group"], r["voxels"]) for r in rows] == [(r["id"], r["group"], r["voxels"]) for r in api.lesions]
    qa = json.loads((demo_dir / "qa.json").read_text(encoding="utf-8"))
    assert qa["band"] == api.qa.risk["band"] and qa["pc1"] == pytest.approx(api.qa.risk["pc1"], rel=1e-9)
