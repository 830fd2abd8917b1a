"""``segxai qa calibrate`` / ``segxai qa score`` / ``segxai qa cohort``: the CLI equals the
library, the risk model JSON round-trips, the score is recomputed independently from the
written map and mask, plots are PNGs, another model or method is refused and bad input exits 2
naming the parameter. Calibration runs on a small synthetic cohort folder in the cohort format
(the real cohort builder is covered by test_qa_cohort.py); scoring runs the bundled lesion model
on a 48x48x32 crop of a lesion phantom."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import read_image, write_image
from SegXAILib.pipeline import MethodSettings, read_manifest
from SegXAILib.pipeline.cohort import method_record
from SegXAILib.report.risk_plots import ec_curve_figure, write_risk_plots
from SegXAILib.topology.cohort import COHORT_FORMAT, COHORT_VERSION, calibrate_cohort
from SegXAILib.topology.risk import RiskModel, _sigmoid, saliency_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHOD = "guided_gradcam"
PARAMS = {"aggregation": "target"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def lesion_card():
    from SegXAILib.pipeline import resolve_model_card

    return resolve_model_card("lesions")


@pytest.fixture(scope="module")
def synthetic_cohort(tmp_path_factory, lesion_card):
    """24 cases on a 14^3 oblique grid: a ball mask, saliency = k well-separated Gaussian bumps
    (one per cube corner, k = 1..8 growing as Dice falls) over faint noise, Dice ~ U(0.3, 0.95)."""
    from conftest import grid_matrix

    out = tmp_path_factory.mktemp("synthetic_cohort")
    rng = np.random.default_rng(0)
    shape = (14, 14, 14)
    grid = np.indices(shape, dtype=float) - 6.5
    ball = (grid**2).sum(axis=0) <= 36.0
    corners = [np.array(c) for c in itertools.product((-3.0, 3.0), repeat=3)]
    matrix = grid_matrix("oblique")
    cases = []
    for i in range(24):
        dice = float(rng.uniform(0.3, 0.95))
        saliency = 0.01 * rng.random(shape)
        for corner in corners[: 1 + int(round(7 * (0.95 - dice) / 0.65))]:
            saliency += rng.uniform(0.7, 1.0) * np.exp(-((grid - corner[:, None, None, None]) ** 2).sum(axis=0) / 2.0)
        folder = out / "cases" / f"case_{i:03d}"
        folder.mkdir(parents=True)
        write_image(Image(ball.astype(np.uint8)[None], matrix, ("mask",)), folder / "mask.nii.gz")
        write_image(Image(saliency.astype(np.float32)[None], matrix, (METHOD,)), folder / f"saliency_{METHOD}.nii.gz")
        cases.append({"case_id": f"case_{i:03d}", "seed": i, "kind": "synthetic", "severity": 0.0, "dice": dice,
                      "status": "ok", "degradation": {},
                      "files": {"mask": f"cases/case_{i:03d}/mask.nii.gz",
                                "saliency": {METHOD: f"cases/case_{i:03d}/saliency_{METHOD}.nii.gz"}}})
    cases.append({"case_id": "empty", "dice": 0.0, "status": "empty_prediction", "files": {}, "degradation": {}})
    document = {
        "format": COHORT_FORMAT, "version": COHORT_VERSION, "complete": True, "class_name": "lesion",
        "model": {"name": "lesions", "card_name": lesion_card.name, "checksum": lesion_card.checksum()},
        "methods": {METHOD: method_record(MethodSettings(method=METHOD, params=PARAMS), "lesion")},
        "cases": cases,
    }
    (out / "cohort.json").write_text(json.dumps(document), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def risk_path(synthetic_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("risk") / "risk.json"
    assert main(["-q", "qa", "calibrate", "--cohort", str(synthetic_cohort), "--method", METHOD, "--out", str(out),
                 "--thresholds", "40"]) == 0
    return out


@pytest.fixture(scope="module")
def crop_case(tmp_path_factory):
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=2026)
    centre = np.argwhere(phantom.lesions.array[0] == 1).mean(axis=0).round().astype(int)
    half = np.array([24, 24, 16])
    image = phantom.image.crop(centre - half, centre + half)
    folder = tmp_path_factory.mktemp("crop")
    return [write_image(image.channel(name), folder / f"{name}.nii.gz") for name in ("FLAIR", "T1")]


def test_calibrate_cli_equals_library(synthetic_cohort, risk_path, capsys):
    cli_model = RiskModel.load(risk_path)
    library, curves, dice, ids = calibrate_cohort(synthetic_cohort, METHOD, n_thresholds=40)
    assert cli_model.to_dict() == library.to_dict()
    assert "empty" not in ids and cli_model.n_cases == 24  # the empty prediction is skipped
    assert cli_model.method == METHOD and cli_model.method_parameters["params"]["aggregation"] == "target"
    # the number of saliency peaks tracks Dice: PC1 separates the insufficient cases
    assert cli_model.auroc > 0.9
    for name in ("risk_roc.png", "risk_dice_pc1.png", "risk_ec_curve.png"):
        assert_png(risk_path.parent / name)
    # round trip through JSON keeps every field and the scores
    again = RiskModel.from_dict(json.loads(risk_path.read_text(encoding="utf-8")))
    assert again.to_dict() == cli_model.to_dict()
    assert [again.project(c) for c in curves] == [cli_model.project(c) for c in curves]
    np.testing.assert_allclose(again.calibration_pc1, [cli_model.project(c) for c in curves], atol=1e-9)


def test_calibrate_cli_prints_summary(synthetic_cohort, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["-q", "qa", "calibrate", "--cohort", str(synthetic_cohort), "--method", METHOD, "--out", str(out),
                 "--thresholds", "40", "--specificity", "0.8"]) == 0
    text = capsys.readouterr().out
    model = RiskModel.load(out)
    assert f"{model.auroc:.3f} (training)" in text and "1 without a prediction skipped" in text
    assert model.specificity_target == 0.8


def test_score_cli(crop_case, risk_path, tmp_path, capsys):
    out = tmp_path / "score"
    assert main(["-q", "qa", "score", *map(str, crop_case), "--model", "lesions", "--risk", str(risk_path),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "qa.json").read_text(encoding="utf-8"))
    risk = RiskModel.load(risk_path)
    assert f"risk band: {result['band']}" in text and "PC1 score:" in text and "estimated Dice:" in text
    assert result["method"] == METHOD and result["structure"] == "lesion"
    # recompute the score from the written contour (the lesion class of the label map) and saliency map
    labels = read_image(out / "labels.nii.gz")
    mask = labels.with_array((labels.array == 1).astype(np.uint8))
    saliency = read_image(out / "qa_saliency.nii.gz")
    flair = read_image(crop_case[0])
    assert mask.same_grid(flair) and saliency.same_grid(flair)
    curve = saliency_curve(saliency.array[0], mask.array[0] > 0, risk.thresholds)
    np.testing.assert_array_equal(curve, result["curve"])
    assert result["pc1"] == pytest.approx(risk.project(curve))
    assert result["band"] == risk.band(result["pc1"]) and result["band"] in {"low", "moderate", "high"}
    expected = _sigmoid(np.array([result["pc1"]]), risk.sigmoid_a, risk.sigmoid_k, risk.sigmoid_lambda0)[0]
    assert result["estimated_dice"] == pytest.approx(expected)
    manifest = read_manifest(out)  # every file's checksum verified
    assert manifest["model"]["checksum"] == risk.model_checksum
    assert manifest["summary"]["structure_voxels"] == int(mask.array.sum())
    assert manifest["settings"]["qa"]["risk_model"] == str(risk_path.resolve())
    for name in ("qa_ec_curve.png", "qa_roc.png", "qa_dice_pc1.png"):
        assert_png(out / name)
        assert name in {entry["path"] for entry in manifest["files"]}


def test_score_refuses_another_model_or_method(crop_case, risk_path, tmp_path, capsys):
    data = json.loads(risk_path.read_text(encoding="utf-8"))
    data["model_checksum"] = "0" * 64
    other = tmp_path / "other_model.json"
    other.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    images = list(map(str, crop_case))
    assert main(["-q", "qa", "score", *images, "--model", "lesions", "--risk", str(other), "--out", str(out)]) == 2
    assert "checksum" in capsys.readouterr().err
    assert main(["-q", "qa", "score", *images[:1], "--model", "parotid-S2", "--risk", str(risk_path),
                 "--out", str(out)]) == 2
    assert "checksum" in capsys.readouterr().err
    assert main(["-q", "qa", "score", *images, "--model", "lesions", "--risk", str(risk_path), "--method", "gradcam",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--method 'gradcam'" in err and METHOD in err
    assert files_under(out) == []


def test_pipeline_qa_refuses_a_risk_model_of_another_model(risk_path):
    from SegXAILib.pipeline import CaseSettings, InstanceSettings, QASettings, load_case_model, run_case

    settings = CaseSettings(model="parotid-S2", device="cpu", instances=InstanceSettings(enabled=False),
                            qa=QASettings(risk_model=str(risk_path)))
    parotid = load_case_model(settings)
    image = Image(np.zeros((1, 8, 8, 8), np.float32), np.eye(4))
    image.array[0, 2:6, 2:6, 2:6] = 1000.0  # something for the model to segment, or QA has no contour
    with pytest.raises(SegXAIInputError, match="checksum|no 'parotid' voxel|predicts no"):
        run_case(image, parotid, settings)


@pytest.mark.parametrize(
    "argv, name",
    [
        (["qa", "cohort", "--model", "parotid", "--out", "{tmp}/c"], "--model"),
        (["qa", "cohort", "--model", "lesions", "--cases", "0", "--out", "{tmp}/c"], "--cases"),
        (["qa", "cohort", "--model", "lesions", "--device", "gpu", "--out", "{tmp}/c"], "--device 'gpu'"),
        (["qa", "cohort", "--model", "lesions", "--method", "nope", "--out", "{tmp}/c"], "method 'nope': unknown"),
        (["qa", "cohort", "--model", "lesions", "--method", "smoothgrad:bogus=1", "--out", "{tmp}/c"], "bogus"),
        (["qa", "cohort", "--model", "deepbet", "--method", "guided_gradcam", "--out", "{tmp}/c"], "--method guided_gradcam"),
        (["qa", "calibrate", "--cohort", "{tmp}/absent", "--method", METHOD, "--out", "{tmp}/r.json"], "--cohort"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", "gradcam", "--out", "{tmp}/r.json"], "--method 'gradcam'"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", METHOD, "--out", "{tmp}/r.txt"], "--out"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", METHOD, "--out", "{tmp}/no/r.json"], "--out"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", METHOD, "--out", "{tmp}/r.json", "--thresholds", "1"],
         "--thresholds"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", METHOD, "--out", "{tmp}/r.json",
          "--insufficient-quantile", "1.5"], "--insufficient-quantile"),
        (["qa", "calibrate", "--cohort", "{cohort}", "--method", METHOD, "--out", "{tmp}/r.json", "--cv-folds", "1"],
         "--cv-folds"),
        (["qa", "score", "{tmp}/a.nii.gz", "--model", "lesions", "--risk", "{tmp}/absent.json"], "absent.json"),
        (["qa", "score", "{tmp}/a.nii.gz", "--model", "lesions", "--risk", "{risk}"], "takes 2 image(s)"),
    ],
)
def test_bad_input_exits_2(argv, name, tmp_path, synthetic_cohort, risk_path, capsys):
    argv = [a.format(tmp=tmp_path, cohort=synthetic_cohort, risk=risk_path) for a in argv]
    assert main(["-q", *argv]) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("r.*"))


def test_plots_are_pngs(risk_path, tmp_path):
    risk = RiskModel.load(risk_path)
    curve = risk.curve_quantiles[2]
    written = write_risk_plots(tmp_path / "plots", risk, curve, risk.score(curve, METHOD, risk.model_checksum),
                               prefix="case_")
    assert sorted(p.name for p in written.values()) == ["case_dice_pc1.png", "case_ec_curve.png", "case_roc.png"]
    for path in written.values():
        assert_png(path)
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]
    with pytest.raises(SegXAIInputError, match="curve must have shape"):
        ec_curve_figure(risk, curve[:-1])


def test_score_refused_after_its_folder_was_made_leaves_nothing(risk_path, tmp_path, capsys):
    """``qa score --out`` makes its folder before reading the images: a refusal after that (an
    image that is not there) removes it again (issue 23: nothing created on refusal)."""
    out = tmp_path / "new" / "qa"
    argv = ["-q", "qa", "score", str(tmp_path / "missing_flair.nii.gz"), str(tmp_path / "missing_t1.nii.gz"),
            "--model", "lesions", "--risk", str(risk_path), "--out", str(out)]
    assert main(argv) == 2
    assert "missing_flair" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
