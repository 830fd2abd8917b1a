"""The engine process (``segxai run``, ``python -m SegXAILib.engine``): JSON progress lines, a
manifest whose checksums hold, exit 2 on bad input with nothing written, SIGINT / SIGTERM
ending the run within 2 s with exit 130 and no half-written file, and a computation estimated
over the time limit refused with a structured reply (exit 2, nothing written), the same request
confirmed giving the map the library gives with no limit; an engine whose front end died cancels
itself (``--exit-with-parent``, what EngineJob passes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image
from SegXAILib.io import write_image
from SegXAILib.pipeline import CaseSettings, read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A two-lesion case (oblique grid) and the per-voxel model that segments it exactly."""
    folder = tmp_path_factory.mktemp("engine")
    card = write_voxelwise_card(folder / "model", orientation=None, threshold=50.0, patch=(8, 8, 8))
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 100.0
    bright[8:10, 6:9, 5:7] = 100.0
    image = write_image(Image(bright[None], grid_matrix("oblique"), ("ch0",)), folder / "image.nii.gz")
    return folder, card, image, bright > 50


def engine(settings: Path, image: Path, out: Path, *extra: str, **variables: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **variables}
    return subprocess.Popen([sys.executable, "-m", "SegXAILib.engine", str(settings), str(image), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def settings_file(folder: Path, name: str, **fields) -> Path:
    path = folder / name
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def test_a_run_prints_progress_and_a_verified_manifest(case, tmp_path):
    folder, card, image, truth = case
    settings = settings_file(tmp_path, "s.json", model=str(card), device="cpu",
                             methods=[{"method": "gradient_x_input"}], qa={"method": "gradient_x_input"},
                             instances={"n_samples": 2, "aggregations": ["mean", "max"]})
    process = engine(settings, image, tmp_path / "out")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    progress = [line for line in lines if line["event"] == "progress"]
    fractions = [line["fraction"] for line in progress]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    assert {"segment", "map gradient_x_input", "instance maps", "QA"} <= {line["step"] for line in progress}
    assert lines[-1]["event"] == "done"
    manifest = read_manifest(Path(lines[-1]["manifest"]).parent)  # every checksum verified
    roles = {entry["role"] for entry in manifest["files"]}
    assert {"labels", "map:gradient_x_input:ch0", "instances", "instance:1:max:ch0", "instance:2:mean:ch0", "lesions",
            "qa"} <= roles
    assert manifest["settings"] == CaseSettings.load(settings).to_dict()
    assert manifest["summary"]["instances"] == 2 and manifest["summary"]["structure_voxels"] == int(truth.sum())


def test_bad_settings_exit_2_naming_the_parameter_and_write_nothing(case, tmp_path):
    folder, card, image, _ = case
    settings = settings_file(tmp_path, "bad.json", model=str(card), device="cpu",
                             methods=[{"method": "smoothgrad", "params": {"n_sample": 3}}])
    process = engine(settings, image, tmp_path / "out")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    error = json.loads(stdout.splitlines()[-1])
    assert error["event"] == "error" and error["kind"] == "input"
    assert "methods.0" in error["message"] and "n_sample" in error["message"] and "n_samples" in error["message"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_within_two_seconds(case, tmp_path, signum):
    folder, card, image, _ = case
    # instance maps of 10^6 noise samples: far longer than the test waits
    settings = settings_file(tmp_path, "long.json", model=str(card), device="cpu",
                             instances={"n_samples": 1_000_000, "batch_size": 1, "ids": [1]})
    out = tmp_path / "out"
    process = engine(settings, image, out, "--max-minutes", "0")  # deliberately long: no time limit
    deadline = time.monotonic() + 120
    for line in process.stdout:  # wait until the instance maps are running
        event = json.loads(line)
        if event.get("step") == "instance maps" or time.monotonic() > deadline:
            break
    assert event.get("step") == "instance maps"
    sent = time.monotonic()
    process.send_signal(signum)
    process.wait(timeout=30)
    elapsed = time.monotonic() - sent
    rest = process.stdout.read().splitlines()
    assert process.returncode == 130
    print(f"stopped {elapsed:.3f} s after signal {signum}")
    assert elapsed < 2.0, f"stopped {elapsed:.2f} s after the signal"
    assert json.loads(rest[-1])["event"] == "cancelled"
    # nothing half-written: no temporary file, no manifest (the run did not finish)
    written = [p for p in out.rglob("*")] if out.exists() else []
    assert not any(p.name.startswith(".") for p in written), written
    assert not (out / "case.json").exists()


def test_a_long_computation_is_refused_with_the_estimate_and_runs_confirmed(case, tmp_path):
    from SegXAILib.attribution import explain
    from SegXAILib.io import read_image
    from SegXAILib.models import load_model, load_model_card

    folder, card, image, truth = case
    # guided backprop's default aggregation: the exact per-voxel sum over the class's voxel terms
    settings = settings_file(tmp_path, "guided.json", model=str(card), device="cpu",
                             methods=[{"method": "guided_backprop"}], instances={"enabled": False})
    for name, extra, variables in (("flag", ("--max-minutes", "0.00001"), {}),
                                   ("environment", (), {"SEGXAI_MAX_MINUTES": "0.00001"})):
        out = tmp_path / name
        process = engine(settings, image, out, *extra, **variables)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr
        error = json.loads(stdout.splitlines()[-1])
        assert error["event"] == "error" and error["kind"] == "cost"
        estimate = error["estimate"]
        # one voxel term per predicted voxel (the model grid is the input grid here)
        assert estimate["items"] == int(truth.sum())
        assert estimate["limit_seconds"] == pytest.approx(0.0006) and estimate["seconds"] > estimate["limit_seconds"]
        assert estimate["bytes"] > 0 and estimate["text"] in stdout + stderr
        assert "over the time limit" in error["message"] and 'aggregation="target"' in error["message"]
        assert "--confirm-long" in stderr and "Traceback" not in stderr
        assert not out.exists()  # refused: nothing written
    out = tmp_path / "confirmed"
    process = engine(settings, image, out, "--max-minutes", "0.00001", "--confirm-long")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    kinds = [line["event"] for line in lines]
    # the estimate is said (a JSON line and on standard error) before the map's work
    first = kinds.index("estimate")
    assert lines[first]["items"] == int(truth.sum()) and lines[first]["message"].startswith("per-voxel maps")
    batches = [i for i, line in enumerate(lines) if line.get("message") == "per-voxel maps"]  # after each batch
    assert batches and first < batches[0]
    assert "segxai run: estimate: per-voxel maps" in stderr and kinds[-1] == "done"
    confirmed = read_image(out / "maps" / "guided_backprop_ch0.nii.gz").array
    # the library's own map of the same request, with no limit and no front end
    direct = explain(read_image(image), load_model(load_model_card(card), device="cpu"), "guided_backprop")
    np.testing.assert_allclose(confirmed, direct.maps.array, rtol=1e-6, atol=1e-6 * np.abs(direct.maps.array).max())


def test_the_time_limit_of_a_request(monkeypatch):
    """What reaches the engine: ``EngineJob``'s ``max_minutes`` as ``--max-minutes``, else
    ``SEGXAI_MAX_MINUTES``, else 10 minutes; 0 and ``--confirm-long``: no limit."""
    from SegXAILib.cli.common import cost_limit_seconds
    from SegXAILib.engine import build_parser
    from SegXAILib.image import SegXAIInputError
    from SegXAILib.pipeline.job import engine_command

    def limit(*extra: str, max_minutes=None):
        command = engine_command("python", Path("s.json"), [Path("a.nii.gz")], Path("out"), max_minutes=max_minutes)
        return cost_limit_seconds(build_parser().parse_args(command[3:] + list(extra)))

    monkeypatch.delenv("SEGXAI_MAX_MINUTES", raising=False)
    assert limit() == 600.0
    assert limit(max_minutes=0.5) == 30.0
    assert limit(max_minutes=0) is None and limit("--confirm-long") is None
    monkeypatch.setenv("SEGXAI_MAX_MINUTES", "2")
    assert limit() == 120.0 and limit(max_minutes=1) == 60.0  # the request's own limit first
    monkeypatch.setenv("SEGXAI_MAX_MINUTES", "0")
    assert limit() is None
    monkeypatch.setenv("SEGXAI_MAX_MINUTES", "soon")
    with pytest.raises(SegXAIInputError, match="SEGXAI_MAX_MINUTES"):
        limit()
    with pytest.raises(SegXAIInputError, match="--max-minutes"):
        limit("--max-minutes", "-1")


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_click_run_from_a_saved_case_skips_the_prediction_and_gives_the_same_map(case, tmp_path):
    """``--case DIR``: the run starts from the folder's saved prediction (no ``segment`` step, the
    model never sees the whole volume) and its instance map and lesion table are bit for bit those
    of a run that predicts anew; the saved labels and probabilities read back exactly as the
    in-process prediction made them. A folder of another model or other images is refused."""
    from SegXAILib.io import read_image
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.pipeline import predict, read_case

    folder, card, image, truth = case
    segment = settings_file(tmp_path, "segment.json", model=str(card), device="cpu", instances={"ids": []})
    process = engine(segment, image, tmp_path / "segmented")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    saved = tmp_path / "segmented"

    # the round trip is exact: the labels and float32 probabilities as the model made them
    model = load_model(load_model_card(card), device="cpu")
    fresh = predict(read_image(image), model)
    back = read_case(saved)
    assert back.segmentation.labels.array.dtype == np.uint8
    assert np.array_equal(back.segmentation.labels.array, fresh.labels.array)
    assert np.array_equal(back.segmentation.labels.array[0] == 1, truth)
    assert back.segmentation.probabilities.array.dtype == np.float32
    assert np.array_equal(back.segmentation.probabilities.array[1:], fresh.probabilities.array[1:])

    click = settings_file(tmp_path, "click.json", model=str(card), device="cpu",
                          instances={"ids": [2], "n_samples": 2, "aggregations": ["mean"]})
    reused = engine(click, image, tmp_path / "reused", "--case", str(saved))
    stdout, stderr = reused.communicate(timeout=300)
    assert reused.returncode == 0, stderr
    steps = {line.get("step") for line in _events(stdout) if line["event"] == "progress"}
    assert "instance maps" in steps and "segment" not in steps  # no whole-volume prediction
    anew = engine(click, image, tmp_path / "anew")
    stdout, stderr = anew.communicate(timeout=300)
    assert anew.returncode == 0, stderr
    assert "segment" in {line.get("step") for line in _events(stdout) if line["event"] == "progress"}
    one, other = read_case(tmp_path / "reused"), read_case(tmp_path / "anew")
    assert sorted(one.instance_maps) == [2] and sorted(other.instance_maps) == [2]
    assert np.array_equal(one.instance_maps[2]["mean"].array, other.instance_maps[2]["mean"].array)
    assert np.abs(one.instance_maps[2]["mean"].array).max() > 0  # a map, not two empty volumes
    assert np.array_equal(one.instance_labels.array, other.instance_labels.array)
    assert json.loads((tmp_path / "reused" / "lesions.json").read_text())["instances"] == \
        json.loads((tmp_path / "anew" / "lesions.json").read_text())["instances"]
    assert read_manifest(tmp_path / "reused")["inputs"] == read_manifest(saved)["inputs"]

    # another model (same architecture, another threshold): refused, nothing predicted or written
    other_card = write_voxelwise_card(tmp_path / "other", orientation=None, threshold=40.0, patch=(8, 8, 8))
    wrong = settings_file(tmp_path, "wrong.json", model=str(other_card), device="cpu", instances={"ids": [1]})
    process = engine(wrong, image, tmp_path / "wrong_model", "--case", str(saved))
    stdout, stderr = process.communicate(timeout=300)
    error = _events(stdout)[-1]
    assert process.returncode == 2 and error["kind"] == "input" and "checksum" in error["message"]
    assert not (tmp_path / "wrong_model").exists()
    # other images: refused
    copy = write_image(read_image(image), tmp_path / "copy.nii.gz")
    process = engine(click, copy, tmp_path / "wrong_images", "--case", str(saved))
    stdout, stderr = process.communicate(timeout=300)
    error = _events(stdout)[-1]
    assert process.returncode == 2 and error["kind"] == "input" and "images" in error["message"]
    # steps that need the model-grid prediction: refused, not predicted again
    maps = settings_file(tmp_path, "maps.json", model=str(card), device="cpu",
                         methods=[{"method": "vanilla_gradient"}], instances={"ids": []})
    process = engine(maps, image, tmp_path / "wrong_steps", "--case", str(saved))
    stdout, stderr = process.communicate(timeout=300)
    error = _events(stdout)[-1]
    assert process.returncode == 2 and "settings.methods" in error["message"]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an ended child its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_an_engine_whose_front_end_died_cancels_itself(case, tmp_path):
    folder, card, image, _ = case
    settings = settings_file(tmp_path, "long.json", model=str(card), device="cpu",
                             instances={"n_samples": 1_000_000, "batch_size": 1, "ids": [1]})
    # a front end that starts the engine as EngineJob does, waits for the long step, then dies
    launcher = """
import json, subprocess, sys, time
log = open(sys.argv[1], "w")
engine = subprocess.Popen([sys.executable, "-m", "SegXAILib.engine", *sys.argv[2:]], stdout=log,
                          stderr=subprocess.DEVNULL, start_new_session=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline and '"instance maps"' not in open(sys.argv[1]).read():
    time.sleep(0.05)
print(engine.pid, flush=True)
"""
    pids = {}
    try:
        for flag in ("--exit-with-parent", None):
            log = tmp_path / f"{flag}.log"
            command = [sys.executable, "-c", launcher, str(log), str(settings), str(image), "--out",
                       str(tmp_path / f"out{len(pids)}"), "--max-minutes", "0", *([flag] if flag else [])]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
            assert '"instance maps"' in log.read_text(), log.read_text()
            pid = pids[flag] = int(done.stdout.split()[0])
            deadline = time.monotonic() + 15  # a poll interval, the grace period and the exit
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if flag:  # the orphaned engine noticed and ended its run
                assert not _running(pid), "the engine kept computing after its front end ended"
                assert json.loads(log.read_text().splitlines()[-1])["event"] == "cancelled"
            else:  # without the flag (a shell's nohup `segxai run`) it goes on
                assert _running(pid)
    finally:
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
