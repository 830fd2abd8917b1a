"""Shared fixtures: grids with oblique, flipped and anisotropic geometry, tiny model cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from SegXAILib.image import Image, geometry_matrix

#: name -> (spacing, origin, direction) covering the geometry users send us
GRIDS = {
    "identity": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
    "anisotropic": ((0.5, 0.9, 3.0), (-12.5, 40.0, 7.25), np.eye(3)),
    "lps_flipped": ((1.2, 1.2, 2.5), (100.0, 120.0, -30.0), np.diag([-1.0, -1.0, 1.0])),
    "coronal": ((2.0, 2.0, 3.0), (0.0, -254.0, 0.0), np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])),
    "oblique": ((0.8, 1.1, 2.2), (5.0, -7.0, 11.0), Rotation.from_euler("xyz", [17, -28, 41], degrees=True).as_matrix()),
    "oblique_left_handed": (
        (1.3, 0.7, 1.9),
        (-3.0, 2.0, 1.0),
        Rotation.from_euler("zyx", [-33, 12, 64], degrees=True).as_matrix() @ np.diag([1.0, -1.0, 1.0]),
    ),
}


def grid_matrix(name: str) -> np.ndarray:
    spacing, origin, direction = GRIDS[name]
    return geometry_matrix(spacing, origin, direction)


@pytest.fixture(params=sorted(GRIDS))
def grid_name(request) -> str:
    return request.param


def random_image(name: str, shape=(9, 7, 5), channels: int = 1, seed: int = 0, integer: bool = False) -> Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 100, size=(channels, *shape)).astype(np.float32)
    if integer:
        array = np.round(array)
    return Image(array, grid_matrix(name))


def write_voxelwise_card(folder: Path, orientation: str | None = "RAS", spacing=None, threshold: float = 0.0,
                         patch=(16, 16, 16), in_channels: int = 1, overlap: float = 0.25) -> Path:
    """A TorchScript 1x1x1 convolution whose class-1 logit is ``x - threshold`` (class 0: 0).

    A per-voxel model: the exact prediction is known on any grid (label = input > threshold),
    which makes it the oracle of the geometry tests.
    """
    folder.mkdir(parents=True, exist_ok=True)
    conv = torch.nn.Conv3d(in_channels, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 1.0
        conv.bias[1] = -threshold
    torch.jit.script(conv).save(str(folder / "voxelwise.ts"))
    card = {
        "name": "voxelwise-threshold",
        "architecture": {"format": "torchscript", "file": "voxelwise.ts"},
        "input_channels": [f"ch{c}" for c in range(in_channels)],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "bright", "color": [255, 0, 0]}],
        "preprocessing": {"orientation": orientation, "spacing": spacing, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": "constant"},
        "output_activation": "softmax",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def write_unet_card(folder: Path, in_channels: int = 1, seed: int = 0) -> Path:
    """A small MONAI UNet with random weights saved as a state dict, and its card."""
    from monai.networks.nets import UNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kwargs = {"spatial_dims": 3, "in_channels": in_channels, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    network = UNet(**kwargs)
    torch.save(network.state_dict(), folder / "model.pt")
    card = {
        "name": "tiny-unet",
        "architecture": {"format": "monai", "name": "UNet", "kwargs": kwargs, "weights": "model.pt"},
        "input_channels": [f"ch{c}" for c in range(in_channels)],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "thing", "color": [0, 255, 0]}],
        "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": [{"kind": "zscore"}]},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25},
        "output_activation": "softmax",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def write_swinunetr_card(folder: Path, in_channels: int = 2, seed: int = 0) -> Path:
    """A small MONAI SwinUNETR (one block per stage, feature size 12) with random weights."""
    from monai.networks.nets import SwinUNETR

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kwargs = {"in_channels": in_channels, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "spatial_dims": 3}
    torch.save(SwinUNETR(**kwargs).state_dict(), folder / "model.pt")
    card = {
        "name": "tiny-swinunetr",
        "architecture": {"format": "monai", "name": "SwinUNETR", "kwargs": kwargs, "weights": "model.pt"},
        "input_channels": [f"ch{c}" for c in range(in_channels)],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "thing", "color": [0, 255, 0]}],
        "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": [{"kind": "zscore"}]},
        "inference": {"patch_size": [64, 64, 64], "overlap": 0.25},
        "output_activation": "softmax",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def install_torchvision_stand_in() -> None:
    """Empty stand-ins for the few torchvision names our test oracles import.

    zennit (LRP) imports two ResNet block classes and pytorch-grad-cam some transforms and ops
    at import time; PyPI's torchvision is a CUDA build that cannot load beside our pinned CPU
    torch (the Makefile installs both oracles with ``--no-deps``). Nothing we call from them
    touches torchvision: the stand-ins raise if ever called. A real, working torchvision is
    left alone.
    """
    import importlib
    import sys
    import types

    try:
        importlib.import_module("torchvision.models.resnet")
        importlib.import_module("torchvision.transforms.functional")
        importlib.import_module("torchvision.ops")
        return
    except Exception:  # absent, or present but broken beside this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def missing(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: not available in this environment")

    def module(name: str, **attributes) -> types.ModuleType:
        stand_in = types.ModuleType(name)
        stand_in.__dict__.update(attributes)
        sys.modules[name] = stand_in
        return stand_in

    resnet = module("torchvision.models.resnet", Bottleneck=type("Bottleneck", (torch.nn.Module,), {}),
                    BasicBlock=type("BasicBlock", (torch.nn.Module,), {}))
    functional = module("torchvision.transforms.functional", resize=missing)
    module("torchvision", models=module("torchvision.models", resnet=resnet),
           transforms=module("torchvision.transforms", Compose=missing, Normalize=missing, ToTensor=missing,
                             functional=functional),
           ops=module("torchvision.ops", box_iou=missing))


def import_zennit():
    """zennit (the LRP test oracle), imported beside :func:`install_torchvision_stand_in`."""
    install_torchvision_stand_in()
    import zennit

    return zennit


def make_card(patch, in_channels: int = 1, blend: str = "gaussian", overlap: float = 0.25):
    """A two-class card (background, thing) for a network built in a test (weights unused)."""
    from SegXAILib.models.card import model_card_from_dict

    return model_card_from_dict({
        "name": "test",
        "architecture": {"format": "monai", "name": "UNet", "weights": "unused.pt"},
        "input_channels": [f"ch{c}" for c in range(in_channels)],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend},
    })


def make_forward(network, shape, target, patch=None, in_channels: int = 1, **card_kwargs):
    """A :class:`SegmentationForward` of ``network`` (put in eval mode) on a ``shape`` volume with
    :func:`make_card`'s card (one window of ``shape`` unless ``patch`` is given)."""
    from SegXAILib.attribution.forward import SegmentationForward

    network.eval()
    return SegmentationForward(network, make_card(patch or shape, in_channels, **card_kwargs), shape, target)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (on a shared 2-core machine two OpenMP threads
    per process oversubscribe it); restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(channels: int = 1, seed: int = 0) -> torch.nn.Module:
    """A two-class, one-downsampling MONAI UNet in eval mode (weights from ``seed``)."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=channels, out_channels=2, channels=[4, 8], strides=[2]).eval()


def model_grid_instances(model, image: Image):
    """``image`` on ``model``'s grid and the class-1 instances the model predicts there.

    Returns ``(inputs (1, C, D, H, W), the model grid as an Image, labels (D, H, W), instances)``.
    """
    from SegXAILib.attribution.forward import SegmentationForward
    from SegXAILib.attribution.targets import ClassThresholdTarget
    from SegXAILib.instances import find_instances
    from SegXAILib.models.preprocessing import preprocess

    x = preprocess(image, model.card)
    grid = Image(np.zeros((1, *x.shape[1:]), np.uint8), np.asarray(x.affine, dtype=float))
    inputs = x.as_tensor()[None].float()
    probe = SegmentationForward(model.network, model.card, inputs.shape[2:], ClassThresholdTarget(1))
    with torch.no_grad():
        logits = probe.logits(inputs)[0]
    probabilities = torch.softmax(logits, 0)[1].numpy()
    labels, instances = find_instances((logits.argmax(0) == 1).numpy(), probabilities, grid=grid)
    return inputs, grid, labels, instances


@pytest.fixture(scope="session")
def quick_demo_case(tmp_path_factory) -> Path:
    """A case folder of the quick demo (``segxai demo --quick``: the lesion model on the sample
    head, maps, two instance maps, QA), made once per test session on the CPU."""
    from SegXAILib.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("quick-demo")
    run_demo(out, device="cpu", settings=DemoSettings.reduced())
    return out
