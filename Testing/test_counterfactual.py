"""Counterfactual relevance by CycleGAN activation maximisation (paper 004, METHODS section 7).

Oracles: the losses against formulas written out here in numpy (SSIM from its definition with
a sampled Gaussian window); identity generators give R = 0; generators that add known
constants give a known R exactly inside the patch; a frozen voxel-wise model whose lesion
logit is ``x - 2`` (so the score is the mean intensity of the region minus 2) must see G+
raise and G- lower it on held-out patches after a short training; an interrupted and resumed
run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models.loaders import load_model
from SegXAILib.progress import CancelToken, Cancelled
from SegXAILib.counterfactual import (CHECKPOINT_NAME, ClassifierScore, CounterfactualConfig, CounterfactualGenerators,
                                      IntensityFrame, LossWeights, PatchGeometry, ResidualGenerator,
                                      SegmentationScore, activation_loss, build_domains, counterfactual_relevance,
                                      cycle_loss, discriminator_loss, dssim, generator_adversarial_loss,
                                      load_counterfactual_generators, similarity_loss, train_counterfactual)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THRESHOLD = 2.0  # the voxel-wise model's lesion logit is x - THRESHOLD
GEOMETRY = PatchGeometry(2, (16, 16), (16, 16, 4), (6, 6))
TINY = dict(batch_size=4, learning_rate=2e-3, generator_features=(8, 16), generator_strides=(2,),
            discriminator_features=(8, 16), ssim_window=5)


def phantom(seed: int, shape=(32, 32, 8), grid: str = "identity") -> Image:
    """Tissue (a disc, intensity about 1) with three bright blobs (+2: above the threshold)."""
    rng = np.random.default_rng(seed)
    array = np.zeros(shape, np.float32)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    tissue = ((ii - 15.5) / 15) ** 2 + ((jj - 15.5) / 15) ** 2 < 1
    array[tissue] = 1 + rng.normal(0, 0.2, tissue.sum())
    for _ in range(3):
        c = rng.integers([6, 6, 1], [26, 26, 7])
        blob = ((ii - c[0]) ** 2 + (jj - c[1]) ** 2) / 4 + (kk - c[2]) ** 2 / 2 < 1
        array[blob & tissue] += 2.0
    return Image(array[None], grid_matrix(grid))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    card = write_voxelwise_card(tmp_path_factory.mktemp("voxelwise"), orientation="RAS", threshold=THRESHOLD,
                                patch=GEOMETRY.context_size)
    return load_model(card, "cpu")


@pytest.fixture(scope="module")
def domains(model):
    return build_domains([phantom(seed) for seed in range(4)], model, GEOMETRY)


@pytest.fixture(scope="module")
def trained(model, domains):
    return train_counterfactual(domains, SegmentationScore(model, GEOMETRY), CounterfactualConfig(iterations=40, **TINY))


# ---- losses against hand-written formulas ---------------------------------------------------------

def numpy_ssim(x: np.ndarray, y: np.ndarray, window: int, sigma: float = 1.5, data_range: float = 2.0) -> float:
    """SSIM of two ``(*spatial)`` arrays: Gaussian-weighted local statistics at every valid
    window position, biased (weighted) variances, ``c = (k L)^2``; the mean over positions."""
    offsets = np.arange(window) - (window - 1) / 2
    g = np.exp(-(offsets / sigma) ** 2 / 2)
    g /= g.sum()
    weights = g
    for _ in range(x.ndim - 1):
        weights = np.multiply.outer(weights, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for corner in np.ndindex(*[s - window + 1 for s in x.shape]):
        box = tuple(slice(c, c + window) for c in corner)
        a, b = x[box].astype(np.float64), y[box].astype(np.float64)
        ma, mb = (weights * a).sum(), (weights * b).sum()
        va, vb = (weights * a * a).sum() - ma ** 2, (weights * b * b).sum() - mb ** 2
        cov = (weights * a * b).sum() - ma * mb
        values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 4)])
def test_dssim_cycle_and_similarity_equal_the_formulas(shape):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 2, *shape)).astype(np.float32)
    y = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)
    expected_dssim = np.array([np.mean([(1 - numpy_ssim(x[b, c], y[b, c], 3)) / 2 for c in range(2)])
                               for b in range(2)])
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    np.testing.assert_allclose(dssim(tx, ty, 3).numpy(), expected_dssim, rtol=0, atol=2e-6)
    np.testing.assert_allclose(similarity_loss(tx, ty, 3).numpy(), expected_dssim, rtol=0, atol=2e-6)
    l1 = np.abs(x - y).reshape(2, -1).mean(1)
    np.testing.assert_allclose(cycle_loss(tx, ty, 3).numpy(), 0.5 * (l1 + expected_dssim), rtol=0, atol=2e-6)
    assert float(dssim(tx, tx, 3).abs().max()) < 1e-6  # zero for identical images


def test_least_squares_adversarial_losses_equal_the_formulas():
    """A stand-in discriminator with two maps whose values are known: the losses are the mean
    squared distance to 1 where the real image comes first (0 otherwise), labels inverted for
    the generator."""
    def discriminator(first, second):
        return [first[:, :1] - 0.5 * second[:, :1], (first * second).mean(1, keepdim=True)[..., ::2, ::2]]

    rng = np.random.default_rng(2)
    real = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    fake = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    order = np.array([1, 0, 1])
    expected_d, expected_g = [], []
    for b in range(3):
        a, c = (real[b], fake[b]) if order[b] else (fake[b], real[b])
        maps = [a[0] - 0.5 * c[0], (a * c).mean(0)[::2, ::2]]
        expected_d.append(np.mean([np.mean((m - order[b]) ** 2) for m in maps]))
        expected_g.append(np.mean([np.mean((m - (1 - order[b])) ** 2) for m in maps]))
    args = (discriminator, torch.from_numpy(real), torch.from_numpy(fake), torch.from_numpy(order))
    np.testing.assert_allclose(discriminator_loss(*args).numpy(), expected_d, rtol=1e-6)
    np.testing.assert_allclose(generator_adversarial_loss(*args).numpy(), expected_g, rtol=1e-6)


def test_activation_loss_is_the_class_probability_cross_entropy():
    logits = torch.tensor([[0.3, 1.2, -0.7], [2.0, -1.0, 0.5]])
    score = ClassifierScore(lambda x: logits, class_index=1)(None, torch.zeros(2, 1, 4, 4))
    p = np.exp(logits.numpy())[:, 1] / np.exp(logits.numpy()).sum(1)
    np.testing.assert_allclose(torch.sigmoid(score).numpy(), p, rtol=1e-6)
    np.testing.assert_allclose(activation_loss(score, 1).numpy(), -np.log(p), rtol=1e-5)
    np.testing.assert_allclose(activation_loss(score, 0).numpy(), -np.log(1 - p), rtol=1e-5)
    single = ClassifierScore(lambda x: torch.tensor([[0.4]]), class_index=1)(None, torch.zeros(1, 1, 4, 4))
    assert float(activation_loss(single, 1)) == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))), rel=1e-6)


def test_segmentation_score_is_the_mean_region_logit(model, domains):
    """For the voxel-wise model the score is the region's mean intensity minus the threshold."""
    rows = torch.arange(4)
    context, patch = domains.contexts("lesion", rows), domains.patches("lesion", rows)
    region = GEOMETRY.region_mask()
    expected = context[:, 0][:, region].mean(1) - THRESHOLD
    np.testing.assert_allclose(SegmentationScore(model, GEOMETRY)(context, patch).detach().numpy(), expected.numpy(),
                               rtol=0, atol=1e-5)


# ---- domains -------------------------------------------------------------------------------------

def test_domains_come_from_the_models_predictions(domains):
    assert len(domains.lesion) > 0 and len(domains.free) > 0
    for row in domains.lesion.tolist():  # a predicted lesion voxel (x > threshold) at each centre
        assert float(domains.volumes[row[0]][(0, *row[1:])]) > THRESHOLD
    free = domains.patches("free", torch.arange(len(domains.free)))
    assert float(free.max()) <= THRESHOLD  # no predicted lesion voxel anywhere in a free patch
    for row in domains.free.tolist():  # centred in tissue
        assert float(domains.volumes[row[0]][(0, *row[1:])]) != 0.0
    patches = domains.patches("lesion", torch.arange(len(domains.lesion)))
    assert tuple(patches.shape[1:]) == (1, 16, 16)
    centre = patches[:, 0, 8, 8]  # the patch centre (index size // 2) is the lesion voxel
    assert bool((centre > THRESHOLD).all())


# ---- relevance -----------------------------------------------------------------------------------

def _generators(frame: IntensityFrame, plus_shift: float = 0.0, minus_shift: float = 0.0) -> CounterfactualGenerators:
    """Fresh generators (zero last layer: the identity), optionally adding ``scale * shift``."""
    config = CounterfactualConfig(iterations=1, **TINY)
    nets = []
    for shift in (plus_shift, minus_shift):
        net = ResidualGenerator(2, frame, config.generator_features, config.generator_strides).eval()
        with torch.no_grad():
            net.head.bias.fill_(math.atanh(shift))
        nets.append(net)
    return CounterfactualGenerators(nets[0], nets[1], GEOMETRY, frame, config)


def test_identity_generators_give_zero_relevance(model):
    image = phantom(7)
    result = counterfactual_relevance(image, model, _generators(IntensityFrame((1.0,), (2.0,))),
                                      point_ras=image.ijk_to_ras[:3] @ [16, 16, 4, 1])
    assert float(np.abs(result.relevance.array).max()) == 0.0
    np.testing.assert_array_equal(result.plus.array, image.array)
    np.testing.assert_array_equal(result.minus.array, image.array)
    assert result.scores["plus"] == result.scores["original"] == result.scores["minus"]


@pytest.mark.parametrize("grid", ["identity", "lps_flipped"])
def test_relevance_is_plus_minus_minus_inside_the_patch_only(model, grid):
    """G+ adds 0.5 scale, G- subtracts 0.25 scale: R = 0.75 scale on the patch (a 16 x 16
    slice through the chosen voxel), 0 elsewhere, on the input grid (flipped axes mapped back)."""
    image = phantom(8, grid=grid)
    scale = 2.0
    voxel = np.array([20, 9, 3])
    result = counterfactual_relevance(image, model, _generators(IntensityFrame((1.0,), (scale,)), 0.5, -0.25),
                                      point_ras=(image.ijk_to_ras @ np.append(voxel, 1.0))[:3])
    patch = result.patch.array[0].astype(bool)
    assert patch.sum() == 16 * 16 and patch[tuple(voxel)]
    assert np.unique(np.argwhere(patch)[:, 2]).tolist() == [voxel[2]]  # one axial slice
    np.testing.assert_allclose(result.relevance.array[0][patch], 0.75 * scale, rtol=1e-6)
    assert float(np.abs(result.relevance.array[0][~patch]).max()) == 0.0
    np.testing.assert_allclose(result.plus.array[0][patch], image.array[0][patch] + 0.5 * scale, rtol=1e-6)
    assert result.plus.array.shape == image.array.shape
    np.testing.assert_allclose(result.plus.ijk_to_ras, image.ijk_to_ras)
    # the score is the region's mean intensity minus the threshold: it moves by the added amount
    assert result.scores["plus"] - result.scores["original"] == pytest.approx(0.5 * scale, abs=1e-5)
    assert result.scores["minus"] - result.scores["original"] == pytest.approx(-0.25 * scale, abs=1e-5)


# ---- training ------------------------------------------------------------------------------------

def test_training_moves_the_score_on_held_out_patches(model, trained):
    """G+ raises, G- lowers the frozen model's score on patches of images not trained on."""
    held_out = build_domains([phantom(seed) for seed in (10, 11)], model, GEOMETRY)
    score = SegmentationScore(model, GEOMETRY)
    for kind in ("lesion", "free"):
        rows = torch.arange(len(getattr(held_out, kind)))
        context, patch = held_out.contexts(kind, rows), held_out.patches(kind, rows)
        with torch.no_grad():
            original = score(context, patch)
            plus = score(context, trained.generators.plus(patch))
            minus = score(context, trained.generators.minus(patch))
        assert float((plus - original).mean()) > 0.1, kind
        assert float((minus - original).mean()) < -0.1, kind
        assert float((plus > original).float().mean()) >= 0.9 and float((minus < original).float().mean()) >= 0.9


def _states(training) -> list[torch.Tensor]:
    nets = [training.generators.plus, training.generators.minus, *training.discriminators]
    return [v for net in nets for v in net.state_dict().values()]


def test_resume_after_an_interruption_is_bit_for_bit(model, domains, tmp_path):
    score = SegmentationScore(model, GEOMETRY)
    config = CounterfactualConfig(iterations=6, checkpoint_every=2, **TINY)
    uninterrupted = train_counterfactual(domains, score, config, tmp_path / "a")

    token = CancelToken()

    def stop_after_three(fraction: float, message: str) -> None:
        if fraction >= 3 / 6:
            token.cancel()  # "killed" after iteration 3: the last checkpoint is iteration 2

    with pytest.raises(Cancelled):
        train_counterfactual(domains, score, config, tmp_path / "b", progress=stop_after_three, cancel=token)
    checkpoint = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert int(checkpoint["iteration"]) == 2
    resumed = train_counterfactual(domains, score, config, tmp_path / "b")
    assert resumed.resumed_from == 2
    assert np.array_equal(resumed.history, uninterrupted.history) and resumed.history.shape[0] == 6
    assert all(torch.equal(a, b) for a, b in zip(_states(resumed), _states(uninterrupted)))
    final = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert int(final["iteration"]) == 6
    # a finished checkpoint returns the same networks without training again
    again = train_counterfactual(domains, score, config, tmp_path / "b")
    assert again.resumed_from == 6 and all(torch.equal(a, b) for a, b in zip(_states(again), _states(resumed)))
    # a checkpoint from other settings is refused
    with pytest.raises(SegXAIInputError, match="checkpoint_dir"):
        train_counterfactual(domains, score, CounterfactualConfig(iterations=6, checkpoint_every=2, seed=1, **TINY),
                             tmp_path / "b")


def test_seeds_reproduce_and_the_global_rng_is_untouched(model, domains):
    score = SegmentationScore(model, GEOMETRY)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = train_counterfactual(domains, score, CounterfactualConfig(iterations=2, seed=3, **TINY))
    assert torch.equal(torch.get_rng_state(), before)
    second = train_counterfactual(domains, score, CounterfactualConfig(iterations=2, seed=3, **TINY))
    other = train_counterfactual(domains, score, CounterfactualConfig(iterations=2, seed=4, **TINY))
    assert np.array_equal(first.history, second.history)
    assert all(torch.equal(a, b) for a, b in zip(_states(first), _states(second)))
    assert not all(torch.equal(a, b) for a, b in zip(_states(first), _states(other)))


def test_generators_save_and_load(trained, tmp_path):
    path = trained.generators.save(tmp_path / "generators.pt")
    loaded = load_counterfactual_generators(path)
    patch = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.plus(patch), trained.generators.plus(patch))
        assert torch.equal(loaded.minus(patch), trained.generators.minus(patch))
    assert loaded.geometry == trained.generators.geometry and loaded.frame == trained.generators.frame
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SegXAIInputError, match="generators"):
        load_counterfactual_generators(tmp_path / "bad.pt")


# ---- bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: PatchGeometry(2, (32, 32), (16, 16, 4), (6, 6)), "patch_size"),
    (lambda: PatchGeometry(2, (16, 16), (16, 16, 4), (20, 6)), "region_size"),
    (lambda: PatchGeometry(4, (16, 16), (16, 16, 4), (6, 6)), "spatial_dims"),
    (lambda: PatchGeometry(2, (16, 16), (16, 16, 4), (6, 6), slice_axis=3), "slice_axis"),
    (lambda: PatchGeometry(3, (16, 16), (16, 16, 4), (6, 6)), "patch_size"),
    (lambda: CounterfactualConfig(iterations=0), "iterations"),
    (lambda: CounterfactualConfig(batch_size=1), "batch_size"),
    (lambda: CounterfactualConfig(learning_rate=-1.0), "learning_rate"),
    (lambda: CounterfactualConfig(checkpoint_every=0), "checkpoint_every"),
    (lambda: LossWeights(cycle=-1.0), "weights.cycle"),
    (lambda: IntensityFrame((0.0,), (0.0,)), "frame.scale"),
    (lambda: activation_loss(torch.zeros(1), 2), "label"),
])
def test_bad_settings_name_the_parameter(build, name):
    with pytest.raises(SegXAIInputError, match=name.replace(".", r"\.")):
        build()


def test_bad_calls_name_the_parameter(model, domains):
    image = phantom(9)
    generators = _generators(IntensityFrame((1.0,), (2.0,)))
    with pytest.raises(SegXAIInputError, match="region, point_ras"):
        counterfactual_relevance(image, model, generators)
    with pytest.raises(SegXAIInputError, match="point_ras"):
        counterfactual_relevance(image, model, generators, point_ras=(1e4, 0.0, 0.0))
    with pytest.raises(SegXAIInputError, match="region"):
        counterfactual_relevance(image, model, generators, region=image.with_array(np.zeros((1, 32, 32, 8), np.uint8)))
    with pytest.raises(SegXAIInputError, match="generators"):
        counterfactual_relevance(image, model, object(), point_ras=(0.0, 0.0, 0.0))
    with pytest.raises(SegXAIInputError, match="class_index"):
        build_domains([image], model, GEOMETRY, class_index=2)
    with pytest.raises(SegXAIInputError, match="images"):
        build_domains([], model, GEOMETRY)
    empty = build_domains([image], model, GEOMETRY)
    empty.lesion = empty.lesion[:0]
    score = SegmentationScore(model, GEOMETRY)
    with pytest.raises(SegXAIInputError, match="domains"):
        train_counterfactual(empty, score, CounterfactualConfig(iterations=1, **TINY))
    with pytest.raises(SegXAIInputError, match="patch_size"):  # 16 does not divide by 2 * 2 * 2 * 2 * 2
        train_counterfactual(domains, score, CounterfactualConfig(iterations=1, **{**TINY, "generator_features": (4,) * 6,
                                                                                   "generator_strides": (2,) * 5}))


def test_a_region_mask_centres_the_patch(model):
    image = phantom(12)
    mask = np.zeros((1, 32, 32, 8), np.uint8)
    mask[0, 10:13, 20:23, 5] = 1
    result = counterfactual_relevance(image, model, _generators(IntensityFrame((1.0,), (2.0,))),
                                      region=image.with_array(mask))
    assert result.centre == (11, 21, 5)


# ---- 3D patches (the GPU setting; tiny here) -------------------------------------------------------

GEOMETRY_3D = PatchGeometry(3, (8, 8, 4), (16, 16, 4), (4, 4, 2))


def test_3d_patches_relevance_and_training(model):
    """3D patches: constant generators give R = 0.75 scale on an 8 x 8 x 4 box around the
    point and 0 elsewhere; a short 3D training moves the score on held-out lesion patches the
    right way (G+ up, G- down)."""
    frame = IntensityFrame((1.0,), (2.0,))
    config = CounterfactualConfig(iterations=1, **TINY)
    nets = []
    for shift in (0.5, -0.25):
        net = ResidualGenerator(3, frame, config.generator_features, config.generator_strides).eval()
        with torch.no_grad():
            net.head.bias.fill_(math.atanh(shift))
        nets.append(net)
    generators = CounterfactualGenerators(nets[0], nets[1], GEOMETRY_3D, frame, config)
    image = phantom(9)
    voxel = np.array([16, 15, 4])
    result = counterfactual_relevance(image, model, generators, point_ras=(image.ijk_to_ras @ np.append(voxel, 1.0))[:3])
    patch = result.patch.array[0].astype(bool)
    assert patch.sum() == 8 * 8 * 4 and patch[tuple(voxel)]
    np.testing.assert_allclose(result.relevance.array[0][patch], 1.5, rtol=1e-6)
    assert float(np.abs(result.relevance.array[0][~patch]).max()) == 0.0

    domains = build_domains([phantom(seed) for seed in range(4)], model, GEOMETRY_3D)
    assert tuple(domains.patches("lesion", torch.arange(1)).shape[1:]) == (1, 8, 8, 4)
    score = SegmentationScore(model, GEOMETRY_3D)
    trained = train_counterfactual(domains, score, CounterfactualConfig(iterations=30, **{**TINY, "ssim_window": 3}))
    held_out = build_domains([phantom(seed) for seed in (10, 11)], model, GEOMETRY_3D)
    rows = torch.arange(len(held_out.lesion))
    context, patches = held_out.contexts("lesion", rows), held_out.patches("lesion", rows)
    with torch.no_grad():
        original = score(context, patches)
        plus = score(context, trained.generators.plus(patches))
        minus = score(context, trained.generators.minus(patches))
    assert float((plus - original).mean()) > 0.1 and float((minus - original).mean()) < -0.1
