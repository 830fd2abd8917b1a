"""Counterfactual relevance for a classifier (paper 004's own setting; issue 20).

Oracles: the shape phantoms' rule is checked from the blobs' second moments (a filled ellipse
with semi-axes a >= b has central second moments a^2/4 and b^2/4 along its axes, so the
square root of the eigenvalue ratio is a / b), independently of how they were drawn; the
classifier must learn the rule on patches it never saw; the domains must be exactly the
patches the classifier assigns to the class (recomputed here with softmax, and for a
classifier whose logit is a known function of the patch); and a short CycleGAN run must do
what the paper checks: G+ raises P(class 1) on class-0 patches, G- lowers it on class-1
patches, held out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.counterfactual import (ClassifierScore, CounterfactualConfig, PatchGeometry, classifier_domains,
                                      train_counterfactual)
from SegXAILib.image import SegXAIInputError
from SegXAILib.phantoms.shape_classifier import predict_probability, train_shape_classifier
from SegXAILib.phantoms.shapes import (AREA, ASPECT_THRESHOLD, CONTRAST, ELONGATED_ASPECT, ROUND_ASPECT,
                                       make_shape_patches)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(batch_size=4, learning_rate=2e-3, generator_features=(8, 16), generator_strides=(2,),
            discriminator_features=(8, 16), ssim_window=5)


@pytest.fixture(scope="module")
def train_set():
    return make_shape_patches(800, seed=1)


@pytest.fixture(scope="module")
def held_out_set():
    return make_shape_patches(200, seed=2)


@pytest.fixture(scope="module")
def classifier(train_set):
    return train_shape_classifier(train_set, epochs=10, seed=0).network


@pytest.fixture(scope="module")
def domains(train_set, classifier):
    return classifier_domains(train_set.images, classifier, class_index=1)


@pytest.fixture(scope="module")
def trained(domains, classifier):
    return train_counterfactual(domains, ClassifierScore(classifier, 1), CounterfactualConfig(iterations=60, **TINY))


def blob_moments(blob: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mass, centre (2,) and ascending eigenvalues (2,) of the occupancy-weighted covariance."""
    ii, jj = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in blob.shape], indexing="ij")
    w = blob.astype(np.float64)
    mass = w.sum()
    ci, cj = (w * ii).sum() / mass, (w * jj).sum() / mass
    cov = np.array([[(w * (ii - ci) ** 2).sum(), (w * (ii - ci) * (jj - cj)).sum()],
                    [(w * (ii - ci) * (jj - cj)).sum(), (w * (jj - cj) ** 2).sum()]]) / mass
    return float(mass), np.array([ci, cj]), np.linalg.eigvalsh(cov)


# ---- the phantoms --------------------------------------------------------------------------------

def test_the_shape_rule_holds_measured_from_the_blobs():
    patches = make_shape_patches(300, seed=5)
    assert patches.images.shape == (300, 1, 32, 32) and patches.images.dtype == np.float32
    assert 0 < patches.labels.sum() < 300
    measured = []
    for n in range(len(patches)):
        mass, centre, eig = blob_moments(patches.blobs[n])
        measured.append(np.sqrt(eig[1] / eig[0]))
        # partial-volume area = pi a b (sub-sampled edges: a fraction of a pixel per edge pixel)
        assert mass == pytest.approx(patches.area[n], rel=0.05)
        assert np.abs(centre - patches.centre[n]).max() < 0.25
    measured = np.array(measured)
    # pixelisation moves a second moment by at most ~1/12 px^2, up to ~12 % of b^2/4 for the
    # thinnest blob (b ~ 1.7 px): at most ~6 % on the ratio of square roots; 10 % allowed
    np.testing.assert_array_less(np.abs(measured / patches.aspect - 1), 0.10)
    # the rule: class 1 iff the (measured) aspect ratio is at least the threshold, with margin
    np.testing.assert_array_equal(patches.labels, (measured >= ASPECT_THRESHOLD).astype(np.int64))
    assert measured[patches.labels == 0].max() < ROUND_ASPECT[1] * 1.1 < ASPECT_THRESHOLD
    assert measured[patches.labels == 1].min() > ELONGATED_ASPECT[0] * 0.9 > ASPECT_THRESHOLD
    # nothing but the shape tells the classes apart: area and contrast share one distribution
    # (uniform: class means differ by chance only, within 4 standard errors of the difference)
    for values, (low, high) in ((patches.area, AREA), (patches.contrast, CONTRAST)):
        a, b = values[patches.labels == 0], values[patches.labels == 1]
        se = (high - low) / np.sqrt(12) * np.sqrt(1 / len(a) + 1 / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se
        assert low <= values.min() and values.max() <= high
    # the image is tissue (mean 1) plus contrast x blob
    residual = patches.images[:, 0] - patches.contrast[:, None, None] * patches.blobs
    assert abs(float(residual.mean()) - 1.0) < 0.02


def test_phantoms_are_seeded():
    a, b, c = make_shape_patches(5, seed=3), make_shape_patches(5, seed=3), make_shape_patches(5, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.array_equal(a.subset(slice(1, 3)).images, a.images[1:3])


# ---- the classifier ------------------------------------------------------------------------------

def test_the_classifier_learns_the_rule_on_held_out_patches(classifier, held_out_set):
    probability = predict_probability(classifier, held_out_set.images)
    accuracy = float(((probability >= 0.5) == held_out_set.labels.astype(bool)).mean())
    assert accuracy >= 0.9, accuracy
    assert not any(p.requires_grad for p in classifier.parameters()) and not classifier.training


# ---- the domains ---------------------------------------------------------------------------------

def test_the_domains_are_the_classifiers_predictions(train_set, classifier, domains):
    probability = predict_probability(classifier, train_set.images)
    positive = np.flatnonzero(probability > 0.5)
    assert sorted(domains.lesion[:, 0].tolist()) == positive.tolist()
    assert sorted(domains.free[:, 0].tolist()) == np.flatnonzero(probability <= 0.5).tolist()
    assert domains.geometry == PatchGeometry.for_classifier((32, 32)) and domains.class_index == 1
    # the domain patches are the input patches, untouched, in generator shape
    rows = torch.arange(len(domains.lesion))
    patches = domains.patches("lesion", rows).numpy()
    np.testing.assert_array_equal(patches, train_set.images[domains.lesion[:, 0].numpy()])
    assert domains.contexts("lesion", rows).shape == (len(rows), 1, 32, 32, 1)
    # class 0's domains are class 1's, swapped
    swapped = classifier_domains(train_set.images, classifier, class_index=0)
    assert torch.equal(swapped.lesion, domains.free) and torch.equal(swapped.free, domains.lesion)


class MeanClassifier(torch.nn.Module):
    """One logit ``mean(x) - 0.5`` (K = 1) or two ``(0, mean(x) - 0.5)``: P(1) > 1/2 iff mean > 0.5."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = x.flatten(1).mean(1, keepdim=True) - 0.5
        return logit if self.outputs == 1 else torch.cat([torch.zeros_like(logit), logit], dim=1)


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("spatial", [(8, 8), (4, 8, 8)])
def test_domains_of_a_known_classifier_in_2d_and_3d(outputs, spatial):
    rng = np.random.default_rng(0)
    patches = rng.uniform(0, 1, (40, 2, *spatial)).astype(np.float32)
    means = patches.reshape(40, -1).mean(1)
    patches[means == 0.5] += 0.01  # no ties at the threshold
    means = patches.reshape(40, -1).mean(1)
    domains = classifier_domains(torch.from_numpy(patches), MeanClassifier(outputs), batch_size=7)
    assert sorted(domains.lesion[:, 0].tolist()) == np.flatnonzero(means > 0.5).tolist()
    assert sorted(domains.free[:, 0].tolist()) == np.flatnonzero(means <= 0.5).tolist()
    assert domains.geometry.spatial_dims == len(spatial) and domains.geometry.patch_size == spatial
    rows = torch.arange(len(domains.free))
    np.testing.assert_array_equal(domains.patches("free", rows).numpy(), patches[domains.free[:, 0].numpy()])
    np.testing.assert_array_equal(domains.all_patches().numpy(),
                                  patches[np.concatenate([domains.lesion[:, 0], domains.free[:, 0]])])
    # a plain callable works too, and the domains keep their own copy of the patches
    again = classifier_domains(patches, lambda x: MeanClassifier(outputs)(x))
    assert torch.equal(again.lesion, domains.lesion) and torch.equal(again.free, domains.free)
    kept = again.patches("free", rows).clone()
    patches += 1.0
    assert torch.equal(again.patches("free", rows), kept)


# ---- the counterfactuals -------------------------------------------------------------------------

def test_the_generators_move_the_class_probability_on_held_out_patches(trained, classifier, held_out_set):
    """The paper's check: G+ raises P(class 1) on patches of class 0, G- lowers it on class 1."""
    x = torch.from_numpy(held_out_set.images)
    with torch.no_grad():
        plus, minus = trained.generators.plus(x), trained.generators.minus(x)
    original = predict_probability(classifier, x)
    p_plus, p_minus = predict_probability(classifier, plus), predict_probability(classifier, minus)
    round_, elongated = held_out_set.labels == 0, held_out_set.labels == 1
    assert p_plus[round_].mean() - original[round_].mean() > 0.3
    assert p_minus[elongated].mean() - original[elongated].mean() < -0.3
    assert (p_plus[round_] > original[round_]).mean() >= 0.9
    assert (p_minus[elongated] < original[elongated]).mean() >= 0.9
    # and over all patches, as the paper reports it: mean P(G-(x)) < mean P(x) < mean P(G+(x))
    assert p_minus.mean() < original.mean() < p_plus.mean()
    assert tuple(plus.shape) == tuple(x.shape)


# ---- bad arguments -------------------------------------------------------------------------------

def test_bad_arguments_name_the_parameter(train_set, classifier):
    with pytest.raises(SegXAIInputError, match="count"):
        make_shape_patches(0)
    with pytest.raises(SegXAIInputError, match="seed"):
        make_shape_patches(3, seed=-1)
    with pytest.raises(SegXAIInputError, match="size"):
        make_shape_patches(3, size=16)
    with pytest.raises(SegXAIInputError, match="positive_fraction"):
        make_shape_patches(3, positive_fraction=1.5)
    with pytest.raises(SegXAIInputError, match="patches"):
        train_shape_classifier(make_shape_patches(4, positive_fraction=0.0))
    with pytest.raises(SegXAIInputError, match="epochs"):
        train_shape_classifier(train_set, epochs=0)
    with pytest.raises(SegXAIInputError, match="patches"):
        classifier_domains(train_set.images[:, 0], classifier)
    with pytest.raises(SegXAIInputError, match="class_index"):
        classifier_domains(train_set.images[:4], classifier, class_index=2)
    with pytest.raises(SegXAIInputError, match="batch_size"):
        classifier_domains(train_set.images[:4], classifier, batch_size=0)
    with pytest.raises(SegXAIInputError, match="patch_size"):
        PatchGeometry.for_classifier((8, 8, 8, 8))
