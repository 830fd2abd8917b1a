"""`segxai demo`: every output exists, opens, and keeps the sample's geometry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.io import read_image
from SegXAILib.sample_data import load_sample_head


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_report_references_only_existing_files(demo_dir):
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) >= 6  # three planes per lesion and channel, at least a few lesions
    for source in sources:
        assert (demo_dir / source).is_file(), source
    assert "Dice" in html and "Timings" in html


def test_outputs_are_on_the_sample_grid(demo_dir):
    t1 = load_sample_head().t1
    for name in ("input_FLAIR.nii.gz", "input_T1.nii.gz", "truth_lesions.nii.gz", "labels.nii.gz",
                 "probability_lesion.nii.gz"):
        image = read_image(demo_dir / name)
        np.testing.assert_allclose(image.ijk_to_ras, t1.ijk_to_ras, atol=1e-4)
        assert image.spatial_shape == t1.spatial_shape


def test_demo_finds_the_inserted_lesions(demo_dir):
    from SegXAILib.metrics import dice_score

    truth = read_image(demo_dir / "truth_lesions.nii.gz").array[0] > 0
    labels = read_image(demo_dir / "labels.nii.gz").array[0] == 1
    assert dice_score(labels, truth) > 0.4
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    assert f"{dice_score(labels, truth):.3f}"[:4] in html
