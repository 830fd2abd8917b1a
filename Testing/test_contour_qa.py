"""QA of given contours (issue 22): a contour equal to the model's prediction has Dice 1 with it
and sorts last, a shifted one (constant volume) sorts first; surface distances equal a brute-force
oracle; a risk model of the model scores each contour's EC curve and then orders the list; the CLI
reads an RTSTRUCT (on a DICOM series) and gives the numbers the same mask gives as NIfTI; unknown
structures exit 2 with nothing written; ``contour_qa.json`` round-trips; the case report, the
MRML summary and the viewer's rows show the review list. Small parotid phantoms (parotid-S6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.image import SegXAIInputError
from SegXAILib.io import write_image
from SegXAILib.metrics import dice_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE, SPACING = (32, 32, 32), (3.0, 3.0, 3.0)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def phantom():
    from SegXAILib.phantoms import make_parotid_phantom

    return make_parotid_phantom("S6", 1000, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def model():
    from SegXAILib.pipeline import CaseSettings, load_case_model

    return load_case_model(CaseSettings(model="parotid-S6", device="cpu"))


def new_case(phantom, model, **fields):
    from SegXAILib.pipeline import CaseSettings, start_case

    settings = CaseSettings.from_dict({"model": "parotid-S6", "device": "cpu", "instances": {"enabled": False},
                                       **fields}, "test")
    return start_case(phantom.image, model, settings)


@pytest.fixture(scope="module")
def scored(phantom, model):
    """A case whose contours are the model's own gland and that gland shifted by 9 mm."""
    from SegXAILib.phantoms import perturb_contour
    from SegXAILib.pipeline import add_contour_qa

    case = new_case(phantom, model)
    prediction = case.mask
    assert prediction.sum() > 50, "the phantom should give the model a gland to draw"
    shifted = perturb_contour(prediction, SPACING, "shift", 9.0, seed=1)
    add_contour_qa(case, model, {"gland": prediction, "edited gland": shifted}, classes={"edited gland": "gland"})
    return case, prediction, shifted


# ---------------------------------------------------------------------------- arrays


def brute_force_surface(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Pooled distances between face-surface voxels, every pair measured (the oracle)."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(axis=-1))
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


def test_surface_distances_equal_a_brute_force_oracle():
    from SegXAILib.qa.contours import surface_distances

    rng = np.random.default_rng(0)
    spacing = (1.0, 2.0, 0.5)
    grid = np.indices((12, 11, 14)).astype(float)
    a = ((grid[0] - 5) ** 2 + ((grid[1] - 5) * 0.8) ** 2 + ((grid[2] - 7) * 0.6) ** 2) <= 16
    b = a.copy()
    b[rng.random(a.shape) < 0.05] ^= True  # ragged border, holes and islands
    expected = brute_force_surface(a, b, spacing)
    found = surface_distances(a, b, spacing)
    assert found["mean_surface_distance_mm"] == pytest.approx(expected.mean(), rel=1e-12)
    assert found["hd95_mm"] == pytest.approx(np.percentile(expected, 95), rel=1e-12)
    assert surface_distances(a, a, spacing) == {"mean_surface_distance_mm": 0.0, "hd95_mm": 0.0}
    # a cube and the cube two voxels longer along axis 0: each moved face is 2 voxels away
    cube = np.zeros((10, 10, 10), bool)
    cube[3:6, 3:6, 3:6] = True
    longer = cube.copy()
    longer[3:8, 3:6, 3:6] = True
    pooled = brute_force_surface(cube, longer, (1, 1, 1))
    assert surface_distances(cube, longer)["mean_surface_distance_mm"] == pytest.approx(pooled.mean())
    assert np.isnan(surface_distances(cube, np.zeros_like(cube))["hd95_mm"])


def test_uncertainty_agreement_known_values():
    from SegXAILib.qa.contours import uncertainty_agreement

    contour = np.zeros((4, 4, 4), bool)
    contour[1:3, 1:3, 1:3] = True  # 8 voxels
    frequency = contour.astype(float) * 0.5  # half the samples hold the contour, none hold more
    information = np.full(contour.shape, 0.1)
    found = uncertainty_agreement(frequency, information, contour)
    assert found["sample_frequency_inside"] == pytest.approx(0.5)
    assert found["sample_soft_dice"] == pytest.approx(2 * 4.0 / (4.0 + 8.0))
    assert found["mean_mutual_information_inside"] == pytest.approx(0.1)
    assert uncertainty_agreement(contour.astype(float), None, contour)["sample_soft_dice"] == 1.0


# ---------------------------------------------------------------------------- the pipeline step


def test_the_prediction_sorts_last_and_a_shifted_contour_first(scored):
    case, prediction, shifted = scored
    rows = case.contour_qa.rows
    assert [row["structure"] for row in rows] == ["edited gland", "gland"]
    first, last = rows
    assert last["scores"]["dice_with_prediction"] == 1.0
    assert last["scores"]["volume_ratio"] == 1.0
    assert last["scores"]["mean_surface_distance_mm"] == 0.0 and last["scores"]["hd95_mm"] == 0.0
    assert last["suspicion"] == 0.0 and last["sort_key"] == "1 - dice_with_prediction"
    assert first["scores"]["dice_with_prediction"] == pytest.approx(dice_score(shifted, prediction))
    assert first["scores"]["dice_with_prediction"] < 0.9
    assert first["suspicion"] == pytest.approx(1.0 - first["scores"]["dice_with_prediction"])
    assert first["scores"]["volume_ratio"] == 1.0  # perturb_contour keeps the voxel count
    assert first["class_name"] == last["class_name"] == "gland"
    # the model's own gland: its probability inside is the model's foreground probability there
    probability = case.segmentation.probabilities.array[1]
    assert last["scores"]["mean_probability_inside"] == pytest.approx(float(probability[prediction].mean()))
    assert first["scores"]["mean_probability_inside"] < last["scores"]["mean_probability_inside"]
    assert first["saliency"] is None and first["risk"] is None  # no risk model, no qa.method
    assert any("no EC curve" in note for note in case.contour_qa.notes)


def test_unknown_structures_are_refused(phantom, model, scored):
    from SegXAILib.pipeline import add_contour_qa

    case, prediction, _ = scored
    with pytest.raises(SegXAIInputError, match=r"contours: structure 'parotid' .*\['gland'\]"):
        add_contour_qa(case, model, {"parotid": prediction})
    with pytest.raises(SegXAIInputError, match=r"classes: structure 'x' is mapped to 'lesion'"):
        add_contour_qa(case, model, {"x": prediction}, classes={"x": "lesion"})
    with pytest.raises(SegXAIInputError, match=r"contours\['gland'\]: empty"):
        add_contour_qa(case, model, {"gland": np.zeros_like(prediction)})
    with pytest.raises(SegXAIInputError, match=r"contours\['gland'\]: shape"):
        add_contour_qa(case, model, {"gland": prediction[:-1]})


def test_a_risk_model_of_the_model_scores_and_orders(phantom, model, scored, tmp_path):
    """With a risk model of parotid-S6 / vanilla_gradient / class:gland, each row's risk is the
    model's score of the EC curve of the class's vanilla-gradient map inside that contour, and the
    list is ordered by P(insufficient)."""
    from SegXAILib.attribution import explain
    from SegXAILib.pipeline import MethodSettings, add_contour_qa
    from SegXAILib.pipeline.cohort import method_record
    from SegXAILib.topology import default_thresholds, saliency_curve
    from SegXAILib.topology.risk import calibrate_risk_model

    _, prediction, shifted = scored
    thresholds = default_thresholds(20)
    rng = np.random.default_rng(1)
    dice = rng.uniform(0.3, 0.95, 16)
    base = np.linspace(40.0, 0.0, thresholds.size)
    curves = base[None] * (1.5 - dice[:, None]) + rng.normal(0, 1.0, (16, thresholds.size))
    record = method_record(MethodSettings(method="vanilla_gradient"), "gland")
    risk = calibrate_risk_model(curves, dice, thresholds, "vanilla_gradient", record, model.card.checksum())
    path = risk.save(tmp_path / "risk.json")

    case = new_case(phantom, model, qa={"risk_model": str(path)})
    add_contour_qa(case, model, {"gland": prediction, "edited gland": shifted}, classes={"edited gland": "gland"})
    saliency = explain(phantom.image, model, "vanilla_gradient", target="class:gland").maps.array.sum(axis=0)
    for row in case.contour_qa.rows:
        mask = prediction if row["structure"] == "gland" else shifted
        curve = saliency_curve(saliency, mask, thresholds)
        np.testing.assert_array_equal(row["saliency"]["curve"], curve)
        expected = risk.score(curve, "vanilla_gradient", model.card.checksum())
        assert row["risk"]["pc1"] == pytest.approx(expected["pc1"], rel=1e-9)
        assert row["suspicion"] == pytest.approx(expected["insufficient_probability"], rel=1e-9)
        assert row["sort_key"] == "insufficient_probability"
    suspicions = [row["suspicion"] for row in case.contour_qa.rows]
    assert suspicions == sorted(suspicions, reverse=True)
    assert case.contour_qa.risk_model == str(path)


def test_without_a_risk_model_qa_method_gives_the_curve(phantom, model, scored):
    """qa.method: the case's map of that method (class target) is reused, its EC curve inside
    each contour on 100 thresholds, no risk and the Dice order."""
    from SegXAILib.pipeline import add_contour_qa, add_maps
    from SegXAILib.topology import default_thresholds, saliency_curve

    _, prediction, shifted = scored
    case = new_case(phantom, model, methods=[{"method": "vanilla_gradient"}], qa={"method": "vanilla_gradient"})
    add_maps(case, model)
    add_contour_qa(case, model, {"gland": prediction, "edited gland": shifted}, classes={"edited gland": "gland"})
    saliency = case.maps["vanilla_gradient"].maps.array.sum(axis=0)
    assert [row["structure"] for row in case.contour_qa.rows] == ["edited gland", "gland"]
    for row in case.contour_qa.rows:
        mask = prediction if row["structure"] == "gland" else shifted
        assert row["saliency"]["map"] == "vanilla_gradient" and row["risk"] is None
        np.testing.assert_array_equal(row["saliency"]["thresholds"], default_thresholds(100))
        np.testing.assert_array_equal(row["saliency"]["curve"], saliency_curve(saliency, mask, default_thresholds(100)))


def test_contour_qa_json_round_trips(phantom, scored, tmp_path):
    from SegXAILib.pipeline import read_case, read_manifest, write_case
    from SegXAILib.pipeline.write import _json_ready

    case, _, _ = scored
    source = write_image(phantom.image, tmp_path / "ct.nii.gz")
    write_case(case, tmp_path / "case", inputs={"CT": source})
    written = json.loads((tmp_path / "case" / "contour_qa.json").read_text(encoding="utf-8"))
    assert [row["structure"] for row in written["structures"]] == ["edited gland", "gland"]
    assert "contour_qa" in {entry["role"] for entry in read_manifest(tmp_path / "case")["files"]}
    back = read_case(tmp_path / "case")
    normal = lambda document: json.loads(json.dumps(_json_ready(document)))  # noqa: E731
    assert normal(back.contour_qa.to_dict()) == normal(case.contour_qa.to_dict())
    assert np.isnan(back.contour_qa.rows[0]["scores"]["mean_entropy_boundary"]) == np.isnan(
        case.contour_qa.rows[0]["scores"]["mean_entropy_boundary"])


# ---------------------------------------------------------------------------- front ends


def test_report_and_front_ends_show_the_review_list(scored, tmp_path):
    from SegXAILib.mrml.logic import contour_qa_summary
    from SegXAILib.report.case_report import write_case_report

    case, _, _ = scored
    html = write_case_report(case, tmp_path).read_text(encoding="utf-8")
    assert "Contour review" in html
    section = html.split("Contour review", 1)[1].split("</table>", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tr>")
    assert "<td>edited gland</td>" in body[0] and "<td>gland</td>" in body[1] and "edited" not in body[1]
    assert "<td>1</td>" in body[0].replace(' class="num"', "") and "1 - dice_with_prediction" in body[0]
    rows = contour_qa_summary(case)
    assert [row["rank"] for row in rows] == [1, 2]
    assert [row["structure"] for row in rows] == ["edited gland", "gland"]
    assert rows[1]["dice_with_prediction"] == 1.0
    assert contour_qa_summary(None) == [] and contour_qa_summary(new_case_without_review(case)) == []
    from SegXAILib.mrml import headless_scene, table_node_columns
    from SegXAILib.mrml.logic import CaseNodes, show_contour_qa

    nodes = show_contour_qa(headless_scene(), case, CaseNodes())
    columns = table_node_columns(nodes.contour_qa_table)
    assert columns["structure"] == ["edited gland", "gland"] and columns["rank"] == [1, 2]
    from SegXAILib.viewer.app import contour_review_state

    page = contour_review_state(case)
    assert [row["structure"] for row in page] == ["edited gland", "gland"]
    assert page[1]["dice_with_prediction"] == 1.0 and page[0]["suspicion"] == round(rows[0]["suspicion"], 3)


def new_case_without_review(case):
    from dataclasses import replace

    return replace(case, contour_qa=None)


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def dicom_case(phantom, tmp_path_factory):
    """The phantom as a DICOM series, an RTSTRUCT of a shifted gland on it, and the same mask as NIfTI."""
    from SegXAILib.dicom import read_dicom_series, write_rtstruct
    from SegXAILib.dicom.testdata import write_test_series
    from SegXAILib.phantoms import perturb_contour

    folder = tmp_path_factory.mktemp("dicom")
    series = read_dicom_series(write_test_series(folder / "series", image=phantom.image))
    reference = phantom.label.array[0] > 0
    edit = perturb_contour(reference, SPACING, "shift", 6.0, seed=3)
    write_rtstruct(folder / "edit.rtstruct.dcm", {"Parotid edit": edit, "Gland": reference}, series)
    write_image(series.image.with_array(edit.astype(np.uint8)[None], ("edit",)), folder / "edit.nii.gz")
    return folder


def score(*argv) -> int:
    return main(["-q", "qa", "score", *map(str, argv), "--model", "parotid-S6", "--device", "cpu"])


def test_cli_rtstruct_equals_the_mask_given_as_nifti(dicom_case, tmp_path, capsys):
    series = dicom_case / "series"
    assert score(series, "--contour", dicom_case / "edit.rtstruct.dcm", "--structure", "Parotid edit=gland",
                 "--structure", "Gland=gland", "--out", tmp_path / "rt") == 0
    text = capsys.readouterr().out
    assert "1. " in text and "Parotid edit" in text and "Dice with prediction" in text
    assert score(series, "--contour", dicom_case / "edit.nii.gz", "--structure", "Parotid edit=gland",
                 "--out", tmp_path / "nifti") == 0
    read = lambda name: json.loads((tmp_path / name / "contour_qa.json").read_text(encoding="utf-8"))  # noqa: E731
    from_rtstruct = {row["structure"]: row for row in read("rt")["structures"]}
    (from_nifti,) = read("nifti")["structures"]
    assert from_rtstruct["Parotid edit"]["scores"] == from_nifti["scores"]
    assert from_nifti["scores"]["contour_voxels"] > 0
    assert set(from_rtstruct) == {"Parotid edit", "Gland"}


@pytest.mark.parametrize("extra, message", [
    (["--structure", "Nope"], "--structure 'Nope'"),
    (["--structure", "Missing=gland"], "--structure 'Missing': not in"),
    (["--structure", "Gland=lesion"], "--structure 'Gland'"),
    ([], "--structure: name the structure"),
])
def test_cli_refuses_unknown_structures(dicom_case, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert score(dicom_case / "series", "--contour", dicom_case / "edit.rtstruct.dcm", *extra, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert files_under(out) == [] and not out.exists()


def test_cli_needs_a_risk_model_or_a_contour(dicom_case, tmp_path, capsys):
    image = dicom_case / "edit.nii.gz"
    assert score(image, "--out", tmp_path / "out") == 2
    assert "--risk" in capsys.readouterr().err
    assert score(image, "--structure", "gland", "--out", tmp_path / "out") == 2
    assert "--structure: only with --contour" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- segxai demo --dicom


def test_demo_dicom_writes_series_seg_rtstruct_and_maps_that_read_back(phantom, model, tmp_path):
    from SegXAILib.demo import write_demo_dicom
    from SegXAILib.dicom import read_dicom_series, read_parametric_map, read_rtstruct, read_seg
    from SegXAILib.pipeline import MethodSettings, add_maps

    case = new_case(phantom, model)
    add_maps(case, model, [MethodSettings(method="vanilla_gradient")])
    written = write_demo_dicom(tmp_path / "dicom", case)
    series = read_dicom_series(written["dicom:series:CT"])
    assert series.image.same_grid(case.image)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    for reader, role in ((read_seg, "dicom:seg"), (read_rtstruct, "dicom:rtstruct")):
        masks = reader(written[role], series)
        assert list(masks) == ["gland"]
        np.testing.assert_array_equal(masks["gland"], case.mask)
    values = read_parametric_map(written["dicom:map:saliency vanilla_gradient CT"], series).array[0]
    expected = case.maps["vanilla_gradient"].maps.array[0]
    # float32 maps stored as 32-bit float pixel data with an identity value mapping: exact
    np.testing.assert_array_equal(values, expected)
    with pytest.raises(SegXAIInputError, match="already exists"):
        write_demo_dicom(tmp_path / "dicom", case)


def test_demo_dicom_refuses_an_existing_folder_before_any_work(tmp_path, capsys):
    (tmp_path / "dicom").mkdir()
    assert main(["-q", "demo", "--quick", "--dicom", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--dicom" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["dicom"]


def test_a_map_label_cut_before_an_underscore_is_written(phantom, tmp_path):
    """``saliency guided_gradcam FLAIR``[:16] ends with an underscore, which a Content Label may not."""
    from SegXAILib.dicom import read_dicom_series, read_parametric_map, write_parametric_map
    from SegXAILib.dicom.testdata import write_test_series

    series = read_dicom_series(write_test_series(tmp_path / "series", image=phantom.image))
    values = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    path = write_parametric_map(tmp_path / "map.dcm", values, series, label="saliency guided_")
    np.testing.assert_array_equal(read_parametric_map(path, series).array[0], values)
