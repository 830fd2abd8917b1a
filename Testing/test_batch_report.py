"""Cohort analyses of a batch folder (``SegXAILib.batch.cohort_report``, ``segxai batch-report``).

The batch runs in process with the per-voxel model of ``conftest.write_voxelwise_card`` (label =
value > 0, so every case's prediction is known); each case's reference is its bright voxels with
a case-dependent number of them dropped, so the Dice against it differs from case to case.
Values shown in ``cohort.html`` are checked against the case folders' own JSON files, the Dice
against ``dice_score`` of the written labels and the reference, the Agg2Exp global matrix
against ``global_matrix`` of the cases' ``agg2exp.json`` and a plain nan-mean.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import write_voxelwise_card
from SegXAILib.batch import BatchCase, case_state, cohort_report, run_batch
from SegXAILib.cli import main
from SegXAILib.evaluation import ImportanceMatrix
from SegXAILib.evaluation.agg2exp import global_matrix
from SegXAILib.io import read_image, write_image
from SegXAILib.metrics import dice_score
from SegXAILib.pipeline import CaseSettings, read_manifest

from test_batch import case_image

#: cases with a reference (the risk model needs at least 10), one without, one with a corrupt image
N_REFERENCED = 11


class _Tables(HTMLParser):
    """Every ``<table>``: caption, rows of cell texts and the ``href`` of each row's links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self._cell: list[str] | None = None
        self._caption = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"caption": "", "rows": [], "links": []})
        elif tag == "caption":
            self._caption = True
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
            self.tables[-1]["links"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a" and self.tables:
            self.tables[-1]["links"][-1].append(dict(attrs)["href"])

    def handle_endtag(self, tag):
        if tag == "caption":
            self._caption = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._caption:
            self.tables[-1]["caption"] += data
        elif self._cell is not None:
            self._cell.append(data)


def tables(html: str) -> list[dict]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def shown(value) -> str:
    """A value as the report shows it: 4 significant digits, empty for None."""
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "n/a"
    return "0" if value == 0 else f"{value:.4g}"


def reference_of(n: int) -> np.ndarray:
    """The case's bright voxels with the first ``2 * n`` of them (in C order) dropped."""
    bright = case_image(n).array[0] > 0
    reference = bright.copy()
    reference.ravel()[np.flatnonzero(bright.ravel())[: 2 * n]] = False
    return reference


def batch_settings(card: Path) -> CaseSettings:
    return CaseSettings.from_dict({
        "model": str(card), "device": "cpu",
        "methods": [{"method": "gradient_x_input"}],
        "instances": {"aggregations": ["mean"], "n_samples": 2, "batch_size": 2},
        "qa": {"method": "gradient_x_input"},
        "agg2exp": {"enabled": True, "method": "gradient_x_input"},
        "uncertainty": {"enabled": True, "sources": {"noise": {"std": 0.3}}, "samples": 3, "seed": 0},
    })


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_report")
    card = write_voxelwise_card(root / "model")
    (root / "images").mkdir()
    cases = []
    for n in range(N_REFERENCED + 2):
        image = write_image(case_image(n), root / "images" / f"c{n:02d}.nii.gz")
        reference = None
        if n < N_REFERENCED:
            truth = case_image(n).with_array(reference_of(n).astype(np.uint8)[None], ("reference",))
            reference = write_image(truth, root / "images" / f"c{n:02d}_reference.nii.gz")
        cases.append(BatchCase(f"c{n:02d}", (image.resolve(),), None if reference is None else reference.resolve(), n + 2))
    broken = root / "images" / f"c{N_REFERENCED + 1:02d}.nii.gz"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated image: this case fails
    settings = batch_settings(card)
    result = run_batch(cases, settings, root / "out", None)
    assert result.counts == {"done": N_REFERENCED + 1, "skipped": 0, "failed": 1, "pending": 0}
    return {"root": root, "out": root / "out", "cases": cases, "settings": settings, "card": card,
            "report": cohort_report(root / "out", calibrate="gradient_x_input")}


def test_one_row_per_case_with_the_case_folders_values(batch):
    out = batch["out"]
    html = batch["report"].read_text(encoding="utf-8")
    table = next(t for t in tables(html) if t["caption"] == "Cases")
    header, *body = table["rows"]
    links = table["links"][1:]
    assert [cells[header.index("case")] for cells in body] == [case.id for case in batch["cases"]]
    failures = 0
    for cells, hrefs, case in zip(body, links, batch["cases"]):
        cell = {title: cells[header.index(title)] for title in header}
        folder = out / "cases" / case.id
        if cell["status"] == "failed":
            failures += 1
            failure = json.loads((out / "failures" / f"{case.id}.json").read_text(encoding="utf-8"))
            assert failure["error"] and cell["error"] == failure["error"]
            assert hrefs == [f"failures/{case.id}.json"]
            continue
        assert cell["status"] == "done" and cell["error"] == ""
        segmentation = json.loads((folder / "segmentation.json").read_text(encoding="utf-8"))
        bright = next(c for c in segmentation["classes"] if c["name"] == "bright")
        assert cell["structure volume (mm^3)"] == shown(bright["volume_mm3"])
        lesions = json.loads((folder / "lesions.json").read_text(encoding="utf-8"))["instances"]
        assert cell["instances"] == str(sum(row.get("id") is not None for row in lesions)) == "2"
        qa = json.loads((folder / "qa.json").read_text(encoding="utf-8"))
        assert cell["QA band"] == qa["band"] == "no risk model" and cell["estimated Dice (QA)"] == ""
        structure = next(r for r in json.loads((folder / "uncertainty.json").read_text(encoding="utf-8"))["structures"]
                         if r["structure"] == "bright")
        assert cell["mean entropy (nats)"] == shown(structure["mean_entropy"])
        assert cell["pairwise Dice (samples)"] == shown(structure["pairwise_dice"])
        # the Dice against the reference: the written labels against the reference file
        labels = read_image(folder / "labels.nii.gz").array[0] == 1
        if case.reference is None:
            assert cell["Dice vs reference"] == ""
        else:
            dice = dice_score(labels, read_image(case.reference).array[0] != 0)
            assert cell["Dice vs reference"] == shown(dice)
            n = int(case.id[1:])
            # 2 n of the bright voxels dropped from the reference: Dice = 2 (V - 2n) / (2 V - 2n)
            assert dice == pytest.approx(2 * (labels.sum() - 2 * n) / (2 * labels.sum() - 2 * n), rel=1e-12)
        assert hrefs == [f"cases/{case.id}/report.html"]
    assert failures == 1


def test_links_resolve_and_case_folders_still_verify(batch):
    out = batch["out"]
    html = batch["report"].read_text(encoding="utf-8")
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert len(hrefs) == len(batch["cases"])
    for href in hrefs:
        assert (out / href).is_file(), href
    for source in re.findall(r'src="([^"]+)"', html):
        assert (out / source).is_file(), source
    for case in batch["cases"][:-1]:
        folder = out / "cases" / case.id
        manifest = read_manifest(folder, verify=True)  # every listed file (the report too) matches its checksum
        assert "report" in {entry["role"] for entry in manifest["files"]}
        assert case_state(folder, case, batch["settings"]) == "finished"
        page = (folder / "report.html").read_text(encoding="utf-8")
        for source in re.findall(r'src="([^"]+)"', page):
            assert (folder / source).is_file(), source
        for section in ("Summary", "Class-level maps", "instance saliency", "Lesion table", "Quality assurance",
                        "Where the model is unsure", "Agg2Exp"):
            assert section in page, (case.id, section)


def test_the_case_report_shows_the_lesion_tables_uncertainty(batch):
    folder = batch["out"] / "cases" / "c03"
    page = (folder / "report.html").read_text(encoding="utf-8")
    lesions = next(t for t in tables(page) if t["caption"].startswith("Lesion table"))
    header, *body = lesions["rows"]
    by_id = {row["id"]: row for row in json.loads((folder / "lesions.json").read_text(encoding="utf-8"))["instances"]
             if row.get("id") is not None}
    assert sorted(int(cells[header.index("id")]) for cells in body) == sorted(by_id) == [1, 2]
    for cells in body:
        row = by_id[int(cells[header.index("id")])]
        assert cells[header.index("mean entropy (nats)")] == shown(row["uncertainty"]["mean_entropy"])
        assert cells[header.index("local peak ch0")] == shown(row["saliency"]["mean"]["ch0"]["peak_positive_local"])
    summary = {cells[0]: cells[1] for cells in next(t for t in tables(page) if t["caption"] == "Summary")["rows"]}
    labels = read_image(folder / "labels.nii.gz").array[0] == 1
    reference = read_image(batch["cases"][3].reference).array[0] != 0
    assert summary["Dice against the reference"] == shown(dice_score(labels, reference))


def test_the_global_agg2exp_matrix_is_the_cohort_functions(batch):
    out = batch["out"]
    document = json.loads((out / "cohort_report.json").read_text(encoding="utf-8"))
    finished = [case.id for case in batch["cases"][:-1]]
    matrices = [ImportanceMatrix.from_dict(json.loads((out / "cases" / i / "agg2exp.json").read_text(encoding="utf-8")))
                for i in finished]
    expected = global_matrix(matrices)
    written = ImportanceMatrix.from_dict(document["agg2exp"]["global"])
    assert written.rows == expected.rows and written.columns == expected.columns
    np.testing.assert_array_equal(written.values, expected.values)
    # and the plain mean over the cases that have the cell (the case without a reference has no
    # reference column; a class whose map has no mass has no row)
    stack = np.stack([m.aligned(expected.columns).values for m in matrices])
    assert np.isnan(stack[-1, :, expected.columns.index("reference:bright")]).all()
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="Mean of empty slice"):
        mean = np.nanmean(stack, axis=0)
    np.testing.assert_allclose(written.values, mean, rtol=1e-12, atol=0)
    assert np.isfinite(written.values[written.rows.index("bright")]).all()
    outliers = document["agg2exp"]["outliers"]
    assert sorted(outliers["scores"]) == sorted(finished)
    html = batch["report"].read_text(encoding="utf-8")
    shown_table = next(t for t in tables(html) if t["caption"] == "Agg2Exp global matrix")
    header, *body = shown_table["rows"]
    for cells, name in zip(body, expected.rows):
        assert cells[0] == name
        for column in expected.columns:
            assert cells[header.index(column)] == shown(float(expected.values[expected.rows.index(name),
                                                                                expected.columns.index(column)]))


def test_the_calibrated_risk_model_is_the_batchs_curves_and_scores_a_new_case(batch, tmp_path):
    from SegXAILib.pipeline import load_case_model, run_case
    from SegXAILib.topology import RiskModel

    out = batch["out"]
    model = RiskModel.load(out / "risk_gradient_x_input.json")
    ids = json.loads((out / "cohort_report.json").read_text(encoding="utf-8"))["calibration"][0]["cases"]
    assert ids == [f"c{n:02d}" for n in range(N_REFERENCED)] and model.n_cases == N_REFERENCED
    expected = [dice_score(read_image(out / "cases" / i / "labels.nii.gz").array[0] == 1, reference_of(int(i[1:])))
                for i in ids]
    np.testing.assert_allclose(model.calibration_dice, expected, rtol=1e-12)
    for name in ("ec_curve", "roc", "dice_pc1"):
        assert (out / f"risk_gradient_x_input_{name}.png").read_bytes()[:4] == b"\x89PNG"
    # the risk model's provenance is what the pipeline's QA compares: a new case gets a band
    settings = CaseSettings.from_dict({**batch["settings"].to_dict(),
                                       "qa": {"risk_model": str(out / "risk_gradient_x_input.json")},
                                       "uncertainty": {"enabled": False}, "agg2exp": {"enabled": False}})
    case = run_case(case_image(3), load_case_model(settings), settings)
    assert case.qa.band in ("low", "moderate", "high")


def test_the_qa_benchmark_puts_the_maps_beside_the_predicted_volume(batch):
    """The benchmark row of the calibrated map: its AUROCs are the risk model's; the volume
    baseline's AUROC is recomputed here from the written label maps and the model's own
    insufficient cut (sklearn's roc_auc_score, the better direction)."""
    from sklearn.metrics import roc_auc_score

    from SegXAILib.topology import RiskModel

    out = batch["out"]
    summary = json.loads((out / "cohort_report.json").read_text(encoding="utf-8"))
    (row,) = summary["qa_benchmark"]
    model = RiskModel.load(out / "risk_gradient_x_input.json")
    ids = summary["calibration"][0]["cases"]
    assert row["method"] == "gradient_x_input" and row["cases"] == model.n_cases
    assert row["auroc_pc1"] == pytest.approx(model.auroc) and row["auroc_pc1_cv"] == pytest.approx(model.auroc_cv_mean)
    insufficient = model.calibration_dice < model.insufficient_dice
    assert row["insufficient"] == int(insufficient.sum())
    volumes = []
    for case in ids:
        labels = read_image(out / "cases" / case / "labels.nii.gz")
        volumes.append(float((labels.array[0] == 1).sum() * labels.voxel_volume))
    small = roc_auc_score(insufficient, -np.asarray(volumes))
    assert row["auroc_volume"] == pytest.approx(max(small, 1 - small), rel=1e-9)
    assert "QA benchmark" in (out / "cohort.html").read_text(encoding="utf-8")


def test_the_command_and_its_bad_input(batch, tmp_path, capsys):
    assert main(["-q", "batch-report", str(batch["out"]), "--calibrate", "gradient_x_input"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [Path(p) for p in printed] == [batch["out"] / "cohort.html", batch["out"] / "risk_gradient_x_input.json"]
    missing = tmp_path / "nothere"
    assert main(["-q", "batch-report", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["-q", "batch-report", str(tmp_path)]) == 2  # a folder without batch.json
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["-q", "batch-report", str(batch["out"]), "--calibrate", "smoothgrad"]) == 2
    assert "--calibrate 'smoothgrad'" in capsys.readouterr().err
