"""Predictive uncertainty of a segmentation (issue 17): prediction samples from test-time
flips, intensity and spatial augmentation, MC dropout and ensembles, streamed into voxel maps
(mean probability, entropies, mutual information, variance) and per-structure / per-instance
tables (confidence, entropy inside and at the boundary, pairwise Dice, volume CV, Soft Dice
Confidence), all on the input grid."""

from .estimate import (DEFAULT_STOCHASTIC_SAMPLES, SamplePlan, UncertaintyResult, estimate_uncertainty,
                       iterate_samples, plan_samples)
from .sources import SOURCES, SourceSpec, available_sources, check_sources, source_specs
from .presets import UNCERTAINTY_PRESETS, preset_settings
from .statistics import (RegionUncertainty, UncertaintyAccumulator, bernoulli_entropy, boundary_band, entropy,
                         instance_regions, pooled_pairwise_dice)

__all__ = [
    "UNCERTAINTY_PRESETS",
    "preset_settings",
    "estimate_uncertainty",
    "UncertaintyResult",
    "RegionUncertainty",
    "SamplePlan",
    "plan_samples",
    "iterate_samples",
    "DEFAULT_STOCHASTIC_SAMPLES",
    "SOURCES",
    "SourceSpec",
    "available_sources",
    "check_sources",
    "source_specs",
    "UncertaintyAccumulator",
    "entropy",
    "bernoulli_entropy",
    "pooled_pairwise_dice",
    "boundary_band",
    "instance_regions",
]
