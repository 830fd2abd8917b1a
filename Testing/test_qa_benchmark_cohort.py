"""QA benchmark cohorts (``segxai qa cohort --benchmark`` / ``--images``) and ``segxai qa
benchmark``: cases are seeded and the plan extends case for case, a rerun resumes, C4 keeps the
contour's volume, the stored Dice and EC curves agree with independent recomputation (numpy's
overlap formula, scikit-image's Euler number), any model gets a cohort of the user's own cases,
and bad input exits 2 writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import euler_number

from SegXAILib.cli import main
from SegXAILib.io import read_image, write_image
from SegXAILib.phantoms import make_parotid_phantom
from SegXAILib.image import SegXAIInputError
from SegXAILib.pipeline.qa_cohort import (
    C2_LESION_COUNT,
    C2_MISREGISTRATION_MM,
    _plan,
    build_qa_cohort,
    c2_lesion_count,
    make_cohort_case,
    qa_cohort_spec,
)
from SegXAILib.qa.benchmark import benchmark_cohort
from SegXAILib.qa.cohort_table import read_case_curves, read_cohort_table, save_case_curves
from SegXAILib.topology.cohort import COHORT_FORMAT, COHORT_VERSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--method", "gradcam", "--method", "vanilla_gradient"]


def overlap_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_plan_extends_case_for_case_and_is_seeded():
    small, large = _plan("c2_lesions", 10, seed=0), _plan("c2_lesions", 25, seed=0)
    assert large[:10] == small
    assert [k for _, k, _ in large[:4]] == ["ghosting", "misregistration", "affine", "ghosting"]
    assert _plan("c2_lesions", 10, seed=1) != small
    severities = np.array([s for _, _, s in _plan("c1_parotid_S6", 400, seed=0)])
    assert severities.min() >= 0 and severities.max() <= 1 and abs(severities.mean() - 0.5) < 5 * 0.29 / 20


def test_c2_lesion_load_is_independent_of_the_failure():
    """C2 design 2: the lesion count comes from its own stream, so it is uniform on 1..12 and
    uncorrelated with the severity; the same case index under another kind or severity has the
    same phantom (bit-identical reference), and spikes (which remove lesions) are not a kind."""
    from scipy.stats import spearmanr

    plan = _plan("c2_lesions", 600, seed=0)
    counts = np.array([c2_lesion_count(0, i) for i, _, _ in plan])
    severities = np.array([s for _, _, s in plan])
    assert set(counts) == set(range(C2_LESION_COUNT[0], C2_LESION_COUNT[1] + 1))
    # independent draws: the rank correlation is ~N(0, 1/(n-1)); 4 standard errors
    assert abs(spearmanr(counts, severities)[0]) < 4 / np.sqrt(len(plan) - 1)
    for kind in ("ghosting", "misregistration", "affine"):
        kinds = np.array([k for _, k, _ in plan]) == kind
        assert abs(counts[kinds].mean() - counts.mean()) < 4 * counts.std() / np.sqrt(kinds.sum())

    mild = make_cohort_case("c2_lesions", 1, "ghosting", 0.0, seed=0)
    strong = make_cohort_case("c2_lesions", 1, "misregistration", 0.9, seed=0)
    assert np.array_equal(mild.reference, strong.reference)
    assert mild.details["lesions"] == strong.details["lesions"] == c2_lesion_count(0, 1)
    assert strong.details["degradation"]["shift_mm"] == pytest.approx(0.9 * C2_MISREGISTRATION_MM)
    # the failure changed the image only: ghosting at severity 0 leaves the phantom as it is
    assert not np.array_equal(mild.image.array, strong.image.array)
    with pytest.raises(SegXAIInputError, match="spikes"):
        make_cohort_case("c2_lesions", 0, "spikes", 0.5, seed=0)


def test_c2_design_version_starts_a_fresh_folder(tmp_path):
    """A folder built with the old C2 design (its identity has no design version) is not
    resumed: its cases are dropped and recomputed under the new design."""
    from SegXAILib import __version__
    from SegXAILib.pipeline import MethodSettings
    from SegXAILib.pipeline.steps import resolve_model_card

    assert qa_cohort_spec("c2_lesions")["version"] == 2
    methods = [MethodSettings(method="gradcam")]
    card = resolve_model_card("lesions")
    old_identity = {"cohort": "c2_lesions", "seed": 0, "model_checksum": card.checksum(),
                    "methods": [m.model_dump() for m in methods], "segxai_version": __version__}
    stale = {"case_id": "case_000", "group": "phantom_50000", "kind": "spikes", "severity": 0.5, "dice": 0.123,
             "status": "ok", "files": {}, "notes": []}
    (tmp_path / "cohort.json").write_text(json.dumps({
        "format": COHORT_FORMAT, "version": COHORT_VERSION, "complete": True, "identity": old_identity,
        "cases": [stale]}))
    build_qa_cohort("c2_lesions", tmp_path, n_cases=1, methods=methods)
    document = json.loads((tmp_path / "cohort.json").read_text())
    assert document["identity"]["design_version"] == 2
    assert [c["kind"] for c in document["cases"]] == ["ghosting"] and document["cases"][0]["dice"] != 0.123


@pytest.fixture(scope="module")
def contour_cohort(tmp_path_factory):
    from SegXAILib.pipeline import MethodSettings

    out = tmp_path_factory.mktemp("c4")
    methods = [MethodSettings(method="gradcam"), MethodSettings(method="vanilla_gradient")]
    build_qa_cohort("c4_contours", out, n_cases=3, methods=methods)
    return out, methods


def test_contour_cohort_keeps_volume_and_agrees_with_recomputation(contour_cohort):
    out, methods = contour_cohort
    document, cases, curves = read_cohort_table(out)
    assert document["complete"] and len(cases) == 3
    for case, named in zip(cases, curves):
        index = int(case["case_id"].split("_")[1])
        item = make_cohort_case("c4_contours", index, case["kind"], case["severity"], seed=0)
        assert item.contour.sum() == item.reference.sum() == case["contour_voxels"] == case["reference_voxels"]
        assert case["dice"] == pytest.approx(overlap_dice(item.contour, item.reference), abs=1e-12)
        assert set(named) == {"gradcam", "vanilla_gradient", "control_intensity", "control_shuffled:gradcam",
                              "control_shuffled:vanilla_gradient"}
        # at t = 0 every contour voxel is in the superlevel set: the contour's own Euler number
        chi = euler_number(item.contour, connectivity=3)
        for curve in named.values():
            assert curve.shape == (100,) and curve[0] == chi
        assert case["scores"]["euler_characteristic"] == chi
        assert 0.0 <= case["scores"]["dice_with_prediction"] <= 1.0


def test_rerun_resumes_and_extends(contour_cohort, tmp_path):
    import shutil

    out, methods = contour_cohort
    copy = tmp_path / "c4"
    shutil.copytree(out, copy)
    before = json.loads((copy / "cohort.json").read_text())["cases"]
    build_qa_cohort("c4_contours", copy, n_cases=4, methods=methods)
    after = json.loads((copy / "cohort.json").read_text())["cases"]
    assert len(after) == 4 and after[:3] == before  # timings included: not recomputed
    # another seed is another cohort: started afresh
    build_qa_cohort("c4_contours", copy, n_cases=1, seed=1, methods=methods)
    assert [c["group"] for c in json.loads((copy / "cohort.json").read_text())["cases"]] != [before[0]["group"]]


def test_user_cohort_with_any_model(tmp_path, capsys):
    """The parotid S4 model (not one of the built-in cohort models) on two cases of the user's:
    a reference equal to the model's own contour gives Dice 1, the phantom's truth the overlap."""
    from SegXAILib.sample_data import bundled_model_card

    card = str(bundled_model_card("parotid-S4"))
    phantoms = [make_parotid_phantom("S4", seed=s) for s in (3, 4)]
    images, references = [], []
    for i, p in enumerate(phantoms):
        images.append(write_image(p.image, tmp_path / f"image{i}.nii.gz"))
    assert main(["-q", "segment", str(images[0]), "--model", card, "--out", str(tmp_path / "seg0")]) == 0
    own = next((tmp_path / "seg0").glob("labels.nii.gz"))
    references = [own, write_image(phantoms[1].label, tmp_path / "truth1.nii.gz")]
    out = tmp_path / "cohort"
    argv = ["-q", "qa", "cohort", "--model", card, "--images", *map(str, images), "--references",
            *map(str, references), "--out", str(out), *FAST]
    assert main(argv) == 0
    document, cases, curves = read_cohort_table(out)
    assert document["model"]["card_name"] == "segxai-parotid-S4" and len(cases) == 2
    assert cases[0]["dice"] == 1.0
    predicted = read_image(own).array[0] > 0
    assert cases[0]["predicted_voxels"] == predicted.sum()
    # the second case: Dice of the model's contour with the truth (recomputed from a segment run)
    assert main(["-q", "segment", str(images[1]), "--model", card, "--out", str(tmp_path / "seg1")]) == 0
    mask = read_image(next((tmp_path / "seg1").glob("labels.nii.gz"))).array[0] > 0
    assert cases[1]["dice"] == pytest.approx(overlap_dice(mask, phantoms[1].label.array[0] > 0), abs=1e-12)
    assert cases[0]["group"] != cases[1]["group"]


@pytest.mark.parametrize("argv, name", [
    (["qa", "cohort", "--benchmark", "c9_nothing"], "--benchmark"),
    (["qa", "cohort", "--model", "lesions", "--images", "a.nii.gz", "b.nii.gz", "--references", "r.nii.gz",
      "--method", "gradcam"], "--references"),
    (["qa", "cohort", "--model", "lesions", "--images", "a.nii.gz", "--references", "r.nii.gz"], "--method"),
    (["qa", "cohort", "--model", "parotid-S4"], "--images"),
    (["qa", "cohort", "--benchmark", "c4_contours", "--workers", "0"], "--workers"),
    (["qa", "benchmark", "--cohort", "nowhere"], "--cohort"),
])
def test_bad_input_exits_2_and_writes_nothing(argv, name, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert name in capsys.readouterr().err
    assert files_under(out) == []


def write_synthetic_folder(folder: Path, n_groups: int = 30, seed: int = 0) -> None:
    """A QA cohort folder in the format with known structure: curves carry 1 - Dice."""
    from test_qa_benchmark import synthetic_cohort

    cases, curves, _ = synthetic_cohort(n_groups=n_groups, seed=seed)
    (folder / "cases").mkdir(parents=True)
    for case, named in zip(cases, curves):
        path = folder / "cases" / case["case_id"] / "curves.npz"
        path.parent.mkdir()
        save_case_curves(path, named)
        case.update(status="ok", files={"curves": f"cases/{case['case_id']}/curves.npz"})
    document = {"format": COHORT_FORMAT, "version": COHORT_VERSION, "complete": True, "cohort": "user",
                "model": {"checksum": "0" * 64, "card_name": "synthetic"}, "class_name": "x",
                "methods": {"signal": {}}, "thresholds": 30, "cases": cases}
    (folder / "cohort.json").write_text(json.dumps(document))


def test_benchmark_cli_equals_library(tmp_path, capsys):
    folder = tmp_path / "synthetic"
    write_synthetic_folder(folder)
    out = tmp_path / "results"
    assert main(["-q", "qa", "benchmark", "--cohort", str(folder), "--out", str(out), "--repeats", "2",
                 "--resamples", "200"]) == 0
    written = json.loads((out / "qa_benchmark.json").read_text())["cohorts"]["synthetic"]
    _, cases, curves = read_cohort_table(folder)
    direct = benchmark_cohort(cases, curves, ["signal"], n_repeats=2, n_resamples=200)
    assert [r["aurc"] for r in written["rows"]] == [r["aurc"] for r in direct["rows"]]
    assert written["best"] == direct["best"]
    assert "### synthetic" in (out / "qa_benchmark.md").read_text()
    for plot in ("qa_risk_coverage_synthetic.png", "qa_auroc_thresholds_synthetic.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert read_case_curves(folder / cases[0]["files"]["curves"])["signal"].shape == (30,)


def test_benchmark_reuses_a_cohort_result_while_the_cohort_is_the_same(tmp_path):
    from SegXAILib.report.qa_benchmark import write_benchmark

    folder = tmp_path / "synthetic"
    write_synthetic_folder(folder)
    out = tmp_path / "results"
    write_benchmark([folder], out, n_repeats=1, n_resamples=100)
    cached = out / "qa_benchmark_synthetic.json"
    first = json.loads(cached.read_text())
    stamp = cached.stat().st_mtime_ns
    write_benchmark([folder], out, n_repeats=1, n_resamples=100)
    assert cached.stat().st_mtime_ns == stamp  # reused, not recomputed
    write_benchmark([folder], out, n_repeats=1, n_resamples=101)  # other settings: recomputed
    assert json.loads(cached.read_text())["key"]["n_resamples"] == 101
    document = json.loads((folder / "cohort.json").read_text())
    document["cases"] = document["cases"][:-1]  # the cohort changed: recomputed
    (folder / "cohort.json").write_text(json.dumps(document))
    write_benchmark([folder], out, n_repeats=1, n_resamples=101)
    assert json.loads(cached.read_text())["n_cases"] == first["n_cases"] - 1
