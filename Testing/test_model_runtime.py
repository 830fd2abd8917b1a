"""Model runtime: cards, loaders (state dict, TorchScript, bundle), inference mapped back exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.models import load_model, load_model_card, model_card_from_dict, preprocess, resolve_device, segment, to_input_grid
from SegXAILib.models.inference import count_windows, sliding_window_logits
from SegXAILib.progress import CancelToken, Cancelled

from conftest import GRIDS, grid_matrix, write_unet_card, write_voxelwise_card

RESOURCE_MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def smooth_volume(shape, seed=0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 10


# ---- cards -------------------------------------------------------------------------------------

def test_card_round_trip(tmp_path):
    card = load_model_card(write_unet_card(tmp_path / "m"))
    card.save(tmp_path / "copy.json")
    again = load_model_card(tmp_path / "copy.json")
    assert again.to_dict() == card.to_dict()
    assert again.class_names == ["background", "thing"]
    assert again.patch_size == (16, 16, 16)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("classes"), "json: classes: Field required"),
        (lambda c: c["architecture"].update(format="onnx"), "architecture.format: "),
        (lambda c: c["inference"].update(patch_size=[16, 16]), "inference.patch_size: "),
        (lambda c: c["inference"].update(overlap=1.5), "inference.overlap: "),
        (lambda c: c["preprocessing"].update(intensity=[{"kind": "ct_window", "center": 40}]),
         "preprocessing.intensity.0.width: Field required"),
        (lambda c: c["preprocessing"].update(spacing=[1, -1, 1]), "preprocessing.spacing.1: "),
        (lambda c: c.update(output_activation="relu"), "output_activation: "),
        (lambda c: c["classes"].pop(), "classes: must list the background and at least one class"),
    ],
)
def test_bad_cards_name_the_field(tmp_path, change, message):
    path = write_unet_card(tmp_path / "m")
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=message):
        load_model_card(path)


@pytest.mark.parametrize(
    "change, message",
    [
        # wrong type
        (lambda c: c["classes"][1].update(color="red"), "classes.1.color: Input should be a valid list, got 'red'"),
        (lambda c: c["inference"].update(overlap="0.5"), "inference.overlap: Input should be a valid number"),
        (lambda c: c.update(name=3), "name: Input should be a valid string, got 3"),
        (lambda c: c["inference"].update(patch_size=[16, 16, True]), "inference.patch_size.2: Input should be a valid number"),
        # missing
        (lambda c: c["architecture"].pop("weights"), "architecture.weights: Field required for format 'monai'"),
        (lambda c: c.pop("inference"), "inference: Field required"),
        (lambda c: c["classes"][0].pop("name"), "classes.0.name: Field required"),
        # bad value
        (lambda c: c["classes"][1].update(color=[0, 0, 256]), "classes.1.color.2: Input should be less than or equal to 255"),
        (lambda c: c["inference"].update(patch_size=[16, 16.5, 16]), "inference.patch_size.1: Input should be a whole number"),
        (lambda c: c["preprocessing"].update(orientation="RA"), "preprocessing.orientation: "),
        (lambda c: c["preprocessing"].update(intensity=[{"kind": "zscore", "center": 40}]),
         "preprocessing.intensity.0.center: Extra inputs are not permitted for kind 'zscore'"),
        (lambda c: c["preprocessing"].update(intensity=[{"kind": "zscore", "bogus": 1}]), "preprocessing.intensity.0.bogus: Extra inputs"),
        (lambda c: c.update(schema_version=2), "schema_version: Input should be 1, got 2"),
    ],
)
def test_card_schema_names_the_field(tmp_path, change, message):
    path = write_unet_card(tmp_path / "m")
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=f"^model card {re.escape(str(path))}: {re.escape(message)}"):
        load_model_card(path)


def test_card_keeps_its_json_as_written(tmp_path):
    """Validation does not rewrite values (the checksum hashes the card as written): an integer
    spacing stays an integer, unknown keys stay, a single intensity step becomes a list of one."""
    path = write_unet_card(tmp_path / "m")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["preprocessing"].update(spacing=[1, 2, 3], intensity={"kind": "affine", "scale": 2, "offset": 0})
    data["architecture"]["note"] = "kept"
    card = model_card_from_dict(data, path)
    assert card.preprocessing["spacing"] == [1, 2, 3] and all(type(v) is int for v in card.preprocessing["spacing"])
    assert card.preprocessing["intensity"] == [{"kind": "affine", "scale": 2, "offset": 0}]
    assert card.architecture["note"] == "kept"
    with pytest.raises(SegXAIInputError, match="expected a JSON object"):
        model_card_from_dict([], path)  # type: ignore[arg-type]


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in RESOURCE_MODELS.glob("*/model_card.json")))
def test_shipped_cards_validate(folder):
    path = RESOURCE_MODELS / folder / "model_card.json"
    card = load_model_card(path)
    # shipped cards were written by ModelCard.save: what loads is exactly what is on disk
    assert card.to_dict() == json.loads(path.read_text(encoding="utf-8"))


def test_card_that_is_not_json(tmp_path):
    path = tmp_path / "model_card.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="not valid JSON"):
        load_model_card(path)


# ---- loaders -----------------------------------------------------------------------------------

def test_monai_state_dict_loads_and_predicts_like_the_original(tmp_path):
    from monai.networks.nets import UNet

    card = load_model_card(write_unet_card(tmp_path / "m", seed=3))
    model = load_model(card, device="cpu")
    torch.manual_seed(3)
    original = UNet(**card.architecture["kwargs"]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), original(x))


def test_weights_checksum_mismatch_is_refused(tmp_path):
    path = write_unet_card(tmp_path / "m")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["architecture"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="SHA-256"):
        load_model(path, device="cpu")


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = write_unet_card(tmp_path / "m")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["architecture"]["kwargs"]["channels"] = [8, 16]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="do not match|cannot be read"):
        load_model(path, device="cpu")


def test_missing_weights_are_refused(tmp_path):
    path = write_unet_card(tmp_path / "m")
    (tmp_path / "m" / "model.pt").unlink()
    with pytest.raises(SegXAIInputError, match="no such file"):
        load_model(path, device="cpu")


def test_pickled_code_is_never_loaded(tmp_path):
    """A checkpoint holding a pickled object (not tensors) is refused by weights_only=True."""
    path = write_unet_card(tmp_path / "m")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": Payload()}, tmp_path / "m" / "model.pt")
    with pytest.raises(SegXAIInputError, match="cannot be read as a PyTorch state dict"):
        load_model(path, device="cpu")


def test_torchscript_loads(tmp_path):
    model = load_model(write_voxelwise_card(tmp_path / "v", threshold=2.0), device="cpu")
    x = torch.full((1, 1, 2, 2, 2), 5.0)
    out = model.network(x)
    torch.testing.assert_close(out[:, 1], torch.full((1, 2, 2, 2), 3.0))


def _write_bundle(folder: Path) -> Path:
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    (folder / "configs" / "inference.json").write_text(
        json.dumps({"network_def": {"_target_": "monai.networks.nets.UNet", **kwargs}}), encoding="utf-8")
    torch.manual_seed(5)
    network = UNet(**kwargs)
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    card = {
        "name": "bundle",
        "architecture": {"format": "bundle", "path": "."},
        "input_channels": ["ch0"],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "inference": {"patch_size": [16, 16, 16]},
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def test_bundle_needs_explicit_trust(tmp_path):
    path = _write_bundle(tmp_path / "bundle")
    with pytest.raises(SegXAIInputError, match="trust"):
        load_model(path, device="cpu")
    model = load_model(path, device="cpu", trust=True)
    from monai.networks.nets import UNet

    torch.manual_seed(5)
    reference = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), reference(x))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    with pytest.raises(SegXAIInputError, match="^device 'tpu'"):  # the parameter, not a CLI option
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SegXAIInputError, match="CUDA is not available"):
            resolve_device("cuda")


# ---- inference mapped back onto the input grid ---------------------------------------------------

@pytest.mark.parametrize("orientation", ["RAS", "LPI", None])
def test_voxelwise_model_prediction_is_exact_on_any_grid(tmp_path, grid_name, orientation):
    """Orientation changes are undone exactly: a per-voxel model gives exactly x > t on the
    input grid, for oblique, flipped, anisotropic and coronal inputs."""
    card = write_voxelwise_card(tmp_path / "v", orientation=orientation, threshold=1.0, patch=(8, 8, 8))
    model = load_model(card, device="cpu")
    image = Image(smooth_volume((19, 13, 11)), grid_matrix(grid_name))
    result = segment(image, model)
    assert result.labels.same_grid(image) and result.probabilities.same_grid(image)
    np.testing.assert_array_equal(result.labels.array[0], (image.array[0] > 1.0).astype(np.uint8))
    expected = 1 / (1 + np.exp(-(image.array[0] - 1.0)))
    np.testing.assert_allclose(result.probabilities.array[1], expected, atol=1e-5)


def test_resampled_prediction_keeps_physical_position(tmp_path):
    """With a spacing change the map goes through resampling; a blob's physical centroid
    and volume survive within a fraction of a voxel."""
    matrix = grid_matrix("oblique")
    shape = (40, 36, 20)
    image = Image(np.zeros(shape, np.float32), matrix)
    centre_ras = image.ijk_to_ras_points(np.array([22.3, 15.6, 9.1]))[0]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    distance = np.linalg.norm(image.ijk_to_ras_points(ijk) - centre_ras, axis=1).reshape(shape)
    image = image.with_array((distance < 9.0).astype(np.float32)[None] * 4.0)
    card = write_voxelwise_card(tmp_path / "v", orientation="RAS", spacing=[1.5, 1.5, 1.5], threshold=2.0, patch=(16, 16, 16))
    result = segment(image, load_model(card, device="cpu"))
    mask = result.mask(1)
    centroid = image.ijk_to_ras_points(np.argwhere(mask).mean(axis=0))[0]
    assert np.linalg.norm(centroid - centre_ras) < 0.5
    truth = distance < 9.0
    assert abs(mask.sum() - truth.sum()) / truth.sum() < 0.08
    assert (mask & truth).sum() / truth.sum() > 0.9


def test_to_input_grid_exact_path_handles_shifted_crops():
    image = Image(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7), grid_matrix("coronal"))
    flipped = image.reoriented("RAS")
    back = to_input_grid(flipped.array, flipped.ijk_to_ras, image)
    np.testing.assert_array_equal(back.array, image.array)


def test_preprocess_refuses_the_wrong_channel_count(tmp_path):
    card = load_model_card(write_unet_card(tmp_path / "m", in_channels=2))
    with pytest.raises(SegXAIInputError, match="takes 2 channel"):
        preprocess(Image(np.zeros((8, 8, 8), np.float32)), card)


@pytest.mark.parametrize("size, overlap", [((40, 30, 17), 0.25), ((16, 16, 16), 0.5), ((33, 8, 70), 0.6)])
def test_count_windows_matches_monai(tmp_path, size, overlap):
    card = load_model_card(write_voxelwise_card(tmp_path / "v", patch=(16, 16, 16), overlap=overlap))
    calls = []

    def network(window):
        calls.append(window.shape[0])
        return torch.zeros(window.shape[0], 2, *window.shape[2:])

    sliding_window_logits(torch.zeros(1, 1, *size), network, card)
    assert sum(calls) == count_windows(size, card.patch_size, overlap)


def test_progress_is_monotone_and_cancel_stops(tmp_path):
    card = write_voxelwise_card(tmp_path / "v", patch=(8, 8, 8))
    model = load_model(card, device="cpu")
    image = Image(smooth_volume((30, 30, 30)), np.eye(4))
    seen = []
    segment(image, model, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))
    assert len(seen) > count_windows((30, 30, 30), (8, 8, 8), 0.25)
    token = CancelToken()

    def cancel_midway(fraction, message):
        if fraction > 0.3:
            token.cancel()

    with pytest.raises(Cancelled):
        segment(image, model, progress=cancel_midway, cancel=token)


def test_intensity_steps_follow_the_card(tmp_path):
    path = write_voxelwise_card(tmp_path / "v", orientation=None)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["preprocessing"]["intensity"] = [
        {"kind": "ct_window", "center": 40, "width": 400},
        {"kind": "affine", "scale": 2.0, "offset": -1.0},
    ]
    card = model_card_from_dict(data, path)
    hu = np.linspace(-500, 500, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    x = preprocess(Image(hu), card)
    expected = np.clip((hu - (40 - 200)) / 400, 0, 1) * 2 - 1
    np.testing.assert_allclose(np.asarray(x[0]), expected, atol=1e-6)
