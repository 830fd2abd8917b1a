"""Sigmoid (multi-label) models: one yes / no logit per foreground class, structures that may
overlap, explained without wrapping in every method, target, instance and QA path.

The oracles are per-voxel TorchScript models whose output channel ``k`` is the logit
``x_k - t_k`` (input channel ``k``): the prediction is known on any grid (class ``k + 1``
where ``x_k > t_k``, overlaps included) and so is the gradient of every target, since
``d(x_k - t_k)_i / dx_(m, j) = [m = k][i = j]``. A class target's vanilla gradient is thus 1
on the class's voxels in the class's input channel and 0 elsewhere, gradient x input is the
input there, and an instance's mean saliency is ``1 / |L|`` on its voxels (max: 1).
Tolerances: the window blend's normalised weights sum to 1 to float32 rounding, a few ulps
of 1 (atol 1e-6), at most 8 windows overlapping a voxel in 3D.

A two-class sigmoid model with overlapping structures checks that a class's mask is
``probability > 0.5`` (not the argmax labels, which give an overlap voxel to one class) and
that class ``c`` reads output channel ``c - 1``. Every registered method runs on tiny MONAI
UNets with one and two sigmoid outputs (finite maps on the input grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import grid_matrix
from SegXAILib.attribution import available_methods, explain
from SegXAILib.cli import main
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.instances import find_instances
from SegXAILib.io import read_image, write_image
from SegXAILib.models import load_model
from SegXAILib.models.inference import segment
from SegXAILib.pipeline import CaseSettings, run_case
from SegXAILib.topology import default_thresholds, saliency_curve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-6  # a few float32 ulps of 1 (see the module docstring)


def write_card(folder: Path, name: str, architecture: dict, input_channels: list[str], classes: list[str],
               patch=(8, 8, 8), orientation=None) -> Path:
    """A sigmoid model card (background first, then one class per output channel)."""
    card = {
        "name": name,
        "architecture": architecture,
        "input_channels": input_channels,
        "classes": [{"name": c} for c in ["background", *classes]],
        "preprocessing": {"orientation": orientation, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": 0.25, "blend": "gaussian"},
        "output_activation": "sigmoid",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json"


def write_voxelwise_sigmoid_card(folder: Path, thresholds: list[float], classes: list[str]) -> Path:
    """TorchScript 1x1x1 convolution, ``len(thresholds)`` inputs and outputs: output channel k
    is ``x_k - thresholds[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    count = len(thresholds)
    conv = torch.nn.Conv3d(count, count, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        for k, threshold in enumerate(thresholds):
            conv.weight[k, k] = 1.0
            conv.bias[k] = -threshold
    torch.jit.script(conv).save(str(folder / "voxelwise.ts"))
    return write_card(folder, f"voxelwise-sigmoid-{count}", {"format": "torchscript", "file": "voxelwise.ts"},
                      [f"ch{k}" for k in range(count)], classes)


# ---------------------------------------------------------------------------- cases


def single_case(folder: Path) -> dict:
    """One sigmoid output (``bright``: x > 50) and two bright lesions on an oblique grid."""
    card = write_voxelwise_sigmoid_card(folder, [50.0], ["bright"])
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 100.0 + np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    bright[8:10, 6:9, 5:7] = 120.0
    image = Image(bright[None], grid_matrix("oblique"), ("ch0",))
    return {"card": card, "image": image, "structure": "bright", "class_index": 1, "channel": 0,
            "masks": {"bright": bright > 50.0}}


def overlap_case(folder: Path) -> dict:
    """Two sigmoid outputs (``A``: x0 > 0, ``B``: x1 > 0) whose structures overlap; in the
    overlap x0 > x1, so the argmax labels give it to A. B has two instances."""
    card = write_voxelwise_sigmoid_card(folder, [0.0, 0.0], ["A", "B"])
    x = np.full((2, 12, 10, 8), -3.0, np.float32)
    x[0, 1:7, 1:6, 1:5] = 2.0 + 0.01 * np.arange(120, dtype=np.float32).reshape(6, 5, 4)
    x[1, 4:10, 3:8, 2:6] = 1.0 + 0.01 * np.arange(120, dtype=np.float32).reshape(6, 5, 4)
    x[1, 9:11, 0:2, 6:8] = 1.2  # a second instance of B (j 0..1 vs 3..7: not 26-connected)
    image = Image(x, grid_matrix("oblique"), ("ch0", "ch1"))
    return {"card": card, "image": image, "structure": "B", "class_index": 2, "channel": 1,
            "masks": {"A": x[0] > 0, "B": x[1] > 0}}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_case(tmp_path_factory.mktemp("single") / "m")


@pytest.fixture(scope="module")
def overlap(tmp_path_factory):
    return overlap_case(tmp_path_factory.mktemp("overlap") / "m")


def only_in_channel(mask: np.ndarray, values: np.ndarray, channel: int, channels: int) -> np.ndarray:
    """``(channels, I, J, K)``: ``values`` on ``mask`` in ``channel``, 0 elsewhere."""
    expected = np.zeros((channels, *mask.shape), np.float32)
    expected[channel][mask] = np.broadcast_to(values, mask.shape)[mask]
    return expected


# ---------------------------------------------------------------------------- segmentation


def test_overlap_labels_stay_argmax_and_masks_are_probability_above_half(overlap):
    model = load_model(overlap["card"], "cpu")
    image, masks = overlap["image"], overlap["masks"]
    segmentation = segment(image, model)
    labels = segmentation.labels.array[0]
    both = masks["A"] & masks["B"]
    assert both.any() and (masks["B"] & ~masks["A"]).any()
    # the labels image: argmax as ever, the overlap goes to the more probable A
    assert np.array_equal(labels == 1, masks["A"]) and np.array_equal(labels == 2, masks["B"] & ~masks["A"])
    # the masks: probability > 0.5, overlaps in both
    assert np.array_equal(segmentation.mask(1), masks["A"]) and np.array_equal(segmentation.mask(2), masks["B"])
    assert np.array_equal(segmentation.mask(0), ~(masks["A"] | masks["B"]))
    assert segmentation.model_masks.shape == (3, *image.spatial_shape)
    assert np.array_equal(segmentation.model_masks[2].numpy(), masks["B"])  # no resampling: orientation None


def test_output_channel_of_a_sigmoid_card(overlap, single):
    card = load_model(overlap["card"], "cpu").card
    assert card.output_channels == 2 and [card.output_channel(c) for c in (1, 2)] == [0, 1]
    with pytest.raises(SegXAIInputError, match="no output channel for its background"):
        card.output_channel(0)
    with pytest.raises(SegXAIInputError, match="class_index 3"):
        card.output_channel(3)


# ---------------------------------------------------------------------------- analytic oracles


@pytest.mark.parametrize("case_name", ["single", "overlap"])
def test_class_target_gradients_are_the_analytic_ones(request, case_name):
    case = request.getfixturevalue(case_name)
    model = load_model(case["card"], "cpu")
    image = case["image"]
    channels = image.num_channels
    for k, (name, mask) in enumerate(case["masks"].items()):
        gradient = explain(image, model, "vanilla_gradient", f"class:{name}")
        assert gradient.target["class_index"] == k + 1 and gradient.target["output_channel"] == k
        assert gradient.target["voxels"] == int(mask.sum())  # overlap voxels included
        np.testing.assert_allclose(gradient.maps.array, only_in_channel(mask, 1.0, k, channels), rtol=0, atol=ATOL)
        product = explain(image, model, "gradient_x_input", f"class:{name}")
        expected = only_in_channel(mask, image.array[k], k, channels)
        np.testing.assert_allclose(product.maps.array, expected, rtol=1e-6, atol=ATOL * np.abs(image.array).max())


def test_instance_voxel_and_threshold_targets_read_the_class_channel(overlap):
    model = load_model(overlap["card"], "cpu")
    image, mask = overlap["image"], overlap["masks"]["B"]
    labels, instances = find_instances(mask, grid=image)
    assert len(instances) == 2
    for identifier in (1, 2):
        result = explain(image, model, "vanilla_gradient", f"instance:{identifier}:B")
        np.testing.assert_allclose(result.maps.array, only_in_channel(labels == identifier, 1.0, 1, 2), rtol=0,
                                   atol=ATOL)
    ijk = (5, 4, 3)  # in the overlap: labelled A, yet a voxel of B
    assert overlap["masks"]["A"][ijk] and mask[ijk]
    ras = image.ijk_to_ras_points(np.asarray([ijk], float))[0]
    voxel = explain(image, model, "vanilla_gradient", f"voxel:{','.join(map(str, ras))}:B")
    one = np.zeros(image.spatial_shape, bool)
    one[ijk] = True
    np.testing.assert_allclose(voxel.maps.array, only_in_channel(one, 1.0, 1, 2), rtol=0, atol=ATOL)
    # d/dx (x [x > 0]) = [x > 0] (x1 is never exactly 0)
    threshold = explain(image, model, "vanilla_gradient", "class_threshold:B:0")
    np.testing.assert_allclose(threshold.maps.array, only_in_channel(mask, 1.0, 1, 2), rtol=0, atol=ATOL)


def test_a_sigmoid_background_is_refused_by_name(overlap):
    model = load_model(overlap["card"], "cpu")
    with pytest.raises(SegXAIInputError, match="'background'.*no output channel"):
        explain(overlap["image"], model, "vanilla_gradient", "class:background")


# ---------------------------------------------------------------------------- case pipeline


@pytest.mark.parametrize("case_name", ["single", "overlap"])
def test_run_case_maps_instances_and_qa(request, case_name):
    case = request.getfixturevalue(case_name)
    image, structure, channel = case["image"], case["structure"], case["channel"]
    mask = case["masks"][structure]
    settings = CaseSettings.from_dict({
        "model": str(case["card"]), "device": "cpu", "class_name": structure,
        "methods": [{"method": "vanilla_gradient"}, {"method": "gradient_x_input"}],
        "instances": {"aggregations": ["mean", "max"], "n_samples": 2},
        "qa": {"method": "gradient_x_input"},
    })
    model = load_model(case["card"], "cpu")
    result = run_case(image, model, settings)
    assert not result.notes and np.array_equal(result.mask, mask)
    channels = image.num_channels
    # the case's map is explain's, and the analytic one
    direct = explain(image, model, "vanilla_gradient", f"class:{structure}")
    np.testing.assert_array_equal(result.maps["vanilla_gradient"].maps.array, direct.maps.array)
    np.testing.assert_allclose(direct.maps.array, only_in_channel(mask, 1.0, channel, channels), rtol=0, atol=ATOL)
    # instances of the structure's mask (overlaps included), each mean 1/|L| and max 1 on its voxels
    labels, instances = find_instances(mask, grid=image)
    assert np.array_equal(result.instance_labels.array[0], labels) and len(result.instance_maps) == len(instances) == 2
    for identifier, maps in result.instance_maps.items():
        inside = labels == identifier
        np.testing.assert_allclose(maps["mean"].array, only_in_channel(inside, 1.0 / inside.sum(), channel, channels),
                                   rtol=0, atol=ATOL)
        np.testing.assert_allclose(maps["max"].array, only_in_channel(inside, 1.0, channel, channels), rtol=0,
                                   atol=ATOL)
    # QA: the EC curve of the method's map (gradient x input = the input on the structure)
    saliency = np.where(mask, image.array[channel], 0.0)
    assert result.qa.structure == structure
    np.testing.assert_allclose(result.qa.saliency, saliency, rtol=1e-6, atol=ATOL * np.abs(image.array).max())
    thresholds = default_thresholds(100)
    np.testing.assert_array_equal(result.qa.curve, saliency_curve(saliency, mask, thresholds))


def test_agg2exp_rows_of_a_sigmoid_model_leave_out_the_background(overlap):
    """A sigmoid model's background has no logit: Agg2Exp's default rows are its foreground
    classes. A's map (1 on A's voxels) lies wholly in A's column (A wins the overlap's labels)."""
    settings = CaseSettings.from_dict({"model": str(overlap["card"]), "device": "cpu", "class_name": "B",
                                       "agg2exp": {"enabled": True, "method": "vanilla_gradient"}})
    matrix = run_case(overlap["image"], load_model(overlap["card"], "cpu"), settings).agg2exp
    assert matrix.rows == ["A", "B"] and matrix.columns == ["background", "A", "B"]
    np.testing.assert_allclose(matrix.to_dict()["values"][0], [0.0, 1.0, 0.0], atol=ATOL)


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("case_name", ["single", "overlap"])
def test_segxai_lesions_on_a_sigmoid_card(request, tmp_path, case_name, capsys):
    case = request.getfixturevalue(case_name)
    image = case["image"]
    paths = [write_image(image.channel(name), tmp_path / f"{name}.nii.gz") for name in image.channel_names]
    common = ["-q", "lesions", *map(str, paths), "--model", str(case["card"]), "--device", "cpu"]
    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--class", case["structure"], "--instances", "1,2",
                 "--aggregation", "mean", "--n-samples", "2"]) == 0
    document = json.loads((out / "lesions.json").read_text(encoding="utf-8"))
    assert len(document["instances"]) == 2 and document["selected"] == [1, 2]
    labels, _ = find_instances(case["masks"][case["structure"]], grid=image)
    written = read_image(out / "instances" / f"instance2_mean_ch{case['channel']}.nii.gz").array[0]
    np.testing.assert_allclose(written, np.where(labels == 2, 1.0 / (labels == 2).sum(), 0.0), rtol=0, atol=ATOL)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--class", "nope"]) == 2
    error = capsys.readouterr().err
    assert "--class" in error and "'nope'" in error and "IndexError" not in error and "Traceback" not in error


# ---------------------------------------------------------------------------- every method


def write_sigmoid_unet_card(folder: Path, image: Image, classes: list[str], fractions: list[float]) -> Path:
    """A tiny MONAI UNet with one sigmoid output per class in ``classes``; its last layer's
    bias is shifted so that class k covers about ``fractions[k]`` of ``image`` (one window)."""
    from monai.networks.nets import UNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    kwargs = {"spatial_dims": 3, "in_channels": image.num_channels, "out_channels": len(classes),
              "channels": [4, 8], "strides": [2]}
    network = UNet(**kwargs).eval()
    last = [m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():
        logits = network(torch.from_numpy(image.array)[None])[0].flatten(1)
        for k, fraction in enumerate(fractions):
            last.bias[k] -= torch.quantile(logits[k], 1.0 - fraction)
    torch.save(network.state_dict(), folder / "model.pt")
    architecture = {"format": "monai", "name": "UNet", "kwargs": kwargs, "weights": "model.pt"}
    return write_card(folder, f"unet-sigmoid-{len(classes)}", architecture,
                      [f"ch{c}" for c in range(image.num_channels)], classes, patch=image.spatial_shape)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = Image(rng.normal(size=(1, 16, 16, 16)).astype(np.float32), np.eye(4), ("ch0",))
    root = tmp_path_factory.mktemp("unets")
    one = load_model(write_sigmoid_unet_card(root / "one", image, ["thing"], [0.3]), "cpu")
    two = load_model(write_sigmoid_unet_card(root / "two", image, ["A", "B"], [0.4, 0.3]), "cpu")
    reference = image.with_array(rng.normal(size=image.array.shape).astype(np.float32))
    masks = segment(image, two)
    assert (masks.mask(1) & masks.mask(2)).any(), "the two structures should overlap"
    return image, one, two, [reference]


CHEAP = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"n_steps": 2},
         "expected_gradients": {"n_samples": 2}, "occlusion": {"window": 8, "stride": 8},
         "guided_backprop": {"batch_size": 64}, "deconvolution": {"batch_size": 64},
         "guided_gradcam": {"batch_size": 64}, "guided_gradcam_plusplus": {"batch_size": 64},
         "pattern_net": {"patterns": "input", "estimator": "linear"},
         "pattern_attribution": {"patterns": "input", "estimator": "linear"}}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_on_sigmoid_unets(unets, method):
    image, one, two, references = unets
    params = dict(CHEAP.get(method, {}))
    if method == "expected_gradients":
        params["references"] = references
    for model, target in ((one, "class:thing"), (one, "instance:1"), (two, "class:B"), (two, "instance:1:B"),
                          (two, "class:A")):
        result = explain(image, model, method, target, dict(params))
        assert result.maps.same_grid(image) and result.maps.array.shape == image.array.shape
        assert np.all(np.isfinite(result.maps.array)), (method, target)
        assert result.target["output_channel"] == result.target["class_index"] - 1
