"""Counterfactual relevance by CycleGAN activation maximisation (paper 004, METHODS section 7;
issue 20).

Two residual U-Net generators are trained without labels against the frozen model: G+ raises
its score (the mean lesion logit over a region, or a classifier's class probability), G-
lowers it, while cycle consistency, a similarity loss and pair discriminators keep the images
realistic and close to the input. ``R = G+(x) - G-(x)`` shows what the model would need to
see more or less of.

Typical use::

    geometry = PatchGeometry(2, (32, 32), model.card.patch_size, (8, 8))
    domains = build_domains(images, model, geometry)
    trained = train_counterfactual(domains, SegmentationScore(model, geometry), config, "ckpt/")
    trained.generators.save("generators.pt")
    result = counterfactual_relevance(image, model, trained.generators, region=instance_mask)

For a classifier ``(B, C, H, W) -> (B, K)`` (paper 004's own setting)::

    domains = classifier_domains(patches, classifier, class_index=1)
    trained = train_counterfactual(domains, ClassifierScore(classifier, 1), config)
    relevance = trained.generators.plus(x) - trained.generators.minus(x)   # R on the patch
"""

from .domains import CounterfactualDomains, PatchGeometry, build_domains, classifier_domains, crop_context
from .explain import CounterfactualRelevance, counterfactual_relevance
from .losses import (LossWeights, activation_loss, cycle_loss, discriminator_loss, dssim, generator_adversarial_loss,
                     similarity_loss)
from .networks import IntensityFrame, PairDiscriminator, ResidualGenerator
from .scores import ClassifierScore, Score, SegmentationScore
from .training import (CHECKPOINT_NAME, HISTORY_COLUMNS, CounterfactualConfig, CounterfactualGenerators,
                       CounterfactualTraining, load_counterfactual_generators, train_counterfactual)

__all__ = [
    "PatchGeometry", "CounterfactualDomains", "build_domains", "classifier_domains", "crop_context",
    "IntensityFrame", "ResidualGenerator", "PairDiscriminator",
    "LossWeights", "dssim", "cycle_loss", "similarity_loss", "discriminator_loss", "generator_adversarial_loss",
    "activation_loss",
    "Score", "SegmentationScore", "ClassifierScore",
    "CounterfactualConfig", "CounterfactualGenerators", "CounterfactualTraining", "train_counterfactual",
    "load_counterfactual_generators", "CHECKPOINT_NAME", "HISTORY_COLUMNS",
    "CounterfactualRelevance", "counterfactual_relevance",
]
