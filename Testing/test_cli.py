"""The ``segxai`` command: outputs, and bad input -> a clear message, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegXAILib.cli import main
from SegXAILib.image import Image
from SegXAILib.io import read_image, write_image

from conftest import grid_matrix, write_unet_card, write_voxelwise_card


@pytest.fixture()
def voxelwise(tmp_path) -> Path:
    return write_voxelwise_card(tmp_path / "model", threshold=1.0, patch=(8, 8, 8))


@pytest.fixture()
def two_channel(tmp_path) -> Path:
    return write_voxelwise_card(tmp_path / "model2", threshold=1.0, patch=(8, 8, 8), in_channels=2)


@pytest.fixture()
def volume(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    image = Image(rng.normal(0, 2, (12, 10, 9)).astype(np.float32), grid_matrix("oblique"))
    return write_image(image, tmp_path / "scan.nii.gz")


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_segment_writes_outputs_on_the_input_grid(tmp_path, voxelwise, volume, capsys):
    out = tmp_path / "out"
    assert main(["-q", "segment", str(volume), "--model", str(voxelwise), "--out", str(out)]) == 0
    image = read_image(volume)
    labels = read_image(out / "labels.nii.gz")
    np.testing.assert_allclose(labels.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(labels.array[0], image.array[0] > 1.0)
    probability = read_image(out / "probability_bright.nii.gz")
    np.testing.assert_allclose(probability.array[0], 1 / (1 + np.exp(-(image.array[0] - 1.0))), atol=1e-5)
    summary = json.loads((out / "segmentation.json").read_text(encoding="utf-8"))
    assert summary["classes"][1]["voxels"] == int((image.array[0] > 1.0).sum())
    assert summary["classes"][1]["volume_mm3"] == pytest.approx(summary["classes"][1]["voxels"] * image.voxel_volume)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_relative_output_folder_is_the_working_folders(tmp_path, voxelwise, volume, monkeypatch):
    """``--out seg`` (what ``make demo`` and users type): the files and the manifest land in
    ``./seg``, each listed once under its own name, checksums verified."""
    from SegXAILib.pipeline import read_manifest

    monkeypatch.chdir(tmp_path)
    assert main(["-q", "segment", str(volume), "--model", str(voxelwise), "--out", "seg"]) == 0
    manifest = read_manifest(tmp_path / "seg", verify=True)
    assert sorted(entry["path"] for entry in manifest["files"]) == [
        "labels.nii.gz", "probability_bright.nii.gz", "segmentation.json"]
    assert not (tmp_path / "seg" / "seg").exists()


def test_segment_dicom_series_input(tmp_path, voxelwise):
    from SegXAILib.io import write_dicom_series

    image = Image(np.round(np.random.default_rng(1).normal(0, 3, (10, 9, 6))).astype(np.float32), grid_matrix("lps_flipped"))
    folder = write_dicom_series(image, tmp_path / "dicom")
    out = tmp_path / "out"
    assert main(["-q", "segment", str(folder), "--model", str(voxelwise), "--out", str(out), "--suffix", ".nrrd"]) == 0
    labels = read_image(out / "labels.nrrd")
    np.testing.assert_allclose(labels.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(labels.array[0], image.array[0] > 1.0)


def test_info_describes_a_model(voxelwise, capsys):
    assert main(["info", str(voxelwise), "--load"]) == 0
    text = capsys.readouterr().out
    assert "voxelwise-threshold" in text and "parameters   : 4" in text and "checksum" in text


def test_console_script_entry_point(tmp_path, voxelwise):
    """``python -m SegXAILib.cli`` (what the ``segxai`` script calls) exits 2 on bad input."""
    result = subprocess.run(
        [sys.executable, "-m", "SegXAILib.cli", "segment", str(tmp_path / "nope.nii.gz"), "--model", str(voxelwise),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "nope.nii.gz" in result.stderr and "no such file" in result.stderr


# ---- bad inputs: one test each ---------------------------------------------------------------------

def assert_bad_input(args: list[str], capsys, expected: str, out: Path) -> None:
    code = main(["-q", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert files_under(out) == [], "nothing may be written on bad input"


def test_missing_file(tmp_path, voxelwise, capsys):
    out = tmp_path / "out"
    assert_bad_input(["segment", str(tmp_path / "missing.nii.gz"), "--model", str(voxelwise), "--out", str(out)], capsys,
            "missing.nii.gz: no such file", out)


def test_non_image_file(tmp_path, voxelwise, capsys):
    bogus = tmp_path / "notes.nii.gz"
    bogus.write_text("this is not an image", encoding="utf-8")
    out = tmp_path / "out"
    assert_bad_input(["segment", str(bogus), "--model", str(voxelwise), "--out", str(out)], capsys,
            "cannot be read as an image", out)


def test_folder_without_dicom(tmp_path, voxelwise, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_bad_input(["segment", str(tmp_path / "empty"), "--model", str(voxelwise), "--out", str(out)], capsys,
            "holds no DICOM series", out)


def test_2d_image(tmp_path, voxelwise, capsys):
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(tmp_path / "slice.nii.gz"))
    out = tmp_path / "out"
    assert_bad_input(["segment", str(tmp_path / "slice.nii.gz"), "--model", str(voxelwise), "--out", str(out)], capsys,
            "2D; expected a 3D volume", out)


def test_4d_image(tmp_path, voxelwise, capsys):
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(tmp_path / "series.nii.gz"))
    out = tmp_path / "out"
    assert_bad_input(["segment", str(tmp_path / "series.nii.gz"), "--model", str(voxelwise), "--out", str(out)], capsys,
            "4D with 3 volumes", out)


@pytest.mark.parametrize("suffix, cut", [(".nii.gz", "data"), (".nii", "data"), (".nii.gz", "stream")])
def test_truncated_nifti(tmp_path, voxelwise, capsys, suffix, cut):
    """ITK fills a NIfTI cut inside its voxel data with zeros and raises nothing; SegXAI refuses
    it (a whole gzip stream, every voxel the header promises), naming the file."""
    import gzip

    array = np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32)
    path = write_image(Image(array), tmp_path / f"scan{suffix}")
    if cut == "stream":  # the compressed file cut short: the gzip stream has no end
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 4])
    else:  # a whole stream (or plain file) holding three quarters of the voxels
        raw = gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes()
        short = raw[: len(raw) * 3 // 4]
        path.write_bytes(gzip.compress(short) if suffix == ".nii.gz" else short)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (16, 20, 24)  # ITK reads it silently
    out = tmp_path / "out"
    assert_bad_input(["segment", str(path), "--model", str(voxelwise), "--out", str(out)], capsys,
                     f"image {path}: truncated or corrupt", out)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, voxelwise, capsys, bad):
    array = np.zeros((8, 8, 8), np.float32)
    array[3, 4, 5] = bad
    write_image(Image(array), tmp_path / "bad.nrrd")
    out = tmp_path / "out"
    assert_bad_input(["segment", str(tmp_path / "bad.nrrd"), "--model", str(voxelwise), "--out", str(out)], capsys,
            "1 voxels are NaN or Inf", out)


def test_wrong_channel_count(tmp_path, two_channel, volume, capsys):
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), "--model", str(two_channel), "--out", str(out)], capsys,
            "takes 2 image(s) (ch0, ch1), got 1", out)


def test_channels_that_cannot_be_resampled(tmp_path, two_channel, volume, capsys):
    far = read_image(volume)
    shifted = far.ijk_to_ras.copy()
    shifted[:3, 3] += 1000.0
    write_image(Image(far.array, shifted), tmp_path / "far.nii.gz")
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), str(tmp_path / "far.nii.gz"), "--model", str(two_channel), "--out", str(out)],
            capsys, "cannot be resampled onto it", out)


def test_missing_weights(tmp_path, volume, capsys):
    card = write_unet_card(tmp_path / "unet")
    (tmp_path / "unet" / "model.pt").unlink()
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), "--model", str(card), "--out", str(out)], capsys, "model.pt: no such file", out)


def test_mismatched_weights(tmp_path, volume, capsys):
    card = write_unet_card(tmp_path / "unet")
    data = json.loads(card.read_text(encoding="utf-8"))
    data["architecture"]["kwargs"]["channels"] = [6, 12]
    card.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), "--model", str(card), "--out", str(out)], capsys, "do not match UNet", out)


def test_missing_model_card(tmp_path, volume, capsys):
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), "--model", str(tmp_path / "none.json"), "--out", str(out)], capsys,
            "none.json: no such file", out)


def test_output_that_cannot_be_written(tmp_path, voxelwise, volume, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    code = main(["-q", "segment", str(volume), "--model", str(voxelwise), "--out", str(blocker / "out")])
    assert code == 2
    assert "cannot be created" in capsys.readouterr().err
    code = main(["-q", "segment", str(volume), "--model", str(voxelwise), "--out", str(blocker)])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err
    assert blocker.read_text(encoding="utf-8") == "x"


def test_unknown_device(tmp_path, voxelwise, volume, capsys):
    out = tmp_path / "out"
    assert_bad_input(["segment", str(volume), "--model", str(voxelwise), "--out", str(out), "--device", "tpu"], capsys,
            "--device 'tpu'", out)


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """Atomic writes: a failure while writing leaves neither a partial file nor a temp file."""
    import SegXAILib.io as io_module

    target = tmp_path / "labels.nii.gz"
    write_image(Image(np.ones((4, 4, 4), np.float32)), target)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io_module.sitk if hasattr(io_module, "sitk") else sitk, "WriteImage", broken)
    with pytest.raises(Exception):
        write_image(Image(np.zeros((4, 4, 4), np.float32)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = write_image(Image(np.ones((4, 4, 4), np.float32)), tmp_path / "a.nii.gz")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_library_errors_are_given_the_options_names():
    """Library messages start with the parameter; a command names the option the user typed. Only
    a whole leading word is replaced (not ``trust=True`` or ``model.0``); other errors pass unchanged."""
    from SegXAILib.cli.common import options_named
    from SegXAILib.image import SegXAIInputError

    def raised(message: str, *parameters: str, **renamed: str) -> str:
        with pytest.raises(SegXAIInputError) as error, options_named(*parameters, **renamed):
            raise SegXAIInputError(message)
        return str(error.value)

    assert raised("window_batch 0: must be >= 1", "window_batch") == "--window-batch 0: must be >= 1"
    assert raised("target: no class 'x'", "target") == "--target: no class 'x'"
    assert raised("cohort_dir /a: no such folder", cohort_dir="--cohort") == "--cohort /a: no such folder"
    assert raised("seed", "seed") == "--seed"
    for message in ("trust=True is needed", "model.0: not supported", "device_name 'x': bad", "weights w: no such file",
                    "the target is empty"):
        assert raised(message, "trust", "model", "device", "target") == message


def test_untrusted_bundle_names_the_option(tmp_path, capsys):
    card = tmp_path / "bundle" / "model_card.json"
    (card.parent / "configs").mkdir(parents=True)
    card.write_text(json.dumps({
        "name": "bundle", "architecture": {"format": "bundle", "path": "."}, "input_channels": ["ch0"],
        "classes": [{"name": "background"}, {"name": "thing"}], "inference": {"patch_size": [16, 16, 16]},
    }), encoding="utf-8")
    assert main(["info", str(card), "--load"]) == 2
    err = capsys.readouterr().err
    assert "--trust-code" in err and "MONAI bundle" in err
