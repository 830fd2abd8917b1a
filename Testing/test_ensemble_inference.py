"""Fold ensembles, mirroring and nnU-Net v2 windows, in prediction and in the attribution forward.

Oracles: the prediction is checked against a hand computation written here (mean over members
and flips of the network's logits, blended by explicitly listed windows and a Gaussian from
``scipy.ndimage.gaussian_filter`` as nnU-Net builds it, accumulated in float64); gradients
against autograd through that whole computation in one graph, and against central finite
differences of a float64 ensemble; nnU-Net's steps against the known example of its own source
(and nnunetv2 itself when it is installed); the resize round trip against a per-voxel model on
a linear ramp, whose exact value is known at every physical point.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import grid_matrix
from SegXAILib.attribution import ClassTarget, RegionTarget, SegmentationForward
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models import LoadedModel, load_model, segment
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.models.inference import sliding_window_logits
from SegXAILib.models.preprocessing import preprocess
from SegXAILib.models import windows
from SegXAILib.models.windows import WindowedForward, mirror_combinations, nnunet_gaussian, nnunet_steps

PATCH = (8, 10, 6)


def card_dict(patch=PATCH, overlap=0.5, mirror_axes=(0, 1, 2), scheme="nnunet", blend="gaussian", **extra):
    data = {
        "name": "ensemble-test", "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": ["ch0"], "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend,
                      "mirror_axes": list(mirror_axes), "window_scheme": scheme},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


def make_card(**kwargs):
    return model_card_from_dict(card_dict(**kwargs))


class Smooth(torch.nn.Module):
    """A tiny smooth, spatially asymmetric network (mirroring changes its output)."""

    def __init__(self, seed: int, dtype=torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
        self.second = torch.nn.Conv3d(3, 2, kernel_size=(3, 1, 3), padding=(1, 0, 1))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.4)
        self.to(dtype).eval()

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class Counting(torch.nn.Module):
    """Records the batch size of every call (one window batch through one network)."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.network(x)


def scipy_gaussian(patch):
    """nnU-Net's compute_gaussian, written as it is (scipy on a unit impulse), float64."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    gaussian = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    gaussian /= gaussian.max() / 10
    gaussian[gaussian == 0] = gaussian[gaussian > 0].min()
    return gaussian


def hand_blend(networks, x, corners, patch, importance, mirror_axes, pad_value=None):
    """The oracle: sum over windows of importance * mean over members and flips of the logits,
    divided by the summed importance; optional zero padding up to the patch (nnU-Net).

    ``corners`` are the window starts on the padded volume; one graph through everything."""
    shape = x.shape[2:]
    pads = [max(p - s, 0) for s, p in zip(shape, patch)]
    if any(pads):
        flat = []
        for axis in (2, 1, 0):
            flat += [pads[axis] // 2, pads[axis] - pads[axis] // 2]
        x = torch.nn.functional.pad(x, flat, value=pad_value)
    importance = torch.as_tensor(importance, dtype=torch.float64)
    numerator = torch.zeros((x.shape[0], 2, *x.shape[2:]), dtype=torch.float64)
    denominator = torch.zeros(x.shape[2:], dtype=torch.float64)
    flips = [c for n in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, n)]
    for corner in corners:
        where = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        window = x[(slice(None), slice(None), *where)]
        outputs = []
        for network in networks:
            for axes in flips:
                dims = [a + 2 for a in axes]
                outputs.append(torch.flip(network(torch.flip(window, dims)), dims) if dims else network(window))
        mean = torch.stack(outputs).double().mean(0)
        numerator[(slice(None), slice(None), *where)] = numerator[(slice(None), slice(None), *where)] + mean * importance
        denominator[where] += importance
    blended = numerator / denominator
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape))
    return blended[(slice(None), slice(None), *crop)]


@pytest.fixture(scope="module")
def members():
    return [Smooth(1), Smooth(2)]


# ---- nnU-Net's window positions and Gaussian -----------------------------------------------------
def test_nnunet_steps_known_values():
    # the example in nnU-Net's own source: image 110, patch 64, step 0.5 -> 0, 23, 46
    assert nnunet_steps((110, 64, 70), (64, 64, 64), 0.5) == [[0, 23, 46], [0], [0, 6]]
    # image 100, patch 40, step 0.5: ceil(60 / 20) + 1 = 4 steps of 20
    assert nnunet_steps((100, 41, 40), (40, 40, 40), 0.5) == [[0, 20, 40, 60], [0, 1], [0]]
    # step 1 (no overlap): 3 steps cover 80 with a 32 patch, spread evenly: 0, 24, 48
    assert nnunet_steps((80, 32, 33), (32, 32, 32), 1.0) == [[0, 24, 48], [0], [0, 1]]
    with pytest.raises(SegXAIInputError, match="tile_step_size"):
        nnunet_steps((10, 10, 10), (4, 4, 4), 0.0)


def test_nnunet_gaussian_is_scipy_filtered_impulse():
    for patch in [(8, 10, 6), (5, 7, 16), (40, 33, 9)]:
        ours = nnunet_gaussian(patch)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == patch
        np.testing.assert_allclose(ours.numpy(), scipy_gaussian(patch), rtol=2e-7, atol=0)
    # known values: peak 10 at patch // 2, exp(-1/2) of it one sigma (= patch / 8) away
    gaussian = nnunet_gaussian((16, 16, 16))
    assert float(gaussian[8, 8, 8]) == pytest.approx(10.0, rel=1e-7)
    assert float(gaussian[10, 8, 8]) == pytest.approx(10.0 * np.exp(-0.5), rel=1e-6)
    assert float(gaussian.min()) > 0


def test_nnunet_functions_match_nnunetv2_when_installed():
    nnunet = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    for image, patch, step in [((110, 64, 70), (64, 64, 64), 0.5), ((37, 20, 21), (16, 20, 8), 0.5),
                               ((50, 50, 50), (24, 16, 40), 1.0), ((19, 23, 15), (8, 10, 6), 0.75)]:
        assert nnunet_steps(image, patch, step) == nnunet.compute_steps_for_sliding_window(image, patch, step)
    for patch in [(8, 10, 6), (40, 33, 9)]:
        theirs = nnunet.compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                         device=torch.device("cpu"))
        torch.testing.assert_close(nnunet_gaussian(patch), theirs, rtol=2e-7, atol=0)


def test_nnunet_windows_are_the_product_of_the_steps():
    card = make_card(overlap=0.5)
    windowed = WindowedForward(Smooth(0), card, (19, 23, 6))
    steps = nnunet_steps((19, 23, 6), PATCH, 0.5)
    corners = [tuple(s.start for s in w) for w in windowed.windows]
    assert corners == list(itertools.product(*steps))
    assert windowed.passes == 8 and mirror_combinations((0, 1, 2))[0] == () and len(windowed.mirrors) == 8


# ---- prediction ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(19, 23, 9), (6, 13, 4)])  # many windows; smaller than the patch (zero padding)
def test_nnunet_ensemble_prediction_equals_hand_computation(members, shape):
    card = make_card(overlap=0.5)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(3))
    padded = tuple(max(s, p) for s, p in zip(shape, PATCH))
    corners = list(itertools.product(*nnunet_steps(padded, PATCH, 0.5)))
    with torch.no_grad():
        expected = hand_blend(members, x, corners, PATCH, scipy_gaussian(PATCH), (0, 1, 2), pad_value=0.0)
        ours = sliding_window_logits(x, members[0], card, networks=members)
        windowed = WindowedForward(members[0], card, shape, networks=members)(x, window_batch=3)
    assert ours.dtype == torch.float32
    # float32 sums of at most 8 x 2 logits and 27 weighted windows: relative error ~ 1e-6
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(windowed, ours, rtol=1e-5, atol=1e-6)


def test_monai_scheme_ensemble_prediction_equals_members_blended_by_monai(members):
    from monai.inferers import sliding_window_inference

    card = make_card(overlap=0.25, scheme="monai", mirror_axes=(1, 2))
    shape = (17, 13, 11)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(4))

    def mean_of_members_and_flips(window):
        outputs = [torch.flip(net(torch.flip(window, dims)), dims) if dims else net(window)
                   for net in members for dims in ([], [3], [4], [3, 4])]
        return torch.stack(outputs).mean(0)

    with torch.no_grad():
        expected = sliding_window_inference(x, PATCH, 1, mean_of_members_and_flips, overlap=0.25, mode="gaussian",
                                            padding_mode="replicate")
        ours = sliding_window_logits(x, members[0], card, networks=members)
        windowed = WindowedForward(members[0], card, shape, networks=members)(x, window_batch=2)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(windowed, expected, rtol=1e-5, atol=1e-6)


def test_segment_with_an_ensemble_averages_logits_then_activates(members):
    card = make_card(overlap=0.5)
    shape = (12, 14, 7)
    image = Image(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32), np.eye(4))
    model = LoadedModel(members[0], card, torch.device("cpu"), networks=members)
    result = segment(image, model)
    corners = list(itertools.product(*nnunet_steps(shape, PATCH, 0.5)))
    with torch.no_grad():
        logits = hand_blend(members, torch.as_tensor(image.array)[None], corners, PATCH, scipy_gaussian(PATCH),
                            (0, 1, 2), pad_value=0.0)
    expected = torch.softmax(logits, dim=1)[0].numpy()  # softmax of the mean logits, not a mean of softmaxes
    np.testing.assert_allclose(result.probabilities.array, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.labels.array[0], expected.argmax(0))
    # one member alone predicts something else: the ensemble is used
    single = segment(image, LoadedModel(members[0], card, torch.device("cpu")))
    assert np.abs(single.probabilities.array - result.probabilities.array).max() > 1e-3


# ---- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nnunet", "monai"])
def test_class_target_gradient_equals_autograd_through_the_whole_ensemble(members, scheme, monkeypatch):
    card = make_card(overlap=0.5, scheme=scheme)
    shape = (16, 19, 9)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(7))
    windowed = WindowedForward(members[0], card, shape, networks=members)
    with torch.no_grad():
        mask = windowed(x)[0].argmax(0) == 1
    assert 20 < int(mask.sum()) < mask.numel() - 20
    target = ClassTarget(1, mask)

    # the naive oracle: every window, flip and member in one graph
    corners = [tuple(s.start for s in w) for w in windowed.windows]
    if scheme == "nnunet":
        importance = scipy_gaussian(PATCH)
    else:
        importance = windowed.importance.double().numpy()  # MONAI's map (its blend is checked above)
    leaf = x.clone().requires_grad_(True)
    value_naive = target(hand_blend(members, leaf, corners, PATCH, importance, (0, 1, 2),
                                    pad_value=0.0 if scheme == "nnunet" else None))
    (gradient_naive,) = torch.autograd.grad(value_naive.sum(), leaf)

    counted = [Counting(m) for m in members]
    patch_voxels = int(np.prod(PATCH))
    # one graph; two passes (member x window batch x flip group), the flips of a window batch
    # stacked in one call as far as PASS_BATCH_VOXELS allows, or one call per flip
    for max_graph_windows, pass_batch_voxels in ((10_000, windows.PASS_BATCH_VOXELS), (0, windows.PASS_BATCH_VOXELS),
                                                 (0, 0), (0, 4 * 2 * patch_voxels)):
        monkeypatch.setattr(windows, "PASS_BATCH_VOXELS", pass_batch_voxels)
        forward = SegmentationForward(counted[0], card, shape, target, networks=counted, window_batch=2,
                                      max_graph_windows=max_graph_windows)
        for c in counted:
            c.batches.clear()
        gradient = forward.gradient(x)
        # float32: sums over <= 27 windows x 16 passes of products of O(1) terms
        torch.testing.assert_close(gradient.double(), gradient_naive.double(), rtol=1e-4, atol=1e-5)
        if max_graph_windows == 0:
            # bounded memory: every backward pass holds one window batch (2) through one network,
            # times the flips that fit in PASS_BATCH_VOXELS
            flips_per_call = max(1, min(8, pass_batch_voxels // (2 * patch_voxels)))
            assert max(max(c.batches) for c in counted) == 2 * flips_per_call
    with torch.no_grad():
        torch.testing.assert_close(forward(x).double(), value_naive.detach(), rtol=1e-5, atol=1e-3)


def test_gradient_against_finite_differences_float64():
    members64 = [Smooth(1, torch.float64), Smooth(2, torch.float64)]
    card = make_card(overlap=0.5, mirror_axes=(0, 2))
    shape = (11, 12, 7)
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:9, 3:11, 1:6] = True
    forward = SegmentationForward(members64[0], card, shape, RegionTarget(1, mask), networks=members64,
                                  max_graph_windows=0)
    gradient = forward.gradient(x)
    assert gradient.dtype == torch.float64
    step = 1e-5
    generator = np.random.default_rng(0)
    voxels = [tuple(int(generator.integers(0, s)) for s in shape) for _ in range(6)] + [(0, 0, 0), (10, 11, 6)]
    for voxel in voxels:
        delta = torch.zeros_like(x)
        delta[(0, 0, *voxel)] = step
        with torch.no_grad():
            numeric = (forward(x + delta) - forward(x - delta)).item() / (2 * step)
        # central differences: truncation O(step^2) ~ 1e-10, rounding ~ 1e-16 * |T| / step ~ 1e-9
        assert gradient[(0, 0, *voxel)].item() == pytest.approx(numeric, rel=1e-6, abs=1e-7)


def test_layer_hooks_refuse_several_passes_per_window(members):
    card = make_card()
    windowed = WindowedForward(members[0], card, (9, 11, 7), networks=members)
    with pytest.raises(SegXAIInputError, match="ensemble member"):
        windowed(torch.zeros((1, 1, 9, 11, 7)), on_window=lambda output, index: None)


# ---- resize_to_shape -----------------------------------------------------------------------------
def write_ramp_card(folder, resize, threshold):
    """A per-voxel TorchScript model: class-1 logit = 4 (x - threshold), class 0: 0."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 4.0
        conv.bias[1] = -4.0 * threshold
    torch.jit.script(conv).save(str(folder / "voxelwise.ts"))
    data = card_dict(patch=(8, 8, 8), mirror_axes=(), scheme="monai", blend="constant",
                     preprocessing__resize_to_shape=list(resize), preprocessing__orientation="RAS")
    data["architecture"] = {"format": "torchscript", "file": "voxelwise.ts"}
    (folder / "model_card.json").write_text(json.dumps(data), encoding="utf-8")
    return folder / "model_card.json"


@pytest.mark.parametrize("grid", ["anisotropic", "oblique"])
@pytest.mark.parametrize("resize", [(20, 15, 12), (10, 8, 5)])
def test_resize_to_shape_round_trip(tmp_path, grid, resize):
    shape = (13, 10, 7)
    affine = grid_matrix(grid)
    # a linear ramp in physical space: trilinear resampling reproduces it exactly away from the border
    direction = np.array([0.9, -0.3, 0.2])

    def ramp(ijk_to_ras, size):
        index = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1).astype(float)
        ras = index @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
        return ras @ direction

    values = ramp(affine, shape)
    threshold = float(np.median(values))
    image = Image(values[None].astype(np.float32), affine)
    card_path = write_ramp_card(tmp_path, resize, threshold)
    model = load_model(card_path, "cpu")

    x = preprocess(image, model.card)
    assert tuple(x.shape[1:]) == resize
    model_affine = np.asarray(x.affine, dtype=float)
    expected = ramp(model_affine, resize)
    scale = np.array(shape) / np.array(resize)
    # interior model voxels (their sample point lies between input voxel centres): exact there
    inner = []
    for s, r, n in zip(scale, resize, shape):
        source = (np.arange(r) + 0.5) * s - 0.5  # input index each model voxel samples
        inside = np.flatnonzero((source >= 0) & (source <= n - 1))
        inner.append(slice(inside[0], inside[-1] + 1))
    inner = tuple(inner)
    np.testing.assert_allclose(x.as_tensor()[0].numpy()[inner], expected[inner], rtol=1e-5, atol=1e-3)
    # the resized grid covers the same physical box: the 8 outer corners are the input's
    # (in another order when the orientation permutes or flips the axes)
    def box(ijk_to_ras, size):
        corners = np.array([[-0.5 if low else n - 0.5 for low, n in zip(bits, size)] + [1.0]
                            for bits in itertools.product([True, False], repeat=3)])
        return np.array(sorted(map(tuple, np.round((corners @ ijk_to_ras.T)[:, :3], 6))))

    np.testing.assert_allclose(box(model_affine, resize), box(affine, shape), atol=1e-5)

    result = segment(image, model)
    assert result.labels.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(result.labels.ijk_to_ras, image.ijk_to_ras)
    assert tuple(result.model_labels.shape) == resize
    # labels right wherever they are certain: an input voxel's probability interpolates the
    # 8 model voxels around it, whose ramp values differ from its own by at most the L1 norm of
    # the ramp's change per model voxel, plus one input voxel's change at the clamped border
    model_step = np.abs(model_affine[:3, :3].T @ direction).sum()
    input_step = np.abs(affine[:3, :3].T @ direction).sum()
    clear = np.abs(values - threshold) > model_step + input_step
    assert clear.sum() > 0.15 * clear.size and 0 < (values > threshold)[clear].mean() < 1
    np.testing.assert_array_equal(result.labels.array[0][clear], (values > threshold)[clear])


# ---- loading and the card ------------------------------------------------------------------------
def test_load_a_fold_ensemble(tmp_path):
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    for fold in range(3):
        torch.manual_seed(fold)
        torch.save(UNet(**kwargs).state_dict(), tmp_path / f"fold_{fold}.pt")
    data = card_dict(patch=(8, 8, 8))
    data["architecture"] = {"format": "monai", "name": "UNet", "kwargs": kwargs,
                            "weights": [f"fold_{fold}.pt" for fold in range(3)]}
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    model = load_model(tmp_path, "cpu")
    assert len(model.networks) == 3 and model.network is model.networks[0]
    for fold, network in enumerate(model.networks):
        state = torch.load(tmp_path / f"fold_{fold}.pt", weights_only=True)
        assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
        assert not network.training
    assert "3 members" in model.card.summary()
    before = model.card.checksum()
    torch.manual_seed(9)
    torch.save(UNet(**kwargs).state_dict(), tmp_path / "fold_2.pt")  # any member's weights identify the model
    assert model.card.checksum() != before
    # the single-network constructor still works
    single = LoadedModel(model.network, model.card, torch.device("cpu"))
    assert single.networks == [model.network]


@pytest.mark.parametrize("key, value, field", [
    ("inference__mirror_axes", [0, 3], "inference.mirror_axes.1"),
    ("inference__mirror_axes", [1, 1], "inference.mirror_axes"),
    ("inference__mirror_axes", "012", "inference.mirror_axes"),
    ("inference__window_scheme", "nnUNet", "inference.window_scheme"),
    ("preprocessing__resize_to_shape", [16, 0, 16], "preprocessing.resize_to_shape.1"),
    ("preprocessing__resize_to_shape", [16, 16], "preprocessing.resize_to_shape"),
    ("preprocessing__resize_to_shape", [16, 16.5, 16], "preprocessing.resize_to_shape.1"),
])
def test_card_errors_name_the_field(key, value, field):
    data = card_dict()
    section, name = key.split("__")
    data[section][name] = value
    with pytest.raises(SegXAIInputError, match=field.replace(".", r"\.")):
        model_card_from_dict(data)


def test_card_ensemble_weights_errors():
    data = card_dict()
    data["architecture"] = {"format": "monai", "name": "UNet", "weights": []}
    with pytest.raises(SegXAIInputError, match=r"architecture\.weights"):
        model_card_from_dict(data)
    data["architecture"] = {"format": "torchscript", "file": "a.ts", "weights": ["a.pt", "b.pt"]}
    with pytest.raises(SegXAIInputError, match="weights: a list of state dicts"):
        model_card_from_dict(data)
    data["architecture"] = {"format": "monai", "name": "UNet", "weights": ["a.pt", "b.pt"], "sha256": ["0" * 64]}
    with pytest.raises(SegXAIInputError, match="sha256: a list needs one checksum per weights file"):
        model_card_from_dict(data)
    card = model_card_from_dict(card_dict())
    assert card.mirror_axes == (0, 1, 2) and card.window_scheme == "nnunet" and card.resize_to_shape is None
    defaults = card_dict()
    del defaults["inference"]["mirror_axes"], defaults["inference"]["window_scheme"]
    card = model_card_from_dict(defaults)
    assert card.mirror_axes == () and card.window_scheme == "monai"


def test_rule_based_methods_use_every_member_or_refuse(tmp_path):
    """Guided backprop applies its rules to every member of a fold ensemble (never a mix of
    ruled and plain members); PatternAttribution, whose patterns are one network's, refuses."""
    import numpy as np

    from SegXAILib.attribution import explain
    from SegXAILib.image import Image, SegXAIInputError
    from SegXAILib.models import load_model

    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                      torch.nn.Conv3d(4, 2, 1))
        torch.save(network.state_dict(), tmp_path / f"m{seed}.pt")
        members.append(network)
    source = tmp_path / "net.py"
    source.write_text("import torch\n\nclass Net(torch.nn.Sequential):\n    def __init__(self):\n        super().__init__("
                      "torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))\n",
                      encoding="utf-8")
    card = {"name": "ens", "architecture": {"format": "python", "file": "net.py", "name": "Net",
                                            "weights": ["m1.pt", "m2.pt"]},
            "input_channels": ["x"], "classes": [{"name": "background"}, {"name": "thing"}],
            "inference": {"patch_size": [8, 8, 8]}, "output_activation": "softmax"}
    (tmp_path / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    model = load_model(tmp_path, device="cpu", trust_code=True)
    image = Image(np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32), np.eye(4))
    both = explain(image, model, "guided_backprop", target="class:thing", params={"aggregation": "target"})

    # the oracle: guided backprop written out (ReLU backward passes a gradient only where the
    # input and the gradient are both positive) through the mean of the members' logits, on
    # the ensemble's own mask (one window covers the image: the blend is the identity)
    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            ctx.save_for_backward(h)
            return h.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            (h,) = ctx.saved_tensors
            return grad * (h > 0) * (grad > 0)

    x = torch.from_numpy(image.array[None]).requires_grad_(True)
    logits = sum(net[2](Guided.apply(net[0](x))) for net in members) / len(members)
    mask = logits.argmax(dim=1) == 1
    logits[:, 1][mask].sum().backward()
    expected = x.grad.numpy()[0]
    assert np.abs(expected).max() > 0
    assert np.allclose(both.maps.array, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # PatternAttribution's patterns belong to one network (LRP sums its members: test_lrp_nnunet.py)
    with pytest.raises(SegXAIInputError, match="ensemble"):
        explain(image, model, "pattern_attribution", target="class:thing")
