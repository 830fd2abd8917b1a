"""``segxai patterns fit``: both case layouts, the files it writes (readable with
``weights_only=True``, equal to the Python API's fit), ``segxai explain`` with the fitted
patterns, and bad input -> exit 2 with a message naming the parameter and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.attribution.patterns import PatternSet, fit_patterns
from SegXAILib.cli import main
from SegXAILib.image import Image
from SegXAILib.io import read_channels, write_image

from conftest import grid_matrix, write_unet_card


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def write_case(folder: Path, names: list[str], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        image = Image(rng.normal(100, 20, size=(1, 20, 17, 12)).astype(np.float32), grid_matrix("anisotropic"))
        paths.append(write_image(image, folder / f"{name}.nii.gz"))
    return paths


@pytest.fixture()
def card(tmp_path) -> Path:
    return write_unet_card(tmp_path / "model", in_channels=2, seed=0)


@pytest.fixture()
def case_folders(tmp_path) -> Path:
    """One sub-folder per case, files named after the card's channels."""
    root = tmp_path / "cases"
    for index in range(3):
        write_case(root / f"case{index:02d}", ["ch0", "ch1"], seed=index)
    return root


def test_fit_writes_both_estimators_beside_the_card_and_explain_uses_them(card, case_folders, tmp_path, capsys):
    from SegXAILib.models import load_model

    assert main(["-q", "patterns", "fit", "--model", str(card), "--images", str(case_folders), "--seed", "3",
                 "--window-batch", "2"]) == 0
    written = {p.name for p in card.parent.glob("patterns_*.pt")}
    assert written == {"patterns_linear.pt", "patterns_two_component.pt"}
    raw = torch.load(card.parent / "patterns_two_component.pt", weights_only=True)
    assert raw["estimator"] == "two_component" and raw["volumes"] == 3 and raw["model_name"] == "tiny-unet"
    # equal to the Python API's fit on the same cases
    model = load_model(card, "cpu")
    images = [read_channels(sorted((case_folders / f"case{i:02d}").glob("*.nii.gz")), ["ch0", "ch1"]) for i in range(3)]
    expected = fit_patterns(model, images, seed=3)
    loaded = PatternSet.load(card.parent / "patterns_linear.pt")
    for name, patterns in expected["linear"].patterns.items():
        torch.testing.assert_close(loaded.patterns[name]["all"], patterns["all"], rtol=1e-5, atol=1e-6)
    assert "patterns_linear.pt" in capsys.readouterr().out

    # explain picks the file beside the card by default
    case = sorted((case_folders / "case00").glob("*.nii.gz"))
    mask = read_channels(case[:1], ["m"]).with_array(np.zeros((1, 20, 17, 12), np.uint8))
    mask.array[0, 8:12, 6:10, 4:8] = 1
    mask_path = write_image(mask, tmp_path / "mask.nii.gz")
    out = tmp_path / "explained"
    assert main(["-q", "explain", *map(str, case), "--model", str(card), "--method", "pattern_attribution",
                 "--target", f"region:{mask_path}", "--out", str(out)]) == 0
    sidecar = json.loads((out / "maps" / "pattern_attribution.json").read_text(encoding="utf-8"))
    assert sidecar["method"] == "pattern_attribution" and sidecar["parameters"]["estimator"] == "two_component"
    assert {p.name for p in (out / "maps").glob("*.nii.gz")} == {"pattern_attribution_ch0.nii.gz",
                                                             "pattern_attribution_ch1.nii.gz"}


def test_flat_layout_one_estimator_max_volumes_and_out(card, tmp_path):
    flat = tmp_path / "flat"
    for index in range(3):
        for path in write_case(tmp_path / "staging" / str(index), ["ch0", "ch1"], seed=10 + index):
            flat.mkdir(exist_ok=True)
            path.rename(flat / f"p{index}_{path.name}")  # p0_ch0.nii.gz, p0_ch1.nii.gz, ...
    out = tmp_path / "fitted"
    assert main(["-q", "patterns", "fit", "--model", str(card), "--images", str(flat), "--estimator", "linear",
                 "--max-volumes", "2", "--max-windows", "1", "--out", str(out)]) == 0
    assert [p.name for p in files_under(out)] == ["patterns_linear.pt"]
    assert not list(card.parent.glob("patterns_*.pt"))
    raw = torch.load(out / "patterns_linear.pt", weights_only=True)
    assert raw["volumes"] == 2 and raw["windows"] == 2 and raw["estimator"] == "linear"


@pytest.mark.parametrize(
    "extra, images, model, expected",
    [
        (["--estimator", "quadratic"], None, None, "--estimator"),
        ([], "nothing", None, "--images"),
        (["--max-volumes", "0"], None, None, "--max-volumes"),
        (["--max-windows", "-1"], None, None, "--max-windows"),
        (["--window-batch", "0"], None, None, "--window-batch"),
        (["--device", "tpu"], None, None, "--device"),
        ([], None, "no-such-model", "no-such-model"),
    ],
)
def test_bad_input_exits_2_naming_the_parameter(card, case_folders, tmp_path, capsys, extra, images, model, expected):
    images_arg = str(case_folders / images) if images else str(case_folders)
    model_arg = str(tmp_path / model) if model else str(card)
    before = files_under(tmp_path)
    assert main(["-q", "patterns", "fit", "--model", model_arg, "--images", images_arg, *extra]) == 2
    assert expected in capsys.readouterr().err
    assert files_under(tmp_path) == before


def test_a_case_missing_a_channel_is_named(card, tmp_path, capsys):
    root = tmp_path / "cases"
    write_case(root / "good", ["ch0", "ch1"], seed=0)
    write_case(root / "broken", ["ch0"], seed=1)
    before = files_under(tmp_path)
    assert main(["-q", "patterns", "fit", "--model", str(card), "--images", str(root)]) == 2
    error = capsys.readouterr().err
    assert "broken" in error and "ch1" in error
    assert files_under(tmp_path) == before
