"""Evaluation tables of attribution methods over a batch folder (``SegXAILib.batch.evaluate_batch``,
``segxai batch-evaluate``).

The batch runs in process with the per-voxel model of ``conftest.write_voxelwise_card`` (label =
value > 0): three cases with a reference, one without, one whose image is truncated (it fails in
the batch). The oracle of the batch's rows is :func:`~SegXAILib.evaluation.evaluate_case` called
directly on each case's image files and reference, without any prediction (the model-grid target
is then the model's own argmax, made here), with the same config and seed; a 2-worker
LocalCluster must give the in-process rows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import write_voxelwise_card
from SegXAILib.batch import BatchCase, cohort_report, evaluate_batch, local_cluster, run_batch
from SegXAILib.cli import main
from SegXAILib.evaluation import EvaluationConfig, evaluate_case
from SegXAILib.evaluation.runner import COLUMNS
from SegXAILib.io import read_image, write_image
from SegXAILib.pipeline import CaseSettings, load_case_model, predict, read_case, read_case_images

from test_batch import case_image
from test_batch_report import reference_of, tables

METHODS = {"vanilla_gradient": {}}
METRICS = "fidelity,pointing,complexity"
#: a seed other than the default: the random baseline's map depends on it
CONFIG = EvaluationConfig(metrics=tuple(METRICS.split(",")), seed=3, fidelity_step=0.1)
FINISHED = ["c00", "c01", "c02", "c03"]


def settings_for(card: Path, **extra) -> CaseSettings:
    return CaseSettings.from_dict({"model": str(card), "device": "cpu", "methods": [{"method": "gradient_x_input"}],
                                   "instances": {"enabled": False}, **extra})


def write_batch(root: Path, card: Path, count: int = 5, references: int = 3, broken: bool = True) -> Path:
    """``count`` cases (the first ``references`` with one, the last truncated when ``broken``) run in process."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for n in range(count):
        image = write_image(case_image(n), root / "images" / f"c{n:02d}.nii.gz")
        reference = None
        if n < references:
            truth = case_image(n).with_array(reference_of(n).astype(np.uint8)[None], ("reference",))
            reference = write_image(truth, root / "images" / f"c{n:02d}_reference.nii.gz").resolve()
        cases.append(BatchCase(f"c{n:02d}", (image.resolve(),), reference, n + 2))
    if broken:
        last = root / "images" / f"c{count - 1:02d}.nii.gz"
        last.write_bytes(last.read_bytes()[:60])  # a truncated image: this case fails in the batch
    run_batch(cases, settings_for(card), root / "out", None)
    return root / "out"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_evaluate")
    card = write_voxelwise_card(root / "model")
    out = write_batch(root, card)
    document = evaluate_batch(out, METHODS, CONFIG)
    return {"root": root, "card": card, "out": out, "document": document,
            "cases": json.loads((out / "batch.json").read_text(encoding="utf-8"))["cases"]}


def case_row(out: Path, identifier: str) -> dict:
    """The case's row as the batch recorded it (its image files and reference)."""
    return json.loads((out / "cases" / identifier / "batch_case.json").read_text(encoding="utf-8"))


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def values(row: dict) -> np.ndarray:
    """The numeric columns of a row (a CSV row's empty cells are NaN, as JSON's None)."""
    return np.array([np.nan if row[c] in ("", None) else float(row[c]) for c in COLUMNS])


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["case"], r["method"], r["variant"]) for r in got] == [(r["case"], r["method"], r["variant"])
                                                                     for r in want]
    for a, b in zip(got, want):
        # the same float32 operations on one torch thread in each process
        np.testing.assert_allclose(values(a), values(b), rtol=1e-6, atol=1e-7, equal_nan=True,
                                   err_msg=f"{a['case']} {a['method']} {a['variant']}")


def test_rows_equal_evaluate_case_called_directly(batch):
    """The oracle reads each case's files itself and lets the model predict on its own grid."""
    settings = settings_for(batch["card"])
    model = load_case_model(settings)
    config = dataclasses.replace(CONFIG, class_name="bright")
    expected = []
    for record in batch["cases"][:-1]:
        row = case_row(batch["out"], record["id"])
        image = read_case_images(row["images"], model.card)
        reference = read_image(row["reference"]) if row["reference"] else None
        rows, _ = evaluate_case(image, model, METHODS, reference, config, case=record["id"])
        expected.extend({"model": model.card.name, **row} for row in rows)
    written = csv_rows(batch["out"] / "evaluation" / "evaluation.csv")
    assert_same_rows(written, expected)
    assert_same_rows(batch["document"]["rows"], expected)
    # the per-voxel model's gradient is 1 on the predicted voxels, 0 elsewhere: the fidelity of the
    # gradient beats the random baseline's on every case
    by_key = {(r["case"], r["method"], r["variant"]): r for r in written}
    for case in FINISHED:
        assert float(by_key[case, "vanilla_gradient", "signed"]["fidelity"]) > float(
            by_key[case, "random", "signed"]["fidelity"])


def test_a_case_without_reference_has_nan_pointing_but_finite_fidelity(batch):
    rows = [r for r in csv_rows(batch["out"] / "evaluation" / "evaluation.csv") if r["case"] == "c03"]
    assert len(rows) == 4  # vanilla_gradient and random, signed and absolute
    for row in rows:
        assert row["pointing_auc"] == ""
        assert np.isfinite(float(row["fidelity"])) and np.isfinite(float(row["complexity"]))
    for row in csv_rows(batch["out"] / "evaluation" / "evaluation.csv"):
        if row["case"] != "c03":
            assert 0.0 <= float(row["pointing_auc"]) <= 1.0
    cases = {c["id"]: c for c in batch["document"]["cases"]}
    assert cases["c03"]["reference"] is None and not cases["c03"]["reference_used"]
    assert all(cases[i]["reference_used"] for i in FINISHED[:3])


def test_the_tables_list_every_finished_case_and_the_skipped_one(batch):
    out, document = batch["out"], batch["document"]
    written = json.loads((out / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))
    assert [c["id"] for c in written["cases"]] == FINISHED
    assert [c["prediction"] for c in written["cases"]] == ["case folder"] * 4  # the model did not predict again
    assert sorted({r["case"] for r in csv_rows(out / "evaluation" / "evaluation.csv")}) == FINISHED
    assert [(e["id"], e["status"]) for e in written["not_evaluated"]] == [("c04", "failed")]
    failure = json.loads((out / "failures" / "c04.json").read_text(encoding="utf-8"))
    assert written["not_evaluated"][0]["reason"] == failure["error"]
    assert written["config"] == json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(
        CONFIG, class_name="bright"))))
    assert written["methods"] == {"vanilla_gradient": {}, "random": {}}
    from SegXAILib.pipeline import resolve_model_card

    assert written["model_checksum"] == resolve_model_card(batch["card"]).checksum()
    summary = {(s["method"], s["variant"]): s for s in written["summary"]}
    assert summary["vanilla_gradient", "signed"]["cases"] == 4
    assert summary["vanilla_gradient", "signed"]["pointing_auc"]["n"] == 3  # c03 has no reference
    markdown = (out / "evaluation" / "evaluation.md").read_text(encoding="utf-8")
    assert "(4 cases)" in markdown and "| c04 | failed |" in markdown
    assert document["paths"] == [out / "evaluation" / f"evaluation.{ext}" for ext in ("md", "csv", "json")]


def test_the_written_prediction_gives_the_models_own_model_grid_target(tmp_path):
    """A card that reorients: the labels put back on the model grid are the model's argmax; a
    card that resamples predicts again."""
    from SegXAILib.batch.evaluate import _case_prediction

    for orientation, spacing, source in (("LPS", None, "case folder"), ("RAS", (2.0, 2.0, 2.0), "predicted again")):
        root = tmp_path / orientation
        card = write_voxelwise_card(root / "model", orientation=orientation, spacing=spacing)
        out = write_batch(root, card, count=1, references=0, broken=False)
        settings = settings_for(card)
        model = load_case_model(settings)
        case = read_case(out / "cases" / "c00")
        prediction, got = _case_prediction(case, model, settings)
        assert got == source
        expected = predict(case.image, model, settings)
        assert prediction.model_labels is not None and prediction.model_labels.shape == expected.model_labels.shape
        assert bool((prediction.model_labels == expected.model_labels).all())
        assert bool((prediction.model_masks == expected.model_masks).all())


def test_the_cohort_report_shows_the_tables(batch):
    out = batch["out"]
    html = cohort_report(out).read_text(encoding="utf-8")
    assert "Evaluation of attribution methods" in html
    assert 'href="evaluation/evaluation.md"' in html and 'href="evaluation/evaluation.csv"' in html
    shown = [t for t in tables(html) if t["rows"] and t["rows"][0][:2] == ["method", "F x 10 (signed)"]]
    assert len(shown) == 1
    header, *body = shown[0]["rows"]
    markdown = (out / "evaluation" / "evaluation.md").read_text(encoding="utf-8")
    for cells in body:
        assert "| " + " | ".join(cells) + " |" in markdown
    assert [cells[0] for cells in body] == ["vanilla_gradient", "random"]
    listed = [t for t in tables(html) if t["rows"] and t["rows"][0] == ["case", "status", "reason"]]
    assert [cells[0] for cells in listed[0]["rows"][1:]] == ["c04"]
    summary = json.loads((out / "cohort_report.json").read_text(encoding="utf-8"))
    assert summary["evaluation"]["evaluation.csv"] == "evaluation/evaluation.csv"


def test_two_workers_equal_the_in_process_run(batch, tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client

    in_process = csv_rows(batch["out"] / "evaluation" / "evaluation.csv")
    with local_cluster(2) as cluster, Client(cluster) as client:
        document = evaluate_batch(batch["out"], METHODS, CONFIG, client)
    assert all(not c["worker"].endswith(f":{os.getpid()}") for c in document["cases"])  # run on the workers
    assert [c["id"] for c in document["cases"]] == FINISHED
    assert_same_rows(csv_rows(batch["out"] / "evaluation" / "evaluation.csv"), in_process)


def test_the_command_writes_the_librarys_tables(batch, capsys):
    out = batch["out"]
    expected = csv_rows(out / "evaluation" / "evaluation.csv")
    (out / "evaluation" / "evaluation.csv").unlink()
    code = main(["-q", "batch-evaluate", str(out), "--methods", "vanilla_gradient", "--metrics", METRICS,
                 "--seed", "3", "--fidelity-step", "0.1", "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr()
    written = [out / "evaluation" / f"evaluation.{ext}" for ext in ("md", "csv", "json")]
    assert [Path(p) for p in printed.out.split()] == written
    assert "c04 (failed)" in printed.err
    assert_same_rows(csv_rows(out / "evaluation" / "evaluation.csv"), expected)


def files_under(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("options, named", [
    (["--methods", "no_such_method"], "no_such_method"),
    (["--methods", "vanilla_gradient", "--param", "vanilla_gradient.no_such=1"], "no_such"),
    (["--methods", "vanilla_gradient", "--metrics", "fidelity,bogus"], "--metrics"),
    (["--methods", "vanilla_gradient", "--class", "no_such_class"], "--class"),
    (["--methods", "vanilla_gradient", "--fidelity-step", "0.9"], "--fidelity-step"),
    (["--methods", "vanilla_gradient", "--baseline", "nan"], "--baseline"),
    (["--methods", "vanilla_gradient", "--workers", "-1"], "--workers"),
    (["--methods", "vanilla_gradient", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers"),
    (["--methods", "vanilla_gradient", "--device", "no_such_device", "--workers", "0"], "--device"),
])
def test_bad_options_exit_2_naming_the_option_with_nothing_written(batch, options, named, capsys):
    before = files_under(batch["out"])
    assert main(["-q", "batch-evaluate", str(batch["out"]), *options]) == 2
    assert named in capsys.readouterr().err
    assert files_under(batch["out"]) == before


def test_not_a_batch_folder_exits_2(tmp_path, capsys):
    assert main(["-q", "batch-evaluate", str(tmp_path / "nothere"), "--methods", "vanilla_gradient"]) == 2
    assert "BATCH_DIR" in capsys.readouterr().err
    assert main(["-q", "batch-evaluate", str(tmp_path), "--methods", "vanilla_gradient"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "evaluation").exists()
