"""nnU-Net v2 results folders as models (card format ``nnunetv2``), checked against nnU-Net itself.

The shipped model ``Resources/Models/nnunet_demo`` was made by nnU-Net's own planning,
preprocessing and training (``Utilities/make_nnunet_demo.py``). The oracle is
``nnUNetPredictor`` run on the CPU in float32 (its float16 logits buffer and Gaussian switched to
float32; nothing else changed), with tile step 0.5 and the mirroring the checkpoint allows.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.image import Image, SegXAIInputError

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install 'SegXAILib[nnunet]')")

from conftest import grid_matrix  # noqa: E402
from SegXAILib.models.card import load_model_card  # noqa: E402
from SegXAILib.models.loaders import load_model  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "nnunet_demo"
EPS32 = float(np.finfo(np.float32).eps)


def _raw_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # the test's own trusted file


@pytest.fixture
def results_copy(tmp_path) -> Path:
    """The demo results folder without its card (the folder is the model)."""
    folder = tmp_path / "results"
    shutil.copytree(DEMO, folder)
    (folder / "model_card.json").unlink()
    return folder


def _sphere_image(matrix: np.ndarray, shape=(30, 34, 22), seed: int = 3) -> Image:
    """A bright sphere with a brighter core in noisy tissue, inside a zero border (nnU-Net crops it)."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    ras = ijk @ matrix[:3, :3].T + matrix[:3, 3]
    centre = np.array([14, 16, 11]) @ matrix[:3, :3].T + matrix[:3, 3]
    distance = np.linalg.norm(ras - centre, axis=-1)
    array = 100.0 + 10.0 * rng.standard_normal(shape) + 60.0 * (distance <= 7) + 50.0 * (distance <= 3.5)
    border = np.zeros(shape, bool)
    border[3:-3, 2:-4, 2:-2] = True
    return Image((array * border)[None].astype(np.float32), matrix, ("MR",))


# ---- the card -------------------------------------------------------------------------------------
def test_card_from_the_results_folder(results_copy):
    card = load_model_card(results_copy)
    dataset = json.loads((results_copy / "dataset.json").read_text())
    plans = json.loads((results_copy / "plans.json").read_text())
    checkpoint = _raw_checkpoint(results_copy / "fold_0" / "checkpoint_final.pth")
    assert card.format == "nnunetv2"
    assert card.input_channels == [dataset["channel_names"]["0"]]
    assert card.class_names == sorted(dataset["labels"], key=dataset["labels"].get)
    assert card.output_activation == "softmax" and card.output_channels == 3
    assert list(card.patch_size) == plans["configurations"]["3d_fullres"]["patch_size"]
    assert card.mirror_axes == tuple(checkpoint["inference_allowed_mirroring_axes"])
    assert card.architecture["trainer"] == checkpoint["trainer_name"]
    assert card.architecture["configuration"] == checkpoint["init_args"]["configuration"]
    assert card.architecture["folds"] == [0, 1]
    assert card.window_scheme == "nnunet" and card.inference["overlap"] == 0.5
    # the shipped card (written from the folder) and a one-line card give the same model
    shipped = load_model_card(DEMO / "model_card.json")
    line = results_copy / "one_line.json"
    line.write_text(json.dumps({"architecture": {"format": "nnunetv2", "results_folder": "."}}))
    for other in (shipped, load_model_card(line)):
        assert (other.input_channels, other.class_names, other.patch_size, other.mirror_axes,
                other.architecture["folds"]) == (card.input_channels, card.class_names, card.patch_size,
                                                  card.mirror_axes, card.architecture["folds"])


def test_region_based_labels_give_sigmoid_outputs(results_copy):
    dataset = json.loads((results_copy / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    dataset["regions_class_order"] = [1, 2]
    (results_copy / "dataset.json").write_text(json.dumps(dataset))
    card = load_model_card(results_copy)
    assert card.output_activation == "sigmoid"
    assert card.class_names == ["background", "whole", "core"] and card.output_channels == 2


def test_card_errors_name_the_field(results_copy, tmp_path):
    with pytest.raises(SegXAIInputError, match="results_folder"):
        load_model_card_from({"architecture": {"format": "nnunetv2"}}, tmp_path)
    with pytest.raises(SegXAIInputError, match="configuration '2d_fancy'"):
        load_model_card_from({"architecture": {"format": "nnunetv2", "results_folder": str(results_copy),
                                               "configuration": "2d_fancy"}}, tmp_path)


def load_model_card_from(data: dict, folder: Path):
    path = folder / "card.json"
    path.write_text(json.dumps(data))
    return load_model_card(path)


# ---- loading: pickles only with an allow-list --------------------------------------------------
def test_checkpoint_with_an_unknown_global_needs_trust_code(results_copy):
    path = results_copy / "fold_1" / "checkpoint_final.pth"
    checkpoint = _raw_checkpoint(path)
    checkpoint["note"] = Fraction(1, 3)  # any class outside nnU-Net's allow-list
    torch.save(checkpoint, path)
    with pytest.raises(SegXAIInputError, match=r"fractions\.Fraction.*can run code.*trust_code=True") as refused:
        load_model(results_copy, device="cpu")
    # only what is outside the allow-list is named (nnU-Net's numpy scalars are allowed)
    assert "numpy" not in str(refused.value)
    model = load_model(results_copy, device="cpu", trust_code=True)
    weights = checkpoint["network_weights"]
    assert all(torch.equal(value, model.networks[1].state_dict()[key]) for key, value in weights.items())


def test_an_untrusted_first_fold_says_how_to_write_the_card(results_copy):
    """The card is completed from fold 0's checkpoint, read without trust: when that one holds
    other objects, the error says which card fields make trust_code usable."""
    path = results_copy / "fold_0" / "checkpoint_final.pth"
    checkpoint = _raw_checkpoint(path)
    checkpoint["note"] = Fraction(1, 3)
    torch.save(checkpoint, path)
    with pytest.raises(SegXAIInputError, match=r"fractions\.Fraction.*configuration.*trainer.*mirror_axes"):
        load_model_card(results_copy)
    card = {"architecture": {"format": "nnunetv2", "results_folder": ".", "configuration": "3d_fullres",
                             "trainer": "nnUNetTrainer_5epochs"},
            "inference": {"mirror_axes": [0, 1, 2]}}
    (results_copy / "model_card.json").write_text(json.dumps(card))
    model = load_model(results_copy, device="cpu", trust_code=True)
    assert all(torch.equal(value, model.networks[0].state_dict()[key])
               for key, value in checkpoint["network_weights"].items())


def test_plans_naming_other_code_need_trust_code(results_copy):
    plans = json.loads((results_copy / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (results_copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SegXAIInputError, match=r"os\.system.*trust_code=True"):
        load_model(results_copy, device="cpu")


def test_folds_load_their_own_weights():
    model = load_model(DEMO, device="cpu")
    assert len(model.networks) == 2 and model.network is model.networks[0]
    for fold, network in enumerate(model.networks):
        weights = _raw_checkpoint(DEMO / f"fold_{fold}" / "checkpoint_final.pth")["network_weights"]
        assert all(torch.equal(value, network.state_dict()[key]) for key, value in weights.items())
        assert not getattr(network, "deep_supervision", getattr(network.decoder, "deep_supervision", False))


# ---- prediction equals nnU-Net's ---------------------------------------------------------------------
class _Float32Torch(types.ModuleType):
    """``torch`` as nnUNetPredictor's module sees it, with ``torch.half`` meaning float32: its
    logits and weight buffers are float16 even on the CPU."""

    half = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def float32_predictor(monkeypatch):
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs

    monkeypatch.setattr(predict_from_raw_data, "torch", _Float32Torch("torch"))
    monkeypatch.setattr(predict_from_raw_data, "compute_gaussian",
                        lambda *args, **kwargs: compute_gaussian(*args, **{**kwargs, "dtype": torch.float32}))
    # nnU-Net finds the trainer by importing every trainer module; some need timm (absent here)
    trainers = {"nnUNetTrainer": nnUNetTrainer.nnUNetTrainer, **{
        name: getattr(nnUNetTrainer_Xepochs, name) for name in dir(nnUNetTrainer_Xepochs) if name.startswith("nnUNet")}}
    monkeypatch.setattr(predict_from_raw_data, "recursive_find_trainer_class_by_name", trainers.__getitem__)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(DEMO), use_folds=(0, 1), checkpoint_name="checkpoint_final.pth")
    return predictor


def test_logits_and_probabilities_equal_nnunet_predictor(float32_predictor):
    from SegXAILib.models.inference import segment, sliding_window_logits
    from SegXAILib.models.preprocessing import model_input

    image = _sphere_image(grid_matrix("oblique"))  # nnU-Net ignores the direction: any grid will do
    model = load_model(DEMO, device="cpu")
    batch, grid = model_input(image, model.card)
    # nnU-Net's own input: the array and spacing SimpleITK would give (checked against a file below)
    data = image.array.transpose(0, 3, 2, 1)
    properties = {"spacing": [float(s) for s in image.spacing[::-1]]}
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    preprocessed = next(PreprocessAdapterFromNpy([data], [None], [dict(properties)], [None],
                                                 float32_predictor.plans_manager, float32_predictor.dataset_json,
                                                 float32_predictor.configuration_manager, num_threads_in_multithreaded=1))
    assert torch.equal(batch[0], preprocessed["data"])
    expected = float32_predictor.predict_logits_from_preprocessed_data(preprocessed["data"]).float()
    assert expected.dtype == torch.float32
    with torch.inference_mode():
        ours = sliding_window_logits(batch, model.network, model.card, networks=model.networks)[0]
    # both are sums of the same per-window network outputs (bit-identical: same weights, same
    # patches) over folds x flips x windows, divided by their counts / weights: float32
    # rounding of at most that many additions (worst case n eps max|term|)
    terms = 2 * 2 ** len(model.card.mirror_axes) * 8
    tolerance = terms * EPS32 * float(expected.abs().max())
    assert torch.allclose(ours, expected, rtol=0, atol=tolerance)

    segmentation, probabilities = float32_predictor.predict_single_npy_array(data, dict(properties), None, None, True)
    result = segment(image, model)
    ours_probabilities = result.probabilities.array.transpose(0, 3, 2, 1)  # to nnU-Net's (z, y, x)
    assert ours_probabilities.shape == probabilities.shape
    # linear resampling is a convex combination and softmax is 1-Lipschitz in the max norm: the
    # probabilities differ by at most the logits' bound (plus float32 rounding of values <= 1)
    assert np.abs(ours_probabilities - probabilities).max() <= tolerance + 8 * EPS32
    ours_labels = result.labels.array[0].transpose(2, 1, 0)
    ambiguous = np.sort(probabilities, axis=0)[-1] - np.sort(probabilities, axis=0)[-2] <= 2 * tolerance
    assert np.array_equal(ours_labels[~ambiguous], segmentation[~ambiguous])
    assert (segmentation == 2).sum() > 0  # the trained model finds the core


def test_image_axes_match_nnunet_reading_the_file(tmp_path):
    """What the network sees equals what nnU-Net's SimpleITK reader gives for the same file."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from SegXAILib.models.nnunet import _sitk_order

    image = _sphere_image(grid_matrix("oblique_left_handed"))
    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(image.to_sitk(), str(path))
    data, properties = SimpleITKIO().read_images([str(path)])
    ours, spacing = _sitk_order(image)
    assert np.array_equal(ours, data)
    assert np.allclose(spacing, properties["spacing"], rtol=1e-6)


# ---- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["oblique", "lps_flipped"])
def test_model_grid_geometry_round_trip(grid):
    """The model grid's IJK-to-RAS agrees with nnU-Net's own inverse: the RAS coordinates of the
    model voxels, mapped back by nnU-Net's resampling, crop and transpose, are the input voxels'
    RAS coordinates (linear resampling is exact on a linear function, away from the edges)."""
    from SegXAILib.models.preprocessing import model_input, to_input_grid

    matrix = grid_matrix(grid)
    matrix[:3, :3] *= 1.3  # coarser than the plans' spacing: nnU-Net resamples
    image = _sphere_image(matrix)
    card = load_model_card(DEMO)
    batch, model_affine = model_input(image, card)
    shape = batch.shape[2:]
    assert shape != tuple(image.spatial_shape)  # cropped, resampled
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).reshape(3, -1)
    ras = (np.asarray(model_affine)[:3, :3] @ index + np.asarray(model_affine)[:3, 3:]).reshape(3, *shape)
    back = to_input_grid(ras.astype(np.float32), model_affine, image, ("R", "A", "S"))
    assert back.same_grid(image)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.spatial_shape], indexing="ij"), 0)
    truth = np.einsum("ab,b...->a...", image.ijk_to_ras[:3, :3], ijk) + image.ijk_to_ras[:3, 3].reshape(3, 1, 1, 1)
    # the crop: nnU-Net's non-zero box, in (i, j, k); two voxels in from its edges
    inside = np.zeros(image.spatial_shape, bool)
    inside[5:-5, 4:-6, 4:-4] = True
    assert np.abs(back.array[:, inside] - truth[:, inside]).max() < 1e-3 * np.abs(truth).max() + 1e-3
    outside = np.ones(image.spatial_shape, bool)
    outside[3:-3, 2:-4, 2:-2] = False
    assert np.all(back.array[:, outside] == 0)  # nothing beyond nnU-Net's crop


# ---- segxai info -----------------------------------------------------------------------------------------
def test_segxai_info_shows_the_nnunet_model(capsys):
    from SegXAILib.cli import main

    assert main(["info", str(DEMO)]) == 0
    out = capsys.readouterr().out
    for expected in ("nnunetv2", "trainer nnUNetTrainer_5epochs", "configuration 3d_fullres", "patch        : [16, 24, 24]",
                     "folds        : [0, 1]", "mirroring    : axes [0, 1, 2]", "0=background, 1=sphere, 2=core"):
        assert expected in out, (expected, out)


# ---- attribution goes through nnU-Net's preprocessing ----------------------------------------------
def test_attribution_maps_back_through_nnunet_inverse():
    """A gradient map of an nnU-Net model lies on the input grid; the voxels nnU-Net crops away
    (outside the image's non-zero box) cannot change its output, so their attribution is 0."""
    from SegXAILib.attribution import explain

    image = _sphere_image(grid_matrix("oblique"))
    model = load_model(DEMO, device="cpu")
    result = explain(image, model, "vanilla_gradient", "class:core")
    assert result.maps.same_grid(image) and result.maps.num_channels == 1
    outside = np.ones(image.spatial_shape, bool)
    outside[3:-3, 2:-4, 2:-2] = False
    assert np.all(result.maps.array[0][outside] == 0)
    assert np.abs(result.maps.array[0][~outside]).max() > 0
