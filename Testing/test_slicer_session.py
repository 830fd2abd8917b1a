"""The Slicer panel's job flow headless (slicer-core, no Qt): each action runs in the engine
process (:class:`SegXAILib.pipeline.EngineJob`), its results come back as nodes through
:class:`SegXAILib.mrml.session.CaseSession`.

Oracles: the per-voxel model's exact prediction (label = channel 0 > 50), the attribution API
run in this process on the same image, the input volume's own IJK-to-RAS matrix (oblique and
flipped grids), and the operating system's view of the process group after a cancel."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.pipeline import CaseSettings, EngineJob, JobStatus
from SegXAILib.pipeline.job import KILL_AFTER_S

slicer = pytest.importorskip("slicer")

ENV = {"OMP_NUM_THREADS": "1"}


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def live_group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that still run (zombies left to a container's init that
    does not reap them are not running); Linux's /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture(scope="module")
def model_card(tmp_path_factory):
    return write_voxelwise_card(tmp_path_factory.mktemp("model") / "model", orientation=None, threshold=50.0,
                                in_channels=2, patch=(8, 8, 8))


def make_case(card, grid: str):
    """Two input volumes (lesions bright in A; B the complement) in a new headless scene."""
    from SegXAILib import mrml

    scene = mrml.headless_scene()
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 1.0  # lesion 1 (48 voxels)
    bright[8:10, 6:9, 5:7] = 1.0  # lesion 2 (12 voxels)
    bright *= np.random.default_rng(7).uniform(60.0, 140.0, bright.shape).astype(np.float32)
    dark = 100.0 - bright
    matrix = grid_matrix(grid)
    volumes = [mrml.image_to_volume_node(Image(a[None], matrix), scene, name) for a, name in ((bright, "A"), (dark, "B"))]
    return scene, volumes, bright > 50, Image(np.stack([bright, dark]), matrix, ("ch0", "ch1"))


def session_for(scene, tmp_path):
    from SegXAILib.mrml.session import CaseSession

    return CaseSession(scene, tmp_path / "jobs", env=ENV)


def settings(card, **fields) -> CaseSettings:
    """Settings of the per-voxel model; no instance map unless ``instances`` names some (as the
    panel's ``caseSettings``)."""
    fields["instances"] = {"ids": [], **fields.get("instances", {})}
    return CaseSettings.from_dict({"model": str(card), "device": "cpu", **fields})


def finish(session, timeout=300.0):
    update = session.wait(timeout)
    assert update.finished
    return update


def test_the_panel_flow_runs_in_engine_processes_and_shows_exact_nodes(model_card, tmp_path):
    """Segment -> explain -> explain again -> click a lesion -> its instance map -> QA, each a
    separate engine process; the nodes sit on the input volume's exact grid."""
    from SegXAILib import mrml
    from SegXAILib.attribution import explain
    from SegXAILib.models import load_model, load_model_card

    scene, volumes, truth, image = make_case(model_card, "oblique")
    session = session_for(scene, tmp_path)
    session.segment(volumes, settings(model_card))
    assert session.busy
    with pytest.raises(SegXAIInputError, match="segment job is running"):  # one job at a time
        session.explain(settings(model_card, methods=[{"method": "vanilla_gradient"}]))
    update = finish(session)
    assert update.state == "done" and update.error == "" and not session.busy
    reference = ijk_to_ras(volumes[0])
    grid_image = mrml.volume_node_to_image(volumes[0])
    assert np.array_equal(mrml.segment_mask(session.nodes.segmentation, "bright", grid_image), truth)
    assert mrml.table_node_columns(session.nodes.lesion_table)["voxels"] == [48, 12]
    pid = session.job.pid
    assert pid != os.getpid()  # computed in another process

    # explain: the map equals the attribution API's, here, on the same image (float32 exact
    # through the NRRD files), on the input volume's exact grid
    model = load_model(load_model_card(model_card), device="cpu")
    session.explain(settings(model_card, methods=[{"method": "vanilla_gradient"}]), display="signed")
    assert finish(session).state == "done"
    direct = explain(image, model, "vanilla_gradient", target="class:bright", params={})
    shown = session.nodes.saliency["vanilla_gradient"]
    for channel, node in enumerate(shown):
        assert np.array_equal(ijk_to_ras(node), reference)
        assert np.array_equal(mrml.volume_node_to_image(node).array[0], direct.maps.array[channel])
    assert all(c.GetForegroundVolumeID() == shown[0].GetID() for c in mrml.slice_composite_nodes(scene))
    assert session.job.pid != pid

    # explaining again under the same name shows the new map (defect 7), replacing the old one
    session.explain(settings(model_card, methods=[{"method": "gradient_x_input", "label": "vanilla_gradient"}]),
                    display="signed")
    assert finish(session).state == "done"
    again = session.nodes.saliency["vanilla_gradient"][0]
    assert all(c.GetForegroundVolumeID() == again.GetID() for c in mrml.slice_composite_nodes(scene))
    times_input = explain(image, model, "gradient_x_input", target="class:bright", params={})
    assert np.array_equal(mrml.volume_node_to_image(again).array[0], times_input.maps.array[0])
    assert not np.array_equal(times_input.maps.array[0], direct.maps.array[0])
    assert scene.GetNodesByName("SegXAI vanilla_gradient ch0").GetNumberOfItems() == 1  # replaced, not added

    # a click on lesion 2 -> its instance map, centred on it
    click = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    click.AddControlPointWorld(*session.case.instances[1].centroid_ras.tolist())
    assert session.instance_at(click) == 2
    session.instance_map(2, settings(model_card, instances={"n_samples": 2, "aggregations": ["mean"]}))
    assert finish(session).state == "done"
    lesion = session.nodes.instance_saliency[2][0]
    assert np.array_equal(ijk_to_ras(lesion), reference)
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceNode").GetSliceToRAS()
    assert np.allclose([red.GetElement(r, 3) for r in range(3)], session.case.instances[1].centroid_ras)
    # the click job started from the segmentation's saved prediction: no whole-volume prediction,
    # and its map is bit for bit that of a job that predicts anew
    jobs_dir = tmp_path / "jobs"
    segmented = next(p for p in sorted(jobs_dir.iterdir()) if p.name.endswith("-segment")) / "case"
    assert session.job.saved_case == segmented.resolve() and "--case" in session.job.command()
    steps = {json.loads(line).get("step") for line in session.job.log_path.read_text().splitlines()}
    assert "instance maps" in steps and "segment" not in steps
    anew = EngineJob(session.job.settings, session.inputs, tmp_path / "anew", env=ENV).start()
    assert anew.wait(300).state == "done"
    assert "segment" in {json.loads(line).get("step") for line in anew.log_path.read_text().splitlines()}
    # (the shown node is normalised for display: the job's case folders are compared)
    mine, theirs = session.job.case().instance_maps[2]["mean"].array, anew.case().instance_maps[2]["mean"].array
    assert np.abs(mine).max() > 0 and np.array_equal(mine, theirs)
    with pytest.raises(SegXAIInputError, match="instance 3"):
        session.instance_map(3, settings(model_card))

    # QA: the EC curve of the map (no risk model)
    session.qa(settings(model_card, methods=[{"method": "vanilla_gradient"}], qa={"method": "vanilla_gradient"}))
    assert finish(session).state == "done"
    assert mrml.table_node_columns(session.nodes.qa_table)["band"] == ["no risk model"]
    assert session.nodes.chart.GetNumberOfPlotSeriesNodes() == 1
    # every job folder holds its settings and a verified case folder
    jobs = sorted(p for p in (tmp_path / "jobs").iterdir())
    assert len(jobs) == 5
    for job in jobs:
        assert (job / "settings.json").is_file() and (job / "case" / "case.json").is_file()

    # a saved case folder opens in a new scene at once (no job), with the same nodes, and the
    # next action runs on its recorded inputs
    other = mrml.headless_scene()
    reopened = session_for(other, tmp_path / "again")
    case = reopened.open(session.job.case_dir)  # the QA job's folder: its map, QA and lesions
    assert reopened.job is None and case.qa is not None
    volume = other.GetFirstNodeByName("SegXAI ch0")
    assert np.array_equal(mrml.volume_node_to_image(volume).array[0], image.array[0])
    assert np.array_equal(mrml.segment_mask(reopened.nodes.segmentation, "bright", grid_image), truth)
    assert np.array_equal(mrml.volume_node_to_image(reopened.nodes.saliency["vanilla_gradient"][1]).array[0],
                          direct.maps.array[1])
    assert mrml.table_node_columns(reopened.nodes.lesion_table)["voxels"] == [48, 12]
    reopened.instance_map(1, settings(model_card, instances={"n_samples": 1, "aggregations": ["mean"]}))
    assert finish(reopened).state == "done" and sorted(reopened.nodes.instance_saliency) == [1]
    assert reopened.job.saved_case == session.job.case_dir.resolve()


def test_uncertainty_runs_in_the_engine_and_shows_the_api_numbers(model_card, tmp_path):
    """Segment -> uncertainty (noise test-time augmentation): the entropy and mutual-information
    volumes equal ``estimate_uncertainty`` run here on the same image and prediction, on the
    input volume's exact grid; the tables carry the per-structure and per-lesion values."""
    import math

    from SegXAILib import mrml
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.mrml.logic import UNCERTAINTY_VOLUMES
    from SegXAILib.uncertainty import estimate_uncertainty

    scene, volumes, _, image = make_case(model_card, "lps_flipped")
    session = session_for(scene, tmp_path)
    session.segment(volumes, settings(model_card))
    finish(session)
    chosen = settings(model_card, uncertainty={"sources": {"noise": {"std": 10.0}}, "samples": 4, "seed": 5})
    session.uncertainty(chosen)
    assert finish(session).state == "done"
    model = load_model(load_model_card(model_card), device="cpu")
    direct = estimate_uncertainty(image, model, sources={"noise": {"std": 10.0}}, samples=4, seed=5,
                                  prediction=session.case.segmentation)
    assert float(direct.mutual_information.array.max()) > 0.01  # the noise moves voxels across 50
    reference = ijk_to_ras(volumes[0])
    for map_name in UNCERTAINTY_VOLUMES:
        node = session.nodes.uncertainty[map_name][0]
        assert np.array_equal(ijk_to_ras(node), reference)
        np.testing.assert_array_equal(mrml.volume_node_to_image(node).array[0], getattr(direct, map_name).array[0])
        display = node.GetDisplayNode()
        assert display.GetWindowLevelMax() == pytest.approx(math.log(2))  # the entropy's bound for 2 classes
    foreground = session.nodes.uncertainty["predictive_entropy"][0].GetID()
    assert all(c.GetForegroundVolumeID() == foreground for c in mrml.slice_composite_nodes(scene))
    table = mrml.table_node_columns(session.nodes.uncertainty_table)
    assert table["structure"] == ["bright"]
    assert table["mean_entropy"] == pytest.approx([direct.structures[0].mean_entropy])
    lesions = mrml.table_node_columns(session.nodes.lesion_table)
    assert lesions["voxels"] == [48, 12]
    assert lesions["uncertainty pairwise_dice"] == pytest.approx([row.pairwise_dice for row in direct.instances])
    # the job's case folder opens with the same volumes
    other = mrml.headless_scene()
    reopened = session_for(other, tmp_path / "again")
    reopened.open(session.job.case_dir)
    again = reopened.nodes.uncertainty["mutual_information"][0]
    np.testing.assert_array_equal(mrml.volume_node_to_image(again).array[0], direct.mutual_information.array[0])


def test_cancel_ends_the_process_tree_and_the_session_stays_ready(model_card, tmp_path):
    scene, volumes, _, _ = make_case(model_card, "oblique")
    session = session_for(scene, tmp_path)
    session.env["SEGXAI_MAX_MINUTES"] = "0"  # deliberately long jobs: no time limit
    session.segment(volumes, settings(model_card))
    finish(session)
    # an instance map of 10^6 samples, one backward each: far longer than this test
    session.instance_map(1, settings(model_card, instances={"n_samples": 1000000, "batch_size": 1,
                                                            "aggregations": ["mean"]}))
    try:
        deadline = time.monotonic() + 120
        while session.poll().status.step != "instance maps" and time.monotonic() < deadline:
            time.sleep(0.05)
        status = session.job.status
        assert status.state == "running" and status.fraction > 0.0 and status.step == "instance maps"
    except BaseException:
        session.cancel()  # a failure here must not leave a job of 10^6 samples running after the test
        raise
    pid = session.job.pid
    started = time.monotonic()
    session.cancel()
    update = finish(session, timeout=30)
    seconds = time.monotonic() - started
    print(f"cancel: the process tree ended after {seconds:.2f} s")
    assert update.state == "cancelled" and update.status.exit_code is not None
    # the kill after KILL_AFTER_S bounds it whatever the engine does; one poll interval on top
    assert seconds < KILL_AFTER_S + 1.0
    if Path("/proc/self/stat").exists():
        assert live_group_members(pid) == []  # nothing of the process tree runs
    case_dir = session.job.case_dir
    assert not (case_dir / "case.json").exists()  # nothing half-written: no manifest
    assert not [p for p in case_dir.rglob(".*") if p.is_file()]  # no temporary file left
    assert 1 not in session.case.instance_maps and session.nodes.instance_saliency == {}
    # ready for the next action
    session.explain(settings(model_card, methods=[{"method": "vanilla_gradient"}]))
    assert finish(session).state == "done"


def test_a_failing_job_reports_why_and_leaves_the_session_ready(model_card, tmp_path):
    from SegXAILib import mrml

    scene, volumes, _, _ = make_case(model_card, "oblique")
    session = session_for(scene, tmp_path)
    session.segment(volumes, settings(model_card))
    finish(session)
    missing = tmp_path / "no-such-risk.json"
    session.qa(settings(model_card, qa={"risk_model": str(missing)}))
    update = finish(session)
    assert update.state == "failed" and update.status.exit_code == 2
    assert "no-such-risk.json" in update.error  # the engine's message, naming the file
    assert not session.busy and session.case is not None and session.case.qa is None
    assert session.nodes.qa_table is None
    # the panel goes on
    session.explain(settings(model_card, methods=[{"method": "vanilla_gradient"}]))
    assert finish(session).state == "done"
    assert len(session.nodes.saliency["vanilla_gradient"]) == 2
    # a case folder that cannot be read back is a failure too, never a silent success
    session.explain(settings(model_card, methods=[{"method": "gradient_x_input"}]))
    while not session.job.poll().finished:
        time.sleep(0.05)
    (session.job.case_dir / "maps" / "gradient_x_input_ch0.nrrd").write_bytes(b"broken")
    update = session.poll()  # the session sees the job's end once, and reads its folder then
    assert update.finished and update.state == "failed" and "gradient_x_input_ch0" in update.error
    assert "gradient_x_input" not in session.nodes.saliency
    assert mrml.table_node_columns(session.nodes.lesion_table)["voxels"] == [48, 12]


def test_closing_the_scene_cancels_and_drops_the_results(model_card, tmp_path):
    scene, volumes, _, _ = make_case(model_card, "oblique")
    session = session_for(scene, tmp_path)
    session.env["SEGXAI_MAX_MINUTES"] = "0"  # a deliberately long job: no time limit
    session.segment(volumes, settings(model_card, instances={"n_samples": 1000000, "batch_size": 1, "ids": [1]}))
    session.close()
    assert session.case is None
    update = finish(session, timeout=30)
    assert update.state == "cancelled"
    assert session.case is None and session.nodes is None
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_the_logic_runs_a_whole_case_through_the_engine(model_card, tmp_path):
    """``SegXAILogic.process`` (console, scripts) is one engine job: the same numbers as the
    attribution API here."""
    import importlib.util

    from SegXAILib import mrml
    from SegXAILib.attribution import explain
    from SegXAILib.models import load_model, load_model_card

    spec = importlib.util.spec_from_file_location("SegXAI", Path(__file__).parent.parent / "SegXAI" / "SegXAI.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scene, volumes, truth, image = make_case(model_card, "lps_flipped")
    logic = module.SegXAILogic(scene, workFolder=str(tmp_path / "jobs"), env=ENV)
    nodes = logic.process(volumes, model=model_card, methods=["gradient_x_input"], instances=[2], device="cpu")
    assert logic.session.job.pid != os.getpid()
    for node in (nodes.saliency["gradient_x_input"][0], nodes.instance_saliency[2][0]):
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(volumes[0]))  # flipped axes, exact
    direct = explain(image, load_model(load_model_card(model_card), device="cpu"), "gradient_x_input",
                     target="class:bright", params={})
    assert np.array_equal(mrml.volume_node_to_image(nodes.saliency["gradient_x_input"][1]).array[0],
                          direct.maps.array[1])
    assert sorted(nodes.instance_saliency) == [2]
    with pytest.raises(SegXAIInputError, match="failed.*no-such"):
        logic.process(volumes, model=model_card, riskModel=str(tmp_path / "no-such.json"), device="cpu")


# ---------------------------------------------------------------------------- EngineJob alone


def test_a_job_that_ignores_the_terminate_signal_is_killed(tmp_path, model_card):
    """The kill after KILL_AFTER_S: an "engine" that ignores SIGTERM (a shell that traps it)."""
    if os.name == "nt":
        pytest.skip("POSIX signals")
    stubborn = tmp_path / "stubborn-python"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nwhile true; do sleep 0.1; done\n", encoding="utf-8")
    stubborn.chmod(0o755)
    image = tmp_path / "image.nrrd"
    image.write_bytes(b"unused")
    job = EngineJob(settings(model_card), [image], tmp_path / "job", python=str(stubborn)).start()
    time.sleep(0.3)
    assert job.poll().state == "running"
    started = time.monotonic()
    job.cancel()
    status = job.wait(timeout=30, interval=0.05)
    seconds = time.monotonic() - started
    assert status.state == "cancelled" and status.exit_code == -signal.SIGKILL
    assert KILL_AFTER_S <= seconds < KILL_AFTER_S + 1.0
    if Path("/proc/self/stat").exists():
        assert live_group_members(job.pid) == []  # the shell and its sleep


def test_progress_lines_are_read_whole_and_give_an_eta(tmp_path, model_card):
    """Lines written in pieces are read once complete; the ETA scales the elapsed time by the
    fraction left; the job's own error line is its error."""
    script = tmp_path / "fake-engine"
    lines = [{"event": "progress", "fraction": 0.25, "step": "segment", "message": "window 1/4"},
             {"event": "error", "kind": "input", "message": "image.nrrd: not a 3D image"}]
    payload = json.dumps(lines[0])
    script.write_text("#!/bin/sh\n"
                      f"printf '%s' '{payload[:20]}'\nsleep 1.2\n"
                      f"printf '%s\\n' '{payload[20:]}'\nsleep 1.2\n"
                      f"printf '%s\\n' '{json.dumps(lines[1])}'\nexit 2\n", encoding="utf-8")
    script.chmod(0o755)
    if os.name == "nt":
        pytest.skip("a POSIX shell script stands in for the interpreter")
    image = tmp_path / "image.nrrd"
    image.write_bytes(b"unused")
    job = EngineJob(settings(model_card), [image], tmp_path / "job", python=str(script)).start()
    time.sleep(0.6)
    assert job.poll().fraction == 0.0  # half a line is not a line
    deadline = time.monotonic() + 10
    while job.poll().fraction == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = job.status
    assert (status.fraction, status.step, status.message) == (0.25, "segment", "window 1/4")
    assert status.eta_s == pytest.approx(3.0 * status.elapsed_s)
    assert "left" in status.text() and status.text().startswith("segment window 1/4 25 %")
    status = job.wait(timeout=10)
    assert status.state == "failed" and status.exit_code == 2 and status.error == "image.nrrd: not a 3D image"
    assert status.eta_s is None
    with pytest.raises(SegXAIInputError, match="no case to read"):
        job.case()


def test_a_job_refuses_bad_arguments(tmp_path, model_card):
    image = tmp_path / "image.nrrd"
    image.write_bytes(b"x")
    with pytest.raises(SegXAIInputError, match="images: .*missing.nrrd"):
        EngineJob(settings(model_card), [tmp_path / "missing.nrrd"], tmp_path / "a")
    with pytest.raises(SegXAIInputError, match="image_format"):
        EngineJob(settings(model_card), [image], tmp_path / "b", image_format=".png")
    with pytest.raises(SegXAIInputError, match="settings"):
        EngineJob({"model": "lesions"}, [image], tmp_path / "c")
    used = tmp_path / "used"
    (used / "case").mkdir(parents=True)
    with pytest.raises(SegXAIInputError, match="holds another job"):
        EngineJob(settings(model_card), [image], used)
    status = JobStatus(fraction=0.5, step="map smoothgrad", eta_s=70.0)
    assert status.text() == "map smoothgrad 50 % (about 1 min 10 s left)"


def test_lesion_table_rows_follow_the_view_model(model_card):
    """qMRMLTableModel's row mapping (column titles as header, or as the model's first row)."""
    from SegXAILib import mrml

    scene = mrml.headless_scene()
    rows = [{"id": 1, "centroid_R": 1.5, "centroid_A": -2.0, "centroid_S": 3.25},
            {"id": 2, "centroid_R": 4.0, "centroid_A": 5.0, "centroid_S": -6.0}]
    table = mrml.lesion_table_node(rows, scene)
    table.SetUseColumnTitleAsColumnHeader(True)
    assert mrml.table_row_of_model_row(table, 1) == 1
    assert mrml.lesion_centroid_ras(table, 1) == [4.0, 5.0, -6.0]
    table.SetUseColumnTitleAsColumnHeader(False)
    assert mrml.table_row_of_model_row(table, 1) == 0
    assert mrml.lesion_centroid_ras(table, 0) == [1.5, -2.0, 3.25]
    assert mrml.lesion_centroid_ras(table, 2) is None and mrml.lesion_centroid_ras(table, -1) is None


def test_the_panels_uncertainty_choices_are_valid_settings(model_card, tmp_path):
    """Every preset of the panel's menu is a valid case setting (random ones count the samples
    box, the others take every combination); the Logic's uncertainty job fills its summary."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("SegXAI", Path(__file__).parent.parent / "SegXAI" / "SegXAI.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logic_class = module.SegXAILogic
    from SegXAILib.uncertainty import UNCERTAINTY_PRESETS

    for preset, (_, sources, random) in UNCERTAINTY_PRESETS.items():
        chosen = logic_class.uncertaintySettings(preset, samples=6, seed=2)
        settings = logic_class.caseSettings(model_card, device="cpu", uncertainty=chosen)
        assert settings.uncertainty.sources == sources
        assert settings.uncertainty.samples == (6 if random else None)
    with pytest.raises(SegXAIInputError, match="coin"):
        logic_class.uncertaintySettings("coin")

    scene, volumes, _, _ = make_case(model_card, "oblique")
    logic = logic_class(scene, workFolder=str(tmp_path / "jobs"), env=ENV)
    logic.segment(volumes, logic_class.caseSettings(model_card, device="cpu"))
    assert logic.wait().state == "done"
    assert logic.uncertaintySummary() == ""
    logic.uncertainty(logic_class.caseSettings(model_card, device="cpu", uncertainty=logic_class.uncertaintySettings(
        "flips_all")))
    assert logic.wait().state == "done"
    # a per-voxel model under flips: every sample is the prediction
    assert "pairwise Dice 1.000" in logic.uncertaintySummary() and "8 samples" in logic.uncertaintySummary()
