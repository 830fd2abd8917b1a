"""The browser viewer without a browser: its access token on real HTTP requests, the method
form's values, where lesions are in a slice view, and the app's actions on a real trame-slicer
scene (open a saved case, bad files, display changes, the uncertainty job with the per-voxel
model against ``estimate_uncertainty`` run here, a lesion's counterfactual with generators of
known R). The browser end to end is
``test_viewer_browser.py``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix
from SegXAILib.image import Image, SegXAIInputError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the token


def test_requests_without_the_token_are_refused():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from SegXAILib.viewer.security import COOKIE, new_token, token_middleware

    token = new_token()
    assert len(token) >= 32 and token != new_token()

    async def scenario():
        app = web.Application(middlewares=[token_middleware(token)])
        async def page(request):
            return web.Response(text="page")

        app.router.add_get("/index.html", page)
        app.router.add_get("/asset.js", page)
        async with TestClient(TestServer(app)) as client:
            refused = [await client.get(path) for path in ("/index.html", "/asset.js", "/index.html?secret=wrong",
                                                              f"/index.html?secret={token[:-1]}")]
            assert [r.status for r in refused] == [403, 403, 403, 403]
            assert "access token" in await refused[0].text()
            first = await client.get(f"/index.html?secret={token}", allow_redirects=False)
            assert first.status == 200 and await first.text() == "page"
            assert first.cookies[COOKIE].value == token and first.cookies[COOKIE]["httponly"]
            # the page's assets come with the cookie alone; a reload is sent back with the secret
            asset = await client.get("/asset.js")
            assert asset.status == 200
            reload = await client.get("/index.html", allow_redirects=False)
            assert reload.status == 302 and reload.headers["Location"] == f"/index.html?secret={token}"
        async with TestClient(TestServer(app)) as stranger:  # another client: no cookie
            assert (await stranger.get("/asset.js")).status == 403

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- pure functions


def test_method_form_values_take_their_parameters_kinds():
    from SegXAILib.attribution import check_params, method_specs
    from SegXAILib.viewer.app import parameter_values

    spec = next(s for s in method_specs() if s["name"] == "smoothgrad")
    values = parameter_values(spec, {"n_samples": "12", "noise_level": "0.25", "squared": "true", "seed": "",
                                     "batch_size": 3.0})
    assert values == {"n_samples": 12, "noise_level": 0.25, "squared": True, "batch_size": 3}
    assert check_params("smoothgrad", values) == values
    with pytest.raises(SegXAIInputError, match="'n_samples': expected int"):
        parameter_values(spec, {"n_samples": "2.5"})
    with pytest.raises(SegXAIInputError, match="'noise_level': expected float"):
        parameter_values(spec, {"noise_level": "lots"})


def test_lesion_targets_are_where_a_click_picks_the_lesion():
    """The oracle: ``instance_at`` (the pick's own lookup) at the RAS point under each reported
    target, on an oblique grid seen through an axial plane through lesion 1."""
    from types import SimpleNamespace

    from SegXAILib.instances import find_instances, instance_at
    from SegXAILib.viewer.app import lesion_targets

    labels = np.zeros((20, 18, 12), np.int32)
    labels[3:8, 4:9, 2:6] = 1
    labels[13:17, 10:15, 7:10] = 1
    image = Image(labels[None].astype(np.float32), grid_matrix("oblique"))
    ids, instances = find_instances(labels.astype(bool), grid=image)
    instance_labels = image.with_array(ids[None].astype(np.int32))
    case = SimpleNamespace(instance_labels=instance_labels, instances=instances)
    # an axial view (XY pixels of 0.5 mm) through lesion 1's centroid, 200 x 160 pixels
    centre = instances[0].centroid_ras
    xy_to_ras = np.array([[0.5, 0, 0, centre[0] - 50.0], [0, 0.5, 0, centre[1] - 40.0], [0, 0, 1, centre[2]],
                          [0, 0, 0, 1]])
    targets = {t["id"]: t for t in lesion_targets(case, xy_to_ras, (200, 160))}
    assert targets[1]["on_slice"] and targets[1]["x"] == pytest.approx(0.5) and targets[1]["y"] == pytest.approx(0.5)
    for target in targets.values():
        x, y = target["x"] * 200, (1.0 - target["y"]) * 160
        ras = (xy_to_ras @ np.array([x, y, 0.0, 1.0]))[:3]
        hit = instance_at(instance_labels, instance_labels, ras, radius_mm=0.0) if target["on_slice"] else None
        assert not target["on_slice"] or hit == target["id"]
    assert lesion_targets(None, xy_to_ras, (200, 160)) == []


# ---------------------------------------------------------------------------- the app, in process


@pytest.fixture(scope="module")
def viewer(quick_demo_case, tmp_path_factory):
    pytest.importorskip("trame_slicer")
    from SegXAILib.viewer.app import ViewerApp

    app = ViewerApp(tmp_path_factory.mktemp("viewer-jobs"), device="cpu", name="segxai-test-viewer")
    return app


def test_a_saved_case_opens_at_once_and_bad_files_leave_the_app_working(viewer, quick_demo_case, tmp_path):
    from SegXAILib.mrml import slice_composite_nodes, volume_node_to_image
    from SegXAILib.pipeline import read_case

    state = viewer.state
    expected = read_case(quick_demo_case)
    viewer.open(quick_demo_case)
    assert viewer.session.job is None  # nothing recomputed
    assert [row["id"] for row in state.lesions] == [row["id"] for row in expected.lesions]
    assert [row["voxels"] for row in state.lesions] == [row["voxels"] for row in expected.lesions]
    assert state.has_case and state.qa_band == expected.qa.summary_text() and state.qa_figure.startswith("data:image/png")
    first_map = next(iter(expected.maps))
    shown = viewer.session.nodes.saliency[first_map][0]
    assert all(c.GetForegroundVolumeID() == shown.GetID() for c in slice_composite_nodes(viewer.scene))
    version = state.overlay_version
    # the display changes re-show the map from the case (signed: the raw values)
    state.display = "signed"
    viewer._on_display()
    shown = viewer.session.nodes.saliency[first_map][0]
    assert np.array_equal(volume_node_to_image(shown).array[0], expected.maps[first_map].maps.array[0])
    assert state.overlay_version == version + 1
    viewer.jump_to_lesion(2)
    red = viewer.scene.GetSingletonNode("Red", "vtkMRMLSliceNode").GetSliceToRAS()
    assert np.allclose([red.GetElement(r, 3) for r in range(3)], expected.instances[1].centroid_ras)
    assert any(t["id"] == 2 and t["on_slice"] for t in state.lesion_targets)

    # a garbage image, a missing path, a bad parameter: clear errors, the app goes on
    garbage = tmp_path / "scan.nrrd"
    garbage.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n\x00\x01")
    state.open_path = str(garbage)
    viewer.ctrl.open()
    assert "scan.nrrd" in state.error
    state.open_path = str(tmp_path / "missing")
    viewer.ctrl.open()
    assert "missing" in state.error and "does not exist" in state.error
    state.method, state.method_params = "smoothgrad", {"n_samples": "many"}
    viewer.ctrl.explain()
    assert "n_samples" in state.error and not state.busy
    state.open_path = str(quick_demo_case)
    viewer.ctrl.open()
    assert state.error == "" and state.has_case


def test_segxai_view_refuses_bad_arguments(tmp_path):
    command = [sys.executable, "-c", "from SegXAILib.cli import main; raise SystemExit(main())", "view"]
    missing = subprocess.run(command + [str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert missing.returncode == 2 and "nothing" in missing.stderr and "no such" in missing.stderr
    port = subprocess.run(command + ["--port", "70000"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert port.returncode == 2 and "--port" in port.stderr
    generators = subprocess.run(command + ["--generators", str(tmp_path / "no-generators")], capture_output=True,
                                text=True, cwd=ROOT, timeout=120)
    assert generators.returncode == 2 and "--generators" in generators.stderr and "no-generators" in generators.stderr


# ---------------------------------------------------------------------------- uncertainty


def test_every_uncertainty_preset_is_a_valid_case_setting():
    """The viewer's presets: the sources of the menu's choice, the samples box counting only for
    the random ones, form text converted, a bad field named."""
    from SegXAILib.pipeline import CaseSettings
    from SegXAILib.uncertainty import SOURCES
    from SegXAILib.uncertainty import UNCERTAINTY_PRESETS, preset_settings as uncertainty_settings

    assert {"flips", "flips_all", "tta", "mc_dropout", "ensemble"} <= set(UNCERTAINTY_PRESETS)
    for preset, (_, sources, random) in UNCERTAINTY_PRESETS.items():
        chosen = uncertainty_settings(preset, samples="6", seed="2")
        settings = CaseSettings.from_dict({"uncertainty": chosen})
        assert settings.uncertainty.sources == sources
        assert settings.uncertainty.samples == (6 if random else None)
        # random: a source that draws random numbers; the others enumerate every combination
        assert random == any(SOURCES[name].stochastic for name in sources)
    with pytest.raises(SegXAIInputError, match="coin"):
        uncertainty_settings("coin")
    with pytest.raises(SegXAIInputError, match="samples: expected a whole number"):
        uncertainty_settings("tta", samples="2.5")
    with pytest.raises(SegXAIInputError, match="seed: expected a whole number"):
        uncertainty_settings("tta", seed="x")


def _finish(viewer, timeout: float = 300.0) -> None:
    """Poll as the server's loop does until the job has ended and its results are shown."""
    import time

    deadline = time.monotonic() + timeout
    viewer.poll()
    while viewer.state.busy:
        assert time.monotonic() < deadline, f"the job did not end within {timeout} s: {viewer.state.status}"
        time.sleep(0.05)
        viewer.poll()


@pytest.fixture(scope="module")
def voxel_case(viewer, tmp_path_factory):
    """The per-voxel model (class 1 where the input > 50, conftest's) and an image of two bright
    lesions on an oblique grid, opened as a file and segmented by the viewer's engine job."""
    from conftest import write_voxelwise_card
    from SegXAILib.io import write_image

    folder = tmp_path_factory.mktemp("voxel-case")
    card = write_voxelwise_card(folder / "model", orientation=None, threshold=50.0, patch=(8, 8, 8))
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 1.0  # lesion 1 (48 voxels)
    bright[8:10, 6:9, 5:7] = 1.0  # lesion 2 (12 voxels)
    bright *= np.random.default_rng(7).uniform(60.0, 140.0, bright.shape).astype(np.float32)
    path = write_image(Image(bright[None], grid_matrix("oblique")), folder / "scan.nrrd")
    viewer.session.forget()  # the module's viewer showed the demo case: a new image, a new case
    viewer.volumes = []
    viewer.state.model = str(card)
    viewer.open(path)
    viewer.segment()
    _finish(viewer)
    assert viewer.state.error == "" and [row["voxels"] for row in viewer.state.lesions] == [48, 12]
    return card, path


def test_uncertainty_runs_as_a_job_and_shows_the_api_entropy(viewer, voxel_case):
    """Intensity TTA (gamma and noise, 4 samples, seed 3) through the viewer's job flow: the
    entropy overlay equals ``estimate_uncertainty`` run here on the same image and prediction;
    the summary and the lesion rows carry the case's values; a refused source is named in the
    error; the job's case folder opens with its uncertainty shown."""
    from SegXAILib import mrml
    from SegXAILib.io import read_image
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.uncertainty import estimate_uncertainty

    card, path = voxel_case
    state = viewer.state
    assert not state.has_uncertainty and state.uncertainty_summary == {}
    state.uncertainty_source = "tta"
    viewer._on_uncertainty_source(state.uncertainty_source)
    assert state.uncertainty_random
    state.uncertainty_samples, state.uncertainty_seed = "4", "3"  # as the form's text fields give them
    version = state.overlay_version
    viewer.ctrl.uncertainty()
    assert state.error == "" and state.busy and state.status.startswith("uncertainty")
    _finish(viewer)
    assert state.error == "" and state.status.startswith("uncertainty: done")
    case = viewer.session.case
    case_dir = viewer.session.job.case_dir

    model = load_model(load_model_card(card), device="cpu")
    direct = estimate_uncertainty(read_image(path), model, sources={"gamma": {}, "noise": {}}, samples=4, seed=3,
                                  prediction=case.segmentation)
    assert float(direct.mutual_information.array.max()) > 0.01  # the samples disagree somewhere
    entropy = viewer.session.nodes.uncertainty["predictive_entropy"][0]
    assert all(c.GetForegroundVolumeID() == entropy.GetID() for c in mrml.slice_composite_nodes(viewer.scene))
    # same code, same inputs, one thread each: the only order-dependent step is the noise's channel
    # standard deviation (a reduction: a few float32 ulps of the noise scale, ~1e-5 of a logit at
    # these intensities), and the entropy moves by at most 0.23 x the logit's change
    np.testing.assert_allclose(mrml.volume_node_to_image(entropy).array[0], direct.predictive_entropy.array[0],
                               rtol=0, atol=1e-5)
    assert state.uncertainty_shown and state.has_uncertainty and state.overlay_version == version + 1

    # the summary: the structure's row (3 decimals on the page)
    summary = state.uncertainty_summary
    structure = direct.structures[0]
    assert summary["samples"] == 4 and summary["sources"] == "gamma, noise" and summary["structure"] == "bright"
    for key in ("mean_entropy", "pairwise_dice", "soft_dice_confidence"):
        assert summary[key] == pytest.approx(getattr(structure, key), abs=5e-4 + 1e-5), key
        assert f"{summary[key]:.3f}" in summary["text"]
    # the lesion rows: each lesion's values, as the case's lesion table has them
    rows = {row["id"]: row for row in state.lesions}
    assert sorted(rows) == [1, 2]
    for lesion in case.lesions:
        for key, value in lesion["uncertainty"].items():
            shown = rows[lesion["id"]][f"uncertainty_{key}"]
            assert (shown is None) if value is None else shown == pytest.approx(value, abs=5e-4), (lesion["id"], key)
    assert rows[1]["uncertainty_mean_entropy"] is not None and rows[2]["uncertainty_pairwise_dice"] is not None

    # bad form values and a refused source: named in state.error, never an exception
    state.uncertainty_samples = "many"
    viewer.ctrl.uncertainty()
    assert "samples" in state.error and "many" in state.error and not state.busy
    state.uncertainty_samples = "1"
    viewer.ctrl.uncertainty()
    assert "uncertainty.samples" in state.error and not state.busy
    state.uncertainty_source = "flips"  # the per-voxel model's card has no mirror axes
    viewer.ctrl.uncertainty()
    assert state.error == "" and state.busy
    _finish(viewer)
    assert "flips" in state.error and "mirror" in state.error and state.status == "uncertainty: failed"
    assert state.has_uncertainty and state.uncertainty_shown  # the last result stays

    # the uncertainty job's case folder, opened: the entropy in front, the summary, the lesion values
    state.update({"uncertainty_summary": {}, "lesions": [], "uncertainty_shown": False})
    last_job = viewer.session.job
    state.open_path = str(case_dir)
    viewer.ctrl.open()
    assert state.error == "" and viewer.session.job is last_job  # shown at once, nothing recomputed
    assert state.has_uncertainty and state.uncertainty_shown and state.uncertainty_summary == summary
    assert {row["id"]: row for row in state.lesions} == rows
    shown = viewer.session.nodes.uncertainty["predictive_entropy"][0]
    assert all(c.GetForegroundVolumeID() == shown.GetID() for c in mrml.slice_composite_nodes(viewer.scene))
    np.testing.assert_allclose(mrml.volume_node_to_image(shown).array[0], direct.predictive_entropy.array[0],
                               rtol=0, atol=1e-5)


def test_a_refused_long_computation_is_asked_and_runs_confirmed(viewer, voxel_case, monkeypatch):
    """Explain under a 0.6 ms limit: the job is refused before it starts, ``cost_refusal`` (what
    the page's confirm shows) carries the estimate; confirmed, the same request runs with no
    limit and shows the map the library gives with no limit; the limit stays for later jobs."""
    from SegXAILib import mrml
    from SegXAILib.attribution import explain
    from SegXAILib.io import read_image
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.models.memory import MAX_MINUTES_ENV

    card, path = voxel_case
    state = viewer.state
    monkeypatch.setitem(viewer.session.env, MAX_MINUTES_ENV, "0.00001")  # what --max-minutes 0.00001 sets
    state.method, state.target = "guided_backprop", "class"
    viewer._on_method(state.method)  # the form's defaults: aggregation per_voxel
    viewer.ctrl.explain()
    assert state.error == "" and state.busy
    _finish(viewer)
    assert state.cost_refusal and state.cost_refusal == state.error and "not started" in state.status
    assert "per-voxel maps: 60 sample(s)" in state.cost_refusal and "over the time limit" in state.cost_refusal
    assert 'aggregation="target"' in state.cost_refusal
    viewer.ctrl.confirm_long()  # what the page triggers when the user accepts
    assert state.error == "" and state.busy and state.cost_refusal == ""
    assert viewer.session.env[MAX_MINUTES_ENV] == "0.00001"  # confirmed for that job only
    _finish(viewer)
    assert state.error == "" and state.status.startswith("explain: done"), state.error
    assert viewer.session.job.status.estimate.startswith("per-voxel maps: 60 sample(s)")
    shown = mrml.volume_node_to_image(viewer.session.nodes.saliency["guided_backprop"][0]).array[0]
    direct = explain(read_image(path), load_model(load_model_card(card), device="cpu"), "guided_backprop")
    expected = direct.maps.array[0]
    np.testing.assert_allclose(shown, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


# ---------------------------------------------------------------------------- counterfactuals


@pytest.fixture(scope="module")
def counterfactual_case(viewer, tmp_path_factory):
    """``test_case_counterfactual``'s per-voxel model (lesion logit x - 2) and phantom on an
    oblique grid, opened as a file and segmented by the viewer's engine job; generators of
    known behaviour: G+ adds 0.5 scale, G- subtracts 0.25 scale on the patch (so R = 0.75
    scale there, 0 elsewhere), and the same pair trained for another model."""
    from test_case_counterfactual import GEOMETRY, THRESHOLD, make_generators, phantom
    from conftest import write_voxelwise_card
    from SegXAILib.io import write_image

    folder = tmp_path_factory.mktemp("counterfactual-case")
    card = write_voxelwise_card(folder / "model", orientation="RAS", threshold=THRESHOLD, patch=GEOMETRY.context_size)
    (folder / "constant").mkdir()
    make_generators(0.5, -0.25).save(folder / "constant" / "generators.pt")
    other = make_generators(0.5, -0.25, model_name="another-model").save(folder / "other.pt")
    image = phantom(6, grid="oblique")
    path = write_image(image, folder / "scan.nrrd")
    viewer.session.forget()
    viewer.volumes = []
    viewer.state.model = str(card)
    viewer.open(path)
    viewer.segment()
    _finish(viewer)
    assert viewer.state.error == "" and len(viewer.session.case.instances) >= 2
    return {"image": image, "constant": folder / "constant", "other": other, "folder": folder}


def test_counterfactual_runs_as_a_job_and_shows_r(viewer, counterfactual_case):
    """The selected lesion's counterfactual through the viewer's job flow: R is the overlay and
    equals the known R (0.75 scale on the patch, 0 elsewhere) on the input grid; the summary
    carries the case's scores; no lesion, no generators file and generators of another model
    are named in ``state.error``; the job's case folder opens with R in front again."""
    from test_case_counterfactual import SCALE
    from SegXAILib import mrml

    state = viewer.state
    image = counterfactual_case["image"]
    assert state.counterfactual_ids == [] and state.counterfactual_summary == {} and state.lesion_selected == 0
    state.counterfactual_generators = str(counterfactual_case["constant"])
    viewer.ctrl.counterfactual()  # no lesion selected yet
    assert "no lesion selected" in state.error and not state.busy
    viewer.jump_to_lesion(1)  # a row of the lesion table
    assert state.lesion_selected == 1
    state.counterfactual_generators = str(counterfactual_case["folder"] / "missing")
    viewer.ctrl.counterfactual()
    assert "counterfactual.generators" in state.error and "missing" in state.error and not state.busy

    state.counterfactual_generators = str(counterfactual_case["constant"])
    version = state.overlay_version
    viewer.ctrl.counterfactual()
    assert state.error == "" and state.busy and state.status.startswith("counterfactual")
    _finish(viewer)
    assert state.error == "" and state.status.startswith("counterfactual: done")
    case_dir = viewer.session.job.case_dir
    case = viewer.session.case
    result = case.counterfactuals[1]
    labels = case.instance_labels.array[0]
    patch = result.patch.array[0].astype(bool)
    assert patch.any() and patch[labels == 1].any()  # the patch is around lesion 1

    relevance_node = viewer.session.nodes.counterfactual[1]["relevance"][0]
    assert all(c.GetForegroundVolumeID() == relevance_node.GetID() for c in mrml.slice_composite_nodes(viewer.scene))
    shown = mrml.volume_node_to_image(relevance_node)
    np.testing.assert_allclose(shown.array[0][patch], 0.75 * SCALE, rtol=1e-6)
    assert float(np.abs(shown.array[0][~patch]).max()) == 0.0
    np.testing.assert_array_equal(shown.array, result.relevance.array)
    np.testing.assert_allclose(shown.ijk_to_ras, image.ijk_to_ras, rtol=0, atol=1e-9)
    plus = mrml.volume_node_to_image(viewer.session.nodes.counterfactual[1]["plus"][0]).array[0]
    np.testing.assert_allclose(plus[patch], image.array[0][patch] + 0.5 * SCALE, rtol=1e-6)
    assert state.counterfactual_shown == 1 and state.counterfactual_ids == [1] and state.instance_shown == 0
    assert state.overlay_version == version + 1 and not state.uncertainty_shown

    summary = state.counterfactual_summary
    assert summary["id"] == 1
    for key in ("original", "plus", "minus"):  # 3 decimals on the page
        assert summary[key] == pytest.approx(result.scores[key], abs=5e-4 + 1e-9), key
        assert f"{result.scores[key]:.3f}" in summary["text"]
    # G+ adds 0.5 scale, G- subtracts 0.25 scale to a per-voxel logit: the mean logit moves as much
    assert summary["plus"] - summary["original"] == pytest.approx(0.5 * SCALE, abs=1e-3 + 1e-5)
    assert summary["original"] - summary["minus"] == pytest.approx(0.25 * SCALE, abs=1e-3 + 1e-5)

    # the threshold slider re-shows R (signed whatever the display), nothing recomputed
    last_job = viewer.session.job
    state.threshold = 0.5
    viewer._on_display()
    again = viewer.session.nodes.counterfactual[1]["relevance"][0]
    np.testing.assert_array_equal(mrml.volume_node_to_image(again).array, result.relevance.array)
    assert viewer.session.job is last_job and state.counterfactual_shown == 1

    # generators of another model: the engine refuses them, the error names the field
    state.counterfactual_generators = str(counterfactual_case["other"])
    viewer.ctrl.counterfactual()
    assert state.error == "" and state.busy
    _finish(viewer)
    assert "counterfactual.generators" in state.error and "another-model" in state.error
    assert state.status == "counterfactual: failed" and state.counterfactual_shown == 1  # the last result stays

    # the counterfactual job's case folder, opened: R in front, the summary, nothing recomputed
    state.update({"counterfactual_summary": {}, "counterfactual_ids": [], "counterfactual_shown": 0})
    failed_job = viewer.session.job
    state.open_path = str(case_dir)
    viewer.ctrl.open()
    assert state.error == "" and viewer.session.job is failed_job
    assert state.counterfactual_shown == 1 and state.counterfactual_ids == [1] and state.counterfactual_summary == summary
    reopened = viewer.session.nodes.counterfactual[1]["relevance"][0]
    assert all(c.GetForegroundVolumeID() == reopened.GetID() for c in mrml.slice_composite_nodes(viewer.scene))
    np.testing.assert_allclose(mrml.volume_node_to_image(reopened).array, result.relevance.array, rtol=0, atol=0)
    assert state.lesion_selected == 0
    viewer.ctrl.show_counterfactual()  # the first computed one (no lesion selected)
    assert state.error == "" and state.counterfactual_shown == 1
