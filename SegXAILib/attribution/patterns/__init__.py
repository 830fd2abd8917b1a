"""PatternNet and PatternAttribution (Kindermans et al. 2018; paper 000; METHODS section 2).

Every layer with weights (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear``) is, per
output channel ``j`` and output position, a linear neuron ``y = w^T x + b`` whose input ``x``
is the receptive-field patch (all input channels x kernel offsets, zero padding included). Its
*pattern* ``a`` (same shape as ``w``) is the direction in input space that carries the signal
the neuron detects: the signal estimator is ``S_a(x) = a w^T x``.

Estimators (per output channel, expectations over every position of every window seen):

``linear``  (Kindermans eq. for ``S_a``)
    ``a = cov(x, y) / (w^T cov(x, y))``, ``cov(x, y) = E[x y] - E[x] E[y]``
    (= ``cov(x, y) / var(y)``, since ``w^T cov(x, y) = var(y)``).
``two_component``  (Kindermans section 4.2, ``S_a+-``)
    The positions split by the sign of the neuron's output: ``+`` where ``y > 0``, ``-`` where
    ``y <= 0``, with ``pi_+`` the share of ``y > 0``. The covariance decomposes as
    ``cov(x, y) = pi_+ (E_+[x y] - E_+[x] E[y]) + (1 - pi_+) (E_-[x y] - E_-[x] E[y])`` and each
    regime gets its own pattern::

        a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T E_+[x y] - w^T E_+[x] E[y])
        a_- = (E_-[x y] - E_-[x] E[y]) / (w^T E_-[x y] - w^T E_-[x] E[y])

    (``E_+`` / ``E_-`` average over the regime's positions, ``E[y]`` over all positions, as the
    paper's decomposition and iNNvestigate's ReLU pattern do). The signal estimator is
    piecewise: ``S(x) = a_+ y`` where ``y > 0``, ``a_- y`` where ``y <= 0``. In a ReLU network
    the gating zeroes the negative regime, so only ``a_+`` matters there; in a PReLU / norm
    network (MONAI's default) ``a_-`` is used where the layer's output is not positive.

``y`` is the layer's own output (bias included: both covariances are bias-invariant). A regime
(or channel) with fewer than two positions, or a denominator that vanishes
(``|w^T cov| <= 1e-6 |w| |cov|``), falls back to that channel's linear pattern (zero if that
one is degenerate too).

Statistics stream: per layer, output channel and regime, running float64 sums of ``x``,
``x y`` (weight-shaped), ``y`` and counts, each call's sums computed in float64 too (so the
patterns do not depend on the batching); memory does not grow with the number of volumes.
For a convolution ``sum_positions x_patch * g_j`` is the weight gradient for the output
cotangent ``g``, so ``aten.convolution_backward`` with ``g = [y > 0]``, ``y [y > 0]`` (and the
``<= 0`` complements) gives every sum exactly, zero padding included, without unfolding patches.

Backward (PatternNet / PatternAttribution): the gradient of the target with every weighted
layer's backward replaced by its transposed operator with ``a`` (PatternNet: the *signal*) or
``w * a`` elementwise (PatternAttribution) in place of ``w`` (two_component: ``a_+`` at the
output positions where the layer's forward output was > 0, ``a_-`` elsewhere). Everything else
keeps its ordinary backward: activations gate as in the gradient (ReLU ``[x > 0]``, PReLU its
slope), skip connections, pooling, the sliding-window blend. Normalisation layers
(``InstanceNorm``, ``BatchNorm``, ``GroupNorm``, ``LayerNorm``) are treated as per-channel affine
maps at the statistics of the forward: their backward is ``g * weight / sqrt(var + eps)`` with
the mean and variance held fixed (detached), not the full gradient through the statistics.
The backward starts (``start="value"``, Kindermans) from the target's logits themselves,
``dT/df * f``, so a one-layer linear model gives exactly ``S = a y`` and ``w * a * y``;
``start="ones"`` starts from ``dT/df`` like the gradient. The backward is linear in the
backward signal (the gating follows the forward), so summing per-voxel maps equals one
backward of the summed target: no per-voxel aggregation is needed.

Patterns are fitted once per model (``segxai patterns fit``) and stored beside the model card
as ``patterns_<estimator>.pt``, readable with ``torch.load(weights_only=True)``: the patterns,
the estimator, the layer names and weight shapes, the SHA-256 of the card's weights, and the
number of volumes / windows / voxels used. Applying them to a network with other weights or
other layers is refused.

Limits: eager networks only (hooks on modules; a TorchScript network is refused); convolutions
with ``padding_mode`` other than ``"zeros"`` are refused; layers called as functions
(``F.conv3d``) inside a ``forward`` are invisible and keep their ordinary gradient.
PatternNet's signal is not normalised: since ``w^T a = 1``, ``|a| >= 1 / |w|`` per channel and
the signal grows roughly by that gain per layer (the bundled 14-layer lesion UNet: about 1e8;
an untrained 40-layer SwinUNETR passes float32's 3e38, which is reported as an error rather
than returned as inf / nan). PatternAttribution (``w * a``, ``sum(w * a) = 1`` per channel)
stays bounded. ``patterns="input"`` fits on the explained volume alone (one pass of statistics
per call); use fitted files for real work.

Modules: :mod:`.algebra` (layers, row layout, weight / input gradients, the solve),
:mod:`.statistics` (streamed sums, estimators), :mod:`.store` (:class:`PatternSet` and its file),
:mod:`.fit` (fitting on volumes), :mod:`.rules` (the backward), :mod:`.methods` (the registered
PatternNet / PatternAttribution; the method registry finds them here through these exports).
"""

from __future__ import annotations

# the public names of the former single module (some only importable, not in __all__)
from .algebra import pattern_layers
from .fit import fit_patterns, fit_patterns_on_tensors
from .methods import PatternAttribution, PatternNet
from .rules import MODES, STARTS, norm_scale, pattern_backward, pattern_map, resolve_patterns
from .statistics import ESTIMATORS, PatternStatistics
from .store import FILE_FORMAT, FILE_VERSION, PatternSet, default_patterns_path, load_patterns, weights_sha256

__all__ = [
    "ESTIMATORS",
    "PatternStatistics",
    "PatternSet",
    "PatternNet",
    "PatternAttribution",
    "pattern_layers",
    "pattern_backward",
    "pattern_map",
    "fit_patterns",
    "fit_patterns_on_tensors",
    "default_patterns_path",
    "load_patterns",
    "weights_sha256",
]
