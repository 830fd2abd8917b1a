"""A MONAI bundle folder without a model card: the card comes from its ``metadata.json`` and
inference config (read as data), the network still loads only with ``trust_code``, and a
preprocessing step a card cannot express is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import grid_matrix
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models import load_model, load_model_card

KWARGS = {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": [4, 8], "strides": [2]}


def write_bundle(folder: Path, preprocessing=None, postprocessing=None, inferer=None, outputs=None) -> Path:
    """A MONAI bundle as the bundle spec lays it out: configs/metadata.json,
    configs/inference.json, models/model.pt."""
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {
        "name": "spleen-like", "version": "0.3.1", "description": "a test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 2,
                                 "spatial_shape": [32, 32, 16], "channel_def": {"0": "T1", "1": "FLAIR"}}},
            "outputs": {"pred": outputs or {"type": "image", "format": "segmentation", "num_channels": 3,
                                            "channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}},
    }
    config = {
        "network_def": {"_target_": "UNet", **KWARGS},
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing if preprocessing is not None else [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": inferer if inferer is not None else {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 8],
                                                         "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing if postprocessing is not None else [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    (folder / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    torch.manual_seed(3)
    torch.save(UNet(**KWARGS).state_dict(), folder / "models" / "model.pt")
    return folder


def test_the_card_comes_from_the_bundles_own_description(tmp_path):
    folder = write_bundle(tmp_path / "bundle")
    card = load_model_card(folder)
    assert card.format == "bundle" and card.name == "spleen-like" and card.version == "0.3.1"
    assert card.input_channels == ["T1", "FLAIR"]
    assert card.class_names == ["background", "liver", "spleen"] and card.output_activation == "softmax"
    assert card.preprocessing["orientation"] == "LPS" and card.preprocessing["spacing"] == [1.5, 1.5, 2.0]
    # ScaleIntensityRanged(a_min=-57, a_max=164, clip) is the CT window centred at 53.5, 221 wide
    assert card.preprocessing["intensity"] == [{"kind": "ct_window", "center": 53.5, "width": 221.0, "b_min": 0.0,
                                                "b_max": 1.0}]
    assert card.inference["patch_size"] == [16, 16, 8] and card.inference["overlap"] == 0.5
    assert card.inference["blend"] == "gaussian" and card.inference["sw_batch_size"] == 2
    # the weights are part of the model's identity
    other = write_bundle(tmp_path / "other")
    torch.save({k: v + 1 for k, v in torch.load(other / "models" / "model.pt", weights_only=True).items()},
               other / "models" / "model.pt")
    assert load_model_card(other).checksum() != card.checksum()


def test_the_bundle_network_loads_only_with_trust_and_segments(tmp_path):
    from monai.networks.nets import UNet

    from SegXAILib.models import segment

    folder = write_bundle(tmp_path / "bundle")
    with pytest.raises(SegXAIInputError, match="trust"):
        load_model(folder, device="cpu")
    model = load_model(folder, device="cpu", trust_code=True)
    torch.manual_seed(3)
    reference = UNet(**KWARGS).eval()
    x = torch.randn(1, 2, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), reference(x))
    image = Image(np.random.default_rng(0).normal(50, 30, (2, 20, 18, 10)).astype(np.float32), grid_matrix("oblique"),
                  ("T1", "FLAIR"))
    result = segment(image, model)
    assert result.labels.spatial_shape == image.spatial_shape
    assert np.array_equal(result.labels.ijk_to_ras, image.ijk_to_ras)


def test_sigmoid_bundles_and_what_a_card_cannot_say(tmp_path):
    sigmoid = write_bundle(tmp_path / "sigmoid", postprocessing=[{"_target_": "Activationsd", "keys": "pred",
                                                                  "sigmoid": True}],
                           outputs={"num_channels": 2, "channel_def": {"0": "liver", "1": "spleen"}})
    card = load_model_card(sigmoid)
    # one channel per structure: the background has no channel of its own
    assert card.output_activation == "sigmoid" and card.class_names == ["background", "liver", "spleen"]
    with pytest.raises(SegXAIInputError, match="CropForegroundd"):
        load_model_card(write_bundle(tmp_path / "crop", preprocessing=[
            {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "CropForegroundd", "keys": "image"}]))
    with pytest.raises(SegXAIInputError, match="expression"):
        load_model_card(write_bundle(tmp_path / "expr", preprocessing=[
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@spacing"}]))
    with pytest.raises(SegXAIInputError, match="SimpleInferer"):
        load_model_card(write_bundle(tmp_path / "simple", inferer={"_target_": "SimpleInferer"}))
    broken = write_bundle(tmp_path / "broken")
    (broken / "configs" / "metadata.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="metadata.json"):
        load_model_card(broken)
    # a model_card.json beside the bundle wins over the metadata
    written = write_bundle(tmp_path / "carded")
    (written / "model_card.json").write_text(json.dumps({
        "name": "mine", "architecture": {"format": "bundle", "path": "."}, "input_channels": ["a", "b"],
        "classes": [{"name": "background"}, {"name": "x"}, {"name": "y"}], "inference": {"patch_size": [16, 16, 8]}}),
        encoding="utf-8")
    assert load_model_card(written).name == "mine"
