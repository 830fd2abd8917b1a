"""Agg2Exp: RoI importance (mass accuracy), matrices, the global matrix, the top-k graph and
Isolation-Forest outliers.

Oracles: a map concentrated in one RoI gives a one-hot row; mass conservation (a row sums to
the share of the mass the RoIs cover, 1 for a partition); hand-made matrices for the global
mean and the graph; a planted anomalous case for the outlier model; and, end to end, a
per-voxel model whose class-target gradient is exactly the class mask (so its matrix is known).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_voxelwise_card
from SegXAILib.evaluation.agg2exp import (IMPORTANCE_VARIANTS, CaseImportance, ImportanceMatrix, OutlierModel,
                                          class_rois, draw_graph, global_matrix, local_matrix, roi_importance,
                                          spearman_with_dice, top_k_graph)
from SegXAILib.image import Image, SegXAIInputError


def partition(shape=(6, 5, 4)):
    labels = np.zeros(shape, dtype=np.int64)
    labels[2:4] = 1
    labels[4:] = 2
    return class_rois(labels, ["background", "a", "b"])


def test_a_map_inside_one_roi_gives_a_one_hot_row():
    rois = partition()
    rng = np.random.default_rng(0)
    attribution = np.zeros((2, 6, 5, 4))
    attribution[:, 2:4] = rng.normal(size=(2, 2, 5, 4))  # both channels, only inside "a"
    np.testing.assert_allclose(roi_importance(attribution, rois, "absolute"), [0.0, 1.0, 0.0])
    positive_only = np.abs(attribution)
    np.testing.assert_allclose(roi_importance(positive_only, rois, "positive"), [0.0, 1.0, 0.0])
    assert np.all(np.isnan(roi_importance(positive_only, rois, "negative")))  # no negative mass at all
    np.testing.assert_allclose(roi_importance(-positive_only, rois, "negative"), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("variant", ["absolute", "positive", "negative"])
def test_mass_conservation(variant):
    rois = partition()
    rng = np.random.default_rng(1)
    attribution = rng.normal(size=(2, 6, 5, 4))
    row = roi_importance(attribution, rois, variant)
    assert row.sum() == pytest.approx(1.0, abs=1e-12)  # the class regions partition the volume
    # RoIs covering part of the volume: the row sums to the covered share of the mass
    partial = {"a": rois["a"], "b": rois["b"]}
    mass = {"absolute": np.abs(attribution), "positive": np.maximum(attribution, 0),
            "negative": np.maximum(-attribution, 0)}[variant].sum(0)
    covered = mass[rois["a"] | rois["b"]].sum() / mass.sum()
    assert roi_importance(attribution, partial, variant).sum() == pytest.approx(covered, abs=1e-12)
    # hand check of one cell: |a| inside "b" over all |a|
    assert roi_importance(attribution, partial, variant)[1] == pytest.approx(mass[4:].sum() / mass.sum())
    with pytest.raises(SegXAIInputError):
        roi_importance(attribution, {"small": np.zeros((2, 2, 2), bool)}, variant)
    with pytest.raises(SegXAIInputError):
        roi_importance(attribution, rois, "squared")


def test_local_matrix_context_use_and_global_mean():
    rois = partition()
    maps = {"background": None, "a": np.where(rois["a"], 1.0, 0.0), "b": np.where(rois["b"] | rois["a"], 1.0, 0.0)}
    matrix = local_matrix(maps, rois)
    assert matrix.rows == ["background", "a", "b"] and matrix.columns == ["background", "a", "b"]
    assert np.all(np.isnan(matrix.row("background")))
    np.testing.assert_allclose(matrix.row("a"), [0, 1, 0])
    np.testing.assert_allclose(matrix.row("b"), [0, 0.5, 0.5])  # "a" and "b" have 40 voxels each
    context = matrix.context_use()
    assert context["a"] == 1.0 and context["b"] == 0.5 and np.isnan(context["background"])
    # global: mean over cases, a missing cell is left out of its mean; columns are the union
    other = ImportanceMatrix(["background", "a", "b"], ["background", "a", "b", "extra"],
                             np.array([[0.5, 0.25, 0.25, 0.1], [0.2, 0.6, 0.2, 0.0], [0.0, 0.3, 0.7, 1.0]]))
    cohort = global_matrix([matrix, other])
    assert cohort.columns == ["background", "a", "b", "extra"]
    np.testing.assert_allclose(cohort.row("background"), [0.5, 0.25, 0.25, 0.1])
    np.testing.assert_allclose(cohort.row("a"), [0.1, 0.8, 0.1, 0.0])
    np.testing.assert_allclose(cohort.row("b"), [0.0, 0.4, 0.6, 1.0])
    # JSON round trip
    again = ImportanceMatrix.from_dict(json.loads(json.dumps(cohort.to_dict())))
    np.testing.assert_array_equal(again.values, cohort.values)
    with pytest.raises(SegXAIInputError):
        global_matrix([matrix, ImportanceMatrix(["a"], ["a"], np.ones((1, 1)))])


def test_top_k_graph_and_drawing(tmp_path):
    matrix = ImportanceMatrix(["x", "y"], ["x", "y", "roi"], np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    graph = top_k_graph(matrix, k=1)
    assert [(e["source"], e["target"], e["weight"]) for e in graph["edges"]] == [("y", "x", 0.3), ("roi", "y", 0.3)]
    graph2 = top_k_graph(matrix, k=2, include_self=True)
    assert [(e["source"], e["target"], e["rank"]) for e in graph2["edges"]] == [
        ("x", "x", 1), ("y", "x", 2), ("y", "y", 1), ("roi", "y", 2)]
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["x"]["context_use"] == 0.5 and not nodes["roi"]["explained"]
    path = draw_graph(graph, tmp_path / "graph.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["graph.png"]  # atomic: no temporary left
    with pytest.raises(SegXAIInputError):
        top_k_graph(matrix, k=0)


def test_outlier_scores_flag_a_planted_anomaly_and_correlate_with_dice():
    rng = np.random.default_rng(2)
    rows, columns = ["background", "gland"], ["background", "gland", "rod"]

    def case(gland_row):
        return ImportanceMatrix(rows, columns, np.array([[0.9, 0.05, 0.05], gland_row]))

    reference = [case(rng.dirichlet([30, 60, 10])) for _ in range(40)]  # gland ~ (0.3, 0.6, 0.1)
    model = OutlierModel(n_estimators=100, seed=0).fit(reference)
    assert model.fitted_on == {"background": 40, "gland": 40}
    typical = [model.score(case(rng.dirichlet([30, 60, 10])))["gland"] for _ in range(8)]
    planted = model.score(case(np.array([0.05, 0.15, 0.8])))["gland"]  # relies on the rod
    # isolation-forest scores: ~0.5 typical, towards 1 isolated (saturating with 40 reference cases)
    assert planted > max(typical) + 0.05 and planted > 0.65
    # a class without a full row scores NaN
    missing = ImportanceMatrix(rows, columns, np.array([[0.9, 0.05, 0.05], [np.nan, np.nan, np.nan]]))
    assert np.isnan(model.score(missing)["gland"])
    # Spearman: a Dice that falls as the score rises gives rho = -1; NaN cases are left out
    scores = typical + [planted, np.nan]
    dice = [1.0 - s for s in scores[:-1]] + [0.5]
    result = spearman_with_dice(scores, dice)
    assert result["rho"] == pytest.approx(-1.0) and result["n"] == 9
    assert np.isnan(spearman_with_dice([0.1, 0.2], [0.3, 0.4])["rho"])
    nothing = ImportanceMatrix(rows, columns, np.full((2, 3), np.nan))
    with pytest.raises(SegXAIInputError):
        OutlierModel().fit([nothing, nothing])


def test_agg2exp_case_on_a_per_voxel_model(tmp_path):
    # logit_1 = x, logit_0 = 0 voxel by voxel: the class target of "bright" is sum of x over the
    # predicted voxels, so its vanilla gradient is exactly the class mask (one-hot row, context
    # use 1); background's target is a sum of zeros: no mass, a row of NaN. Through the case
    # pipeline: one prediction (start_case), then agg2exp_case
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import Agg2ExpSettings, CaseSettings, InstanceSettings, agg2exp_case, start_case

    card = write_voxelwise_card(tmp_path / "model")
    model = load_model(card, device="cpu")
    settings = CaseSettings(model=str(card), device="cpu", instances=InstanceSettings(enabled=False),
                            agg2exp=Agg2ExpSettings(enabled=True, method="vanilla_gradient"))
    rng = np.random.default_rng(3)
    array = rng.uniform(-1.0, -0.1, size=(1, 12, 10, 8)).astype(np.float32)
    array[0, 3:6, 2:5, 2:5] = 1.0
    image = Image(array, np.diag([1.5, 1.0, 2.0, 1.0]))
    truth = np.zeros((12, 10, 8), np.uint8)
    truth[3:6, 2:5, 2:6] = 1  # one slab more than the prediction
    user = np.zeros((12, 10, 8), np.uint8)
    user[4, 3, 3] = 1
    case = start_case(image, model, settings, reference=image.with_array(truth[None]))
    result = agg2exp_case(case, model, classes=None, rois={"user": user}, variants=IMPORTANCE_VARIANTS, name="c0",
                          keep_maps=True)
    assert result.case == "c0"
    matrix = result.matrices["absolute"]
    assert matrix.rows == ["background", "bright"]
    assert matrix.columns == ["background", "bright", "reference:bright", "user"]
    assert np.all(np.isnan(matrix.row("background")))
    np.testing.assert_allclose(matrix.row("bright"), [0.0, 1.0, 1.0, 1 / 27], atol=1e-7)
    assert result.matrices["positive"].context_use()["bright"] == pytest.approx(1.0)
    assert np.isnan(result.matrices["negative"].row("bright")).all()
    assert result.dice["bright"] == pytest.approx(2 * 27 / (27 + 36))
    assert set(result.maps) == {"background", "bright"} and result.maps["bright"].same_grid(image)
    assert not result.maps["background"].array.any()
    again = CaseImportance.from_dict(json.loads(json.dumps(result.to_dict(), default=str).replace("NaN", "null")))
    np.testing.assert_allclose(again.matrices["absolute"].row("bright"), matrix.row("bright"))
    with pytest.raises(SegXAIInputError):
        agg2exp_case(case, model, classes=["tumour"])
    with pytest.raises(SegXAIInputError):
        agg2exp_case(case, model, rois={"bright": user})
    with pytest.raises(SegXAIInputError):
        agg2exp_case(case, model, rois={"small": np.zeros((3, 3, 3))})


def test_matrix_figure_writes_every_cell():
    from matplotlib.figure import Figure

    from SegXAILib.evaluation import ImportanceMatrix, matrix_figure

    matrix = ImportanceMatrix(["background", "lesion"], ["background", "lesion", "white matter"],
                              np.array([[0.9, 0.05, 0.5], [np.nan, 0.25, 0.625]]))
    figure = matrix_figure(matrix, title="demo")
    assert isinstance(figure, Figure)
    texts = sorted(t.get_text() for t in figure.axes[0].texts)
    assert texts == sorted(["0.90", "0.05", "0.50", "n/a", "0.25", "0.62"])
