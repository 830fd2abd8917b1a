"""``segxai explain`` and ``segxai methods``: outputs on the input grid equal to the Python API,
the JSON sidecar, and bad input -> exit code 2 with nothing written. Plus a smoke test of the
attribution benchmark (``Testing/Benchmarks/bench_attribution.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.pipeline import read_manifest
from SegXAILib.io import read_channels, read_image, write_image

BENCHMARK = Path(__file__).resolve().parent / "Benchmarks" / "bench_attribution.py"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def parotid_case(tmp_path_factory) -> Path:
    from SegXAILib.phantoms import make_parotid_phantom

    phantom = make_parotid_phantom("S6", 1000, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    return write_image(phantom.image, tmp_path_factory.mktemp("parotid") / "ct.nii.gz")


@pytest.fixture(scope="module")
def lesion_case(tmp_path_factory) -> list[Path]:
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=2026)
    folder = tmp_path_factory.mktemp("lesions")
    return [write_image(phantom.image.channel(name), folder / f"{name}.nii.gz") for name in ("FLAIR", "T1")]


@pytest.fixture(scope="module")
def models():
    """The bundled models, loaded once (CPU)."""
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    return {name: load_model(resolve_model_card(name), device="cpu") for name in ("parotid-S6", "lesions")}


def python_maps(images, model, method, params, target="class"):
    from SegXAILib.attribution import explain

    image = read_channels(images, model.card.input_channels)
    return explain(image, model, method, target=target, params=params)


def run_explain(images, model_name, method, out, *extra) -> int:
    return main(["-q", "explain", *map(str, images), "--model", model_name, "--method", method, "--out", str(out),
                 "--device", "cpu", *extra])


def check_outputs(images, out, method, result, suffix=".nii.gz", transform=lambda v: v):
    reference = read_image(images[0])
    for channel, name in enumerate(result.maps.channel_names):
        written = read_image(out / "maps" / f"{method}_{name}{suffix}")
        np.testing.assert_allclose(written.ijk_to_ras, reference.ijk_to_ras, atol=1e-4)
        assert written.spatial_shape == reference.spatial_shape
        expected = transform(result.maps.array[channel])
        scale = float(np.abs(expected).max())
        assert scale > 0, "the map should not be all zeros"
        np.testing.assert_allclose(written.array[0], expected, rtol=1e-5, atol=1e-6 * scale)
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    read_manifest(out)  # every written file is listed with its checksum


@pytest.mark.parametrize("method, params", [("vanilla_gradient", {}), ("smoothgrad", {"n_samples": 2})])
def test_explain_parotid_phantom(tmp_path, parotid_case, models, method, params):
    out = tmp_path / "out"
    extra = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    assert run_explain([parotid_case], "parotid-S6", method, out, *extra) == 0
    result = python_maps([parotid_case], models["parotid-S6"], method, params)
    assert result.maps.channel_names == ("CT",)
    check_outputs([parotid_case], out, method, result)
    sidecar = json.loads((out / "maps" / f"{method}.json").read_text(encoding="utf-8"))
    assert sidecar["method"] == method
    assert sidecar["parameters"] == json.loads(json.dumps(result.metadata()["parameters"]))
    assert sidecar["postprocessing"] == "signed"
    assert sidecar["target"]["class_name"] == "gland" and sidecar["target"]["spec"] == "class"
    manifest = read_manifest(out)
    assert manifest["inputs"] == {"CT": str(parotid_case.resolve())}
    assert sidecar["files"] == {"CT": f"{method}_CT.nii.gz"}
    assert sidecar["model"] == "segxai-parotid-S6" and sidecar["model_checksum"]
    from SegXAILib import __version__

    assert manifest["versions"]["segxai"] == __version__
    if method == "smoothgrad":
        assert sidecar["parameters"]["n_samples"] == 2
        assert sidecar["seed"] == 0 and sidecar["parameters"]["seed"] == 0
    else:
        assert sidecar["seed"] is None


@pytest.mark.parametrize("method, params", [("vanilla_gradient", {}), ("smoothgrad", {"n_samples": 2, "seed": 7})])
def test_explain_lesion_sample(tmp_path, lesion_case, models, method, params):
    out = tmp_path / "out"
    extra = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    assert run_explain(lesion_case, "lesions", method, out, "--target", "class:lesion", *extra) == 0
    result = python_maps(lesion_case, models["lesions"], method, params, target="class:lesion")
    assert result.maps.channel_names == ("FLAIR", "T1")
    check_outputs(lesion_case, out, method, result)
    sidecar = json.loads((out / "maps" / f"{method}.json").read_text(encoding="utf-8"))
    assert sidecar["channels"] == ["FLAIR", "T1"]
    assert set(sidecar["files"]) == {"FLAIR", "T1"}
    if method == "smoothgrad":
        assert sidecar["seed"] == 7 and sidecar["parameters"]["n_samples"] == 2


def test_explain_postprocessing_suffix_and_region_target(tmp_path, parotid_case, models):
    from SegXAILib.attribution import TargetSpec

    image = read_image(parotid_case)
    mask = np.zeros(image.spatial_shape, np.uint8)
    mask[12:20, 12:20, 12:20] = 1
    mask_path = write_image(image.with_array(mask[None]), tmp_path / "roi.nrrd")
    out = tmp_path / "out"
    code = run_explain([parotid_case], "parotid-S6", "gradient_x_input", out, "--target", f"region:{mask_path}:gland",
                       "--postprocess", "absolute", "--suffix", ".nrrd")
    assert code == 0
    result = python_maps([parotid_case], models["parotid-S6"], "gradient_x_input", {},
                         target=TargetSpec.parse(f"region:{mask_path}:gland"))
    check_outputs([parotid_case], out, "gradient_x_input", result, suffix=".nrrd", transform=np.abs)
    sidecar = json.loads((out / "maps" / "gradient_x_input.json").read_text(encoding="utf-8"))
    assert sidecar["postprocessing"] == "absolute" and sidecar["target"]["spec"] == "region"
    assert sidecar["target"]["kind"] == "RegionTarget"


def test_explain_normalised_is_in_unit_range(tmp_path, parotid_case):
    out = tmp_path / "out"
    assert run_explain([parotid_case], "parotid-S6", "vanilla_gradient", out, "--postprocess", "normalised") == 0
    values = read_image(out / "maps" / "vanilla_gradient_CT.nii.gz").array
    assert values.min() >= 0.0 and values.max() == pytest.approx(1.0)


# ---- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--method", "no_such_method"], "method 'no_such_method': unknown"),
        (["--method", "expected_gradients"], "needs reference volumes"),
        (["--method", "smoothgrad", "--param", "n_samples"], "expected NAME=VALUE"),
        (["--method", "smoothgrad", "--param", "samples=3"], "method 'smoothgrad' has no parameter 'samples'"),
        (["--method", "smoothgrad", "--param", "n_samples=many"], "parameter n_samples: expected int"),
        (["--method", "smoothgrad", "--param", "n_samples=0"], "parameter n_samples: must be >= 1"),
        (["--method", "vanilla_gradient", "--param", "n_samples=2"],
         "method 'vanilla_gradient' has no parameter 'n_samples'; it takes no parameters"),
        (["--method", "vanilla_gradient", "--target", "everything"], "--target 'everything'"),
        (["--method", "vanilla_gradient", "--target", "instance:first"], "--target 'instance:first'"),
        (["--method", "vanilla_gradient", "--target", "class:tumour"], "no class 'tumour'"),
        (["--method", "vanilla_gradient", "--target", "region:/no/such/mask.nii.gz"], "no such file"),
        (["--method", "vanilla_gradient", "--target", "instance:99"], "--target instance:99"),
        (["--method", "vanilla_gradient", "--postprocess", "squared"], "--postprocess 'squared'"),
        (["--method", "vanilla_gradient", "--window-batch", "0"], "--window-batch 0"),
        (["--method", "vanilla_gradient", "--device", "tpu"], "--device 'tpu'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_explain_bad_input(tmp_path, parotid_case, capsys, extra, expected):
    out = tmp_path / "out"
    code = main(["-q", "explain", str(parotid_case), "--model", "parotid-S6", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert err.startswith("segxai explain: error:")
    assert files_under(out) == [], "nothing may be written on bad input"


def test_explain_wrong_channel_count_and_missing_image(tmp_path, parotid_case, capsys):
    out = tmp_path / "out"
    assert run_explain([parotid_case], "lesions", "vanilla_gradient", out) == 2
    assert "takes 2 image(s) (FLAIR, T1), got 1" in capsys.readouterr().err
    assert not out.exists()
    assert run_explain([tmp_path / "missing.nii.gz"], "parotid-S6", "vanilla_gradient", out) == 2
    assert "missing.nii.gz: no such file" in capsys.readouterr().err
    assert files_under(out) == []


def test_explain_unwritable_output(tmp_path, parotid_case, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    assert run_explain([parotid_case], "parotid-S6", "vanilla_gradient", blocker / "out") == 2
    assert "cannot be created" in capsys.readouterr().err
    assert run_explain([parotid_case], "parotid-S6", "vanilla_gradient", blocker) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert blocker.read_text(encoding="utf-8") == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


# ---- methods ----------------------------------------------------------------------------------------

def test_methods_json(capsys):
    from SegXAILib.attribution import available_methods

    assert main(["methods", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    by_name = {spec["name"]: spec for spec in specs}
    assert sorted(by_name) == available_methods()
    assert by_name["vanilla_gradient"]["parameters"] == [] and by_name["vanilla_gradient"]["summary"]
    smoothgrad = {p["name"]: p for p in by_name["smoothgrad"]["parameters"]}
    assert smoothgrad["n_samples"]["default"] == 20 and smoothgrad["n_samples"]["minimum"] == 1
    assert smoothgrad["seed"]["kind"] == "int" and by_name["smoothgrad"]["stochastic"] is True
    ig = {p["name"]: p for p in by_name["integrated_gradients"]["parameters"]}
    assert "black_white" in ig["baselines"]["choices"]


def test_methods_text(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "vanilla_gradient: gradient of the target" in text
    assert "n_samples=20  (int; >= 1)" in text
    assert "baselines=zero  (choice; one of zero, min, max, black_white)" in text


# ---- the benchmark ------------------------------------------------------------------------------------

def test_benchmark_smoke(tmp_path):
    """One in-process measurement of ours and Captum's IG on a 16^3 cube; equal outputs."""
    spec = importlib.util.spec_from_file_location("bench_attribution", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = {"size": 16, "device": "cpu", "repeats": 1, "params": {"n_steps": 2, "batch": 2}}
    ours = bench.run_measurement({**common, "impl": "ours:integrated_gradients"}, tmp_path / "ours.npy")
    reference = bench.run_measurement({**common, "impl": "captum:integrated_gradients"}, tmp_path / "ref.npy")
    assert ours["size"] == 16 and len(ours["seconds"]) == 1 and ours["peak_mb"] >= 0
    equality = bench.compare(np.load(tmp_path / "ours.npy"), np.load(tmp_path / "ref.npy"))
    assert equality["max_abs_reference"] > 0 and equality["relative_diff"] < 1e-5
    row = {"method": "integrated_gradients", "size": 16, "device": "cpu", "ours_s": ours["seconds_median"],
           "reference_s": reference["seconds_median"], "time_ratio": 1.0, "ours_peak_mb": 1.0,
           "reference_peak_mb": 1.0, "memory_ratio": 1.0, "equality": equality}
    results = {"date": "now", "machine": {"processor": "cpu", "cpu_count": 1, "torch_threads": 1, "cuda": None},
               "versions": {"torch": "t", "captum": "c", "monai": "m"}, "model": "UNet", "target": "sphere",
               "params": {**bench.DEFAULTS, "n_steps": 2, "batch": 2}, "repeats": 1, "gradcam_plusplus": "no",
               "rows": [row]}
    json_path, md_path = bench.write_results(results, tmp_path / "results")
    assert json.loads(json_path.read_text(encoding="utf-8"))["rows"][0]["size"] == 16
    assert "| integrated_gradients | 16^3 | cpu |" in md_path.read_text(encoding="utf-8")
