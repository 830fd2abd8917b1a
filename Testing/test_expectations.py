"""Is this the scan the model was made for? The model cards' ``input_expectations`` (computed
from the bundled models' own training data), the one comparison every front end runs, and the
same warnings in ``case.json``, the report, the MRML scene and the viewer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.models.expectations import INPUT_WARNING_TITLE, check_input, compare_with_card, input_statistics
from SegXAILib.pipeline import resolve_model_card

ROOT = Path(__file__).resolve().parent.parent


def abdominal_ct(channels: int = 1) -> Image:
    """An abdominal CT as a new user would give one: Hounsfield units (-1024 .. 1500: air around
    a body of soft tissue with a spine), 0.8 x 0.8 x 5 mm voxels over a 384 x 384 x 400 mm field."""
    shape = (480, 480, 80)
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((i - 240) / 200.0) ** 2 + ((j - 240) / 150.0) ** 2 < 1
    plane = np.where(body, 40.0, -1000.0)
    plane[((i - 240) / 30.0) ** 2 + ((j - 330) / 30.0) ** 2 < 1] = 1200.0
    volume = plane[:, :, None] + rng.normal(0.0, 15.0, shape)
    volume = np.clip(volume, -1024, 1500).astype(np.int16)
    return Image(np.stack([volume] * channels), geometry_matrix((0.8, 0.8, 5.0), (0, 0, 0), np.eye(3)))


def test_the_abdominal_ct_given_to_the_brain_mr_model_is_flagged():
    """The issue's case (10.7 L of "brain", exit 0): modality, spacing and extent all differ
    from the lesion model's brain-MR training inputs, and --strict refuses it."""
    card = resolve_model_card("lesions")
    image = abdominal_ct(channels=2)
    findings = compare_with_card(image, card)
    text = "\n".join(findings)
    assert "'FLAIR' looks like a CT in Hounsfield units" in text and "'T1' looks like a CT" in text
    assert "voxel spacing 0.8 x 0.8 x 5 mm is outside the training range 2 x 2 x 3 - 2 x 2 x 3 mm" in text
    assert "physical extent 384 x 384 x 400 mm" in text
    assert all("made for head (brain) MR" in finding for finding in findings)
    with pytest.raises(SegXAIInputError, match="strict: the input does not fit the model"):
        check_input(image, card, strict=True)


def test_normal_cases_of_every_bundled_model_are_not_flagged():
    """Held-out phantoms (seeds the training never saw) of the very generators the models were
    trained on fit their cards; so does the nnU-Net demo's sphere on its own grid."""
    import importlib.util

    from SegXAILib.phantoms import make_lesion_phantom, make_parotid_phantom
    from SegXAILib.sample_data import load_sample_head

    lesions = make_lesion_phantom(load_sample_head(), seed=2000)
    assert compare_with_card(lesions.image, resolve_model_card("lesions")) == []
    for variant in ("S2", "S4", "S6"):
        phantom = make_parotid_phantom(variant, seed=2000, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
        assert compare_with_card(phantom.image, resolve_model_card(f"parotid-{variant}")) == []
    spec = importlib.util.spec_from_file_location("make_nnunet_demo", ROOT / "Utilities" / "make_nnunet_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sphere = module._phantom(np.random.default_rng(99))[0].transpose(2, 1, 0)
    image = Image(sphere[None], geometry_matrix(module.SPACING_XYZ, (0, 0, 0), np.eye(3)), ("MR",))
    assert compare_with_card(image, resolve_model_card(ROOT / "Resources" / "Models" / "nnunet_demo")) == []


def test_the_cards_statistics_are_those_of_the_training_data():
    """``Utilities/card_expectations.py --check`` recomputes them from the training generators
    (the nnU-Net demo's spheres and a parotid model's 400 phantoms) and finds the stored numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("card_expectations", ROOT / "Utilities" / "card_expectations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check", "--models", "nnunet-demo", "parotid-S2"]) == 0


def test_statistics_are_the_known_values_of_a_known_image():
    """Percentiles, negative share, spacing and extent of a ramp, by hand: values 0..999 on a
    10 x 10 x 10 grid of 2 x 3 x 1 mm voxels."""
    ramp = Image(np.arange(1000, dtype=np.float32).reshape(10, 10, 10) - 100.0, geometry_matrix((2, 3, 1), (0, 0, 0), np.eye(3)),
                 ("ch0",))
    block = input_statistics([ramp], "MR", "phantom")
    stats = block["channels"]["ch0"]
    assert stats["min"] == -100.0 and stats["max"] == 899.0 and stats["median"] == pytest.approx(399.5)
    assert stats["percentile_00_5"] == pytest.approx(-100 + 0.005 * 999) and stats["negative_fraction"] == 0.1
    assert block["spacing_mm"] == {"min": [1.0, 2.0, 3.0], "max": [1.0, 2.0, 3.0]}
    assert block["extent_mm"] == {"min": [10.0, 20.0, 30.0], "max": [10.0, 20.0, 30.0]}


def test_the_expectations_are_not_part_of_the_checksum(tmp_path):
    """The risk model and counterfactual generators shipped with the lesion model record its
    checksum: they match, and a card without the expectations block has the same checksum."""
    card = resolve_model_card("lesions")
    assert card.input_expectations["modality"] == "MR"
    from SegXAILib.topology import bundled_risk_model

    recorded = json.loads(bundled_risk_model("lesions").read_text("utf-8"))
    assert card.checksum() == recorded["model_checksum"]
    data = json.loads(card.path.read_text("utf-8"))
    data.pop("input_expectations")
    copy = tmp_path / "model_card.json"
    copy.write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "model.pt").symlink_to(card.resolve("model.pt"))
    assert resolve_model_card(copy).checksum() == card.checksum()


def test_a_malformed_block_is_refused_naming_the_field(tmp_path):
    card = write_voxelwise_card(tmp_path / "model")
    data = json.loads(card.read_text("utf-8"))
    data["input_expectations"] = {"spacing_mm": {"min": [1, 1], "max": [1, 1, 1]}}
    card.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="input_expectations.spacing_mm.min"):
        resolve_model_card(card)


@pytest.fixture(scope="module")
def warned_case(tmp_path_factory):
    """A case folder whose input (a constant volume) gets a warning, written by ``segxai segment``."""
    from SegXAILib.cli import main
    from SegXAILib.io import write_image

    folder = tmp_path_factory.mktemp("warned")
    card = write_voxelwise_card(folder / "model", threshold=1.0, patch=(8, 8, 8))
    image = write_image(Image(np.full((8, 8, 8), 3.0, np.float32)), folder / "flat.nii.gz")
    assert main(["-q", "segment", str(image), "--model", str(card), "--out", str(folder / "case")]) == 0
    return folder / "case"


def test_the_warnings_travel_with_the_case(warned_case, tmp_path):
    """case.json -> read_case -> the report's banner and the MRML scene: the same sentence."""
    from SegXAILib.mrml.logic import input_warnings_text
    from SegXAILib.pipeline import read_case
    from SegXAILib.report.case_report import write_case_report

    recorded = json.loads((warned_case / "case.json").read_text("utf-8"))["summary"]["warnings"]
    assert recorded == ["input channel 'ch0' is constant (3): it holds no image"]
    case = read_case(warned_case)
    assert case.warnings == recorded
    html = write_case_report(case, tmp_path).read_text("utf-8")
    banner = html[html.index('class="warning-banner"'):]
    assert INPUT_WARNING_TITLE in banner and "input channel &#x27;ch0&#x27; is constant (3)" in banner
    assert input_warnings_text(case) == f"{INPUT_WARNING_TITLE}\n- {recorded[0]}"
    slicer = pytest.importorskip("slicer")  # noqa: F841
    from SegXAILib import mrml
    from SegXAILib.mrml.logic import INPUT_WARNINGS_ATTRIBUTE, show_case

    scene = mrml.headless_scene()
    nodes = show_case(scene, case)
    assert nodes.segmentation.GetAttribute(INPUT_WARNINGS_ATTRIBUTE) == input_warnings_text(case)


def test_the_viewer_shows_the_banner(warned_case, tmp_path):
    pytest.importorskip("trame_slicer")
    from SegXAILib.viewer.app import ViewerApp

    viewer = ViewerApp(tmp_path / "jobs", device="cpu", name="segxai-test-expectations")
    assert viewer.state.input_warnings == []
    viewer.open(warned_case)
    assert viewer.state.input_warnings == ["input channel 'ch0' is constant (3): it holds no image"]
    page = viewer.layout.html
    banner = page[page.index('id="segxai-input-warnings"') - 200:]
    # shown while there are warnings, with the common title and one item per warning
    assert 'v-show="input_warnings.length"' in banner[:400] and INPUT_WARNING_TITLE in banner
    assert 'v-for="w in input_warnings"' in banner


def test_each_check_fires_on_its_own_mismatch():
    """One mismatch at a time against a card's known expectations: CT padding (-2048) still
    counts as air; a scale-free (z-scored) channel is flagged only for negative voxels it never
    saw, not for another scale; an absolute-intensity model for voxels outside its range."""
    nnunet = resolve_model_card(ROOT / "Resources" / "Models" / "nnunet_demo")  # z-score, non-negative MR
    parotid = resolve_model_card("parotid-S2")  # no normalisation: absolute intensities
    grid = geometry_matrix((1.0, 1.0, 1.5), (0, 0, 0), np.eye(3))
    rng = np.random.default_rng(5)
    tissue = rng.uniform(90, 200, (40, 40, 28)).astype(np.float32)
    assert compare_with_card(Image(tissue, grid), nnunet) == []
    assert compare_with_card(Image(tissue * 40.0, grid), nnunet) == []  # another scanner's scale: fine
    padded = tissue.copy()
    padded[:6] = -2048.0
    (finding,) = [f for f in compare_with_card(Image(padded, grid), nnunet) if "Hounsfield" in f]
    assert "15% of voxels at air" in finding
    signed = tissue - 150.0  # about half negative, none below -900
    assert [f for f in compare_with_card(Image(signed, grid), nnunet) if "negative" in f]
    phantom = Image(rng.normal(0.03, 0.05, (32, 32, 32)).astype(np.float32), geometry_matrix((3, 3, 3), (0, 0, 0),
                                                                                             np.eye(3)))
    assert compare_with_card(phantom, parotid) == []
    findings = compare_with_card(phantom.with_array(phantom.array * 1000.0), parotid)
    assert len(findings) == 1 and "lie outside the training intensities" in findings[0]
