"""The case report's counterfactual section (``write_case_report``, ``add_counterfactual_section``).

Oracles: the scores table equals the case folder's ``counterfactual.json``; with generators of
known behaviour (G+ adds 0.5 scale, G- subtracts 0.25 scale on the patch) the largest R is
0.75 scale and the smallest 0, and G+ raises the per-voxel model's score by 0.5 scale; the
figures named in the page exist as PNG files; a case without counterfactuals has no section.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import write_voxelwise_card
from test_batch_report import shown, tables
from test_case_counterfactual import GEOMETRY, SCALE, THRESHOLD, make_generators, phantom, settings_for
from SegXAILib.io import write_image
from SegXAILib.models.loaders import load_model
from SegXAILib.pipeline import CaseSettings, read_case, run_case, write_case
from SegXAILib.report.case_report import write_case_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One case (oblique grid) of the per-voxel model (lesion logit x - 2) with counterfactuals
    of lesions 1 and 2, and the same case without, each written to its folder, read back and
    reported there."""
    root = tmp_path_factory.mktemp("cf-report")
    card = write_voxelwise_card(root / "model", orientation="RAS", threshold=THRESHOLD, patch=GEOMETRY.context_size)
    model = load_model(card, "cpu")
    generators = make_generators(0.5, -0.25).save(root / "generators.pt")
    image = phantom(5, grid="oblique")
    source = write_image(image, root / "image.nii.gz")
    folders = {}
    for name, settings in (("with", settings_for(card, generators, ids=[1, 2])),
                           ("without", CaseSettings.from_dict({"model": str(card), "device": "cpu",
                                                               "instances": {"ids": []}}))):
        case = run_case(image, model, settings)
        folder = root / name
        write_case(case, folder, inputs={"ch0": source})
        write_case_report(read_case(folder), folder)
        folders[name] = folder
    return folders


def _page(folder: Path) -> str:
    return (folder / "report.html").read_text(encoding="utf-8")


def test_the_section_shows_the_case_folders_scores_and_figures(reports):
    folder = reports["with"]
    page = _page(folder)
    assert "<h2>Counterfactual relevance</h2>" in page
    assert "red is what G+ adds" in page and "blue what it removes" in page
    document = json.loads((folder / "counterfactual.json").read_text(encoding="utf-8"))
    table = next(t for t in tables(page) if t["caption"].startswith("Counterfactual scores"))
    header, *body = table["rows"]
    assert header[:4] == ["lesion", "x", "G+(x)", "G-(x)"]
    assert sorted(int(cells[0]) for cells in body) == sorted(int(i) for i in document["instances"]) == [1, 2]
    for cells in body:
        scores = document["instances"][cells[0]]["scores"]
        assert cells[1:4] == [shown(scores["original"]), shown(scores["plus"]), shown(scores["minus"])]
        # G+ adds 0.5 scale to the per-voxel logit inside the region: its mean moves as much
        assert scores["plus"] - scores["original"] == pytest.approx(0.5 * SCALE, abs=1e-5)
        # R = 0.75 scale on the patch and 0 outside (the patch is smaller than the image)
        assert cells[header.index("max R (ch0)")] == shown(0.75 * SCALE)
        assert cells[header.index("min R (ch0)")] == "0"
    figures = re.findall(r'<img src="(figures/counterfactual[^"]+)"', page)
    expected = [f"figures/counterfactual{i}_{kind}.png" for i in (1, 2) for kind in ("plus", "minus", "relevance")]
    assert figures == expected
    for figure in figures:
        assert (folder / figure).read_bytes()[:8] == PNG


def test_no_section_without_counterfactuals(reports):
    folder = reports["without"]
    page = _page(folder)
    assert not (folder / "counterfactual.json").exists()
    assert "<h2>Counterfactual relevance</h2>" not in page and "G+(x)" not in page
    assert not list((folder / "figures").glob("counterfactual*"))
