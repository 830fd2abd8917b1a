"""PatternNet / PatternAttribution: estimators, streamed statistics, the pattern backward, files.

Oracles: the paper's linear toy (signal + distractor, known signal direction) and a ReLU toy
with a different signal direction per regime; explicit patch unfolding (convolution, grouped
convolution, transposed convolution) and one-batch statistics for the streamed sums; the plain
autograd gradient when the patterns are set to the weights (PatternNet) or to ones
(PatternAttribution); a functional re-implementation with detached statistics for the norm
layers; closed forms ``a y`` / ``w a y`` for one-layer models; linearity (per-voxel sum =
summed target). The shipped patterns of the bundled lesion model give finite maps.
"""

from __future__ import annotations

import functools

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.patterns import (
    PatternAttribution,
    PatternNet,
    PatternSet,
    PatternStatistics,
    fit_patterns,
    fit_patterns_on_tensors,
    pattern_backward,
    pattern_layers,
)
from SegXAILib.attribution.patterns.algebra import _rows
from SegXAILib.attribution.targets import RegionTarget, VoxelTarget
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.progress import CancelToken, Cancelled

from conftest import make_card as _make_card
from conftest import make_forward as _make_forward
from conftest import write_unet_card

# these tests use constant window blending unless they say otherwise
make_card = functools.partial(_make_card, blend="constant")
make_forward = functools.partial(_make_forward, blend="constant")


# ---- helpers -------------------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a.detach(), b.detach()
    return float(a @ b / (a.norm() * b.norm()))


def manual_set(network, make, estimator="linear") -> PatternSet:
    """A PatternSet whose patterns are ``make(weight)`` for every layer."""
    keys = ("all",) if estimator == "linear" else ("positive", "negative")
    layers = pattern_layers(network)
    return PatternSet(
        estimator=estimator,
        patterns={n: {k: make(m.weight.detach()) for k in keys} for n, m in layers},
        layer_shapes={n: tuple(m.weight.shape) for n, m in layers},
    )


def smooth_volumes(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((count, channels, size, size, size), generator=generator)
    return F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False) * 3.0


def unet(seed: int = 0, in_channels: int = 1, norm="instance"):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=2, channels=(4, 8), strides=(2,),
                num_res_units=1, norm=norm).eval()


# ---- the estimators on toys with a known signal --------------------------------------------------
def paper_toy(n: int, seed: int = 0):
    """Kindermans' toy: x = a_s z + a_d e; w = (1, -1) cancels the distractor, so y = z."""
    g = torch.Generator().manual_seed(seed)
    z, e = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a_s, a_d = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    return z[:, None] * a_s + e[:, None] * a_d, a_s


def test_linear_pattern_recovers_the_signal_while_weights_and_gradient_do_not():
    x, a_s = paper_toy(20000)
    network = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=True))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        network[0].bias.fill_(0.3)
    statistics = PatternStatistics(network)
    with statistics.collecting(), torch.no_grad():
        network(x)
    a = statistics.patterns("linear")["0"]["all"][0]
    leaf = x[:5].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(network(leaf).sum(), leaf)
    assert cosine(a, a_s) > 0.99
    assert cosine(network[0].weight, a_s) < 0.9 and cosine(gradient[0], a_s) < 0.9
    assert abs(float(network[0].weight.detach()[0] @ a) - 1.0) < 1e-5  # normalised: w^T a = 1

    # closed forms of a one-layer model: PatternNet = a y, PatternAttribution = w * a * y
    pattern_set = PatternSet("linear", statistics.patterns("linear"), {"0": (1, 2)})
    for mode, expected_direction in (("signal", a), ("attribution", network[0].weight[0].detach() * a)):
        leaf = x[:7].clone().requires_grad_(True)
        with pattern_backward(network, pattern_set, mode):
            y = network(leaf)
            (result,) = torch.autograd.grad(y, leaf, y.detach())
        torch.testing.assert_close(result, y.detach() * expected_direction, rtol=1e-5, atol=1e-6)


def test_linear_pattern_of_a_convolution_and_pattern_net_closed_form_through_the_engine():
    """The toy per voxel through a 1x1x1 Conv3d, explained through SegmentationForward."""
    x, a_s = paper_toy(16 * 16 * 16, seed=1)
    volume = x.T.reshape(1, 2, 16, 16, 16)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 1))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[0.5, 0.2], [1.0, -1.0]]).reshape(2, 2, 1, 1, 1))
    sets = fit_patterns_on_tensors(network, make_card((16, 16, 16), 2), [volume], ("linear",))
    a = sets["linear"].patterns["0"]["all"].reshape(2, 2)
    assert cosine(a[1], a_s) > 0.99 and cosine(network[0].weight[1], a_s) < 0.9

    region = torch.zeros((16, 16, 16), dtype=torch.bool)
    region[3:9, 4:7, 5:11] = True
    forward = make_forward(network, (16, 16, 16), RegionTarget(1, region), in_channels=2)
    y = network(volume).detach()[0, 1]
    w1 = network[0].weight.detach().reshape(2, 2)[1]
    for method, direction in ((PatternNet, a[1]), (PatternAttribution, w1 * a[1])):
        result = method(forward).attribute(volume, estimator="linear", patterns=sets["linear"])
        expected = direction[:, None, None, None] * (y * region)[None]
        torch.testing.assert_close(result[0], expected, rtol=1e-5, atol=1e-6)


def test_two_component_estimator_on_a_relu_toy():
    """The signal points along u_+ where y > 0 and along u_- where y <= 0; a distractor v with
    w^T v = 0. Two-component recovers both; the linear estimator mixes them."""
    g = torch.Generator().manual_seed(0)
    n = 40000
    z, e = torch.randn(n, generator=g), torch.randn(n, generator=g)
    u_pos, u_neg, v = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 0, -1.0])
    x = torch.where(z[:, None] > 0, z[:, None] * u_pos, z[:, None] * u_neg) + e[:, None] * v
    network = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False), torch.nn.ReLU())
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
    statistics = PatternStatistics(network)
    with statistics.collecting(), torch.no_grad():
        network(x)
    two = statistics.patterns("two_component")["0"]
    linear = statistics.patterns("linear")["0"]["all"][0]
    assert cosine(two["positive"][0], u_pos) > 0.99 and cosine(two["negative"][0], u_neg) > 0.99
    assert cosine(linear, u_pos) < 0.9 and cosine(linear, u_neg) < 0.9

    # PatternNet of relu(w^T x): a_+ y where y > 0, nothing where the ReLU is off
    pattern_set = PatternSet("two_component", statistics.patterns("two_component"), {"0": (1, 3)})
    leaf = x[:200].clone().requires_grad_(True)
    with pattern_backward(network, pattern_set, "signal"):
        out = network(leaf)
        (signal,) = torch.autograd.grad(out, leaf, out.detach())
    expected = torch.where(z[:200, None] > 0, z[:200, None] * two["positive"][0], torch.zeros(3))
    torch.testing.assert_close(signal, expected, rtol=1e-5, atol=1e-6)


# ---- streamed statistics --------------------------------------------------------------------------
class Mixed(torch.nn.Module):
    """Strided, grouped, dilated and transposed convolutions and a Linear on the last axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.up = torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.last = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.last(self.up(F.relu(self.grouped(F.relu(self.down(x))))))


class MagnitudeStatistics(PatternStatistics):
    """The statistics of ``|x|`` with the regimes of ``y``: per regime, ``|count|``, ``|sum_y|``,
    ``|sum_x|`` and ``|sum_xy|`` are the sums of the terms' magnitudes (``y`` has one sign in
    each regime), the scale of the rounding error of each sum."""

    def update(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        super().update(name, x.abs(), y)


def test_streamed_statistics_equal_one_batch():
    # float64 network: its layer inputs / outputs then differ between batch sizes by float64
    # rounding only (a float32 forward's own rounding would differ by ~1e-7 and hide whether
    # the statistics accumulate in float64)
    network = Mixed().double().eval()
    x = smooth_volumes(6, 2, 8, seed=3).double()
    streamed, whole, magnitude = PatternStatistics(network), PatternStatistics(network), MagnitudeStatistics(network)
    with streamed.collecting(), torch.no_grad():
        for chunk in x.split([1, 2, 3]):
            network(chunk)
    with whole.collecting(), magnitude.collecting(), torch.no_grad():
        network(x)
    assert streamed.calls == 12 and whole.calls == 4
    # Each sum has at most N = 6 volumes x 8^3 positions = 3072 terms (the Linear: 768 rows).
    # Summed in float64 in two orders, each is within gamma_N ~ N u of the exact sum
    # (u = 2^-53) times the sum of the terms' magnitudes; the float64 forward's rounding of x
    # and y (fan-in <= 4 x 27, three layers: << N u) adds less than that again: 4 N u.
    # float32 per-batch sums (the bug) were ~1e-4 apart, 1e8 times this bound.
    bound = 4 * 3072 * 2.0**-53
    for name in whole.sums:
        torch.testing.assert_close(streamed.sums[name].count, whole.sums[name].count, rtol=0, atol=0)  # integers
        for field in ("sum_y", "sum_x", "sum_xy"):
            difference = (getattr(streamed.sums[name], field) - getattr(whole.sums[name], field)).abs()
            scale = getattr(magnitude.sums[name], field).abs()
            assert bool((difference <= bound * scale).all()), (name, field, float((difference / scale).max()))
    # the patterns are solved in float64 from these sums and rounded to float32: equal, or one
    # float32 rounding step apart (2^-23 relative) where the float64 values straddle a step
    for estimator in ("linear", "two_component"):
        for name, patterns in streamed.patterns(estimator).items():
            for key, value in patterns.items():
                torch.testing.assert_close(value, whole.patterns(estimator)[name][key], rtol=2.0**-23, atol=0)


def explicit_conv_sums(module: torch.nn.Conv3d, x: torch.Tensor):
    """Sums by an explicit loop over output positions and receptive-field patches."""
    y = module(x).detach()
    weight, bias = module.weight.detach(), module.bias.detach()
    pad, (kd, kh, kw), s, dil, groups = module.padding[0], module.kernel_size, module.stride[0], module.dilation[0], module.groups
    xp = F.pad(x, [pad] * 6)
    out_channels, in_per_group = module.out_channels, module.in_channels // groups
    patch_size = in_per_group * kd * kh * kw
    sums = {key: torch.zeros((2, out_channels, patch_size), dtype=torch.float64) for key in ("x", "xy")}
    counts = torch.zeros((2, out_channels), dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                for k in range(y.shape[4]):
                    window = xp[b, :, i * s : i * s + dil * (kd - 1) + 1 : dil, j * s : j * s + dil * (kh - 1) + 1 : dil,
                                k * s : k * s + dil * (kw - 1) + 1 : dil]
                    for o in range(out_channels):
                        g = o // (out_channels // groups)
                        patch = window[g * in_per_group : (g + 1) * in_per_group].reshape(-1).double()
                        value = float(y[b, o, i, j, k])
                        # the patch reproduces the convolution: a check of the oracle itself
                        assert abs(float(weight[o].reshape(-1).double() @ patch) + float(bias[o]) - value) < 1e-4
                        r = 0 if value > 0 else 1
                        sums["x"][r, o] += patch
                        sums["xy"][r, o] += patch * value
                        counts[r, o] += 1
    return sums, counts


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding=2, dilation=2, groups=2)])
def test_convolution_statistics_equal_explicit_unfolding(kwargs):
    torch.manual_seed(1)
    module = torch.nn.Conv3d(4, 4, 3, **kwargs).eval()
    network = torch.nn.Sequential(module)
    x = torch.randn(2, 4, 5, 4, 6)
    statistics = PatternStatistics(network)
    with statistics.collecting(), torch.no_grad():
        network(x)
    sums, counts = explicit_conv_sums(module, x)
    got = statistics.sums["0"]
    torch.testing.assert_close(got.count, counts)
    torch.testing.assert_close(got.sum_x, sums["x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum_xy, sums["xy"], rtol=1e-5, atol=1e-5)


def test_transposed_convolution_statistics_equal_explicit_patches():
    torch.manual_seed(2)
    module = torch.nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1).eval()
    network = torch.nn.Sequential(module)
    x = torch.randn(1, 2, 3, 2, 3)
    y = module(x).detach()
    weight_rows = _rows(module.weight.detach(), module).double()  # (O, I * 27), order (i, t)
    sums_x = torch.zeros((2, 3, 2 * 27), dtype=torch.float64)
    sums_xy = torch.zeros_like(sums_x)
    for position in np.ndindex(*y.shape[2:]):
        patch = torch.zeros((2, 3, 3, 3), dtype=torch.float64)
        for t in np.ndindex(3, 3, 3):
            q = [(o + 1 - tt) for o, tt in zip(position, t)]  # o = 2 q - 1 + t
            if all(v % 2 == 0 and 0 <= v // 2 < n for v, n in zip(q, x.shape[2:])):
                patch[(slice(None), *t)] = x[(0, slice(None), *[v // 2 for v in q])].double()
        patch = patch.reshape(2, -1).reshape(-1)
        for o in range(3):
            value = float(y[(0, o, *position)])
            assert abs(float(weight_rows[o] @ patch) + float(module.bias.detach()[o]) - value) < 1e-4
            r = 0 if value > 0 else 1
            sums_x[r, o] += patch
            sums_xy[r, o] += patch * value
    statistics = PatternStatistics(network)
    with statistics.collecting(), torch.no_grad():
        network(x)
    torch.testing.assert_close(statistics.sums["0"].sum_x, sums_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(statistics.sums["0"].sum_xy, sums_xy, rtol=1e-5, atol=1e-5)


def test_patterns_from_two_halves_agree_with_all_of_the_data():
    network = unet(seed=0)
    volumes = smooth_volumes(16, 1, 16, seed=5)

    def statistics_of(batch: torch.Tensor) -> PatternStatistics:
        statistics = PatternStatistics(network)
        with statistics.collecting(), torch.no_grad():
            network(batch)  # one batch = streaming the volumes one by one (test above)
        return statistics

    halves = [statistics_of(volumes[:8]), statistics_of(volumes[8:])]
    everything = statistics_of(volumes)
    for estimator in ("linear", "two_component"):
        for name, patterns in everything.patterns(estimator).items():
            for key, value in patterns.items():
                for half in halves:
                    assert cosine(half.patterns(estimator)[name][key], value) > 0.99, (estimator, name, key)


# ---- the pattern backward -------------------------------------------------------------------------
class SkipNet(torch.nn.Module):
    """Convolution, ReLU, max pooling, transposed convolution, LeakyReLU, a skip concatenation,
    a residual sum and a Linear on the last axis; no normalisation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(6, 4, 2, stride=2)
        self.c = torch.nn.Conv3d(8, 2, 1)
        self.last = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.a(x))
        d = F.leaky_relu(self.up(F.relu(self.b(F.max_pool3d(h, 1)))), 0.1)
        out = self.c(torch.cat([h, d], 1)) + x
        return self.last(out)


@pytest.mark.parametrize("estimator", ["linear", "two_component"])
def test_patterns_equal_to_the_weights_give_the_gradient(estimator):
    """PatternNet with a = w, and PatternAttribution with a = 1, are the plain gradient."""
    network = SkipNet().eval()
    x = smooth_volumes(2, 2, 8, seed=7).requires_grad_(True)
    cotangent = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    (gradient,) = torch.autograd.grad(network(x), x, cotangent)
    for mode, make in (("signal", lambda w: w.clone()), ("attribution", torch.ones_like)):
        with pattern_backward(network, manual_set(network, make, estimator), mode):
            (result,) = torch.autograd.grad(network(x), x, cotangent)
        torch.testing.assert_close(result, gradient, rtol=1e-5, atol=1e-6)
    # and a different pattern gives a different map (the rule is really used)
    with pattern_backward(network, manual_set(network, lambda w: 2 * w, estimator), "signal"):
        (doubled,) = torch.autograd.grad(network(x), x, cotangent)
    assert not torch.allclose(doubled, gradient, rtol=1e-3)


class NormNet(torch.nn.Module):
    def __init__(self, oracle: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.oracle = oracle
        self.a = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.instance = torch.nn.InstanceNorm3d(4, affine=True)
        self.act = torch.nn.PReLU()
        self.b = torch.nn.Conv3d(4, 4, 3, padding=1)
        self.group = torch.nn.GroupNorm(2, 4)
        self.c = torch.nn.Conv3d(4, 4, 1)
        self.batch = torch.nn.BatchNorm3d(4)
        self.layer = torch.nn.LayerNorm(6)
        self.d = torch.nn.Conv3d(4, 2, 1)
        with torch.no_grad():
            for norm in (self.instance, self.group, self.batch, self.layer):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-1, 1)
            self.batch.running_mean.uniform_(-1, 1)
            self.batch.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        view = lambda t: t.view(1, -1, 1, 1, 1)  # noqa: E731
        h = self.a(x)
        if self.oracle:  # the norms with their statistics detached, written out
            mean, var = h.mean((2, 3, 4), keepdim=True).detach(), h.var((2, 3, 4), unbiased=False, keepdim=True).detach()
            h = (h - mean) / torch.sqrt(var + self.instance.eps) * view(self.instance.weight) + view(self.instance.bias)
        else:
            h = self.instance(h)
        h = self.b(self.act(h))
        if self.oracle:
            g = h.reshape(h.shape[0], 2, -1)
            mean, var = g.mean(2, keepdim=True).detach(), g.var(2, unbiased=False, keepdim=True).detach()
            h = ((g - mean) / torch.sqrt(var + self.group.eps)).reshape(h.shape) * view(self.group.weight) + view(self.group.bias)
        else:
            h = self.group(h)
        h = self.c(F.relu(h))
        if self.oracle:
            scale = view(self.batch.weight) / torch.sqrt(view(self.batch.running_var) + self.batch.eps)
            h = (h - view(self.batch.running_mean)) * scale + view(self.batch.bias)
            mean, var = h.mean(-1, keepdim=True).detach(), h.var(-1, unbiased=False, keepdim=True).detach()
            h = (h - mean) / torch.sqrt(var + self.layer.eps) * self.layer.weight + self.layer.bias
        else:
            h = self.layer(self.batch(h))
        return self.d(h)


def test_norm_layers_backpropagate_as_affine_maps_at_the_forward_statistics():
    network, oracle = NormNet().eval(), NormNet(oracle=True).eval()
    x = smooth_volumes(2, 1, 6, seed=8).requires_grad_(True)
    torch.testing.assert_close(oracle(x), network(x), rtol=1e-4, atol=1e-5)  # the oracle is the same function
    cotangent = torch.randn(2, 2, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    (expected,) = torch.autograd.grad(oracle(x), x, cotangent)
    (full_gradient,) = torch.autograd.grad(network(x), x, cotangent)
    with pattern_backward(network, manual_set(network, lambda w: w.clone()), "signal"):
        (result,) = torch.autograd.grad(network(x), x, cotangent)
    scale = float(expected.abs().max())
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5 * scale)
    assert not torch.allclose(result, full_gradient, rtol=1e-2, atol=1e-2 * scale)  # differs from the gradient through the statistics


def test_pattern_map_through_sliding_windows_equals_the_gradient_when_patterns_are_the_weights():
    network = unet(seed=1, norm=None)
    x = smooth_volumes(1, 1, 20, seed=9)
    region = torch.zeros((20, 20, 20), dtype=torch.bool)
    region[2:18:3, 5:15, 8:12] = True
    forward = make_forward(network, (20, 20, 20), RegionTarget(1, region), patch=(16, 16, 16), blend="gaussian")
    assert len(forward.windowed.windows) > 1
    result = PatternNet(forward).attribute(x, estimator="linear", patterns=manual_set(network, lambda w: w.clone()),
                                           start="ones")
    torch.testing.assert_close(result, forward.gradient(x), rtol=1e-4, atol=1e-6)


def test_an_overflowing_signal_is_an_error_not_a_map_of_infinities():
    network = torch.nn.Sequential(*[torch.nn.Conv3d(1, 1, 1) for _ in range(8)]).eval()
    forward = make_forward(network, (4, 4, 4), RegionTarget(0, torch.ones((4, 4, 4), dtype=torch.bool)))
    x = torch.ones((1, 1, 4, 4, 4))
    huge = manual_set(network, lambda w: torch.full_like(w, 1e6))  # gain 1e6 per layer: 1e48 > float32's 3e38
    with pytest.raises(SegXAIInputError, match="pattern_net: the backward overflowed"):
        PatternNet(forward).attribute(x, estimator="linear", patterns=huge)
    modest = manual_set(network, lambda w: torch.full_like(w, 2.0))
    assert torch.isfinite(PatternNet(forward).attribute(x, estimator="linear", patterns=modest)).all()


def test_per_voxel_sum_equals_the_summed_target():
    """The pattern backward is linear in the backward signal: explaining every voxel of the
    target and summing equals explaining the target once."""
    network = unet(seed=2)
    x = smooth_volumes(1, 1, 16, seed=10)
    card = make_card((16, 16, 16))
    pattern_set = fit_patterns_on_tensors(network, card, [smooth_volumes(1, 1, 16, seed=11)], ("two_component",))
    voxels = [(3, 4, 5), (10, 2, 7), (8, 8, 8)]
    region = torch.zeros((16, 16, 16), dtype=torch.bool)
    for v in voxels:
        region[v] = True
    total = PatternAttribution(make_forward(network, (16, 16, 16), RegionTarget(1, region))).attribute(
        x, patterns=pattern_set["two_component"])
    parts = sum(
        PatternAttribution(make_forward(network, (16, 16, 16), VoxelTarget(1, v, (16, 16, 16)))).attribute(
            x, patterns=pattern_set["two_component"])
        for v in voxels
    )
    torch.testing.assert_close(total, parts, rtol=1e-4, atol=1e-7)
    assert float(total.abs().max()) > 0


# ---- files, provenance, fitting ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from SegXAILib.models import load_model

    return load_model(write_unet_card(tmp_path_factory.mktemp("tiny") / "card", seed=0), "cpu")


def tiny_images(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [Image(rng.normal(size=(1, 24, 20, 14)).astype(np.float32), np.diag([1.5, 1.0, 2.0, 1.0]), ("ch0",))
            for _ in range(count)]


def test_save_load_round_trip_and_refusals(tiny_model, tmp_path):
    from SegXAILib.models import load_model

    sets = fit_patterns(tiny_model, tiny_images(2, seed=0))
    path = sets["two_component"].save(tmp_path / "patterns_two_component.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["estimator"] == "two_component" and raw["volumes"] == 2 and raw["voxels"] > 0
    assert raw["weights_sha256"] == sets["two_component"].weights_sha256 != ""
    assert raw["layers"] == [name for name, _ in pattern_layers(tiny_model.network)]
    loaded = PatternSet.load(path)
    for name, patterns in sets["two_component"].patterns.items():
        for key, value in patterns.items():
            assert torch.equal(loaded.patterns[name][key], value)
    assert loaded.layer_shapes == sets["two_component"].layer_shapes
    loaded.check(tiny_model.network, tiny_model.card)

    # the same architecture with other weights: refused by checksum
    other = load_model(write_unet_card(tmp_path / "other", seed=1), "cpu")
    with pytest.raises(SegXAIInputError, match="SHA-256"):
        loaded.check(other.network, other.card)
    # other layers: refused by name / shape
    with pytest.raises(SegXAIInputError, match="do not match the network's layers"):
        loaded.check(unet(in_channels=2), None)
    # through the method: the file beside another model's card is refused, with the other estimator too
    shutil.copy(path, other.card.path.parent / "patterns_two_component.pt")
    image = torch.zeros((1, 1, 16, 16, 16))
    image[..., 4:9, 4:9, 4:9] = 1.0
    forward = SegmentationForward(other.network, other.card, (16, 16, 16), RegionTarget(1, image[0, 0] > 0))
    with pytest.raises(SegXAIInputError, match="SHA-256"):
        PatternAttribution(forward).attribute(image)
    with pytest.raises(SegXAIInputError, match="estimator=linear was asked"):
        PatternAttribution(forward).attribute(image, estimator="linear", patterns=str(path))
    with pytest.raises(SegXAIInputError, match="segxai patterns fit"):
        PatternNet(forward).attribute(image, estimator="linear")
    with pytest.raises(SegXAIInputError, match="no such file"):
        PatternNet(forward).attribute(image, patterns=str(tmp_path / "nothing.pt"))
    # an unknown keyword is refused like in any Python function (no catch-all swallows it)
    with pytest.raises(TypeError, match="n_samples"):
        PatternNet(forward).attribute(image, patterns=str(path), n_samples=3)


def test_fitting_on_images_progress_cancel_and_seed(tiny_model):
    images = tiny_images(3, seed=1)
    calls = []
    first = fit_patterns(tiny_model, images, ("linear",), max_volumes=2, max_windows=2, seed=4,
                         progress=lambda f, m: calls.append(f))["linear"]
    again = fit_patterns(tiny_model, images, ("linear",), max_volumes=2, max_windows=2, seed=4)["linear"]
    other = fit_patterns(tiny_model, images, ("linear",), max_volumes=2, max_windows=2, seed=5)["linear"]
    assert first.volumes == 2 and first.windows == 4 and first.voxels == 4 * 16 ** 3
    assert calls and calls[-1] == pytest.approx(1.0) and calls == sorted(calls)
    name = next(iter(first.patterns))
    assert torch.equal(first.patterns[name]["all"], again.patterns[name]["all"])
    assert not torch.equal(first.patterns[name]["all"], other.patterns[name]["all"])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        fit_patterns(tiny_model, images, cancel=token)
    with pytest.raises(SegXAIInputError, match="^max_volumes 0"):
        fit_patterns(tiny_model, images, max_volumes=0)
    with pytest.raises(SegXAIInputError, match="^estimator "):
        fit_patterns(tiny_model, images, ("quadratic",))


def test_patterns_fitted_on_the_input_equal_explicit_fitting(tiny_model):
    x = smooth_volumes(1, 1, 16, seed=12)
    region = torch.zeros((16, 16, 16), dtype=torch.bool)
    region[5:10, 5:10, 5:10] = True
    forward = SegmentationForward(tiny_model.network, tiny_model.card, (16, 16, 16), RegionTarget(1, region))
    on_input = PatternNet(forward).attribute(x, patterns="input")
    explicit = fit_patterns_on_tensors(tiny_model.network, tiny_model.card, [x], ("two_component",))["two_component"]
    torch.testing.assert_close(on_input, PatternNet(forward).attribute(x, patterns=explicit))
    assert torch.isfinite(on_input).all() and float(on_input.abs().max()) > 0


def test_torchscript_networks_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still used by models
        scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)))
    with pytest.raises(SegXAIInputError, match="TorchScript"):
        PatternStatistics(scripted)


# ---- the bundled model with its shipped patterns -------------------------------------------------
def test_bundled_lesion_model_with_shipped_patterns():
    from SegXAILib.attribution import explain
    from SegXAILib.models import load_model
    from SegXAILib.models.preprocessing import model_input
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    model = load_model(resolve_model_card("lesions"), "cpu")
    for estimator in ("linear", "two_component"):
        shipped = PatternSet.load(model.card.path.parent / f"patterns_{estimator}.pt")
        shipped.check(model.network, model.card)
        assert shipped.volumes >= 8 and shipped.estimator == estimator
    case = make_lesion_phantom(load_sample_head(), seed=2026)
    centre = np.argwhere(case.lesions.array[0] == 1).mean(axis=0).astype(int)
    image = case.image.crop(centre - (20, 20, 6), centre + (20, 20, 6))
    result = explain(image, model, "pattern_attribution", "instance:1")  # default: the shipped two_component file
    assert result.maps.array.shape == (2, *image.spatial_shape) and result.maps.same_grid(image)
    assert np.all(np.isfinite(result.maps.array)) and np.abs(result.maps.array).max() > 0
    # the methods' own output on the model grid is (1, 2, D, H, W)
    x, _ = model_input(image, model.card)
    region = torch.zeros(x.shape[2:], dtype=torch.bool)
    region[tuple(s // 2 for s in x.shape[2:])] = True
    forward = SegmentationForward(model.network, model.card, x.shape[2:], RegionTarget(1, region))
    for method, estimator in ((PatternNet, "two_component"), (PatternAttribution, "linear")):
        raw = method(forward).attribute(x, estimator=estimator)
        assert raw.shape == x.shape and x.shape[:2] == (1, 2)
        assert torch.isfinite(raw).all() and float(raw.abs().max()) > 0
