"""KernelSHAP and occlusion on supervoxels (paper 003; METHODS section 2).

The players are *supervoxels*, not voxels:

* ``"semantic"``: the model's own prediction: every predicted label is one feature (with
  ``connected=True`` every 26-connected region of a label is its own feature);
* ``"cubes"``: a regular grid of ``cubes`` x ``cubes`` x ``cubes`` boxes, each its own feature
  (paper 003: 8 per axis = 512 cubes).

A coalition ``z`` (a 0/1 vector over the M features) keeps the input where ``z = 1`` and sets
the absent features to the baseline (paper 003: 0). :func:`kernel_shap` solves Lundberg & Lee's
Shapley-kernel weighted least squares with the efficiency constraint (``sum phi = v(1) - v(0)``)
eliminated exactly, choosing coalitions as the ``shap`` package does: whole coalition sizes
are enumerated (largest kernel weight first, a size together with its complement size) while
the budget allows, and the rest is sampled with paired (complementary) sampling. When the
budget covers all ``2^M - 2`` proper coalitions the solution *is* the exact Shapley value (a
theorem of Lundberg & Lee 2017); :func:`exact_shapley` enumerates the Shapley formula itself
and is the oracle of the tests.

Captum's ``KernelShap`` (with ``feature_mask``) was measured as an alternative engine and not
used: it draws every coalition at random from the global RNG (with replacement, no exact
enumeration, no paired sampling) and fits an unconstrained regression in which the empty and
full coalitions get a weight of 10^6; it is never exact, and one sample at a time it builds
Python-side tensors of the input's size. It remains the tests' statistical oracle.

Each voxel of a feature gets that feature's Shapley value (paper 003, eq. 6: the supervoxel
partition times the value vector). Features that lie wholly outside the input box the
target's sliding windows read are dummy players (value 0, exactly) and are left out of the
game, which leaves the other players' Shapley values unchanged and saves model calls; the
forward itself runs only the windows touching the target's support.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..image import SegXAIInputError
from ..models.inference import activate
from ..progress import CancelToken, ProgressCallback, report
from .base import Attribution, Parameter, batched, check_inputs
from .forward import SegmentationForward
from .gradient import make_baseline
from .perturbation import read_region

__all__ = [
    "KernelSHAP",
    "SupervoxelOcclusion",
    "FEATURE_KINDS",
    "supervoxel_features",
    "cube_features",
    "semantic_features",
    "kernel_shap",
    "exact_shapley",
    "shapley_design",
    "ShapleyDesign",
]

FEATURE_KINDS = ("semantic", "cubes")

#: paper 003's sample budgets: 200 coalitions with semantic features, 1000 with 512 cubes
DEFAULT_SAMPLES = {"semantic": 200, "cubes": 1000}

ValueFunction = Callable[[np.ndarray], np.ndarray]


# ---- features ----------------------------------------------------------------------------------
def cube_features(spatial_shape, cubes: int) -> torch.Tensor:
    """Feature ids ``(D, H, W)`` (int64, 0..M-1) of a regular grid with ``cubes`` boxes per axis
    (fewer on an axis shorter than ``cubes``); box edges at ``round(k * n / cubes)``."""
    if cubes < 1:
        raise SegXAIInputError(f"cubes must be >= 1, got {cubes}")
    per_axis = []
    for n in spatial_shape:
        k = min(int(cubes), int(n))
        edges = np.round(np.linspace(0, n, k + 1)).astype(int)
        per_axis.append((np.searchsorted(edges, np.arange(n), side="right") - 1, k))
    (a, ka), (b, kb), (c, kc) = per_axis
    ids = (a[:, None, None] * kb + b[None, :, None]) * kc + c[None, None, :]
    return torch.as_tensor(ids, dtype=torch.int64)


def semantic_features(labels: torch.Tensor, connected: bool = False) -> torch.Tensor:
    """Feature ids ``(D, H, W)`` from a label map: one feature per present label, in label
    order; with ``connected`` one per 26-connected region of each label."""
    labels = torch.as_tensor(labels).cpu()
    if labels.ndim != 3:
        raise SegXAIInputError(f"labels: expected a 3D label map (D, H, W), got shape {tuple(labels.shape)}")
    values = labels.numpy()
    if not connected:
        _, ids = np.unique(values, return_inverse=True)
        return torch.as_tensor(ids.reshape(values.shape), dtype=torch.int64)
    from scipy import ndimage

    ids = np.zeros(values.shape, dtype=np.int64)
    offset = 0
    for label in np.unique(values):
        components, count = ndimage.label(values == label, structure=np.ones((3, 3, 3), bool))
        inside = components > 0
        ids[inside] = components[inside] - 1 + offset
        offset += count
    return torch.as_tensor(ids)


def predicted_labels(forward: SegmentationForward, inputs: torch.Tensor) -> torch.Tensor:
    """The clean prediction's label map ``(D, H, W)`` on the model grid (every window runs)."""
    with torch.no_grad():
        logits = forward.windowed(inputs, None, forward.window_batch)
        return activate(logits, forward.card)[0].argmax(0).cpu()


def supervoxel_features(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    features: str = "semantic",
    cubes: int = 8,
    connected: bool = False,
    feature_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Feature ids ``(D, H, W)`` (0..M-1, every id present) for ``inputs`` ``(1, C, D, H, W)``.

    ``feature_mask`` (any integer map of the spatial shape) overrides ``features``; its values
    are renumbered 0..M-1 in increasing order.
    """
    spatial = tuple(inputs.shape[2:])
    if feature_mask is not None:
        mask = torch.as_tensor(feature_mask).cpu()
        if tuple(mask.shape) != spatial:
            raise SegXAIInputError(f"feature_mask: shape {tuple(mask.shape)} differs from the input's {spatial}")
        return semantic_features(mask)
    if features == "cubes":
        return cube_features(spatial, cubes)
    if features == "semantic":
        return semantic_features(predicted_labels(forward, inputs), connected)
    raise SegXAIInputError(f"features: expected one of {FEATURE_KINDS}, got {features!r}")


def _active_features(forward: SegmentationForward, ids: torch.Tensor) -> np.ndarray:
    """Ids of the features with a voxel inside the box the target's windows read (the others
    cannot change T: dummy players)."""
    box = read_region(forward)
    inside = ids[tuple(slice(lo, hi) for lo, hi in box)]
    return np.unique(inside.numpy())


def _baseline(inputs: torch.Tensor, baseline: Union[str, float, torch.Tensor]) -> torch.Tensor:
    if isinstance(baseline, str) and baseline not in ("zero", "min", "max"):
        try:
            baseline = float(baseline)
        except ValueError:
            raise SegXAIInputError(f"baseline: expected zero, min, max or a number, got {baseline!r}") from None
    return make_baseline(inputs, baseline)


# ---- the Shapley game ------------------------------------------------------------------------------
def exact_shapley(value: ValueFunction, n_features: int) -> np.ndarray:
    """Shapley values by enumeration of the formula
    ``phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! (v(S + i) - v(S))``.

    ``value`` maps coalitions ``(K, M)`` (bool) to ``(K,)``; it is called once with all
    ``2^M`` coalitions. For tests and small M only.
    """
    m = int(n_features)
    if m < 1 or m > 20:
        raise SegXAIInputError(f"exact_shapley: n_features must be 1..20, got {m}")
    coalitions = np.array(list(itertools.product((False, True), repeat=m)), dtype=bool)
    values = np.asarray(value(coalitions), dtype=np.float64)
    index = {tuple(z): k for k, z in enumerate(coalitions)}
    phi = np.zeros(m)
    for k, z in enumerate(coalitions):
        s = int(z.sum())
        for i in np.flatnonzero(~z):
            with_i = z.copy()
            with_i[i] = True
            weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
            phi[i] += weight * (values[index[tuple(with_i)]] - values[k])
    return phi


@dataclass
class ShapleyDesign:
    """Coalitions ``(K, M)`` (bool, neither empty nor full) with their regression weights ``(K,)``
    and whether every proper coalition is in (then the solution is exact)."""

    coalitions: np.ndarray
    weights: np.ndarray
    complete: bool


def _kernel(m: int, s: int) -> float:
    """Shapley kernel weight of one coalition of size s: ``(M-1) / (C(M, s) s (M-s))``."""
    return (m - 1) / (math.comb(m, s) * s * (m - s))


def shapley_design(n_features: int, n_samples: int, rng: np.random.Generator) -> ShapleyDesign:
    """At most ``n_samples`` distinct coalitions and their Shapley-kernel weights.

    As ``shap.KernelExplainer``: sizes ``s`` and ``M - s`` are taken together, smallest ``s``
    first (the largest total kernel weight); a size pair is enumerated whole while the budget
    left, shared in proportion to the remaining kernel mass, covers it. The remaining sizes
    are sampled (size by its kernel mass, then a uniform subset) with each draw's complement
    (paired sampling); their kernel mass is shared among the drawn coalitions in proportion to
    how often each was drawn.
    """
    m = int(n_features)
    if m < 2:
        return ShapleyDesign(np.zeros((0, m), bool), np.zeros(0), True)
    budget = int(n_samples)
    if budget < 1:
        raise SegXAIInputError(f"n_samples must be >= 1, got {n_samples}")
    sizes = list(range(1, (m - 1) // 2 + 1))
    if (m - 1) % 2 == 1:  # odd M - 1: the middle size s = M/2 is its own complement size
        sizes.append(m // 2)
    # total kernel mass of a size group (s and M - s; one size when s = M - s)
    mass = {s: (m - 1) / (s * (m - s)) * (1 if 2 * s == m else 2) for s in sizes}
    rows: list[np.ndarray] = []
    weights: list[float] = []
    remaining = list(sizes)
    left = budget
    while remaining:
        s = remaining[0]
        members = math.comb(m, s) * (1 if 2 * s == m else 2)
        share = left * mass[s] / sum(mass[r] for r in remaining)
        if share + 1e-9 < members:
            break
        for chosen in itertools.combinations(range(m), s):
            z = np.zeros(m, bool)
            z[list(chosen)] = True
            rows.append(z)
            weights.append(_kernel(m, s))
            if 2 * s != m:
                rows.append(~z)
                weights.append(_kernel(m, m - s))
        left -= members
        remaining.pop(0)
    complete = not remaining
    if remaining and left >= 2:
        probabilities = np.array([mass[s] for s in remaining])
        probabilities /= probabilities.sum()
        counts: dict[bytes, list] = {}
        draws = 0
        # distinct coalitions up to the budget; the draw cap stops loops where few distinct
        # coalitions exist
        while len(counts) < left and draws < 50 * left:
            s = remaining[int(rng.choice(len(remaining), p=probabilities))]
            z = np.zeros(m, bool)
            z[rng.choice(m, size=s, replace=False)] = True
            for member in (z, ~z):
                key = member.tobytes()
                if key in counts:
                    counts[key][1] += 1
                elif len(counts) < left:
                    counts[key] = [member, 1]
            draws += 1
        total_mass = sum(mass[s] for s in remaining)
        total_count = sum(c for _, c in counts.values())
        for member, count in counts.values():
            rows.append(member)
            weights.append(total_mass * count / total_count)
    return ShapleyDesign(np.array(rows, dtype=bool).reshape(-1, m), np.asarray(weights, float), complete)


def solve_kernel_shap(design: ShapleyDesign, values: np.ndarray, empty: float, full: float,
                      ridge: float = 0.0) -> np.ndarray:
    """Shapley-kernel weighted least squares with ``sum phi = full - empty`` exactly.

    The constraint eliminates the last feature: ``phi_M = (full - empty) - sum_{j<M} phi_j``,
    then ``min sum_k w_k (y_k - z_kM d - sum_{j<M} (z_kj - z_kM) phi_j)^2 + ridge |phi|^2`` with
    ``y = v(z) - empty``, ``d = full - empty`` (float64, least squares via SVD).
    """
    z = design.coalitions.astype(np.float64)
    m = z.shape[1]
    total = float(full) - float(empty)
    if m == 1:
        return np.array([total])
    y = np.asarray(values, np.float64) - float(empty) - z[:, -1] * total
    a = z[:, :-1] - z[:, -1:]
    root = np.sqrt(design.weights)[:, None]
    a, y = a * root, y * root[:, 0]
    if ridge > 0:
        a = np.vstack([a, math.sqrt(ridge) * np.eye(m - 1)])
        y = np.concatenate([y, np.zeros(m - 1)])
    head, *_ = np.linalg.lstsq(a, y, rcond=None)
    return np.concatenate([head, [total - head.sum()]])


def kernel_shap(
    value: ValueFunction,
    n_features: int,
    n_samples: int,
    seed: Optional[int] = 0,
    ridge: float = 0.0,
) -> tuple[np.ndarray, ShapleyDesign]:
    """KernelSHAP values ``(M,)`` of the game ``value`` (coalitions ``(K, M)`` bool -> ``(K,)``).

    ``value`` is called once with the empty and the full coalition, then with the design's
    coalitions. Exact (equal to :func:`exact_shapley`) when ``n_samples >= 2^M - 2``.
    """
    m = int(n_features)
    ends = np.asarray(value(np.array([np.zeros(m, bool), np.ones(m, bool)])), np.float64)
    design = shapley_design(m, n_samples, np.random.default_rng(0 if seed is None else int(seed)))
    values = np.asarray(value(design.coalitions), np.float64) if len(design.coalitions) else np.zeros(0)
    return solve_kernel_shap(design, values, ends[0], ends[1], ridge), design


# ---- the image game ----------------------------------------------------------------------------
class _ImageGame:
    """``v(z) = T(x_z)``: players with ``z = 1`` keep the input, the others take the baseline.

    ``players`` are (channel or None, feature id) pairs; ``voxel_player`` ``(C, D, H, W)`` says
    which player owns each input element (``M`` = nobody: a feature left out of the game keeps
    the input). Calls run ``batch_size`` coalitions per forward and check ``cancel``.
    """

    def __init__(self, forward, inputs, fill, voxel_player, batch_size, progress, cancel, expected_calls):
        self.forward, self.inputs, self.fill = forward, inputs, fill
        self.voxel_player = voxel_player.to(inputs.device)
        self.batch_size = batch_size
        self.progress, self.cancel = progress, cancel
        self.expected = max(1, expected_calls)
        self.done = 0

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        z_all = torch.as_tensor(np.asarray(coalitions, bool), device=self.inputs.device)
        out = []
        with torch.no_grad():
            for chunk in batched(len(z_all), self.batch_size, None, self.cancel, "kernel_shap"):
                z = z_all[chunk.start:chunk.stop]
                z = torch.cat([z, torch.ones((len(z), 1), dtype=torch.bool, device=z.device)], dim=1)
                keep = z[:, self.voxel_player]  # (B, C, D, H, W)
                batch = torch.where(keep, self.inputs, self.fill)
                out.append(self.forward(batch).double().cpu())
                self.done += len(chunk)
                report(self.progress, self.done / self.expected, "kernel_shap")
        return torch.cat(out).numpy() if out else np.zeros(0)


def _players(ids: torch.Tensor, forward: SegmentationForward, channels: int, per_channel: bool,
             restrict: bool) -> tuple[list[tuple[Optional[int], int]], torch.Tensor]:
    """The players and the ``(C, D, H, W)`` map of each input element's player (M: none)."""
    features = _active_features(forward, ids) if restrict else np.unique(ids.numpy())
    n_ids = int(ids.max()) + 1
    lookup = torch.full((channels, n_ids), len(features) * (channels if per_channel else 1), dtype=torch.int64)
    if per_channel:
        players = [(c, int(f)) for c in range(channels) for f in features]
        for c in range(channels):
            lookup[c, torch.as_tensor(features, dtype=torch.int64)] = torch.arange(len(features)) + c * len(features)
    else:
        players = [(None, int(f)) for f in features]
        lookup[:, torch.as_tensor(features, dtype=torch.int64)] = torch.arange(len(features))
    voxel_player = torch.stack([lookup[c][ids] for c in range(channels)])
    return players, voxel_player


def _paint(values: np.ndarray, voxel_player: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The map ``(1, C, D, H, W)``: each player's value on its elements, 0 elsewhere."""
    extended = torch.as_tensor(np.concatenate([np.asarray(values, np.float64), [0.0]]), dtype=inputs.dtype,
                               device=inputs.device)
    return extended[voxel_player.to(inputs.device)][None]


_FEATURE_PARAMETERS = (
    Parameter("features", "choice", "semantic", "supervoxels: the predicted label map or a regular grid of cubes",
              choices=FEATURE_KINDS),
    Parameter("cubes", "int", 8, "with features=cubes: cubes per axis (8 -> 512 cubes, paper 003)", minimum=1),
    Parameter("connected", "bool", False, "with features=semantic: each 26-connected region of a label is a feature"),
    Parameter("baseline", "str", "zero", "value of absent features: zero, min, max (per channel) or a number (from "
              "Python also a tensor of the input's shape)", objects=(int, float, torch.Tensor)),
    Parameter("per_channel", "bool", False, "each input channel of a supervoxel is its own feature"),
    Parameter("batch_size", "int", 8, "perturbed volumes per forward pass", minimum=1),
    Parameter("feature_mask", "object", None, "an integer map (D, H, W) of any supervoxels, overriding features",
              objects=(torch.Tensor, np.ndarray)),
    Parameter("restrict", "bool", True, "leave out the features the target cannot see"),
)


class KernelSHAP(Attribution):
    """KernelSHAP on supervoxels (Lundberg & Lee 2017; paper 003).

    Every voxel gets the Shapley value of its supervoxel for the target ``T``, the game being
    ``v(z) = T(x_z)`` with absent supervoxels at the baseline. ``n_samples`` = 0 takes paper
    003's budgets (200 coalitions for semantic features, 1000 for cubes); with
    ``n_samples >= 2^M - 2`` every coalition is evaluated and the values are exact. Cost:
    ``n_samples + 2`` forwards (``batch_size`` per call), plus one full prediction for
    semantic features. ``ridge`` > 0 adds an L2 penalty (paper 003's "penalised ridge
    regression"); 0 (default) keeps the exactness guarantee.

    ``feature_mask`` (an integer map ``(D, H, W)``: any supervoxels; from Python only)
    overrides ``features``; ``restrict`` (default True) leaves out the features the target
    cannot see. After a call, ``self.feature_ids`` holds the id map and
    ``self.values`` the players' values.
    """

    name = "kernel_shap"
    summary = "KernelSHAP on supervoxels (semantic labels or cubes): Shapley values by kernel-weighted regression"
    stochastic = True
    parameters = (
        *_FEATURE_PARAMETERS[:3],
        Parameter("n_samples", "int", 0, "coalitions evaluated (0: 200 semantic / 1000 cubes, paper 003)", minimum=0),
        Parameter("ridge", "float", 0.0, "L2 penalty of the regression (0: exact when all coalitions fit the budget)",
                  minimum=0.0),
        *_FEATURE_PARAMETERS[3:6],
        Parameter("seed", "int", 0, "seed of the coalition sampling"),
        *_FEATURE_PARAMETERS[6:],
    )

    def attribute(
        self,
        inputs: torch.Tensor,
        features: str = "semantic",
        cubes: int = 8,
        connected: bool = False,
        n_samples: int = 0,
        ridge: float = 0.0,
        baseline: Union[str, float, torch.Tensor] = "zero",
        per_channel: bool = False,
        batch_size: int = 8,
        seed: Optional[int] = 0,
        feature_mask: Optional[torch.Tensor] = None,
        restrict: bool = True,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if batch_size < 1:
            raise SegXAIInputError(f"batch_size must be >= 1, got {batch_size}")
        if n_samples < 0:
            raise SegXAIInputError(f"n_samples must be >= 0, got {n_samples}")
        fill = _baseline(inputs, baseline)
        ids = supervoxel_features(self.forward, inputs, features, cubes, connected, feature_mask)
        players, voxel_player = _players(ids, self.forward, inputs.shape[1], per_channel, restrict)
        budget = n_samples or DEFAULT_SAMPLES.get(features, 200)
        m = len(players)
        expected = 2 + min(budget, 2**min(m, 30) - 2)
        game = _ImageGame(self.forward, inputs, fill, voxel_player, batch_size, progress, cancel, expected)
        if m == 0:
            values = np.zeros(0)
        else:
            values, _ = kernel_shap(game, m, budget, seed=seed, ridge=ridge)
        self.feature_ids, self.players, self.values = ids, players, values
        report(progress, 1.0, self.name)
        return _paint(values, voxel_player, inputs)


class SupervoxelOcclusion(Attribution):
    """Occlusion of whole supervoxels: each voxel gets ``T(x) - T(x with its supervoxel at the
    baseline)``, on the same features as :class:`KernelSHAP` (one forward per feature)."""

    name = "supervoxel_occlusion"
    summary = "drop of the target when one supervoxel (semantic label or cube) is set to a baseline"
    parameters = _FEATURE_PARAMETERS

    def attribute(
        self,
        inputs: torch.Tensor,
        features: str = "semantic",
        cubes: int = 8,
        connected: bool = False,
        baseline: Union[str, float, torch.Tensor] = "zero",
        per_channel: bool = False,
        batch_size: int = 8,
        feature_mask: Optional[torch.Tensor] = None,
        restrict: bool = True,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        inputs = check_inputs(inputs)
        if batch_size < 1:
            raise SegXAIInputError(f"batch_size must be >= 1, got {batch_size}")
        fill = _baseline(inputs, baseline)
        ids = supervoxel_features(self.forward, inputs, features, cubes, connected, feature_mask)
        players, voxel_player = _players(ids, self.forward, inputs.shape[1], per_channel, restrict)
        m = len(players)
        game = _ImageGame(self.forward, inputs, fill, voxel_player, batch_size, progress, cancel, m + 1)
        full = game(np.ones((1, m), bool))[0]
        drops = full - game(~np.eye(m, dtype=bool)) if m else np.zeros(0)
        self.feature_ids, self.players, self.values = ids, players, drops
        report(progress, 1.0, self.name)
        return _paint(drops, voxel_player, inputs)
