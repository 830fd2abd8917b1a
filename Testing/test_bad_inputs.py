"""Every error path of a case's inputs and outputs, as one table (the README's "Reliability"
section lists it): each bad input is run through the command line (``segxai segment``) and
the engine process (``segxai run``, in process), with its exit code and message. A refusal
writes nothing: no output folder appears, a folder that was there stays as it was. An input
that reads but does not fit the model (constant, another modality) runs with a warning on
standard error and in ``case.json``, and is refused with ``--strict``."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import write_voxelwise_card
from SegXAILib.cli import main
from SegXAILib.image import Image, geometry_matrix
from SegXAILib.io import write_dicom_series, write_image


def _volume(tmp: Path, name: str = "scan.nii.gz", array: Optional[np.ndarray] = None) -> Path:
    if array is None:
        array = np.random.default_rng(0).normal(0.0, 2.0, (10, 9, 8)).astype(np.float32)
    return write_image(Image(array), tmp / name)


def _non_finite(tmp: Path, name: str, value: float, count: int = 1) -> Path:
    array = np.random.default_rng(1).normal(0.0, 1.0, (8, 8, 8)).astype(np.float32)
    array.reshape(-1)[:count] = value
    return _volume(tmp, name, array)


def _truncated(tmp: Path) -> Path:
    path = _volume(tmp)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return path


def _nifti_header_edit(tmp: Path, start: int, value: bytes) -> Path:
    path = _volume(tmp)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[start : start + len(value)] = value
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _two_d(tmp: Path) -> Path:
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(tmp / "slice.nii.gz"))
    return tmp / "slice.nii.gz"


def _four_d(tmp: Path) -> Path:
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(tmp / "series.nii.gz"))
    return tmp / "series.nii.gz"


def _dicom(tmp: Path, change: Callable[[Path], None]) -> Path:
    """A 10-slice series (1 mm apart), then one change to its files."""
    array = np.round(np.random.default_rng(2).normal(0, 3, (8, 9, 10))).astype(np.float32)
    folder = write_dicom_series(Image(array), tmp / "dicom")
    change(folder)
    return folder


def _drop_slice(folder: Path) -> None:
    (folder / "slice_0004.dcm").unlink()


def _duplicate_slice(folder: Path) -> None:
    dataset = pydicom.dcmread(folder / "slice_0004.dcm")
    dataset.SOPInstanceUID += ".9"
    dataset.InstanceNumber = 99
    dataset.save_as(folder / "slice_0099.dcm")


def _shift_slice(folder: Path) -> None:
    dataset = pydicom.dcmread(folder / "slice_0004.dcm")
    position = [float(v) for v in dataset.ImagePositionPatient]
    position[2] += 0.4  # 0.6 and 1.4 mm gaps around it, the others 1 mm
    dataset.ImagePositionPatient = position
    dataset.save_as(folder / "slice_0004.dcm")


def _tilt_slice(folder: Path) -> None:
    dataset = pydicom.dcmread(folder / "slice_0004.dcm")
    dataset.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(0.1)), float(np.sin(0.1))]
    dataset.save_as(folder / "slice_0004.dcm")


def abdominal_ct(shape=(40, 36, 12), spacing=(0.8, 0.8, 5.0)) -> Image:
    """A CT-like volume in Hounsfield units: air (-1000) around an elliptic body of soft tissue
    (40 HU, noisy) with a bone (1200 HU); anisotropic 0.8 x 0.8 x 5 mm voxels."""
    rng = np.random.default_rng(3)
    i, j, _ = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (i / 0.8) ** 2 + (j / 0.6) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, shape)
    ct[(i / 0.15) ** 2 + ((j - 0.3) / 0.15) ** 2 < 1] = 1200.0
    return Image(np.clip(ct, -1024, 1500).astype(np.float32)[None], geometry_matrix(spacing, (0, 0, 0), np.eye(3)))


def mr_card(folder: Path) -> Path:
    """The per-voxel model with a card that expects brain MR: non-negative intensities around 0-600,
    1 mm voxels, a head-sized field of view."""
    card = write_voxelwise_card(folder, threshold=1.0, patch=(8, 8, 8))
    data = json.loads(card.read_text(encoding="utf-8"))
    data["input_expectations"] = {
        "modality": "MR", "anatomy": "head (brain)", "cases": 3,
        "channels": {"ch0": {"min": 0.0, "percentile_00_5": 0.0, "median": 120.0, "percentile_99_5": 600.0,
                             "max": 800.0, "mean": 150.0, "std": 120.0, "negative_fraction": 0.0}},
        "spacing_mm": {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.2]},
        "extent_mm": {"min": [8.0, 9.0, 10.0], "max": [160.0, 220.0, 220.0]},
    }
    card.write_text(json.dumps(data), encoding="utf-8")
    return card


@dataclass
class Bad:
    """One row of the table: how to make the input, what both front ends must answer."""

    name: str
    make: Callable[[Path], list[Path]]
    code: int
    message: str
    card: str = "voxelwise"  # voxelwise | two_channel | mr
    strict: bool = False
    output: str = "new"  # new | file | read_only
    patch: Optional[str] = None  # enospc
    warning: str = ""  # exit 0: the warning on stderr and in case.json
    extra: dict = field(default_factory=dict)


TABLE = [
    Bad("missing file", lambda t: [t / "missing.nii.gz"], 2, "missing.nii.gz: no such file"),
    Bad("empty file", lambda t: [_empty(t)], 2, "cannot be read as an image"),
    Bad("truncated gzip", lambda t: [_truncated(t)], 2, "truncated or corrupt"),
    Bad("corrupt header (datatype)", lambda t: [_nifti_header_edit(t, 70, struct.pack("<h", 999))], 2,
        "cannot be read as an image"),
    Bad("corrupt header (dimensions)", lambda t: [_nifti_header_edit(t, 44, struct.pack("<h", -9))], 2,
        "corrupt NIfTI header (dimensions [10, -9, 8]"),
    Bad("NaN in NIfTI", lambda t: [_non_finite(t, "nan.nii.gz", np.nan)], 2, "nan.nii.gz: 1 voxels are NaN or Inf (1 NaN, 0 Inf)"),
    Bad("Inf in NIfTI", lambda t: [_non_finite(t, "inf.nii", -np.inf, 3)], 2, "inf.nii: 3 voxels are NaN or Inf (0 NaN, 3 Inf)"),
    Bad("all-NaN NIfTI", lambda t: [_non_finite(t, "allnan.nii.gz", np.nan, 512)], 2,
        "allnan.nii.gz: 512 voxels are NaN or Inf (512 NaN, 0 Inf)"),
    Bad("NaN in MetaImage", lambda t: [_non_finite(t, "nan.mha", np.nan, 2)], 2, "nan.mha: 2 voxels are NaN or Inf (2 NaN, 0 Inf)"),
    Bad("Inf in MetaImage", lambda t: [_non_finite(t, "inf.mha", np.inf)], 2, "inf.mha: 1 voxels are NaN or Inf (0 NaN, 1 Inf)"),
    Bad("2D image", lambda t: [_two_d(t)], 2, "2D; expected a 3D volume"),
    Bad("4D image", lambda t: [_four_d(t)], 2, "4D with 3 volumes"),
    Bad("constant image", lambda t: [_volume(t, "flat.nii.gz", np.full((8, 8, 8), 7.0, np.float32))], 0, "",
        warning="input channel 'ch0' is constant (7)"),
    Bad("constant image, --strict", lambda t: [_volume(t, "flat.nii.gz", np.full((8, 8, 8), 7.0, np.float32))], 2,
        "strict: the input does not fit the model: input channel 'ch0' is constant (7)", strict=True),
    Bad("wrong channel count", lambda t: [_volume(t)], 2, "takes 2 image(s) (ch0, ch1), got 1", card="two_channel"),
    Bad("wrong modality (CT into a brain-MR model)", lambda t: [write_image(abdominal_ct(), t / "ct.nii.gz")], 0, "",
        card="mr", warning="looks like a CT in Hounsfield units"),
    Bad("wrong modality, --strict", lambda t: [write_image(abdominal_ct(), t / "ct.nii.gz")], 2,
        "looks like a CT in Hounsfield units", card="mr", strict=True),
    Bad("DICOM series: missing slice", lambda t: [_dicom(t, _drop_slice)], 2,
        "missing slices (about 1): a gap of 2.000 mm between slice_0003.dcm and slice_0005.dcm"),
    Bad("DICOM series: duplicate slice", lambda t: [_dicom(t, _duplicate_slice)], 2, "duplicate slices"),
    Bad("DICOM series: uneven spacing", lambda t: [_dicom(t, _shift_slice)], 2,
        "uneven slice spacing (gaps from 0.600 to 1.400 mm"),
    Bad("DICOM series: mixed orientations", lambda t: [_dicom(t, _tilt_slice)], 2, "mixed slice orientations (1 of 10"),
    Bad("output is a file", lambda t: [_volume(t)], 2, "exists and is not a folder", output="file"),
    Bad("read-only output folder (chmod 555, also as root)", lambda t: [_volume(t)], 2,
        "is not writable (read-only, mode 555)", output="read_only"),
    Bad("out of disk space (ENOSPC while writing)", lambda t: [_volume(t)], 2,
        "cannot be written (No space left on device)", patch="enospc"),
]


def _card(tmp: Path, kind: str) -> Path:
    if kind == "two_channel":
        return write_voxelwise_card(tmp / "model2", threshold=1.0, patch=(8, 8, 8), in_channels=2)
    if kind == "mr":
        return mr_card(tmp / "mr")
    return write_voxelwise_card(tmp / "model", threshold=1.0, patch=(8, 8, 8))


def _output(tmp: Path, kind: str) -> Path:
    out = tmp / "out"
    if kind == "file":
        out.write_text("x", encoding="utf-8")
    elif kind == "read_only":
        out.mkdir()
        out.chmod(0o555)
    return out


def _snapshot(out: Path) -> Optional[list]:
    """What is at ``out``: None (nothing), the text of a file, or the sorted entries of a folder."""
    if not out.exists():
        return None
    if out.is_file():
        return [out.read_text(encoding="utf-8")]
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cli(bad: Bad, images: list[Path], card: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["-q", "segment", *map(str, images), "--model", str(card), "--out", str(out),
                 *(["--strict"] if bad.strict else [])])
    return code, capsys.readouterr().err


def _engine(bad: Bad, images: list[Path], card: Path, out: Path, capsys) -> tuple[int, str]:
    from SegXAILib.engine import build_parser, run_engine

    settings = card.parent.parent / "settings.json"  # beside the model folder, outside the output
    # the segmentation alone, as `segxai segment`: the table is about the inputs, not the steps
    settings.write_text(json.dumps({"model": str(card), "device": "cpu", "instances": {"enabled": False}}),
                        encoding="utf-8")
    args = build_parser().parse_args([str(settings), *map(str, images), "--out", str(out),
                                      *(["--strict"] if bad.strict else [])])
    stream = io.StringIO()
    code = run_engine(args, stream)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [line for line in lines if line["event"] == "error"]
    if code:
        assert errors and errors[-1]["kind"] == "input", lines
        assert lines[-1]["event"] == "error"
    else:
        assert lines[-1]["event"] == "done"
    warnings = [line["message"] for line in lines if line["event"] == "warning"]
    err = capsys.readouterr().err
    # the JSON lines say what standard error says: the error and each warning
    assert all(w in err for w in warnings)
    return code, err + "".join(e["message"] for e in errors) + "".join(warnings)


@pytest.mark.parametrize("front_end", ["cli", "engine"])
@pytest.mark.parametrize("bad", TABLE, ids=[bad.name for bad in TABLE])
def test_bad_input(tmp_path, capsys, monkeypatch, bad: Bad, front_end: str):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    images = bad.make(inputs)
    card = _card(tmp_path, bad.card)
    out = _output(tmp_path, bad.output)
    before = _snapshot(out)
    if bad.patch == "enospc":
        monkeypatch.setattr(sitk, "WriteImage", _enospc)  # every image write hits a full disk
    try:
        code, err = (_cli if front_end == "cli" else _engine)(bad, images, card, out, capsys)
    finally:
        if bad.output == "read_only":
            out.chmod(0o755)
    assert code == bad.code, err
    if bad.code:
        assert bad.message in err, err
        assert _snapshot(out) == before, "a refused run leaves nothing behind"
        return
    assert bad.warning in err and "warning" in err, err
    summary = json.loads((out / "case.json").read_text(encoding="utf-8"))["summary"]
    assert any(bad.warning in warning for warning in summary["warnings"]), summary["warnings"]


def test_a_fitting_input_runs_without_warnings(tmp_path, capsys):
    """The oracle of the table's warnings: an MR-like input within the card's expectations
    (non-negative, 1 mm voxels, a head-sized field of view) gets none, anywhere."""
    rng = np.random.default_rng(4)
    image = write_image(Image(rng.uniform(0, 500, (40, 50, 45)).astype(np.float32)), tmp_path / "mr.nii.gz")
    out = tmp_path / "out"
    assert main(["-q", "segment", str(image), "--model", str(mr_card(tmp_path / "mr")), "--out", str(out),
                 "--strict"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "case.json").read_text(encoding="utf-8"))["summary"]["warnings"] == []


def test_a_refused_run_removes_only_the_folder_it_made(tmp_path, capsys):
    """An output folder that was there before (with a file) is kept as it was on refusal; the
    check of writability leaves no probe file."""
    card = write_voxelwise_card(tmp_path / "model", threshold=1.0, patch=(8, 8, 8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    bad = _non_finite(tmp_path, "nan.nii.gz", np.nan)
    assert main(["-q", "segment", str(bad), "--model", str(card), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    nested = tmp_path / "a" / "b" / "out"
    assert main(["-q", "segment", str(bad), "--model", str(card), "--out", str(nested)]) == 2
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("front_end", ["cli", "engine"])
def test_a_failed_write_removes_the_parent_folders_it_made(tmp_path, capsys, monkeypatch, front_end):
    """A full disk after the folders were made (a/b/out): every folder the run made goes."""
    card = write_voxelwise_card(tmp_path / "model", threshold=1.0, patch=(8, 8, 8))
    bad = Bad("nested", lambda t: [], 2, "No space left on device", patch="enospc")
    image = _volume(tmp_path)
    monkeypatch.setattr(sitk, "WriteImage", _enospc)
    code, err = (_cli if front_end == "cli" else _engine)(bad, [image], card, tmp_path / "a" / "b" / "out", capsys)
    assert code == 2 and bad.message in err, err
    assert not (tmp_path / "a").exists()


def test_engine_process_refuses_nan_nifti(tmp_path):
    """The engine as its own process (what the GUIs launch): exit 2, the error line names the
    file and the count, no folder."""
    import subprocess
    import sys

    card = write_voxelwise_card(tmp_path / "model", threshold=1.0, patch=(8, 8, 8))
    bad = _non_finite(tmp_path, "nan.nii.gz", np.nan, 5)
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"model": str(card), "device": "cpu"}), encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "SegXAILib.engine", str(settings), str(bad), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["event"] == "error" and f"{bad}: 5 voxels are NaN or Inf (5 NaN, 0 Inf)" in error["message"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("front_end", ["cli", "engine"])
def test_missing_slices_are_resampled_only_when_asked(tmp_path, capsys, front_end):
    """With ``--resample-slices`` (``"resample_slices": true``) a series missing two slices is
    read onto the regular grid: on an oblique grid and with voxels linear along the slices, the
    linear resampling gives back the full series exactly (to float32 rounding); without it the
    series is refused (the table above)."""
    from conftest import grid_matrix
    from SegXAILib.engine import build_parser, run_engine
    from SegXAILib.io import read_image

    i, j, k = np.meshgrid(np.arange(8), np.arange(9), np.arange(10), indexing="ij")
    full = Image((10.0 * k + 3.0 * i - 2.0 * j).astype(np.float32), grid_matrix("oblique"))
    folder = write_dicom_series(full, tmp_path / "dicom")
    (folder / "slice_0004.dcm").unlink()
    (folder / "slice_0007.dcm").unlink()
    card = write_voxelwise_card(tmp_path / "model", orientation=None, threshold=1.0, patch=(8, 8, 8))
    out = tmp_path / "out"
    if front_end == "cli":
        assert main(["-q", "segment", str(folder), "--model", str(card), "--out", str(out), "--suffix", ".nrrd",
                     "--resample-slices"]) == 0
    else:
        settings = tmp_path / "s.json"
        settings.write_text(json.dumps({"model": str(card), "device": "cpu", "resample_slices": True,
                                        "instances": {"enabled": False}}), encoding="utf-8")
        args = build_parser().parse_args([str(settings), str(folder), "--out", str(out), "--image-format", ".nrrd"])
        assert run_engine(args, io.StringIO()) == 0
    assert "resampled (linear) onto a regular grid" in capsys.readouterr().err
    labels = read_image(out / "labels.nrrd")
    np.testing.assert_allclose(labels.ijk_to_ras, full.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(labels.array[0], full.array[0] > 1.0)
    assert read_image(folder, resample_slices=True).array.shape == (1, 8, 9, 10)
    np.testing.assert_allclose(read_image(folder, resample_slices=True).array, full.array, atol=1e-4)

