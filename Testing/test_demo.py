"""`segxai demo --quick` (the demo's pipeline on the reduced setting): every output exists and
opens, keeps the case's geometry, and the report references only files that exist; the
report's uncertainty section and columns are the case folder's numbers."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from SegXAILib.cli import main
from SegXAILib.demo import DEMO_SEED, REPORT_UNCERTAINTY_COLUMNS, DemoSettings, demo_case
from SegXAILib.io import read_image
from SegXAILib.topology import shipped_risk_model

#: the quick demo's uncertainty sources: left-right flips (model-grid axis 0 of the RAS card) and mild noise
QUICK_SOURCES = {"flips": {"axes": [0]}, "noise": {"std": 0.05}}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def case():
    return demo_case(DEMO_SEED, DemoSettings.reduced().crop_half)


@pytest.fixture(scope="module")
def api_case(case):
    """``run_case`` of the quick-demo settings on the demo case through the Python API."""
    from SegXAILib.pipeline import CaseSettings, run_case

    image, truth = case
    return run_case(image, None, CaseSettings.quick_demo(device="cpu"), reference=truth)


class _Tables(HTMLParser):
    """Every ``<table>`` of a page: ``{"caption": str, "rows": [[cell text, ...], ...]}`` (header
    cells included, image cells as their ``alt`` text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th", "caption"):
            self._text = []
        elif tag == "img" and self._text is not None:
            self._text.append(dict(attrs).get("alt", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._text is not None:
            self.tables[-1]["rows"][-1].append("".join(self._text).strip())
            self._text = None
        elif tag == "caption" and self._text is not None:
            self.tables[-1]["caption"] = "".join(self._text).strip()
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def html_tables(html: str) -> list[dict]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def shown(text: str) -> float:
    """A number as the report shows it (4 significant digits, empty for None)."""
    return math.nan if text in ("", "n/a") else float(text)


def assert_shows(text: str, value, what: str) -> None:
    """``text`` is ``value`` to the report's 4 significant digits (a rounding error of at most
    half a unit in the 4th digit: relative 5e-4)."""
    if value is None:
        assert text == "", what
    else:
        assert shown(text) == pytest.approx(value, rel=5e-4, abs=1e-12), what


def test_report_references_only_existing_files(demo_dir):
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', html)
    assert sources
    for source in sources:
        assert (demo_dir / source).is_file(), source
    assert not re.findall(r'href="(?!#)([^"]+)"', html) or all(
        (demo_dir / h).exists() for h in re.findall(r'href="(?!#)([^"]+)"', html))
    for section in ("Class-level maps", "instance saliency", "Lesion table", "Where the model is unsure", "Timings"):
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
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") >= 3  # lesions, QA, uncertainty
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") >= 1
    # the uncertainty volumes hold the written maps on the case grid
    from SegXAILib.io import read_image

    entropy = volume_node_to_image(volumes["SegXAI predictive entropy entropy"])
    written = read_image(demo_dir / "uncertainty" / "predictive_entropy_entropy.nii.gz")
    np.testing.assert_allclose(entropy.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(entropy.array, written.array, rtol=1e-6, atol=1e-7)


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
    assert manifest["settings"]["qa"]["risk_model"] == shipped_risk_model("lesions")


def test_the_demo_equals_the_pipeline(demo_dir, case, api_case):
    """The demo is a caller of the pipeline: its written maps, lesion table and QA equal a
    ``run_case`` of the quick-demo settings on the same case through the Python API."""
    image, truth = case
    api = api_case
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


# ---------------------------------------------------------------------------- uncertainty


def test_the_case_folder_keeps_the_uncertainty_maps_on_the_input_grid(demo_dir, case):
    """``uncertainty.json`` says how the samples were drawn; ``uncertainty/`` holds every map of a
    two-class softmax model on the input grid, and the maps obey their definitions."""
    image, _ = case
    document = json.loads((demo_dir / "uncertainty.json").read_text(encoding="utf-8"))
    assert (document["samples"], document["seed"], document["sources"]) == (4, 0, QUICK_SOURCES)
    # softmax over (background, lesion): per-class maps for each class, one entropy channel, mask
    # frequency for each foreground class
    expected = {"mean_probability": ["background", "lesion"], "variance": ["background", "lesion"],
                "predictive_entropy": ["entropy"], "expected_entropy": ["entropy"],
                "mutual_information": ["entropy"], "mask_frequency": ["lesion"]}
    assert {name: sorted(files) for name, files in document["files"].items()} == expected
    maps = {}
    for name, channels in document["files"].items():
        for channel, file in channels.items():
            opened = read_image(demo_dir / "uncertainty" / file)
            np.testing.assert_allclose(opened.ijk_to_ras, image.ijk_to_ras, atol=1e-4, err_msg=file)
            assert opened.spatial_shape == image.spatial_shape and opened.array.dtype == np.float32, file
            maps[f"{name}_{channel}"] = opened.array[0].astype(np.float64)
    # float32 maps of values in [0, 1] (probabilities) and [0, ln 2] (entropies): a few ulps of 1
    tolerance = 1e-5
    np.testing.assert_allclose(maps["mean_probability_background"] + maps["mean_probability_lesion"], 1.0,
                               atol=tolerance)
    information = maps["mutual_information_entropy"]
    assert information.min() >= 0.0 and maps["predictive_entropy_entropy"].max() <= math.log(2) + tolerance
    np.testing.assert_allclose(maps["predictive_entropy_entropy"], maps["expected_entropy_entropy"] + information,
                               atol=tolerance)
    assert information.max() > 0.01  # the flips and the noise do change the prediction somewhere
    # the share of 4 samples: a multiple of 1/4
    frequency = maps["mask_frequency_lesion"] * 4
    np.testing.assert_allclose(frequency, np.rint(frequency), atol=tolerance)


def test_the_lesion_tables_uncertainty_is_the_maps(demo_dir):
    """Each lesion's mean entropy and mutual information in ``lesions.json`` are the means of the
    written maps over the lesion's voxels; the structure's in ``uncertainty.json`` over all of them."""
    labels = read_image(demo_dir / "instances.nii.gz").array[0]
    entropy = read_image(demo_dir / "uncertainty" / "predictive_entropy_entropy.nii.gz").array[0].astype(np.float64)
    information = read_image(demo_dir / "uncertainty" / "mutual_information_entropy.nii.gz").array[0].astype(np.float64)
    rows = [row for row in json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))["instances"]
            if row["id"] is not None]
    assert rows and all(set(row["uncertainty"]) >= set(REPORT_UNCERTAINTY_COLUMNS) for row in rows)
    # the written float32 maps are the in-memory ones; both means in float64 over a few hundred
    # voxels: only the summation order may differ (relative error ~ n * 2^-53, far below 1e-9)
    for row in rows:
        lesion = labels == row["id"]
        assert row["uncertainty"]["mean_entropy"] == pytest.approx(entropy[lesion].mean(), rel=1e-9, abs=1e-12)
        assert row["uncertainty"]["mean_mutual_information"] == pytest.approx(information[lesion].mean(), rel=1e-9,
                                                                              abs=1e-12)
        assert 0.0 <= row["uncertainty"]["pairwise_dice"] <= 1.0
    structure = json.loads((demo_dir / "uncertainty.json").read_text(encoding="utf-8"))["structures"]
    lesion_row = next(r for r in structure if r["structure"] == "lesion")
    assert lesion_row["mean_entropy"] == pytest.approx(entropy[labels > 0].mean(), rel=1e-9, abs=1e-12)


def test_the_reports_uncertainty_columns_are_the_case_folders(demo_dir):
    """The report's lesion table shows, per lesion id, the uncertainty of that lesion in
    ``lesions.json``; its summary and the structure key-values those of ``uncertainty.json``."""
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    tables = html_tables(html)
    lesions = next(t for t in tables if t["caption"].startswith("Lesion table"))
    header, *body = lesions["rows"]
    by_id = {row["id"]: row for row in json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))["instances"]}
    selected = json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))["selected"]
    assert [int(cells[header.index("id")]) for cells in body] == selected  # the lesions with an instance map
    for cells in body:
        row = by_id[int(cells[header.index("id")])]
        for key, title in REPORT_UNCERTAINTY_COLUMNS.items():
            assert_shows(cells[header.index(title)], row["uncertainty"][key], f"lesion {row['id']} {key}")

    document = json.loads((demo_dir / "uncertainty.json").read_text(encoding="utf-8"))
    structure = next(r for r in document["structures"] if r["structure"] == "lesion")
    key_values = next(t for t in tables if t["caption"] == "Uncertainty of the lesion class")
    values = {cells[0]: cells[1] for cells in key_values["rows"]}
    assert int(values["samples"]) == document["samples"]
    for title, key in (("mean entropy inside (nats)", "mean_entropy"), ("boundary entropy (nats)", "boundary_entropy"),
                       ("pairwise Dice of the samples", "pairwise_dice"),
                       ("soft Dice confidence", "soft_dice_confidence"),
                       ("mean mutual information inside (nats)", "mean_mutual_information")):
        assert_shows(values[title], structure[key], title)
    summary = {cells[0]: cells[1] for cells in next(t for t in tables if t["caption"] == "Summary")["rows"]}
    line = summary[f"lesion uncertainty ({document['samples']} samples)"]
    assert f"soft Dice confidence {structure['soft_dice_confidence']:.3f}" in line
    assert f"pairwise Dice {structure['pairwise_dice']:.3f}" in line


def test_the_uncertainty_section_says_how_the_samples_were_drawn(demo_dir):
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    start = html.index("<h2>Where the model is unsure</h2>")
    end = html.find("<h2>", start + 1)
    section = html[start:end if end > 0 else len(html)]
    text = re.sub(r"<[^>]+>", " ", section)
    # 4 samples, seed 0, the sources as uncertainty.json records them; axis 0 of the RAS card is left-right
    assert "repeated 4 times" in text and "seed 0" in text
    assert "flips (axes 0 = left-right)" in text and "noise (std 0.05)" in text
    figures = re.findall(r'src="(figures/uncertainty_[^"]+)"', section)
    assert sorted(figures) == ["figures/uncertainty_mutual_information.png",
                               "figures/uncertainty_predictive_entropy.png"]
    for figure in figures:
        assert (demo_dir / figure).read_bytes()[:4] == b"\x89PNG"
    # the captions give the absolute floors and the maps' maxima (the written maps')
    entropy = read_image(demo_dir / "uncertainty" / "predictive_entropy_entropy.nii.gz").array[0]
    assert "transparent below 0.199 nats" in text and f"{float(entropy.max()):.3f} nats" in text


def test_the_same_seed_gives_the_same_uncertainty_and_another_seed_other_numbers(demo_dir, api_case):
    """The demo's written uncertainty equals the API run's with the same settings (seed 0); seed 1
    draws other noise, so other numbers."""
    from SegXAILib.pipeline import load_case_model
    from SegXAILib.uncertainty import estimate_uncertainty

    api = api_case
    for name, values in api.uncertainty.maps().items():
        for channel in values.channel_names:
            expected = values.channel(channel).array[0]
            written = read_image(demo_dir / "uncertainty" / f"{name}_{channel}.nii.gz").array[0]
            assert float(np.abs(written - expected).max()) <= 1e-6 * max(float(np.abs(expected).max()), 1e-30), name
    rows = json.loads((demo_dir / "lesions.json").read_text(encoding="utf-8"))["instances"]
    for written, expected in zip(rows, api.lesions):
        assert written.get("uncertainty", {}).keys() == (expected.get("uncertainty") or {}).keys()
        for key, value in (expected.get("uncertainty") or {}).items():
            assert written["uncertainty"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    chosen = api.settings.uncertainty
    other = estimate_uncertainty(api.image, load_case_model(api.settings), sources=chosen.sources,
                                 samples=chosen.samples, seed=1, prediction=api.segmentation,
                                 band_width=chosen.band_width_mm, width_unit="mm")
    assert not np.array_equal(other.mutual_information.array, api.uncertainty.mutual_information.array)


def test_a_case_without_uncertainty_has_no_uncertainty_in_the_report(demo_dir, tmp_path):
    """With uncertainty disabled the report has no uncertainty section, figures, columns or
    summary line, and everything else still."""
    from SegXAILib.demo import _write_report
    from SegXAILib.metrics import dice_score
    from SegXAILib.pipeline import read_case

    case = read_case(demo_dir)
    off = case.settings.uncertainty.model_copy(update={"enabled": False})
    disabled = case.settings.model_copy(update={"uncertainty": off})
    case = replace(case, settings=disabled, uncertainty=None,
                   lesions=[{k: v for k, v in row.items() if k != "uncertainty"} for row in case.lesions])
    truth = read_image(demo_dir / "truth_lesions.nii.gz").array[0] > 0
    path = _write_report(tmp_path, case, truth, dice_score(case.mask, truth), DEMO_SEED, {}, None, scene=None)
    html = path.read_text(encoding="utf-8")
    assert "Where the model is unsure" not in html and "uncertainty" not in html.lower()
    assert not list((tmp_path / "figures").glob("uncertainty_*"))
    lesions = next(t for t in html_tables(html) if t["caption"].startswith("Lesion table"))
    assert not set(REPORT_UNCERTAINTY_COLUMNS.values()) & set(lesions["rows"][0])
    assert len(lesions["rows"]) == 1 + len(case.instance_maps)
    for section in ("Class-level maps", "instance saliency", "Quality assurance", "Agg2Exp"):
        assert section in html


@pytest.mark.parametrize("preset", ["demo", "quick_demo"])
def test_the_demo_flips_the_model_grids_left_right_axis(preset, case):
    """The presets flip only the axis of the lesion model's grid that runs along R-L (a brain is
    roughly mirror-symmetric left-right, not front-back or up-down), read off the model grid's
    affine on the demo case."""
    from SegXAILib.models.preprocessing import preprocess
    from SegXAILib.pipeline import CaseSettings
    from SegXAILib.pipeline.steps import resolve_model_card

    settings = getattr(CaseSettings, preset)().uncertainty
    image, _ = case
    grid = preprocess(image, resolve_model_card(getattr(CaseSettings, preset)().model))
    directions = np.asarray(grid.affine, dtype=float)[:3, :3]
    left_right = [axis for axis in range(3) if abs(directions[0, axis]) > 0.99 * np.linalg.norm(directions[:, axis])]
    assert settings.enabled and settings.sources["flips"]["axes"] == left_right == [0]
    assert settings.seed == 0 and settings.samples == {"demo": 8, "quick_demo": 4}[preset]
