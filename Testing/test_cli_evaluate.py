"""``segxai evaluate`` and ``segxai agg2exp`` on tiny cases of a per-voxel model (class-1 logit =
the input): the tables carry every method plus the random baseline, the rows equal the Python
API's, the Agg2Exp outputs (matrices, graph, outliers, a reference cohort from an earlier run)
are written, and every bad input exits 2 naming the parameter, with nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_voxelwise_card
from SegXAILib.cli import main
from SegXAILib.image import Image
from SegXAILib.io import write_image

SHAPE = (12, 10, 8)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A per-voxel model card and four case folders (ch0 image, reference, roi_corner)."""
    root = tmp_path_factory.mktemp("evaluate")
    card = write_voxelwise_card(root / "model")
    cases = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        array = rng.uniform(-1.0, -0.1, size=(1, *SHAPE)).astype(np.float32)
        start = 2 + seed % 3
        array[0, start:start + 4, 3:6, 2:5] = rng.uniform(0.5, 1.5)
        image = Image(array, np.diag([1.2, 1.0, 2.0, 1.0]))
        folder = root / f"case{seed}"
        folder.mkdir()
        write_image(image, folder / "ch0.nii.gz")
        reference = np.zeros((1, *SHAPE), np.uint8)
        reference[0, start:start + 4, 3:6, 2:6] = 1
        write_image(image.with_array(reference), folder / "reference.nii.gz")
        corner = np.zeros((1, *SHAPE), np.uint8)
        corner[0, :3, :3, :3] = 1
        write_image(image.with_array(corner), folder / "roi_corner.nii.gz")
        cases.append(folder)
    other = root / "other_grid.nii.gz"
    write_image(Image(np.zeros((1, 5, 5, 5), np.uint8), np.eye(4)), other)
    return {"card": card, "cases": cases, "other_grid": other, "root": root}


FAST = ["--n-subsets", "10", "--sensitivity-samples", "1", "--slic-segments", "20", "--fidelity-step", "0.25"]


def test_evaluate_writes_tables_with_the_random_baseline(cohort, tmp_path):
    out = tmp_path / "out"
    code = main(["-q", "evaluate", "--model", str(cohort["card"]), "--images", *map(str, cohort["cases"][:2]),
                 "--methods", "vanilla_gradient,gradient_x_input", "--out", str(out), *FAST])
    assert code == 0
    assert sorted(p.name for p in files_under(out)) == ["evaluation.csv", "evaluation.json", "evaluation.md"]
    markdown = (out / "evaluation.md").read_text(encoding="utf-8")
    tables = [block for block in markdown.split("\n\n") if block.startswith("| method")]
    assert len(tables) == 2
    for table in tables:
        names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
        assert names == ["vanilla_gradient", "gradient_x_input", "random"]
    with open(out / "evaluation.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 2  # cases x methods x variants
    document = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert document["methods"] == {"vanilla_gradient": {}, "gradient_x_input": {}, "random": {}}
    assert document["command"].startswith("segxai") and len(document["cases"]) == 2
    # the gradient of sum(x over the predicted voxels) is the class mask: it points at the
    # reference (AUC well above the random baseline's) and scores a positive fidelity
    by = {(r["case"], r["method"], r["variant"]): r for r in rows}
    for case in ("case0", "case1"):
        gradient = by[(case, "vanilla_gradient", "absolute")]
        random = by[(case, "random", "absolute")]
        # map 1 on the 36 predicted voxels, 0 elsewhere; the reference has 12 more (zero) voxels:
        # AUC = 36/48 * 1 + 12/48 * 1/2 (ties count half)
        assert float(gradient["pointing_auc"]) == pytest.approx(0.875)
        assert abs(float(random["pointing_auc"]) - 0.5) < 0.1
        assert float(gradient["fidelity"]) > 0.3
        assert float(gradient["complexity"]) == pytest.approx(36 / np.prod(SHAPE))


def test_evaluate_rows_equal_the_python_api(cohort, tmp_path):
    from SegXAILib.evaluation.runner import EvaluationConfig, evaluate_case
    from SegXAILib.io import read_image
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    out = tmp_path / "out"
    assert main(["-q", "evaluate", "--model", str(cohort["card"]), "--images",
                 str(cohort["cases"][2] / "ch0.nii.gz"), "--reference", str(cohort["cases"][2] / "reference.nii.gz"),
                 "--methods", "smoothgrad@few", "--param", "smoothgrad@few.n_samples=3", "--metrics", "fidelity,pointing,complexity",
                 "--variants", "absolute", "--seed", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))["rows"]
    model = load_model(resolve_model_card(cohort["card"]), device="cpu")
    image = read_image(cohort["cases"][2] / "ch0.nii.gz", "ch0")
    expected, _ = evaluate_case(image, model, {"smoothgrad@few": {"n_samples": 3}},
                                read_image(cohort["cases"][2] / "reference.nii.gz"),
                                EvaluationConfig(metrics=("fidelity", "pointing", "complexity"), variants=("absolute",), seed=4))
    assert [r["method"] for r in rows] == ["smoothgrad@few", "random"]
    for ours, theirs in zip(rows, expected):
        for column in ("fidelity", "pointing_auc", "complexity"):
            assert ours[column] == pytest.approx(theirs[column], abs=1e-9)
        assert ours["faithfulness"] is None  # not run: null in the JSON


def test_agg2exp_matrices_graph_outliers_and_fit_on(cohort, tmp_path):
    first = tmp_path / "reference_run"
    assert main(["-q", "agg2exp", "--model", str(cohort["card"]), "--images", *map(str, cohort["cases"][:3]),
                 "--method", "vanilla_gradient", "--out", str(first), "--top-k", "2", "--save-maps"]) == 0
    names = {p.relative_to(first).as_posix() for p in files_under(first)}
    assert {"agg2exp.json", "graph.json", "graph.png", "outliers.csv", "global_absolute.csv", "global_positive.md",
            "cases/case0_absolute.csv", "maps/case0/bright_ch0.nii.gz"} <= names
    document = json.loads((first / "agg2exp.json").read_text(encoding="utf-8"))
    matrix = document["global"]["absolute"]
    assert matrix["rows"] == ["background", "bright"]
    assert matrix["columns"] == ["background", "bright", "reference:bright", "corner"]
    row = dict(zip(matrix["columns"], matrix["values"][1]))
    # the gradient is the class mask: all mass on "bright", none in the corner
    assert row["bright"] == pytest.approx(1.0) and row["corner"] == 0.0 and row["background"] == 0.0
    assert row["reference:bright"] == pytest.approx(1.0)
    assert document["context_use"]["absolute"]["bright"] == pytest.approx(1.0)
    assert matrix["values"][0] == [None] * 4  # background's target has no gradient: no mass
    assert [e["target"] for e in document["graph"]["edges"]] == ["bright", "bright"]
    assert document["outliers"]["fitted_on"].startswith("this run")
    assert set(document["outliers"]["scores"]) == {"case0", "case1", "case2"}
    assert "bright" in document["outliers"]["spearman_vs_dice"]
    # a new case scored against the first run's cohort
    second = tmp_path / "new_case"
    assert main(["-q", "agg2exp", "--model", str(cohort["card"]), "--images", str(cohort["cases"][3]),
                 "--method", "vanilla_gradient", "--variants", "absolute", "--fit-on", str(first / "agg2exp.json"),
                 "--out", str(second)]) == 0
    outliers = json.loads((second / "agg2exp.json").read_text(encoding="utf-8"))["outliers"]
    assert outliers["reference_cases"] == 3 and outliers["fitted_on"].endswith("agg2exp.json")
    assert 0.0 < outliers["scores"]["case3"]["bright"] < 1.0


@pytest.mark.parametrize("arguments, names", [
    (["--methods", "no_such_method"], "method 'no_such_method': unknown"),
    (["--methods", "vanilla_gradient", "--param", "n_samples=3"], "--param"),
    (["--methods", "vanilla_gradient", "--param", "smoothgrad.n_samples=3"], "--param"),
    (["--methods", "smoothgrad", "--param", "smoothgrad.n_samples=zero"], "n_samples"),
    (["--methods", "vanilla_gradient", "--metrics", "fidelity,beauty"], "--metrics"),
    (["--methods", "vanilla_gradient", "--variants", "squared"], "--variants"),
    (["--methods", "vanilla_gradient", "--class", "tumour"], "--class"),
    (["--methods", "vanilla_gradient", "--fidelity-step", "0"], "--fidelity-step"),
    (["--methods", "vanilla_gradient", "--reference", "a.nii.gz", "b.nii.gz", "c.nii.gz"], "--reference"),
    (["--methods", "expected_gradients"], "expected_gradients"),
])
def test_evaluate_bad_input_exits_2_and_writes_nothing(cohort, tmp_path, capsys, arguments, names):
    out = tmp_path / "out"
    code = main(["-q", "evaluate", "--model", str(cohort["card"]), "--images", *map(str, cohort["cases"][:2]),
                 "--out", str(out), *arguments])
    assert code == 2
    assert names in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing_channel", "bad_list", "reference_grid", "roi_grid", "fit_on", "top_k",
                                  "graph_variant", "classes"])
def test_agg2exp_bad_input_exits_2_and_writes_nothing(cohort, tmp_path, capsys, kind):
    out = tmp_path / "out"
    images = [str(cohort["cases"][0])]
    extra: list[str] = []
    expected = {"missing_channel": "--images", "bad_list": "--images", "reference_grid": "--reference",
                "roi_grid": "--roi", "fit_on": "--fit-on", "top_k": "--top-k", "graph_variant": "--graph-variant",
                "classes": "--classes"}[kind]
    if kind == "missing_channel":
        empty = tmp_path / "empty_case"
        empty.mkdir()
        images = [str(empty)]
    elif kind == "bad_list":
        images = [f"{cohort['cases'][0] / 'ch0.nii.gz'},{cohort['cases'][1] / 'ch0.nii.gz'}"]
    elif kind == "reference_grid":
        extra = ["--reference", str(cohort["other_grid"])]
    elif kind == "roi_grid":
        extra = ["--roi", f"odd={cohort['other_grid']}"]
    elif kind == "fit_on":
        bogus = tmp_path / "bogus.json"
        bogus.write_text("{}", encoding="utf-8")
        extra = ["--fit-on", str(bogus)]
    elif kind == "top_k":
        extra = ["--top-k", "0"]
    elif kind == "graph_variant":
        extra = ["--variants", "positive", "--graph-variant", "absolute"]
    elif kind == "classes":
        extra = ["--classes", "bright,tumour"]
    code = main(["-q", "agg2exp", "--model", str(cohort["card"]), "--images", *images, "--method", "vanilla_gradient",
                 "--out", str(out), *extra])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()
