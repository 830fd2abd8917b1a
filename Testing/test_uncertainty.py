"""Predictive uncertainty (issue 17): sample sources, streaming maps and tables.

Oracles: closed forms (entropy of known mixtures, MI bounds), the same quantities computed in
float64 numpy from the stacked samples, the explicit pairwise Dice over sample pairs, brute-force
distances for bands and regions, ``segment`` of hand-built networks (a flip written with
``torch.flip``, one ensemble member alone), and exact invariances (a flip-symmetric network,
identity-magnitude augmentation, trilinear interpolation of linear functions).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.models import LoadedModel, segment
from SegXAILib.models.card import model_card_from_dict
from SegXAILib.progress import CancelToken, Cancelled
from SegXAILib.uncertainty import (UncertaintyAccumulator, check_sources, estimate_uncertainty, iterate_samples,
                                   plan_samples, pooled_pairwise_dice, source_specs)
from SegXAILib.uncertainty.sources import spatial_matrix, warp_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (12, 10, 8)
# float32 accumulation of a few samples of values <= log K: a few 1e-7; entropies add logs
ATOL = 2e-5


# ---- models ------------------------------------------------------------------------------------------------
def make_card(classes=("background", "thing"), activation="softmax", mirror_axes=(), patch=SHAPE, overlap=0.25,
              name="uncertainty-test"):
    return model_card_from_dict({
        "name": name, "architecture": {"format": "torchscript", "file": "unused.ts"},
        "input_channels": ["ch0"], "classes": [{"name": c} for c in classes],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": "gaussian",
                      "mirror_axes": list(mirror_axes)},
        "output_activation": activation,
    })


def seeded(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


class Smooth(torch.nn.Module):
    """Spatially asymmetric: flips change its output."""

    def __init__(self, seed: int = 0, out_channels: int = 2):
        super().__init__()
        self.first = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.second = torch.nn.Conv3d(3, out_channels, (3, 1, 3), padding=(1, 0, 1))
        seeded(self, seed)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class Symmetric(torch.nn.Module):
    """Convolutions whose kernels are symmetric under every flip (zero padding too): the
    network commutes with flips, ``f(flip x) = flip f(x)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.first = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.second = torch.nn.Conv3d(3, 2, 3, padding=1)
        seeded(self, seed)
        with torch.no_grad():
            for conv in (self.first, self.second):
                w = conv.weight
                conv.weight.copy_(sum(torch.flip(w, dims) for dims in
                                      [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]) / 8)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class WithDropout(torch.nn.Module):
    """Dropout between convolutions, and a BatchNorm whose train mode would change the output."""

    def __init__(self, seed: int = 0, p: float = 0.3):
        super().__init__()
        self.first = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm3d(4)
        self.drop = torch.nn.Dropout(p)
        self.second = torch.nn.Conv3d(4, 2, 1)
        seeded(self, seed)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.second(self.drop(torch.relu(self.norm(self.first(x)))))


class Linear(torch.nn.Module):
    """Voxelwise and linear: logits ``w_k x + b_k``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 0.8]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -0.3]))
        self.eval()

    def forward(self, x):
        return self.conv(x)


class HandFlipped(torch.nn.Module):
    def __init__(self, network, axes):
        super().__init__()
        self.network, self.axes = network, [a + 2 for a in axes]

    def forward(self, x):
        if not self.axes:
            return self.network(x)
        return self.network(x.flip(self.axes)).flip(self.axes)


def loaded(network, card, networks=None) -> LoadedModel:
    return LoadedModel(network, card, torch.device("cpu"), networks=networks or [])


def make_image(seed: int = 0, shape=SHAPE, matrix=None) -> Image:
    rng = np.random.default_rng(seed)
    return Image(rng.normal(size=(1, *shape)).astype(np.float32), np.eye(4) if matrix is None else matrix)


# ---- numpy oracle of the maps -----------------------------------------------------------------------------
def plogp(p):
    p = np.asarray(p, dtype=np.float64)
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def oracle_maps(stack: np.ndarray, activation: str) -> dict[str, np.ndarray]:
    """The maps from the stacked samples ``(N, K, ...)`` in float64."""
    stack = stack.astype(np.float64)
    mean = stack.mean(0)
    if activation == "softmax":
        predictive = -plogp(mean).sum(0)[None]
        expected = (-plogp(stack).sum(1)).mean(0)[None]
        masks = np.argmax(stack, axis=1)[:, None] == np.arange(1, stack.shape[1]).reshape(1, -1, 1, 1, 1)
    else:
        predictive = -(plogp(mean[1:]) + plogp(1 - mean[1:]))
        expected = (-(plogp(stack[:, 1:]) + plogp(1 - stack[:, 1:]))).mean(0)
        masks = stack[:, 1:] > 0.5
    return {"mean_probability": mean, "variance": stack.var(0), "predictive_entropy": predictive,
            "expected_entropy": expected, "mutual_information": predictive - expected,
            "mask_frequency": masks.mean(0), "masks": masks}


def random_samples(n: int, k: int, shape, activation: str, seed: int, concentration: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if activation == "softmax":
        return rng.dirichlet([concentration] * k, size=(n, *shape)).transpose(0, 4, 1, 2, 3).astype(np.float32)
    foreground = rng.uniform(0, 1, size=(n, k - 1, *shape))
    return np.concatenate([1 - foreground.max(1, keepdims=True), foreground], axis=1).astype(np.float32)


def accumulate(stack: np.ndarray, activation: str, masks=None, grid=None, **kwargs) -> UncertaintyAccumulator:
    k = stack.shape[1]
    grid = grid or Image(np.zeros((1, *stack.shape[2:]), np.float32))
    masks = np.zeros((k - 1, *stack.shape[2:]), bool) if masks is None else masks
    accumulator = UncertaintyAccumulator(grid, [f"c{i}" for i in range(k)], activation, masks, **kwargs)
    for sample in stack:
        accumulator.add(sample)
    return accumulator


# ---- closed forms -------------------------------------------------------------------------------------------
def test_entropy_of_known_mixtures():
    # two certain but opposite samples: H(mean) = log 2, E[H] = 0, MI = log 2 (the bound for K = 2)
    a = np.zeros((2, 1, 1, 1), np.float32)
    a[0] = 1
    b = 1 - a
    maps = accumulate(np.stack([a, b]), "softmax").maps()
    assert maps["predictive_entropy"][0, 0, 0, 0] == pytest.approx(math.log(2), abs=1e-6)
    assert maps["expected_entropy"][0, 0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    assert maps["mutual_information"][0, 0, 0, 0] == pytest.approx(math.log(2), abs=1e-6)
    assert maps["variance"][:, 0, 0, 0] == pytest.approx([0.25, 0.25], abs=1e-7)
    # K = 3: samples (1,0,0), (0,1,0), (0,0,1) and a uniform one: H(mean) = log 3, E[H] = log(3) / 4
    eye = np.eye(3, dtype=np.float32)
    stack = np.stack([eye[0], eye[1], eye[2], np.full(3, 1 / 3, np.float32)])[..., None, None, None]
    maps = accumulate(stack, "softmax").maps()
    assert maps["predictive_entropy"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert maps["expected_entropy"].item() == pytest.approx(math.log(3) / 4, abs=1e-6)
    # sigmoid: one class, samples q = 0.2 and 0.8: Bernoulli entropies h(0.5) = log 2 and h(0.2) each
    q = np.array([0.2, 0.8], np.float32)
    stack = np.stack([1 - q, q], axis=1)[..., None, None, None]
    maps = accumulate(stack, "sigmoid").maps()
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert maps["predictive_entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert maps["expected_entropy"].item() == pytest.approx(h, abs=1e-6)


@pytest.mark.parametrize("activation, k", [("softmax", 2), ("softmax", 4), ("sigmoid", 3)])
def test_mutual_information_identities(activation, k):
    stack = random_samples(6, k, (5, 4, 3), activation, seed=k)
    maps = accumulate(stack, activation).maps()
    difference = maps["predictive_entropy"] - maps["expected_entropy"]
    assert difference.min() >= -1e-6  # Jensen: entropy is concave
    bound = math.log(k) if activation == "softmax" else math.log(2)
    assert maps["mutual_information"].max() <= bound + 1e-6
    assert maps["predictive_entropy"].max() <= bound + 1e-6
    # identical samples: no disagreement at all
    same = accumulate(np.repeat(stack[:1], 5, axis=0), activation).maps()
    assert np.abs(same["mutual_information"]).max() <= 1e-6
    assert same["variance"].max() <= 1e-12
    np.testing.assert_allclose(same["mean_probability"], stack[0], atol=1e-7)


@pytest.mark.parametrize("activation, k", [("softmax", 3), ("sigmoid", 3), ("softmax", 2)])
def test_streaming_maps_equal_the_stacked_numpy_computation(activation, k):
    stack = random_samples(7, k, (6, 5, 4), activation, seed=11, concentration=0.7)
    maps = accumulate(stack, activation).maps()
    expected = oracle_maps(stack, activation)
    for name in ("mean_probability", "variance", "predictive_entropy", "expected_entropy", "mask_frequency"):
        np.testing.assert_allclose(maps[name], expected[name], atol=ATOL, err_msg=name)
    np.testing.assert_allclose(maps["mutual_information"], np.maximum(expected["mutual_information"], 0), atol=ATOL)


def explicit_pairwise_dice(masks: np.ndarray):
    """``2 Σ_{i<j} |A_i ∩ A_j| / Σ_{i<j} (|A_i| + |A_j|)`` over the explicit pairs."""
    pairs = list(itertools.combinations(range(len(masks)), 2))
    numerator = sum(2 * np.logical_and(masks[i], masks[j]).sum() for i, j in pairs)
    denominator = sum(masks[i].sum() + masks[j].sum() for i, j in pairs)
    return None if denominator == 0 else numerator / denominator


@pytest.mark.parametrize("n", [2, 3, 6])
def test_pooled_pairwise_dice_equals_the_explicit_pairs(n):
    rng = np.random.default_rng(n)
    for density in (0.0, 0.1, 0.5, 1.0):
        masks = rng.uniform(size=(n, 4, 5, 3)) < density
        expected = explicit_pairwise_dice(masks)
        value = pooled_pairwise_dice(masks.sum(0), n)
        assert (value is None) == (expected is None)
        if expected is not None:
            assert value == pytest.approx(expected, rel=1e-12)
    # identical masks agree fully; disjoint ones not at all
    same = np.repeat(rng.uniform(size=(1, 4, 5, 3)) < 0.5, n, axis=0)
    assert pooled_pairwise_dice(same.sum(0), n) == pytest.approx(1.0)
    disjoint = np.zeros((n, n), bool)
    disjoint[np.arange(n), np.arange(n)] = True
    assert pooled_pairwise_dice(disjoint.sum(0), n) == 0.0


# ---- tables against a direct numpy computation --------------------------------------------------------------
def voxel_centres(grid: Image, unit: str) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in grid.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    return ijk * (grid.spacing if unit == "mm" else 1.0)


def brute_band(mask: np.ndarray, points: np.ndarray, width: float) -> np.ndarray:
    flat = mask.ravel()
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    band = np.zeros(flat.shape, bool)
    if flat.any() and (~flat).any():
        band[flat] = distances[np.ix_(flat, ~flat)].min(1) <= width + 1e-9
        band[~flat] = distances[np.ix_(~flat, flat)].min(1) <= width + 1e-9
    return band.reshape(mask.shape)


def direct_row(stack, expected, masks_main, c, region, mask, band, voxel_volume, activation):
    """One table row from the stacked samples and their maps (float64)."""
    channel = 0 if activation == "softmax" else c - 1
    mean = expected["mean_probability"]
    confidence = mean.max(0) if activation == "softmax" else mean[c]
    sample_masks = expected["masks"][:, c - 1] & region
    volumes = sample_masks.reshape(len(stack), -1).sum(1) * voxel_volume
    probability = mean[c][region]
    denominator = mask[region].sum() + probability.sum()

    def avg(values, where):
        return float(values[where].mean()) if where.any() else None

    return {
        "voxels": int(mask.sum()),
        "mean_confidence": avg(confidence, mask),
        "mean_entropy": avg(expected["predictive_entropy"][channel], mask),
        "mean_mutual_information": avg(np.maximum(expected["mutual_information"][channel], 0), mask),
        "boundary_entropy": avg(expected["predictive_entropy"][channel], band),
        "boundary_voxels": int(band.sum()),
        "pairwise_dice": explicit_pairwise_dice(sample_masks),
        "volume_mean_mm3": float(volumes.mean()),
        "volume_cv": None if volumes.mean() == 0 else float(volumes.std() / volumes.mean()),
        "soft_dice_confidence": None if denominator == 0 else float(2 * mean[c][mask & region].sum() / denominator),
    }


def compare_row(row, expected):
    for key, value in expected.items():
        got = getattr(row, key)
        if value is None:
            assert got is None, key
        else:
            assert got == pytest.approx(value, abs=ATOL, rel=1e-5), key


@pytest.mark.parametrize("activation, unit, band_width, region_width", [
    ("softmax", "mm", 1.5, 3.0), ("sigmoid", "voxels", 1.0, 2.5), ("softmax", "voxels", 2.0, 100.0)])
def test_structure_and_instance_rows_equal_a_direct_numpy_computation(activation, unit, band_width, region_width):
    shape = (11, 9, 7)
    grid = Image(np.zeros((1, *shape), np.float32), geometry_matrix((0.8, 1.0, 1.7), (3, -2, 5), np.eye(3)))
    k = 3
    main = np.zeros((k - 1, *shape), bool)
    main[0, 1:4, 1:4, 1:3] = True  # three instances of class 1
    main[0, 7:10, 5:8, 3:6] = True
    main[0, 1:2, 7:8, 6:7] = True
    main[1, 4:8, 2:6, 2:5] = True  # one of class 2
    rng = np.random.default_rng(5)
    # samples near the main masks (blobs grow and shrink between samples) and some noise
    stack = []
    for s in range(5):
        logits = rng.normal(0, 0.6, size=(k, *shape))
        logits[1:] += 2.5 * main * rng.uniform(0.5, 1.5)
        logits[0] += 1.0
        if activation == "softmax":
            p = np.exp(logits) / np.exp(logits).sum(0)
        else:
            fg = 1 / (1 + np.exp(-(logits[1:] - logits[0])))
            p = np.concatenate([1 - fg.max(0, keepdims=True), fg])
        stack.append(p.astype(np.float32))
    stack = np.stack(stack)
    accumulator = accumulate(stack, activation, main, grid, band_width=band_width, region_width=region_width,
                             width_unit=unit)
    structures, instances = accumulator.tables()
    expected = oracle_maps(stack, activation)
    points = voxel_centres(grid, unit)
    voxel_volume = grid.voxel_volume
    everywhere = np.ones(shape, bool)
    for c in (1, 2):
        band = brute_band(main[c - 1], points, band_width)
        compare_row(structures[c - 1], direct_row(stack, expected, main, c, everywhere, main[c - 1], band,
                                                  voxel_volume, activation))
    rows = {(row.class_index, row.instance): row for row in instances}
    assert sorted(rows) == [(1, 1), (1, 2), (1, 3), (2, 1)]
    for c in (1, 2):
        regions = accumulator.instances[c - 1]
        # the regions: each voxel goes to an instance at the least distance, within the width
        ids = np.arange(1, regions.count + 1)
        distance = np.stack([np.linalg.norm(points[:, None] - points[(regions.labels == i).ravel()][None], axis=-1)
                             .min(1) for i in ids])  # (instances, voxels)
        nearest = distance.min(0)
        assigned = regions.regions.ravel()
        np.testing.assert_array_equal(assigned > 0, nearest <= region_width + 1e-9)
        inside = assigned > 0
        np.testing.assert_allclose(distance[assigned[inside] - 1, np.nonzero(inside)[0]], nearest[inside])
        for i in ids:
            region = regions.regions == i
            mask = regions.labels == i
            band = brute_band(mask, points, band_width) & region
            compare_row(rows[(c, i)], direct_row(stack, expected, main, c, region, mask, band, voxel_volume,
                                                 activation))


# ---- sources on small networks --------------------------------------------------------------------------------
def test_a_flip_symmetric_network_has_zero_mutual_information_under_flips():
    card = make_card(mirror_axes=(0, 1, 2), patch=(8, 8, 8), overlap=0.5)  # several windows
    image = make_image(1)
    result = estimate_uncertainty(image, loaded(Symmetric(3), card), "flips")
    assert result.samples == 8
    assert result.mutual_information.array.max() <= 1e-6
    assert result.variance.array.max() <= 1e-10
    # an asymmetric network disagrees with itself under flips
    other = estimate_uncertainty(image, loaded(Smooth(3), card), "flips")
    assert other.mutual_information.array.max() > 1e-3


def test_flip_samples_are_the_hand_flipped_networks_predictions():
    card = make_card(mirror_axes=(0, 2), patch=(8, 8, 8), overlap=0.5)
    plain = make_card(patch=(8, 8, 8), overlap=0.5)
    image = make_image(2)
    network = Smooth(4)
    plan = plan_samples(loaded(network, card), "flips")
    samples = list(iterate_samples(image, plan))
    assert [d["flip_axes"] for d, _ in samples] == [[], [0], [2], [0, 2]]
    for description, probabilities in samples:
        expected = segment(image, loaded(HandFlipped(network, description["flip_axes"]), plain))
        np.testing.assert_allclose(probabilities, expected.probabilities.array, atol=1e-5)


def test_identity_magnitude_augmentations_reproduce_the_plain_prediction():
    card = make_card(mirror_axes=(1,), patch=(8, 8, 8), overlap=0.5)
    image = make_image(3)
    model = loaded(Smooth(5), card)
    expected = segment(image, model).probabilities.array  # with the card's mirroring
    sources = {"noise": {"std": 0.0}, "gamma": {"low": 1.0, "high": 1.0},
               "intensity_scale": {"low": 1.0, "high": 1.0}, "spatial": {"rotation_degrees": 0.0, "scale": 0.0}}
    for _, probabilities in iterate_samples(image, plan_samples(model, sources, samples=3)):
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # MC dropout with rate 0: dropout on, norms still in eval mode (train mode would use batch statistics)
    dropout = loaded(WithDropout(6), card)
    expected = segment(image, dropout).probabilities.array
    for _, probabilities in iterate_samples(image, plan_samples(dropout, {"mc_dropout": {"rate": 0.0}}, samples=2)):
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert not any(module.training for module in dropout.network.modules())
    assert dropout.network.drop.p == 0.3  # the layer's own rate restored


def test_warp_and_its_inverse_compose_to_the_identity_on_linear_fields():
    shape = (13, 11, 9)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    ramp = torch.from_numpy((0.3 * grid[0] - 0.7 * grid[1] + 0.45 * grid[2] + 2.0)[None, None].astype(np.float32))
    matrix = spatial_matrix([12.0, -8.0, 15.0], 1.1, (0.9, 1.2, 2.0))
    assert np.allclose(matrix @ np.linalg.inv(matrix), np.eye(3))
    centre = (np.array(shape) - 1) / 2
    offsets = grid.reshape(3, -1).T - centre
    forward = offsets @ matrix.T + centre
    inside = np.all((forward >= 0) & (forward <= np.array(shape) - 1), axis=1).reshape(shape)
    warped = warp_volume(ramp, matrix)
    expected = 0.3 * forward[:, 0] - 0.7 * forward[:, 1] + 0.45 * forward[:, 2] + 2.0
    np.testing.assert_allclose(warped[0, 0].numpy()[inside], expected.reshape(shape)[inside], atol=1e-4)
    back = warp_volume(warped, np.linalg.inv(matrix))
    # positions whose round trip stays inside the volume (and the 8 neighbours used between)
    round_trip = offsets @ np.linalg.inv(matrix).T + centre
    there = np.floor(round_trip).astype(int)
    ok = np.all((there >= 0) & (there + 1 <= np.array(shape) - 1), axis=1)
    for corner in itertools.product((0, 1), repeat=3):
        index = np.clip(there + np.array(corner), 0, np.array(shape) - 1)
        ok &= inside[tuple(index.T)]
    ok = ok.reshape(shape)
    assert ok.sum() > 100
    np.testing.assert_allclose(back[0, 0].numpy()[ok], ramp[0, 0].numpy()[ok], atol=1e-4)
    np.testing.assert_allclose(warp_volume(ramp, np.eye(3)).numpy(), ramp.numpy(), atol=1e-5)


def test_a_spatial_sample_is_mapped_back_onto_the_input_grid():
    """A voxelwise linear network on a linear ramp: the logits are linear in space, so warping
    the input and the logits back is exact wherever nothing left the volume: the sample's
    probabilities are the plain ones there."""
    shape = (15, 13, 11)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    ramp = (0.25 * grid[0] - 0.2 * grid[1] + 0.3 * grid[2] - 1.0).astype(np.float32)
    image = Image(ramp[None], geometry_matrix((1.0, 1.0, 1.5), (0, 0, 0), np.eye(3)))
    model = loaded(Linear(), make_card(patch=shape))
    expected = segment(image, model).probabilities.array
    plan = plan_samples(model, {"spatial": {"rotation_degrees": 15.0, "scale": 0.1}}, samples=3, seed=2)
    centre = (np.array(shape) - 1) / 2
    near_centre = np.linalg.norm((grid - centre[:, None, None, None]) * np.array([1, 1, 1.5])[:, None, None, None],
                                 axis=0) <= 3.0
    for description, probabilities in iterate_samples(image, plan):
        assert np.abs(description["rotation_degrees"]).max() > 0.5  # a real rotation
        np.testing.assert_allclose(probabilities[:, near_centre], expected[:, near_centre], atol=1e-4)
        assert np.abs(probabilities - expected).max() > 1e-3  # the border did move


@pytest.mark.parametrize("sources", ["noise", "mc_dropout", "spatial", "gamma"])
def test_same_seed_same_maps_and_global_rng_untouched(sources):
    card = make_card(patch=(8, 8, 8))
    image = make_image(4)
    model = loaded(WithDropout(7), card)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = estimate_uncertainty(image, model, sources, samples=3, seed=1)
    again = estimate_uncertainty(image, model, sources, samples=3, seed=1)
    other = estimate_uncertainty(image, model, sources, samples=3, seed=2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    np.testing.assert_array_equal(first.mean_probability.array, again.mean_probability.array)
    np.testing.assert_array_equal(first.mutual_information.array, again.mutual_information.array)
    assert np.abs(first.mean_probability.array - other.mean_probability.array).max() > 1e-4


def test_mc_dropout_needs_dropout_layers_and_names_the_model():
    model = loaded(Smooth(1), make_card(name="no-dropout-net"))
    with pytest.raises(SegXAIInputError, match="no-dropout-net.*no dropout layer"):
        estimate_uncertainty(make_image(0), model, "mc_dropout", samples=2)
    assert not any(module.training for module in model.network.modules())


def test_mc_dropout_samples_differ_and_the_model_is_left_in_eval_mode():
    model = loaded(WithDropout(8, p=0.4), make_card())
    samples = [p for _, p in iterate_samples(make_image(5), plan_samples(model, "mc_dropout", samples=3, seed=0))]
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    assert not any(module.training for module in model.network.modules())


def test_ensemble_members_are_one_sample_each():
    card = make_card(patch=(8, 8, 8))
    image = make_image(6)
    members = [Smooth(10), Smooth(11), Smooth(12)]
    folds = loaded(members[0], card, members)
    samples = list(iterate_samples(image, plan_samples(folds, "ensemble")))
    assert len(samples) == 3
    for (description, probabilities), member in zip(samples, members):
        np.testing.assert_allclose(probabilities, segment(image, loaded(member, card)).probabilities.array, atol=1e-6)
    # several models: their members in order; with flips the combinations multiply
    flipped = make_card(patch=(8, 8, 8), mirror_axes=(0,))
    models = [loaded(members[0], flipped, members[:2]), loaded(members[2], flipped)]
    plan = plan_samples(models, ["ensemble", "flips"])
    assert plan.samples == 6
    descriptions = [d for d, _ in iterate_samples(image, plan)]
    assert [(d["model"], d["member"], d["flip_axes"]) for d in descriptions] == [
        (0, 0, []), (0, 0, [0]), (0, 1, []), (0, 1, [0]), (1, 0, []), (1, 0, [0])]


def test_the_result_equals_the_numpy_computation_of_its_own_samples():
    card = make_card(classes=("background", "a", "b"), patch=(8, 8, 8), mirror_axes=(0, 1))
    image = make_image(7)
    model = loaded(Smooth(13, out_channels=3), card)
    seen = []
    result = estimate_uncertainty(image, model, {"flips": None, "noise": {"std": 0.3}}, samples=6, seed=3,
                                  on_sample=lambda d, p: seen.append(p.copy()))
    expected = oracle_maps(np.stack(seen), "softmax")
    for name, value in result.maps().items():
        target = np.maximum(expected[name], 0) if name == "mutual_information" else expected[name]
        np.testing.assert_allclose(value.array, target, atol=ATOL, err_msg=name)
        assert value.same_grid(image)
    assert result.mean_probability.channel_names == ("background", "a", "b")
    assert [row.structure for row in result.structures] == ["a", "b"]
    assert result.summary()["sources"]["flips"]["axes"] == [0, 1]


def test_a_sigmoid_model_gets_one_entropy_channel_per_class():
    card = make_card(classes=("background", "a", "b"), activation="sigmoid", patch=(8, 8, 8))
    result = estimate_uncertainty(make_image(8), loaded(Smooth(14, out_channels=2), card), "noise", samples=4)
    assert result.predictive_entropy.channel_names == ("a", "b")
    assert result.mutual_information.array.max() <= math.log(2) + 1e-6
    assert result.mask_frequency.num_channels == 2


def test_progress_is_reported_and_cancel_stops():
    model = loaded(Smooth(2), make_card(mirror_axes=(0,), patch=(8, 8, 8)))
    fractions = []
    estimate_uncertainty(make_image(9), model, "flips", progress=lambda f, m: fractions.append(f))
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        estimate_uncertainty(make_image(9), model, "flips", cancel=token)


@pytest.mark.parametrize("sources, kwargs, match", [
    ("bootstrap", {}, "unknown source 'bootstrap'"),
    ({"noise": {"sigma": 0.1}}, {}, "source 'noise' has no parameter 'sigma'"),
    ({"gamma": {"low": 2.0, "high": 1.0}}, {}, "low .* must be <= high"),
    ({"noise": {"std": -1.0}}, {}, "parameter std"),
    ({"flips": {"axes": "0,5"}}, {}, "parameter axes"),
    ("flips", {}, "allows no mirroring"),
    ("noise", {"samples": 1}, "samples"),
    ("ensemble", {"samples": 3}, "would repeat"),
    ("noise", {"width_unit": "cm"}, "width_unit"),
    ("noise", {"band_width": -1.0}, "band_width"),
])
def test_bad_requests_name_what_is_wrong(sources, kwargs, match):
    model = loaded(Smooth(1), make_card())
    with pytest.raises(SegXAIInputError, match=match):
        estimate_uncertainty(make_image(0), model, sources, **kwargs)


def test_several_models_need_the_ensemble_source_and_the_same_classes():
    a = loaded(Smooth(1), make_card())
    with pytest.raises(SegXAIInputError, match="add the source 'ensemble'"):
        plan_samples([a, a], "noise")
    b = loaded(Smooth(2, out_channels=3), make_card(classes=("background", "x", "y")))
    with pytest.raises(SegXAIInputError, match="same classes"):
        plan_samples([a, b], "ensemble")


def test_the_registry_describes_every_source():
    specs = {spec["name"]: spec for spec in source_specs()}
    assert set(specs) == {"flips", "gamma", "noise", "intensity_scale", "spatial", "mc_dropout", "ensemble"}
    assert specs["noise"]["stochastic"] and not specs["flips"]["stochastic"]
    checked = check_sources({"spatial": {"rotation_degrees": "5"}, "flips": {"axes": [2, 0]}})
    assert checked == {"spatial": {"rotation_degrees": 5.0, "scale": 0.1}, "flips": {"axes": (2, 0)}}


@pytest.mark.parametrize("layer, channelwise", [(torch.nn.Dropout, False), (torch.nn.Dropout3d, True)])
def test_mc_dropout_masks_come_from_the_seed_not_the_global_generator(layer, channelwise):
    """Eager dropout draws its masks on the CPU from the sample's seed: torch's global
    generators (each device has its own) play no part, so the maps are the same on any device.
    The mask follows torch's definition: kept values scaled by 1 / (1 - p), zeros elsewhere,
    per element (Dropout) or per channel (Dropout3d)."""
    from SegXAILib.uncertainty.sources import mc_dropout

    network = torch.nn.Sequential(layer(0.5)).eval()
    x = torch.ones(1, 6, 4, 5, 3)
    outputs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        with mc_dropout([network], "probe", generator=torch.Generator().manual_seed(9)):
            outputs.append(network(x))
    assert torch.equal(outputs[0], outputs[1])
    values = set(outputs[0].unique().tolist())
    assert values == {0.0, 2.0}
    if channelwise:  # one draw per channel: each channel all kept or all dropped
        per_channel = outputs[0].flatten(2)
        assert torch.all(per_channel.amin(2) == per_channel.amax(2))
    assert not network[0].training and not network[0]._forward_hooks  # restored
