"""Uncertainty as a step of the case pipeline: settings, run_case, the lesion table's columns,
the case folder (written and read back) and ``segxai uncertainty``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import write_image
from SegXAILib.pipeline import CaseSettings, load_case_model, read_case, run_case, write_case
from SegXAILib.pipeline.steps import LESION_UNCERTAINTY_KEYS
from SegXAILib.uncertainty import estimate_uncertainty

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOISY = {"enabled": True, "sources": {"noise": {"std": 4.0}}, "samples": 5, "seed": 3, "band_width_mm": 1.5}


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_voxelwise_card(tmp_path_factory.mktemp("model") / "m", orientation=None, threshold=5.0,
                                patch=(8, 8, 8))


def two_lesions(grid: str = "oblique") -> Image:
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 6.0 + 0.4 * np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    bright[8:10, 6:9, 5:7] = 7.0
    return Image(bright[None], grid_matrix(grid), ("ch0",))


def settings_for(card, **fields) -> CaseSettings:
    return CaseSettings.from_dict({"model": str(card), "device": "cpu", **fields})


@pytest.fixture(scope="module")
def noisy_case(card):
    return run_case(two_lesions(), None, settings_for(card, uncertainty=NOISY))


def test_the_case_step_gives_the_api_numbers(card, noisy_case):
    case = noisy_case
    direct = estimate_uncertainty(case.image, load_case_model(case.settings), sources={"noise": {"std": 4.0}},
                                  samples=5, seed=3, prediction=case.segmentation, band_width=1.5)
    for name, values in direct.maps().items():
        assert np.array_equal(case.uncertainty.maps()[name].array, values.array), name
    assert case.uncertainty.instance_rows() == direct.instance_rows()
    assert float(case.uncertainty.mutual_information.array.max()) > 0.01  # the noise flips voxels


def test_each_lesion_row_carries_its_instance_uncertainty(noisy_case):
    case = noisy_case
    labels = case.instance_labels.array[0]
    entropy = case.uncertainty.predictive_entropy.array[0]
    information = case.uncertainty.mutual_information.array[0]
    rows = [row for row in case.lesions if row.get("id") is not None]
    assert len(rows) == 2
    for row in rows:
        inside = labels == row["id"]
        assert set(row["uncertainty"]) == set(LESION_UNCERTAINTY_KEYS)
        # the means over the lesion's own voxels, from the maps (float32 maps, float64 means)
        assert row["uncertainty"]["mean_entropy"] == pytest.approx(float(entropy[inside].mean()), rel=1e-5, abs=1e-7)
        assert row["uncertainty"]["mean_mutual_information"] == pytest.approx(float(information[inside].mean()),
                                                                              rel=1e-5, abs=1e-7)
        assert 0.0 <= row["uncertainty"]["pairwise_dice"] <= 1.0
        assert 0.0 <= row["uncertainty"]["soft_dice_confidence"] <= 1.0


def test_a_flip_invariant_model_under_flips_is_certain(card):
    # a per-voxel model commutes with every flip: each sample is the prediction itself
    case = run_case(two_lesions("lps_flipped"), None, settings_for(
        card, uncertainty={"enabled": True, "sources": {"flips": {"axes": [0, 1, 2]}}}))
    assert case.uncertainty.samples == 8
    assert float(np.abs(case.uncertainty.mutual_information.array).max()) <= 1e-6
    for row in case.lesions:
        assert row["uncertainty"]["pairwise_dice"] == pytest.approx(1.0)
        assert row["uncertainty"]["volume_cv"] == pytest.approx(0.0, abs=1e-12)


def test_the_case_folder_keeps_the_uncertainty(noisy_case, tmp_path):
    case = noisy_case
    source = write_image(case.image, tmp_path / "image.nii.gz")
    manifest = json.loads(write_case(case, tmp_path / "case", inputs={"ch0": source}).read_text())
    assert "uncertainty_mean_entropy" in manifest["summary"]
    again = read_case(tmp_path / "case")
    for name, values in case.uncertainty.maps().items():
        read = again.uncertainty.maps()[name]
        assert read.channel_names == values.channel_names
        np.testing.assert_array_equal(read.array, values.array)
        np.testing.assert_allclose(read.ijk_to_ras, values.ijk_to_ras, atol=1e-6)
    assert again.uncertainty.instance_rows() == case.uncertainty.instance_rows()
    assert again.uncertainty.structure_rows() == case.uncertainty.structure_rows()
    with open(tmp_path / "case" / "lesions.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    by_id = {int(row["id"]): row for row in table if row["id"]}
    for row in case.lesions:
        for key in LESION_UNCERTAINTY_KEYS:
            assert float(by_id[row["id"]][f"uncertainty_{key}"]) == pytest.approx(row["uncertainty"][key])


@pytest.mark.parametrize("uncertainty, words", [
    ({"sources": {"coin": {}}}, "coin"),
    ({"sources": {"noise": {"sigma": 1.0}}}, "sigma"),
    ({"sources": {"noise": {}}, "models": ["other.json"]}, "ensemble"),
    ({"samples": 1}, "samples"),
])
def test_bad_uncertainty_settings_name_the_field(uncertainty, words):
    with pytest.raises(SegXAIInputError, match=words) as error:
        CaseSettings.from_dict({"uncertainty": uncertainty}, "s.json")
    assert "uncertainty" in str(error.value)


def test_flips_on_a_card_without_mirroring_name_the_source(card):
    with pytest.raises(SegXAIInputError, match="mirror"):
        run_case(two_lesions(), None, settings_for(card, instances={"enabled": False},
                                                   uncertainty={"enabled": True}))


# ---------------------------------------------------------------------------- segxai uncertainty


def test_the_command_writes_the_pipelines_numbers(card, noisy_case, tmp_path, capsys):
    from SegXAILib.cli.app import main

    source = write_image(noisy_case.image, tmp_path / "image.nii.gz")
    code = main(["-q", "uncertainty", str(source), "--model", str(card), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--source", "noise:std=4", "--samples", "5", "--seed", "3",
                 "--band-width-mm", "1.5"])
    assert code == 0
    assert "lesion 1" in capsys.readouterr().out
    written = read_case(tmp_path / "out")
    for name, values in noisy_case.uncertainty.maps().items():
        # the image went through a NIfTI file: float32 voxels, geometry to float32 precision
        np.testing.assert_allclose(written.uncertainty.maps()[name].array, values.array, rtol=1e-6, atol=1e-7)
    assert [row["uncertainty"]["pairwise_dice"] for row in written.lesions] == pytest.approx(
        [row["uncertainty"]["pairwise_dice"] for row in noisy_case.lesions])


@pytest.mark.parametrize("options, words", [
    (["--source", "coin"], "--source"),
    (["--source", "noise:std=[1"], "--source"),
    (["--samples", "1"], "--samples"),
    (["--source", "noise", "--ensemble-model", "x.json"], "--ensemble-model"),
])
def test_bad_options_are_named(card, tmp_path, capsys, options, words):
    from SegXAILib.cli.app import main

    source = write_image(two_lesions(), tmp_path / "image.nii.gz")
    code = main(["-q", "uncertainty", str(source), "--model", str(card), "--out", str(tmp_path / "out"),
                 "--device", "cpu", *options])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out" / "case.json").exists()


def test_more_model_cards_form_the_ensemble(card, tmp_path):
    """``uncertainty.models``: each card one sample beside the case's own model; the mean
    probability is the mean of the models' own predictions (segmented independently)."""
    from SegXAILib.models import load_model, load_model_card, segment

    other = write_voxelwise_card(tmp_path / "other", orientation=None, threshold=6.5, patch=(8, 8, 8))
    image = two_lesions()
    case = run_case(image, None, settings_for(card, uncertainty={
        "enabled": True, "sources": {"ensemble": {}}, "models": [str(other)]}))
    assert case.uncertainty.samples == 2
    predictions = [segment(image, load_model(load_model_card(path), device="cpu")).probabilities.array
                   for path in (card, other)]
    np.testing.assert_allclose(case.uncertainty.mean_probability.array, (predictions[0] + predictions[1]) / 2,
                               atol=1e-6)
    # mutual information of two samples: H(mean) - mean of H, in nats (float32 maps)
    def entropy(p):
        return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=0)

    information = entropy((predictions[0] + predictions[1]) / 2) - (entropy(predictions[0]) + entropy(predictions[1])) / 2
    np.testing.assert_allclose(case.uncertainty.mutual_information.array[0], np.clip(information, 0, None), atol=1e-5)
    assert float(information.max()) > 0.01  # the two thresholds disagree
