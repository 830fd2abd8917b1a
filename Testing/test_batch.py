"""Cohort runs on Dask (``SegXAILib.batch``, ``segxai batch``).

The model is a per-voxel network (a 1x1x1 convolution whose class-1 logit is the voxel's value),
so the exact labels of every case are known (label = value > 0). As a ``python`` model card, it
appends a line to the file named by ``SEGXAI_TEST_COUNTER`` each time it is built or called:
a finished case computed again, or a network built once per case instead of once per worker,
changes those counts.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from SegXAILib.batch import (BatchCase, JobOptions, case_state, job_script, local_cluster, read_cases, run_batch)
from SegXAILib.cli import main
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import read_image, write_image
from SegXAILib.pipeline import CaseSettings, load_case_model, read_case_images, read_manifest, run_case

pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (12, 11, 10)

NETWORK = '''
import os
import time

import torch


def _count(kind):
    path = os.environ.get("SEGXAI_TEST_COUNTER")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{kind} {os.getpid()}\\n")


class CountingNet(torch.nn.Module):
    """Class-1 logit = the voxel's value (class 0: 0); counts its constructions and calls."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        _count("init")

    def forward(self, x):
        _count("forward")
        delay = float(os.environ.get("SEGXAI_TEST_DELAY") or 0)
        if delay:
            time.sleep(delay)
        return self.conv(x)
'''


def write_counting_card(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "counting_net.py").write_text(NETWORK, encoding="utf-8")
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 1.0
    torch.save({"conv." + k: v for k, v in conv.state_dict().items()}, folder / "counting.pt")
    card = {
        "name": "counting-voxelwise",
        "architecture": {"format": "python", "file": "counting_net.py", "name": "CountingNet", "kwargs": {},
                         "weights": "counting.pt"},
        "input_channels": ["T1"],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "bright", "color": [255, 0, 0]}],
        "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": []},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blend": "constant"},
        "output_activation": "softmax",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def case_image(seed: int) -> Image:
    """Background below 0, two bright blocks above 0: exactly two instances, whatever the noise."""
    rng = np.random.default_rng(seed)
    array = (-1.0 + 0.2 * rng.random(SHAPE)).astype(np.float32)
    a, b = 1 + seed % 3, 6 + seed % 2
    array[a:a + 3, 2:5, 2:5] = 1.0 + rng.random((3, 3, 3))
    array[b:b + 4, 6:9, 5:8] = 0.5 + rng.random((4, 3, 3))
    matrix = np.diag([1.5, 1.0, 2.0, 1.0])
    matrix[:3, 3] = [-10.0, 4.0, 7.5]
    return Image(array[None], matrix, ("T1",))


def write_cohort(folder: Path, count: int, relative: bool = True) -> Path:
    """``count`` cases as NIfTI files and their CASES.csv (relative paths, a metadata column)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        path = write_image(case_image(n), folder / "images" / f"c{n:02d}.nii.gz")
        rows.append({"case": f"c{n:02d}", "T1": f"images/{path.name}" if relative else str(path), "age": str(40 + n)})
    with open(folder / "cases.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "T1", "age"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "cases.csv"


def settings_for(card: Path) -> CaseSettings:
    return CaseSettings.from_dict({
        "model": str(card), "trust_code": True, "device": "cpu",
        "methods": [{"method": "gradient_x_input"}, {"method": "smoothgrad", "params": {"n_samples": 2, "seed": 0}}],
        "instances": {"aggregations": ["mean"], "n_samples": 2, "batch_size": 2, "max_instances": 2},
    })


def counts(path: Path) -> dict[str, int]:
    lines = path.read_text(encoding="utf-8").split() if path.exists() else []
    return {kind: lines[0::2].count(kind) for kind in ("init", "forward")}


def assert_same_case(folder: Path, expected: Path) -> None:
    """Two case folders hold the same labels, maps and lesion table."""
    files = sorted(p.relative_to(expected).as_posix() for p in expected.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.nii.gz"))
    for name in files:
        got, want = read_image(folder / name).array, read_image(expected / name).array
        # the same float32 operations on one thread in each process: equal to float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max() or 1.0), err_msg=name)
    lesions = json.loads((folder / "lesions.json").read_text())["instances"]
    reference = json.loads((expected / "lesions.json").read_text())["instances"]
    assert [(r["id"], r["voxels"]) for r in lesions] == [(r["id"], r["voxels"]) for r in reference]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cohort")
    card = write_counting_card(folder / "model")
    csv_path = write_cohort(folder, 6)
    settings = settings_for(card)
    (folder / "settings.json").write_text(settings.to_json(), encoding="utf-8")
    return {"folder": folder, "card": card, "csv": csv_path, "settings": settings,
            "cases": read_cases(csv_path, ["T1"])}


@pytest.fixture(scope="module")
def client():
    """One 2-worker LocalCluster for the module (its processes end with it)."""
    from distributed import Client

    before = children()
    with local_cluster(2) as cluster, Client(cluster) as dask_client:
        yield dask_client
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and children() - before:
        time.sleep(0.1)
    assert not children() - before, "worker processes left behind"


def children() -> set[int]:
    """This process's children but multiprocessing's resource tracker (it lives as long as we do)."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in process.cmdline()):
                found.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


# ------------------------------------------------------------------------ distributed = in process


def test_two_workers_equal_the_pipeline_case_by_case(cohort, client, tmp_path):
    settings, cases = cohort["settings"], cohort["cases"]
    result = run_batch(cases, settings, tmp_path / "dask", client)
    assert result.ok and result.counts["done"] == len(cases)
    workers = {record["worker"] for record in result.cases.values()}
    assert len(workers) == 2, f"both workers ran cases: {workers}"
    serial = run_batch(cases, settings, tmp_path / "serial", None)
    assert serial.ok
    model = load_case_model(settings)  # the oracle: the pipeline called directly, case by case
    for case in cases:
        image = read_case_images(case.images, model.card)
        expected = run_case(image, model, settings)
        folder = tmp_path / "dask" / "cases" / case.id
        read_manifest(folder, verify=True)
        labels = read_image(folder / "labels.nii.gz").array[0]
        np.testing.assert_array_equal(labels, (image.array[0] > 0).astype(labels.dtype))  # the model's known answer
        np.testing.assert_array_equal(labels, expected.segmentation.labels.array[0])
        for name, attribution in expected.maps.items():
            got = read_image(folder / "maps" / f"{name}_T1.nii.gz").array
            scale = float(np.abs(attribution.maps.array).max())
            np.testing.assert_allclose(got, attribution.maps.array, rtol=0, atol=1e-6 * scale, err_msg=name)
        rows = json.loads((folder / "lesions.json").read_text())["instances"]
        assert [(r["id"], r["voxels"]) for r in rows] == [(r["id"], r["voxels"]) for r in expected.lesions]
        assert len(rows) == 2
        assert_same_case(folder, tmp_path / "serial" / "cases" / case.id)
    summary = json.loads((tmp_path / "dask" / "batch.json").read_text())
    assert summary["state"] == "done" and summary["counts"] == {"done": 6, "skipped": 0, "failed": 0, "pending": 0}
    assert summary["cases"][0]["metadata"] == {"age": "40"}
    # the dashboard (bokeh is in the batch extra) is served on the loopback interface only
    assert result.dashboard.startswith("http://127.0.0.1:") and summary["cluster"]["dashboard"] == result.dashboard


def test_a_gpu_cluster_gives_each_worker_its_own_device(tmp_path):
    """One worker per GPU id, each seeing only its own (checked without a GPU: the environment)."""
    from distributed import Client

    with local_cluster(gpus=["3", "5"]) as cluster, Client(cluster) as gpu_client:
        seen = gpu_client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        hosts = {address.split("//")[1].rsplit(":", 1)[0] for address in seen}
    assert sorted(seen.values()) == ["3", "5"]
    assert hosts == {"127.0.0.1"}


# ------------------------------------------------------------------------ killed and resumed


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "SegXAILib.cli", "-q", "batch", *args], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(out: Path, cases, settings) -> list[str]:
    return [c.id for c in cases if case_state(out / "cases" / c.id, c, settings) == "finished"]


def test_killed_midway_and_resumed_nothing_lost_nothing_redone(cohort, tmp_path, monkeypatch):
    settings, cases, csv_path = cohort["settings"], cohort["cases"], cohort["csv"]
    settings_path = cohort["folder"] / "settings.json"
    # an uninterrupted run: the outputs to match and the network calls of one case
    monkeypatch.setenv("SEGXAI_TEST_COUNTER", str(tmp_path / "reference.txt"))
    assert run_batch(cases, settings, tmp_path / "reference", None).ok
    monkeypatch.delenv("SEGXAI_TEST_COUNTER")
    reference = counts(tmp_path / "reference.txt")
    assert reference["init"] == 1 and reference["forward"] % len(cases) == 0
    per_case = reference["forward"] // len(cases)

    out = tmp_path / "out"
    run = cli(str(csv_path), "--settings", str(settings_path), "--out", str(out), "--workers", "1",
              env={"SEGXAI_TEST_COUNTER": str(tmp_path / "killed.txt"), "SEGXAI_TEST_DELAY": "0.1"},
              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("cases/*/case.json"))) < 2:
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no case finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the command, its scheduler and its worker processes
        run.communicate()
    deadline = time.monotonic() + 10
    while any(p.info["pid"] != run.pid and _group(p) == run.pid for p in psutil.process_iter(["pid"])):
        assert time.monotonic() < deadline, "processes of the killed run are left"
        time.sleep(0.1)

    done = finished(out, cases, settings)
    assert 2 <= len(done) < len(cases), done
    # a case killed between its files and its manifest: a partial folder, to be removed and redone
    partial = done.pop()
    (out / "cases" / partial / "case.json").unlink()
    (out / "cases" / partial / "leftover.tmp").write_text("half-written")
    kept = {c: ((out / "cases" / c / "case.json").read_bytes(), (out / "cases" / c / "case.json").stat().st_mtime_ns)
            for c in done}

    rerun = cli(str(csv_path), "--settings", str(settings_path), "--out", str(out), "--workers", "1",
                env={"SEGXAI_TEST_COUNTER": str(tmp_path / "resumed.txt")})
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    resumed = counts(tmp_path / "resumed.txt")
    assert resumed == {"init": 1, "forward": per_case * (len(cases) - len(done))}, (resumed, per_case, done)
    for identifier, (text, mtime) in kept.items():
        manifest = out / "cases" / identifier / "case.json"
        assert manifest.read_bytes() == text and manifest.stat().st_mtime_ns == mtime
    assert not (out / "cases" / partial / "leftover.tmp").exists()
    summary = json.loads((out / "batch.json").read_text())
    statuses = {record["id"]: record["status"] for record in summary["cases"]}
    assert statuses == {c.id: "skipped" if c.id in done else "done" for c in cases}
    for case in cases:
        read_manifest(out / "cases" / case.id, verify=True)
        assert_same_case(out / "cases" / case.id, tmp_path / "reference" / "cases" / case.id)


def _group(process: psutil.Process) -> int:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return -1


# ------------------------------------------------------------------------ failures


def test_a_corrupt_case_is_recorded_and_the_others_finish(cohort, client, tmp_path, capsys):
    folder = tmp_path / "cohort"
    csv_path = write_cohort(folder, 4, relative=False)
    broken = folder / "images" / "c02.nii.gz"
    data = broken.read_bytes()
    # a NIfTI cut inside its header (SimpleITK fills a file cut inside its voxels with zeros, silently)
    broken.write_bytes(data[:60])
    out = tmp_path / "out"
    args = [str(csv_path), "--settings", str(cohort["folder"] / "settings.json"), "--out", str(out)]
    code = main(["-q", "batch", *args, "--scheduler", client.scheduler.address])
    assert code == 3
    failure = json.loads((out / "failures" / "c02.json").read_text())
    assert "c02.nii.gz" in failure["error"] and "Traceback" in failure["traceback"]
    assert failure["case"]["images"] == [str(broken)] and failure["settings"]["model"] == str(cohort["card"])
    assert not (out / "cases" / "c02").exists()
    for identifier in ("c00", "c01", "c03"):
        read_manifest(out / "cases" / identifier, verify=True)
    summary = json.loads((out / "batch.json").read_text())
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "pending": 0}
    assert "c02" in capsys.readouterr().err
    # repaired, the rerun runs that case alone and the failure record goes
    broken.write_bytes(data)
    assert main(["-q", "batch", *args, "--workers", "0"]) == 0
    summary = json.loads((out / "batch.json").read_text())
    assert {r["id"]: r["status"] for r in summary["cases"]} == {"c00": "skipped", "c01": "skipped", "c02": "done",
                                                                "c03": "skipped"}
    assert not (out / "failures" / "c02.json").exists()


def test_other_settings_redo_the_finished_cases(cohort, tmp_path):
    cases = cohort["cases"][:2]
    assert run_batch(cases, cohort["settings"], tmp_path, None).ok
    changed = CaseSettings.from_dict({**cohort["settings"].to_dict(), "methods": [{"method": "gradient_x_input"}]})
    assert case_state(tmp_path / "cases" / cases[0].id, cases[0], changed) == "partial"
    assert case_state(tmp_path / "cases" / cases[0].id, cases[0], cohort["settings"]) == "finished"
    moved = BatchCase(cases[0].id, (cases[1].images[0],))
    assert case_state(tmp_path / "cases" / cases[0].id, moved, cohort["settings"]) == "partial"
    # a changed output file breaks its checksum: the case is no longer finished
    labels = tmp_path / "cases" / cases[1].id / "labels.nii.gz"
    labels.write_bytes(labels.read_bytes() + b"\0")
    assert case_state(labels.parent, cases[1], cohort["settings"]) == "partial"
    result = run_batch(cases, changed, tmp_path, None)
    assert [r["status"] for r in result.cases.values()] == ["done", "done"]


# ------------------------------------------------------------------------ job queues


def test_the_slurm_job_script_has_the_booking():
    script = job_script("slurm", JobOptions(cores=4, memory="16GB", walltime="02:00:00", queue="gpu", account="lab",
                                            gpus=True, job_extra=("--constraint=a100",)))
    lines = script.splitlines()
    # 16 GB = 14.9 GiB, which SLURM books rounded up to whole GiB
    for directive in ("#SBATCH --cpus-per-task=4", "#SBATCH --mem=15G", "#SBATCH -t 02:00:00", "#SBATCH -p gpu",
                      "#SBATCH -A lab", "#SBATCH --gres=gpu:1", "#SBATCH --constraint=a100"):
        assert directive in lines, f"{directive!r} not in\n{script}"
    assert "export OMP_NUM_THREADS=4" in lines
    command = lines[-1]
    assert "distributed.cli.dask_worker tcp://scheduler:8786" in command and "--nthreads 1" in command
    assert not any("gres" in line for line in job_script("slurm", JobOptions(cores=2)).splitlines())


def test_the_pbs_and_sge_job_scripts_have_the_booking():
    pbs = job_script("pbs", JobOptions(cores=8, memory="32GB", walltime="01:00:00", queue="workq", gpus=True))
    assert "#PBS -l select=1:ncpus=8:mem=30GB:ngpus=1" in pbs.splitlines(), pbs  # 32 GB = 29.8 GiB, rounded up
    assert "#PBS -l walltime=01:00:00" in pbs and "#PBS -q workq" in pbs
    sge = job_script("sge", JobOptions(cores=2, queue="all.q", gpus=True, job_extra=("-pe smp 2",)))
    assert {"#$ -q all.q", "#$ -l gpu=1", "#$ -pe smp 2"} <= set(sge.splitlines()), sge


@pytest.mark.parametrize("options, message", [
    ({"cores": 0}, r"cores 0: must be >= 1"),
    ({"memory": "lots"}, r"memory 'lots': expected a size"),
    ({"walltime": "2h"}, r"walltime '2h': expected HH:MM:SS"),
])
def test_bad_job_options_are_named(options, message):
    with pytest.raises(SegXAIInputError, match=message):
        JobOptions(**options)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("text, message", [
    ("case,FLAIR\nx,a.nii.gz\n", r"cases .*cases.csv: missing column\(s\) \['T1'\]"),
    ("case,T1\nc1,a.nii.gz\nC1,a.nii.gz\n", r"line 3, column 'case': case id 'C1' repeats the case of line 2"),
    ("case,T1\n../up,a.nii.gz\n", r"line 2, column 'case': case id '../up' is not a folder name"),
    ("case,T1\nc1,missing.nii.gz\n", r"line 2, column 'T1': .*missing.nii.gz does not exist"),
    ("case,T1\nc1,\n", r"line 2, column 'T1': empty"),
    ("case,T1,reference\nc1,a.nii.gz,nothere.nii.gz\n", r"line 2, column 'reference': .*nothere.nii.gz does not exist"),
    ("case,T1\n", r"no case rows"),
    ("case,T1\nc1,a.nii.gz,extra\n", r"line 2: 3 cells but 2 columns"),
])
def test_bad_cases_files_are_named(tmp_path, text, message):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "cases.csv").write_text(text, encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=message):
        read_cases(tmp_path / "cases.csv", ["T1"])


def test_cases_paths_are_relative_to_the_csv(cohort):
    case = cohort["cases"][0]
    assert case.images == ((cohort["folder"] / "images" / "c00.nii.gz").resolve(),)
    assert case.line == 2 and case.metadata == {"age": "40"}


def test_bad_input_exits_2_before_any_work(cohort, tmp_path, capsys):
    settings = cohort["folder"] / "settings.json"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("case,T1\nc1,nowhere.nii.gz\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(bad_csv), "--settings", str(settings), "--out", str(out)]) == 2
    assert "nowhere.nii.gz does not exist" in capsys.readouterr().err
    assert main(["batch", str(cohort["csv"]), "--settings", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "--settings" in capsys.readouterr().err
    untrusted = tmp_path / "untrusted.json"
    untrusted.write_text(json.dumps({**cohort["settings"].to_dict(), "trust_code": False}), encoding="utf-8")
    assert main(["batch", str(cohort["csv"]), "--settings", str(untrusted), "--out", str(out)]) == 2
    assert "trust_code" in capsys.readouterr().err
    assert main(["batch", str(cohort["csv"]), "--settings", str(settings), "--out", str(out), "--workers", "-1"]) == 2
    assert "--workers -1" in capsys.readouterr().err
    assert main(["batch", str(cohort["csv"]), "--settings", str(settings), "--out", str(out), "--scheduler",
                 "tcp://127.0.0.1:1", "--workers", "2"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not out.exists()
