"""LRP (``SegXAILib.attribution.lrp``) and the canonical form (``.canonical``): conservation on
bias-free networks (plain, UNet-shaped with skips / residual adds / ConvTranspose3d / merged
BatchNorm, through overlapping sliding windows), equality with zennit, hand-computed rule values,
the alpha2-beta1 split, frozen InstanceNorm / GroupNorm against explicitly merged networks
(zennit on the merged network), the sliding windows (zennit through MONAI's
``sliding_window_inference``), unsupported layers, the bundled lesion model, and
``segxai explain --method lrp``."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from SegXAILib.attribution import TargetSpec, explain
from SegXAILib.attribution.canonical import canonicalise, input_layers
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.lrp import COMPOSITES, LRP, AlphaBeta, relevance_sum_ratio
from SegXAILib.attribution.targets import ClassTarget
from SegXAILib.image import SegXAIInputError
from SegXAILib.models.card import model_card_from_dict

from conftest import import_zennit

#: Conservation holds exactly (bias-free, stabilisers -> 0) for the epsilon rule always; for z+
#: where every neuron with relevance has a positive contribution: hidden layers followed by a
#: ReLU, under an epsilon head (epsilon_plus and its flat / w^2 variants). z+ on a signed head
#: or on MONAI's residual convolutions (no ReLU after them), and alpha-beta where a neuron has
#: contributions of one sign only, lose or add relevance by design.
EXACT_ALWAYS = ("epsilon",)
EXACT_UNDER_RELU = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_plus_wsquare")


# ---- helpers ------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is as fast


def card(patch, overlap: float = 0.25, blend: str = "constant", channels: int = 2):
    return model_card_from_dict({
        "name": "lrp-test",
        "architecture": {"format": "monai", "name": "UNet", "weights": "none.pt"},
        "input_channels": [f"c{i}" for i in range(channels)],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": list(patch), "overlap": overlap, "blend": blend},
    })


def forward_for(network, x, mask, patch=None, **kwargs) -> SegmentationForward:
    model_card = card(patch or x.shape[2:], channels=x.shape[1], **kwargs)
    return SegmentationForward(network.eval(), model_card, x.shape[2:], ClassTarget(1, mask))


def lrp(network, x, mask, composite, patch=None, max_graph_windows=8, **params) -> torch.Tensor:
    forward = forward_for(network, x, mask, patch, **({"overlap": 0.5, "blend": "gaussian"} if patch else {}))
    forward.max_graph_windows = max_graph_windows
    return LRP(forward).attribute(x, composite=composite, **params)


def bias_free_batch_norms(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm scales and variances, zero means and shifts: merged, still bias-free."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
    return network.eval()


def random_batch_norms(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return network.eval()


def bias_free_unet(num_res_units: int = 2) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=num_res_units, act="RELU",
                   norm="BATCH", bias=False)
    return bias_free_batch_norms(network).double()


def smooth_input(shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *shape), generator=generator, dtype=torch.float64)
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False) * 2.0


def target_value(network, x, mask) -> float:
    with torch.no_grad():
        return float(network(x)[0, 1][mask].sum())


def assert_conserved(relevance: torch.Tensor, target: float, tolerance: float = 1e-4) -> None:
    total = float(relevance.sum())
    assert abs(total - target) <= tolerance * abs(target), f"relevance sum {total} vs target {target}"


# ---- conservation ---------------------------------------------------------------------------------------

def test_plain_network_conserves_relevance():
    torch.manual_seed(1)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 6, 3, padding=1, bias=False), torch.nn.BatchNorm3d(6), torch.nn.ReLU(),
        torch.nn.Conv3d(6, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
        torch.nn.ConvTranspose3d(8, 4, 2, stride=2, bias=False), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 2, 1, bias=False),
    )
    network = bias_free_batch_norms(network).double()
    x = smooth_input((2, 8, 8, 8))
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6, 3:7, 1:5] = True
    target = target_value(network, x, mask)
    for composite in EXACT_UNDER_RELU:
        assert_conserved(lrp(network, x, mask, composite, epsilon=1e-12, stabilizer=1e-12), target)


def test_dense_layers_and_reflect_padding_conserve_relevance():
    """A dense layer (acting on the last axis) and a reflect-padded convolution (the rules'
    generic autograd transpose) in a bias-free network."""
    torch.manual_seed(3)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), torch.nn.ReLU(),
        torch.nn.Linear(6, 6, bias=False), torch.nn.ReLU(),
        torch.nn.Conv3d(3, 2, 1, bias=False),
    ).double()
    canonical = canonicalise(network)
    assert [layer.kind for layer in canonical.linear_layers()] == ["conv", "dense", "conv"]
    x = smooth_input((2, 6, 6, 6), seed=4)
    mask = torch.zeros(6, 6, 6, dtype=torch.bool)
    mask[1:5, 0:4, 2:6] = True
    target = target_value(network, x, mask)
    for composite in EXACT_UNDER_RELU:
        assert_conserved(lrp(network, x, mask, composite, epsilon=1e-12, stabilizer=1e-12), target)


@pytest.mark.parametrize("num_res_units", [0, 2])
def test_unet_with_skips_residuals_transposed_convolutions_and_batch_norm_conserves(num_res_units):
    network = bias_free_unet(num_res_units)
    canonical = canonicalise(network)
    kinds = {type(m).__name__ for m in canonical.modules()}
    assert {"Concat", "LinearLayer"} <= kinds and ("Add" in kinds) == (num_res_units > 0)
    assert any(layer.kind == "conv_transpose" for layer in canonical.linear_layers())
    assert all(layer.bias is None or float(layer.bias.abs().max()) == 0 for layer in canonical.linear_layers())
    assert not any(type(m).__name__ == "FrozenNorm" for m in canonical.modules())  # every BatchNorm merged
    x = smooth_input((2, 8, 8, 8))
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[1:7, 2:6, 2:7] = True
    target = target_value(network, x, mask)
    for composite in EXACT_UNDER_RELU if num_res_units == 0 else EXACT_ALWAYS:
        relevance = lrp(network, x, mask, composite, epsilon=1e-12, stabilizer=1e-12)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all()
        assert_conserved(relevance, target)


def test_conservation_through_overlapping_windows_blend_and_padding():
    """Patch 8^3 over a 12 x 10 x 6 volume (overlap 0.5: 4 windows, Gaussian blend; the last axis
    is padded by replication): relevance is still conserved, and both the whole-graph and the
    window-by-window backward equal zennit through MONAI's sliding_window_inference."""
    network = bias_free_unet(1)
    x = smooth_input((2, 12, 10, 6), seed=3)
    mask = torch.zeros(12, 10, 6, dtype=torch.bool)
    mask[3:10, 2:9, 1:5] = True
    forward = forward_for(network, x, mask, patch=(8, 8, 8), overlap=0.5, blend="gaussian")
    assert len(forward.windowed.windows_for(mask)) == 4 and any(forward.windowed.pad)
    with torch.no_grad():
        target = float(forward(x))
    assert_conserved(lrp(network, x, mask, "epsilon", patch=(8, 8, 8), epsilon=1e-12, stabilizer=1e-12), target)
    # the oracle needs a Sequential (zennit): the BatchNorm / ConvTranspose network of the zennit tests
    sequential = zennit_network()
    weights = torch.zeros(1, 2, 12, 10, 6, dtype=torch.float64)
    weights[0, 1][mask] = 1.0
    expected = zennit_relevance(sequential, x, weights, *ZENNIT_EQUIVALENTS["zplus"], windows=((8, 8, 8), 0.5, "gaussian"))
    scale = float(expected.abs().max())
    assert scale > 0
    for max_graph_windows in (8, 1):  # all windows in one graph / one window at a time
        ours = lrp(sequential, x, mask, "zplus", patch=(8, 8, 8), max_graph_windows=max_graph_windows)
        # ours rounds the logits and the blend weights to float32: relative differences ~1e-7,
        # as in the whole-volume zennit comparison below
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * scale)


# ---- canonical form --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, num_res_units", [("INSTANCE", 1), ("BATCH", 2), (("GROUP", {"num_groups": 2}), 1)])
def test_canonical_copy_computes_the_network_and_leaves_it_untouched(norm, num_res_units):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=num_res_units, norm=norm, act="PRELU")
    network = random_batch_norms(network)
    state = copy.deepcopy(network.state_dict())
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        before = network(x)
    canonical = canonicalise(network)
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), before, rtol=1e-4, atol=1e-5)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:5, 2:6, 3:7] = True
    relevance = lrp(network, x[:1], mask, "zplus")
    assert torch.isfinite(relevance).all() and float(relevance.abs().max()) > 0
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(m._forward_hooks or m._backward_hooks for m in network.modules())
    with torch.no_grad():
        assert torch.equal(network(x), before)
    # the layers reading the input: the first unit's convolution (and its residual convolution)
    first = {layer.source.split("+")[0] for layer in input_layers(canonical, x)}
    assert first == ({"model.0.conv.unit0.conv", "model.0.residual"} if num_res_units else {"model.0.conv"})


@pytest.mark.parametrize("norm", ["instance", "group"])
@pytest.mark.parametrize("composite", ["zplus", "epsilon_plus", "alpha2_beta1", "epsilon_plus_wsquare"])
def test_frozen_norm_equals_the_explicitly_merged_network(norm, composite):
    """InstanceNorm / GroupNorm (affine, some negative scales) as a per-channel affine map at the
    current statistics, merged into the convolution: LRP equals LRP of a plain network whose
    convolution has the merged weights ``s W`` and bias ``s b + c`` for this input."""
    torch.manual_seed(2)
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    normalisation = torch.nn.InstanceNorm3d(4, affine=True) if norm == "instance" else torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        normalisation.weight.copy_(torch.tensor([1.3, -0.7, 0.9, -1.1]))
        normalisation.bias.copy_(torch.tensor([0.2, -0.1, 0.05, 0.3]))
    head = torch.nn.Conv3d(4, 2, 1)
    network = torch.nn.Sequential(conv, normalisation, torch.nn.ReLU(), head).double().eval()
    x = smooth_input((2, 6, 6, 6), seed=5)
    with torch.no_grad():
        z = conv(x)
        if norm == "instance":
            var, mean = torch.var_mean(z, dim=(2, 3, 4), unbiased=False)
        else:
            var, mean = torch.var_mean(z.reshape(1, 2, -1), dim=2, unbiased=False)
            var, mean = var.repeat_interleave(2, dim=1), mean.repeat_interleave(2, dim=1)
        scale = normalisation.weight / torch.sqrt(var[0] + normalisation.eps)
        shift = normalisation.bias - mean[0] * scale
        merged_conv = torch.nn.Conv3d(2, 4, 3, padding=1).double()
        merged_conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
        merged_conv.bias.copy_(conv.bias * scale + shift)
    merged = torch.nn.Sequential(merged_conv, torch.nn.ReLU(), head).eval()
    mask = torch.zeros(6, 6, 6, dtype=torch.bool)
    mask[1:5, 1:4, 2:6] = True
    with torch.no_grad():
        torch.testing.assert_close(merged(x), network(x))
    ours = lrp(network, x, mask, composite)
    # the LRP of the merged network by zennit (first layer merged_conv, head the 1x1 convolution)
    weights = torch.zeros(1, 2, 6, 6, 6, dtype=torch.float64)
    weights[0, 1][mask] = 1.0
    expected = zennit_relevance(merged, x, weights, *ZENNIT_EQUIVALENTS[composite])
    # ours rounds the logits to float32: relative differences ~1e-7 (as in the zennit tests below)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


# ---- zennit ---------------------------------------------------------------------------------------------

def zennit_network() -> torch.nn.Module:
    torch.manual_seed(4)
    # eps ~ 0: zennit "removes" a merged BatchNorm by setting it to x / sqrt(1 + eps), not exactly x
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4, eps=1e-14), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 6, 3, stride=2, padding=1), torch.nn.BatchNorm3d(6, eps=1e-14), torch.nn.ReLU(),
        torch.nn.ConvTranspose3d(6, 4, 2, stride=2), torch.nn.BatchNorm3d(4, eps=1e-14), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 2, 1),
    )
    return random_batch_norms(network).double()


#: ours -> (first layer, hidden convolutions, head) in zennit's rules
ZENNIT_EQUIVALENTS = {
    "zplus": (None, "ZPlus", "ZPlus"),  # = zennit's EpsilonPlus on a convolution-only network
    "epsilon": (None, "Epsilon", "Epsilon"),
    "epsilon_plus": (None, "ZPlus", "Epsilon"),
    "epsilon_plus_flat": ("Flat", "ZPlus", "Epsilon"),
    "epsilon_plus_wsquare": ("WSquare", "ZPlus", "Epsilon"),
    "epsilon_alpha2_beta1": (None, "AlphaBeta", "Epsilon"),
    "epsilon_alpha2_beta1_flat": ("Flat", "AlphaBeta", "Epsilon"),
    "alpha2_beta1": (None, "AlphaBeta", "AlphaBeta"),
}


class StartAtTheLogits(torch.autograd.Function):
    """Identity whose backward multiplies the incoming ``dT/df`` by ``f``: the relevance
    ``R = f dT/df`` starts at each window's own logits, below MONAI's blend (METHODS section 1)."""

    @staticmethod
    def forward(ctx, logits):  # type: ignore[override]
        ctx.save_for_backward(logits)
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        return grad * logits


class MonaiWindows(torch.nn.Module):
    """``network`` through MONAI's ``sliding_window_inference`` (replicate padding, blend), all
    windows in one batch: zennit keeps one stored input per layer, so a layer must run once."""

    def __init__(self, network: torch.nn.Module, patch, overlap: float, blend: str) -> None:
        super().__init__()
        self.network, self.patch, self.overlap, self.blend = network, patch, overlap, blend

    def forward(self, x):
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, roi_size=self.patch, sw_batch_size=64, overlap=self.overlap,
                                        mode=self.blend, padding_mode="replicate",
                                        predictor=lambda window: StartAtTheLogits.apply(self.network(window)))


def zennit_relevance(network, x, weights, first, hidden, head, composite_class=None, windows=None):
    """zennit's relevance of ``sum(logits * weights)`` for a Sequential ``network``; ``windows``
    ``(patch, overlap, blend)`` runs it through MONAI's sliding windows (``weights`` then weigh
    the blended logits, and each window's relevance starts at its own logits)."""
    zennit = import_zennit()
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.core import Composite
    from zennit import rules

    model = copy.deepcopy(network)
    first_layer, head_layer = model[0], model[-1]

    def make(name):
        if name == "AlphaBeta":
            return rules.AlphaBeta(2.0, 1.0)
        if name == "WSquare":  # zennit squares the bias too unless told; the w^2 rule has no bias term
            return rules.WSquare(zero_params=["bias"])
        return getattr(rules, name)()

    def module_map(ctx, name, module):
        if module is first_layer and first is not None:
            return make(first)
        if module is head_layer:
            return make(head)
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            return make(hidden)
        if isinstance(module, (torch.nn.ReLU, torch.nn.BatchNorm3d)):
            return rules.Pass()
        return None

    composite = composite_class(canonizers=[SequentialMergeBatchNorm()]) if composite_class else Composite(
        module_map=module_map, canonizers=[SequentialMergeBatchNorm()])
    assert zennit is not None
    if windows is None:
        start = lambda output: output * weights  # noqa: E731  R = f dT/df at the logits
    else:
        model = MonaiWindows(model, *windows)
        start = lambda output: weights  # noqa: E731  dT/df of the blend; StartAtTheLogits makes R
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), start)
    return relevance


@pytest.mark.parametrize("composite", sorted(ZENNIT_EQUIVALENTS))
def test_equals_zennit_after_batch_norm_merging(composite):
    network = zennit_network()
    x = smooth_input((2, 8, 8, 8), seed=6)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:7, 1:6, 3:8] = True
    weights = torch.zeros(1, 2, 8, 8, 8, dtype=torch.float64)
    weights[0, 1][mask] = 1.0
    expected = zennit_relevance(network, x, weights, *ZENNIT_EQUIVALENTS[composite])
    ours = lrp(network, x, mask, composite)
    scale = float(expected.abs().max())
    assert scale > 0
    # the windowed forward rounds the logits to float32: relative differences ~1e-7
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * scale)


def test_default_equals_zennit_epsilon_plus_composite():
    """Paper 000's default (z+ on every convolution) is zennit's own EpsilonPlus composite on a
    network whose layers are all convolutions."""
    zennit = import_zennit()
    network = zennit_network()
    x = smooth_input((2, 8, 8, 8), seed=7)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[0:5, 2:8, 1:6] = True
    weights = torch.zeros(1, 2, 8, 8, 8, dtype=torch.float64)
    weights[0, 1][mask] = 1.0
    expected = zennit_relevance(network, x, weights, None, None, None, composite_class=zennit.composites.EpsilonPlus)
    ours = lrp(network, x, mask, LRP.parameters[0].default)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


# ---- each rule by hand ------------------------------------------------------------------------------------

#: a 1-layer network (a 1x1x3 convolution, 'same' padding): the middle output of class 1 reads
#: x = (1, -2, 3) with w = (0.5, 1, -1), b = 0.5: z = 0.5 - 2 - 3 + 0.5 = -4 = the relevance
HAND = {
    # epsilon 0.1: contributions (0.5, -2, -3) * (-4) / (-4 - 0.1)
    "epsilon": [0.5 * 4 / 4.1, -2 * 4 / 4.1, -3 * 4 / 4.1],
    # z+: only x1 w1 = 0.5 is positive; z+ = 0.5 + b+ = 1: (0.5 / 1 * -4, 0, 0)
    "zplus": [-2.0, 0.0, 0.0],
    # alpha2-beta1: 2 (z+ term) - 1 * (-2, -3) / (-5) * -4 on the negative contributions
    "alpha2_beta1": [-4.0, 1.6, 2.4],
    # flat: three connections of weight 1
    "epsilon_plus_flat": [-4 / 3] * 3,
    # w^2: (0.25, 1, 1) / 2.25 * -4
    "epsilon_plus_wsquare": [-4 * 0.25 / 2.25, -4 / 2.25, -4 / 2.25],
}


@pytest.mark.parametrize("composite", sorted(HAND))
def test_each_rule_against_a_hand_computed_value(composite):
    conv = torch.nn.Conv3d(1, 2, (1, 1, 3), padding=(0, 0, 1)).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, 0, 0, 0] = torch.tensor([0.5, 1.0, -1.0])
        conv.weight[0, 0, 0, 0] = torch.tensor([2.0, -3.0, 1.0])  # class 0: not part of the target
        conv.bias.copy_(torch.tensor([7.0, 0.5]))
    network = torch.nn.Sequential(conv)
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64).view(1, 1, 1, 1, 3)
    mask = torch.zeros(1, 1, 3, dtype=torch.bool)
    mask[0, 0, 1] = True
    relevance = lrp(network, x, mask, composite, epsilon=0.1, stabilizer=1e-12)
    np.testing.assert_allclose(relevance.view(-1).numpy(), HAND[composite], rtol=1e-6, atol=1e-9)


def test_alpha2_beta1_positive_part_sums_to_twice_and_negative_to_minus_once():
    torch.manual_seed(8)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1, bias=False)).double().eval()
    x = smooth_input((2, 6, 6, 6), seed=8)
    mask = torch.ones(6, 6, 6, dtype=torch.bool)
    canonical = canonicalise(network)
    (layer,) = canonical.linear_layers()
    with torch.no_grad():
        output = layer(x)
    output_relevance = torch.zeros_like(output)
    output_relevance[:, 1] = output[:, 1]  # the target: class-1 logits everywhere
    rule = AlphaBeta(2.0, 1.0, stabilizer=1e-12)
    positive, negative = rule.terms(layer, x, output_relevance)
    total = float(output_relevance.sum())
    np.testing.assert_allclose(float((2 * positive).sum()), 2 * total, rtol=1e-8)
    np.testing.assert_allclose(float((-1 * negative).sum()), -total, rtol=1e-8)
    # the engine's alpha2-beta1 map conserves (2 - 1 = 1) and is zennit's AlphaBeta(2, 1) map
    ours = lrp(network, x, mask, "alpha2_beta1", stabilizer=1e-12)
    assert_conserved(ours, total)
    weights = torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64)  # three output channels; the target: class 1
    weights[0, 1] = 1.0
    expected = zennit_relevance(network, x, weights, *ZENNIT_EQUIVALENTS["alpha2_beta1"])  # stabiliser 1e-6
    torch.testing.assert_close(lrp(network, x, mask, "alpha2_beta1"), expected, rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()))
    # with positive output relevance the positive part is >= 0 and the negative part <= 0 elementwise
    positive, negative = rule.terms(layer, x, output.abs())
    assert float(positive.min()) >= 0 and float(negative.min()) >= 0


# ---- errors, registry -----------------------------------------------------------------------------------

def test_unsupported_layers_raise_naming_the_layer():
    from monai.networks.nets import SwinUNETR

    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), spatial_dims=3)
    with pytest.raises(SegXAIInputError, match=r"not supported.*swinViT\..*LayerNorm"):
        canonicalise(swin)
    with pytest.raises(SegXAIInputError, match=r"not supported.*'1' \(GELU\)"):
        canonicalise(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.GELU()))

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) * 2

    with pytest.raises(SegXAIInputError, match=r"not supported.*'block' \(Functional\)"):
        canonicalise(torch.nn.Sequential(OrderedDict(first=torch.nn.Conv3d(1, 1, 1), block=Functional())))
    with pytest.raises(SegXAIInputError, match="TorchScript"):
        canonicalise(torch.jit.script(torch.nn.Conv3d(1, 2, 1)))
    with pytest.raises(SegXAIInputError, match="composite"):
        lrp(bias_free_unet(0), smooth_input((2, 8, 8, 8)), torch.ones(8, 8, 8, dtype=torch.bool), "nope")


def test_composites_are_all_registered_and_the_default_is_paper_000s():
    from SegXAILib.attribution import get_method

    method = get_method("lrp")
    assert method is LRP
    composite = {p.name: p for p in method.parameters}["composite"]
    assert composite.default == "zplus" and set(composite.choices) == set(COMPOSITES)
    assert {COMPOSITES["zplus"].convolution, COMPOSITES["zplus"].head, COMPOSITES["zplus"].dense} == {"zplus"}


# ---- the bundled lesion model and the command line -------------------------------------------------------

@pytest.fixture(scope="module")
def lesion_case():
    from SegXAILib.models import load_model
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    case = make_lesion_phantom(load_sample_head(), seed=2026)
    centre = np.argwhere(case.lesions.array[0] == 1).mean(axis=0).astype(int)
    image = case.image.crop(centre - (24, 24, 6), centre + (24, 24, 6))
    return load_model(resolve_model_card("lesions"), "cpu"), image


def test_bundled_lesion_model(lesion_case, capsys):
    from SegXAILib.models.preprocessing import model_input

    model, image = lesion_case
    result = explain(image, model, "lrp", "instance:1")
    assert result.maps.same_grid(image) and result.maps.channel_names == ("FLAIR", "T1")
    assert np.all(np.isfinite(result.maps.array)) and np.abs(result.maps.array).max() > 0
    assert result.metadata()["parameters"]["composite"] == "zplus"
    # the relevance sum ratio on the model grid (biases and InstanceNorm's mean absorb relevance)
    x, _ = model_input(image, model.card, model.device)
    with torch.no_grad():
        from SegXAILib.models.windows import WindowedForward

        labels = WindowedForward(model.network, model.card, x.shape[2:])(x)[0].argmax(0)
    forward = SegmentationForward(model.network, model.card, x.shape[2:], ClassTarget(1, labels == 1))
    ratios = {}
    for composite in ("zplus",):
        relevance = LRP(forward).attribute(x, composite=composite)
        ratios[composite] = relevance_sum_ratio(forward, x, relevance)
        assert np.isfinite(ratios[composite]) and float(relevance.abs().max()) > 0
    with capsys.disabled():
        print(f"\nlesion model relevance sum ratio (sum R_input / T): {ratios}")


def test_cli_explain_lrp_and_methods(tmp_path, lesion_case, capsys):
    from SegXAILib.cli import main
    from SegXAILib.io import read_image, write_image

    model, image = lesion_case
    files = [write_image(image.channel(name), tmp_path / f"{name}.nii.gz") for name in ("FLAIR", "T1")]
    out = tmp_path / "out"
    common = ["-q", "explain", *map(str, files), "--model", "lesions", "--method", "lrp", "--device", "cpu",
              "--target", "instance:1"]
    assert main([*common, "--param", "composite=epsilon_plus", "--out", str(out)]) == 0
    sidecar = json.loads((out / "maps" / "lrp.json").read_text(encoding="utf-8"))
    assert sidecar["method"] == "lrp" and sidecar["parameters"]["composite"] == "epsilon_plus"
    expected = explain(image, model, "lrp", TargetSpec("instance", instance_id=1), {"composite": "epsilon_plus"})
    for channel, name in enumerate(("FLAIR", "T1")):
        written = read_image(out / "maps" / f"lrp_{name}.nii.gz")
        scale = float(np.abs(expected.maps.array[channel]).max())
        np.testing.assert_allclose(written.array[0], expected.maps.array[channel], rtol=1e-5, atol=1e-6 * scale)
    bad = tmp_path / "bad"
    assert main([*common, "--param", "composite=nope", "--out", str(bad)]) == 2
    assert not bad.exists() or not any(bad.iterdir())
    capsys.readouterr()
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "lrp: layer-wise relevance propagation" in text and "composite=zplus" in text
