"""Counterfactual relevance as a step of the case pipeline: settings, ``add_counterfactual`` /
``run_case``, the case folder (written and read back) and ``segxai counterfactual train`` /
``explain``.

Oracles: the step's maps equal :func:`counterfactual_relevance` called directly on each
instance's mask; generators that add known constants give ``R`` exactly (``0.75 scale`` inside
the rewritten patch, 0 elsewhere) on oblique and flipped grids, read back from the folder on the
same grid; a training run killed (SIGKILL) after its first checkpoint and started again ends
with the same generators, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_voxelwise_card
from test_counterfactual import phantom as core_phantom
from SegXAILib.counterfactual import (CHECKPOINT_NAME, CounterfactualConfig, CounterfactualGenerators, IntensityFrame,
                                      PatchGeometry, ResidualGenerator, counterfactual_relevance,
                                      load_counterfactual_generators)
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.io import write_image
from SegXAILib.models.loaders import load_model
from SegXAILib.pipeline import (CaseSettings, add_counterfactual, read_case, run_case, start_case, write_case)
from SegXAILib.pipeline.write import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 2.0  # the voxel-wise model's lesion logit is x - THRESHOLD
GEOMETRY = PatchGeometry(2, (16, 16), (16, 16, 4), (6, 6))
TINY = dict(batch_size=4, learning_rate=2e-3, generator_features=(8, 16), generator_strides=(2,),
            discriminator_features=(8, 16), ssim_window=5)
TINY_OPTIONS = ["--patch-size", "16,16", "--context-size", "16,16,4", "--region-size", "6,6", "--batch-size", "4",
                "--learning-rate", "2e-3", "--features", "8,16", "--strides", "2", "--discriminator-features", "8,16",
                "--ssim-window", "5", "--device", "cpu"]
SCALE = 2.0  # the generators' intensity frame: G adds scale * tanh(head bias)


def phantom(seed: int, shape=(32, 32, 8), grid: str = "identity") -> Image:
    """``test_counterfactual``'s phantom (tissue with three blobs above the threshold) as the
    card's channel ``ch0``."""
    image = core_phantom(seed, shape, grid)
    return Image(image.array, image.ijk_to_ras, ("ch0",))


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_voxelwise_card(tmp_path_factory.mktemp("voxelwise"), orientation="RAS", threshold=THRESHOLD,
                                patch=GEOMETRY.context_size)


@pytest.fixture(scope="module")
def model(card):
    return load_model(card, "cpu")


def make_generators(plus_shift: float, minus_shift: float, random_plus: bool = False,
                    model_name: str = "voxelwise-threshold") -> CounterfactualGenerators:
    """Fresh generators adding ``SCALE * shift`` each (their last layer is zero: the identity
    plus the bias); with ``random_plus`` G+'s last layer gets seeded random weights, so that
    its output varies with the image."""
    frame = IntensityFrame((1.0,), (SCALE,))
    config = CounterfactualConfig(iterations=1, **TINY)
    nets = []
    for shift in (plus_shift, minus_shift):
        torch.manual_seed(7)
        net = ResidualGenerator(2, frame, config.generator_features, config.generator_strides).eval()
        with torch.no_grad():
            net.head.bias.fill_(math.atanh(shift))
            if random_plus and not nets:
                net.head.weight.normal_(0.0, 0.3)
        nets.append(net)
    return CounterfactualGenerators(nets[0], nets[1], GEOMETRY, frame, config, 1, model_name)


@pytest.fixture(scope="module")
def constant_generators(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("constant")
    make_generators(0.5, -0.25).save(folder / "generators.pt")
    return folder  # a folder holding generators.pt, as `counterfactual train` writes it


@pytest.fixture(scope="module")
def random_generators(tmp_path_factory) -> Path:
    return make_generators(0.3, -0.2, random_plus=True).save(tmp_path_factory.mktemp("random") / "generators.pt")


def settings_for(card, generators, **counterfactual) -> CaseSettings:
    return CaseSettings.from_dict({"model": str(card), "device": "cpu", "instances": {"ids": []},
                                   "counterfactual": {"enabled": True, "generators": str(generators), **counterfactual}})


# ---------------------------------------------------------------------------- the pipeline step


def test_the_pipeline_step_equals_the_api(card, model, random_generators):
    image = phantom(3, grid="oblique")
    case = run_case(image, model, settings_for(card, random_generators))
    assert len(case.instances) >= 2 and sorted(case.counterfactuals) == [i.id for i in case.instances]
    generators = load_counterfactual_generators(random_generators)
    labels = case.instance_labels.array[0]
    for identifier, result in case.counterfactuals.items():
        region = image.with_array((labels == identifier).astype(np.uint8)[None], ("instance",))
        direct = counterfactual_relevance(image, model, generators, region=region)
        for kind in ("plus", "minus", "relevance", "patch"):
            assert np.array_equal(getattr(result, kind).array, getattr(direct, kind).array), (identifier, kind)
        assert result.centre == direct.centre and result.scores == direct.scores
        # the patch is centred on a voxel of the instance; G+ is not a constant shift
        assert bool(result.patch.array[0][labels == identifier].any())
        assert float(np.ptp(result.relevance.array[0][result.patch.array[0] > 0])) > 1e-3
    assert case.counterfactual_generators["sha256"] == file_sha256(random_generators)
    assert case.counterfactual_generators["path"] == str(random_generators.resolve())


def test_the_step_takes_the_cases_instances_by_id_or_click(card, model, constant_generators):
    image = phantom(3)
    case = start_case(image, model, settings_for(card, constant_generators, ids=[2]))
    add_counterfactual(case, model)
    assert list(case.counterfactuals) == [2]
    # a click on a voxel of instance 1 selects it
    voxel = np.argwhere(case.instance_labels.array[0] == 1)[0]
    point = (image.ijk_to_ras @ np.append(voxel, 1.0))[:3].tolist()
    clicked = run_case(image, model, settings_for(card, constant_generators, click_ras=point))
    assert list(clicked.counterfactuals) == [1]
    with pytest.raises(SegXAIInputError, match=r"counterfactual\.ids: no instance 9"):
        run_case(image, model, settings_for(card, constant_generators, ids=[9]))


@pytest.mark.parametrize("grid", ["oblique", "lps_flipped"])
def test_the_case_folder_round_trips_with_known_relevance(card, model, constant_generators, tmp_path, grid):
    """G+ adds 0.5 scale, G- subtracts 0.25 scale: R = 0.75 scale on the patch, 0 elsewhere,
    on the input grid; read back equal, on the same grid."""
    image = phantom(5, grid=grid)
    case = run_case(image, model, settings_for(card, constant_generators, ids=[1, 2]))
    for result in case.counterfactuals.values():
        patch = result.patch.array[0].astype(bool)
        assert patch.any()
        np.testing.assert_allclose(result.relevance.array[0][patch], 0.75 * SCALE, rtol=1e-6)
        assert float(np.abs(result.relevance.array[0][~patch]).max()) == 0.0
        np.testing.assert_allclose(result.plus.array[0][patch], image.array[0][patch] + 0.5 * SCALE, rtol=1e-6)
        assert result.scores["plus"] - result.scores["original"] == pytest.approx(0.5 * SCALE, abs=1e-5)

    source = write_image(image, tmp_path / "image.nii.gz")
    manifest = json.loads(write_case(case, tmp_path / "case", inputs={"ch0": source}).read_text())
    assert manifest["summary"]["counterfactuals"] == [1, 2]
    for identifier in (1, 2):
        for kind in ("plus", "minus", "relevance"):
            assert (tmp_path / "case" / "counterfactual" / f"instance{identifier}_{kind}_ch0.nii.gz").is_file()
    document = json.loads((tmp_path / "case" / "counterfactual.json").read_text())
    assert document["generators"]["sha256"] == file_sha256(constant_generators / "generators.pt")
    assert document["instances"]["1"]["scores"] == case.counterfactuals[1].scores

    again = read_case(tmp_path / "case", ijk_to_ras=image.ijk_to_ras)
    assert list(again.counterfactuals) == [1, 2]
    assert again.counterfactual_generators == case.counterfactual_generators
    for identifier, result in case.counterfactuals.items():
        read = again.counterfactuals[identifier]
        for kind in ("plus", "minus", "relevance", "patch"):
            written, back = getattr(result, kind), getattr(read, kind)
            np.testing.assert_array_equal(back.array, written.array)
            assert back.channel_names == written.channel_names
            np.testing.assert_array_equal(back.ijk_to_ras, image.ijk_to_ras)
        assert read.scores == result.scores and read.centre == result.centre
    # without the caller's matrix: the manifest's grid, float32 NIfTI geometry within its rounding
    plain = read_case(tmp_path / "case")
    np.testing.assert_allclose(plain.counterfactuals[1].relevance.ijk_to_ras, image.ijk_to_ras, rtol=0, atol=1e-4)


def test_generators_for_another_model_or_file_are_refused(card, model, tmp_path):
    image = phantom(3)
    other = make_generators(0.5, -0.25, model_name="another-model").save(tmp_path / "other.pt")
    with pytest.raises(SegXAIInputError, match=r"counterfactual\.generators .*another-model"):
        run_case(image, model, settings_for(card, other))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SegXAIInputError, match=r"counterfactual\.generators .*cannot be read"):
        run_case(image, model, settings_for(card, tmp_path / "bad.pt"))
    with pytest.raises(SegXAIInputError, match=r"counterfactual\.generators .*no generators file"):
        run_case(image, model, settings_for(card, tmp_path / "missing"))


@pytest.mark.parametrize("counterfactual, instances, words", [
    ({"enabled": True}, {}, "counterfactual.generators"),
    ({"ids": [0]}, {}, "counterfactual.ids"),
    ({"ids": [1], "click_ras": [0, 0, 0]}, {}, "counterfactual: give ids or click_ras"),
    ({"click_ras": [0, 0, "nan"]}, {}, "counterfactual.click_ras"),
    ({"max_instances": 0}, {}, "counterfactual.max_instances"),
    ({"enabled": True, "generators": "g.pt"}, {"enabled": False}, "instances.enabled"),
])
def test_bad_counterfactual_settings_name_the_field(counterfactual, instances, words):
    with pytest.raises(SegXAIInputError, match=words.replace(".", r"\.")):
        CaseSettings.from_dict({"counterfactual": counterfactual, "instances": instances}, "s.json")


# ---------------------------------------------------------------------------- segxai counterfactual


def _state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{net}.{k}": v for net in ("plus", "minus") for k, v in state[net].items()}


@pytest.fixture(scope="module")
def training_images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("training")
    return [str(write_image(phantom(seed), folder / f"case{seed}.nii.gz")) for seed in range(4)]


def test_train_killed_after_a_checkpoint_resumes_bit_for_bit(card, training_images, tmp_path):
    from SegXAILib.cli.app import main

    arguments = ["counterfactual", "train", "--model", str(card), "--images", *training_images, "--iterations", "40",
                 "--checkpoint-every", "3", "--seed", "1", *TINY_OPTIONS]
    assert main(["-q", *arguments, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "SegXAILib.cli", "-q", *arguments, "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / CHECKPOINT_NAME).exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    stopped = int(torch.load(out / CHECKPOINT_NAME, weights_only=True)["iteration"])
    assert 3 <= stopped < 40 and not (out / "generators.pt").exists()  # killed midway

    rerun = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from iteration {stopped}" in rerun.stdout
    whole, resumed = _state(tmp_path / "whole" / "generators.pt"), _state(out / "generators.pt")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert (out / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    training = json.loads((out / "training.json").read_text())
    assert training["resumed_from"] == stopped and training["model"]["name"] == "voxelwise-threshold"
    # the trained pair moves the model's score the right way on its last batch
    last = training["last_iteration"]
    assert last["score_plus"] > last["score_minus"]


def test_explain_writes_the_pipelines_files(card, model, constant_generators, tmp_path, capsys):
    from SegXAILib.cli.app import main

    image = phantom(5, grid="lps_flipped")
    source = write_image(image, tmp_path / "image.nii.gz")
    expected = run_case(image, model, settings_for(card, constant_generators, ids=[2]))
    code = main(["-q", "counterfactual", "explain", str(source), "--model", str(card), "--generators",
                 str(constant_generators), "--instance", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    assert "instance 2:" in capsys.readouterr().out
    for kind in ("plus", "minus", "relevance"):
        assert (tmp_path / "out" / "counterfactual" / f"instance2_{kind}_ch0.nii.gz").is_file()
    written = read_case(tmp_path / "out")
    assert list(written.counterfactuals) == [2] and written.instance_maps == {}
    for kind in ("plus", "minus", "relevance"):
        # the image went through a NIfTI file: float32 voxels, geometry to float32 precision
        np.testing.assert_allclose(getattr(written.counterfactuals[2], kind).array,
                                   getattr(expected.counterfactuals[2], kind).array, rtol=1e-6, atol=1e-6)
    assert written.counterfactuals[2].scores == pytest.approx(expected.counterfactuals[2].scores, abs=1e-5)


@pytest.mark.parametrize("options, words", [
    (["--click", "1,2"], "--click"),
    (["--instance", "0"], "--instance"),
    (["--instance", "9"], "--instance 9"),
    (["--click-radius", "-1"], "--click-radius"),
    (["--max-instances", "0"], "--max-instances"),
    (["--class", "nothing"], "--class"),
    (["--generators", "/no/such/folder"], "--generators"),
])
def test_bad_explain_options_are_named_and_nothing_is_written(card, constant_generators, tmp_path, capsys, options,
                                                              words):
    from SegXAILib.cli.app import main

    source = write_image(phantom(5), tmp_path / "image.nii.gz")
    arguments = ["-q", "counterfactual", "explain", str(source), "--model", str(card), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--generators", str(constant_generators), *options]
    assert main(arguments) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, words", [
    (["--patch-size", "15,15"], "--patch-size"),  # does not divide by the generator's stride
    (["--patch-size", "16,16,4"], "--patch-size"),
    (["--region-size", "20,6"], "--region-size"),
    (["--iterations", "0"], "--iterations"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--features", "8,x"], "--features"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--tissue-mask", "a.nii.gz"], "--tissue-mask"),
    (["--class", "nothing"], "--class"),
])
def test_bad_train_options_are_named_and_nothing_is_written(card, training_images, tmp_path, capsys, options,
                                                            words):
    from SegXAILib.cli.app import main

    arguments = ["-q", "counterfactual", "train", "--model", str(card), "--images", *training_images[:2],
                 "--out", str(tmp_path / "cf"), "--iterations", "2", *TINY_OPTIONS, *options]
    assert main(arguments) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "cf").exists()


def test_argparse_refuses_both_selections(card, constant_generators, tmp_path):
    from SegXAILib.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["counterfactual", "explain", "x.nii.gz", "--model", str(card), "--out", str(tmp_path / "out"),
              "--generators", str(constant_generators), "--instance", "1", "--click", "0,0,0"])
    assert exit_.value.code == 2 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- MRML bridge and engine job

def test_the_engine_job_shows_the_counterfactual_as_nodes(card, constant_generators, tmp_path):
    """Segment -> counterfactual of lesion 1 through the engine process: R as a signed saliency
    volume (0.75 scale on the patch, 0 elsewhere), G+(x) and G-(x) as volumes, all on the input
    volume's exact grid; R is the views' foreground; a reopened case folder shows the same."""
    pytest.importorskip("slicer")
    from SegXAILib import mrml
    from SegXAILib.mrml.logic import counterfactual_summary
    from SegXAILib.mrml.session import CaseSession

    image = phantom(6, grid="oblique")
    scene = mrml.headless_scene()
    volume = mrml.image_to_volume_node(image, scene, "input")
    session = CaseSession(scene, tmp_path / "jobs", env={"OMP_NUM_THREADS": "1"})
    settings = settings_for(card, constant_generators)
    session.segment([volume], CaseSettings.from_dict({**settings.to_dict(), "counterfactual": {}}))
    assert session.wait(300).state == "done"
    session.counterfactual(1, settings)
    update = session.wait(300)
    assert update.state == "done", update.error
    shown = session.nodes.counterfactual[1]
    relevance = mrml.volume_node_to_image(shown["relevance"][0])
    patch = session.case.counterfactuals[1].patch.array[0].astype(bool)
    np.testing.assert_allclose(relevance.array[0][patch], 0.75 * SCALE, rtol=1e-6)
    assert float(np.abs(relevance.array[0][~patch]).max()) == 0.0
    np.testing.assert_allclose(relevance.ijk_to_ras, mrml.volume_node_to_image(volume).ijk_to_ras, atol=1e-9)
    plus = mrml.volume_node_to_image(shown["plus"][0]).array[0]
    np.testing.assert_allclose(plus[patch], image.array[0][patch] + 0.5 * SCALE, rtol=1e-6)
    assert all(c.GetForegroundVolumeID() == shown["relevance"][0].GetID() for c in mrml.slice_composite_nodes(scene))
    summary = counterfactual_summary(session.case, 1)
    assert summary["plus"] - summary["original"] == pytest.approx(0.5 * SCALE, abs=1e-5)
    other = mrml.headless_scene()
    reopened = CaseSession(other, tmp_path / "again")
    reopened.open(session.job.case_dir)
    back = mrml.volume_node_to_image(reopened.nodes.counterfactual[1]["relevance"][0])
    np.testing.assert_array_equal(back.array, relevance.array)


def test_the_slicer_logic_runs_the_counterfactual(card, constant_generators, tmp_path):
    """The panel's Logic: the generators path goes into the case settings; its counterfactual
    job fills the summary line with the scores the case holds."""
    pytest.importorskip("slicer")
    import importlib.util

    from SegXAILib import mrml

    spec = importlib.util.spec_from_file_location("SegXAI", ROOT / "SegXAI" / "SegXAI.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scene = mrml.headless_scene()
    volume = mrml.image_to_volume_node(phantom(7), scene, "input")
    logic = module.SegXAILogic(scene, workFolder=str(tmp_path / "jobs"), env={"OMP_NUM_THREADS": "1"})
    settings = logic.caseSettings(card, device="cpu", counterfactualGenerators=str(constant_generators))
    assert settings.counterfactual.generators == str(constant_generators) and not settings.counterfactual.enabled
    logic.segment([volume], settings)
    assert logic.wait().state == "done"
    assert logic.counterfactualSummary(1) == ""
    logic.counterfactual(1, settings)
    assert logic.wait().state == "done"
    scores = logic.case.counterfactuals[1].scores
    assert f"{scores['plus']:.3f} after G+" in logic.counterfactualSummary(1)
