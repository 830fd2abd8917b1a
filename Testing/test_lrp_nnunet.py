"""LRP on nnU-Net v2 networks: the canonical form of ``PlainConvUNet`` (its output equals the
network's; conservation on bias-free copies; zennit on the network with its InstanceNorms merged
at the current statistics), and fold ensembles with mirror flips (the ensemble's relevance is
the mean of each member x flip's relevance of its own logits, computed here by hand)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install 'SegXAILib[nnunet]')")

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402
from test_lrp import (  # noqa: E402
    EXACT_ALWAYS,
    ZENNIT_EQUIVALENTS,
    assert_conserved,
    bias_free_batch_norms,
    lrp,
    smooth_input,
    target_value,
)

from conftest import import_zennit  # noqa: E402
from SegXAILib.attribution.canonical import canonicalise, input_layers  # noqa: E402
from SegXAILib.attribution.forward import SegmentationForward  # noqa: E402
from SegXAILib.attribution.lrp import LRP, lrp_rules, relevance_sum_ratio  # noqa: E402
from SegXAILib.attribution.targets import ClassTarget  # noqa: E402
from SegXAILib.image import SegXAIInputError  # noqa: E402
from SegXAILib.models.loaders import load_model  # noqa: E402
from SegXAILib.models.windows import mirror_combinations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is as fast

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "nnunet_demo"
PATCH = (16, 24, 24)  # the demo's patch: one window covers an image of this shape


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, device="cpu")


def plain_conv_unet(norm=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU, bias: bool = True, **kwargs) -> PlainConvUNet:
    """A small 3-stage PlainConvUNet (2 convolutions per stage) with random weights."""
    torch.manual_seed(0)
    settings = dict(
        input_channels=2, n_stages=3, features_per_stage=(4, 8, 12), conv_op=torch.nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2), n_conv_per_stage=2, num_classes=2, n_conv_per_stage_decoder=2, conv_bias=bias,
        norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nonlin, nonlin_kwargs={"inplace": True},
    )
    settings.update(kwargs)
    return PlainConvUNet(**settings).eval()


# ---- the canonical copy --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["demo", "nonlin_first_dropout"])
def test_canonical_copy_computes_the_network_and_leaves_it_untouched(demo, variant):
    if variant == "demo":
        network = demo.networks[0]
        x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    else:  # conv -> dropout -> nonlin -> norm: the norm after the activation is a frozen norm of its own
        network = plain_conv_unet(nonlin_first=True, dropout_op=torch.nn.Dropout3d, dropout_op_kwargs={"p": 0.3})
        with torch.no_grad():  # random affine norms (default weight 1, bias 0 would hide mistakes)
            for module in network.modules():
                if isinstance(module, torch.nn.InstanceNorm3d):
                    module.weight.uniform_(-1.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 2, 8, 12, 8, generator=torch.Generator().manual_seed(2))
    state = copy.deepcopy(network.state_dict())
    with torch.no_grad():
        before = network(x)
    canonical = canonicalise(network)
    kinds = [type(m).__name__ for m in canonical.modules()]
    assert kinds.count("Concat") == 2 and kinds.count("Skip") == 2
    assert ("FrozenNorm" in kinds) == (variant != "demo")
    with torch.no_grad():
        # float32: the canonical norms compute their statistics separately (rounding ~1e-7 relative
        # per layer, amplified by the division by the standard deviation); the samples stay independent
        torch.testing.assert_close(canonical(x), before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    heads = [layer.source for layer in canonical.linear_layers() if layer.is_head]
    assert heads == ["decoder.seg_layers.1"]  # the full-resolution head; the deep-supervision one is unused
    first = {layer.source.split("+")[0] for layer in input_layers(canonical, x)}
    assert first == {"encoder.stages.0.0.convs.0.all_modules.0"}
    mask = torch.zeros(x.shape[2:], dtype=torch.bool)
    mask[2:6, 3:9, 1:7] = True
    relevance = lrp(network, x[:1], mask, "zplus")
    assert torch.isfinite(relevance).all() and float(relevance.abs().max()) > 0
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(network(x), before)


def test_deep_supervision_and_pooling_encoders_are_refused():
    network = plain_conv_unet(deep_supervision=True)
    with pytest.raises(SegXAIInputError, match=r"lrp: not supported.*PlainConvUNet.*deep supervision"):
        canonicalise(network)
    network.decoder.deep_supervision = False
    canonicalise(network)  # switching it off is enough
    network.encoder.stages[1].insert(0, torch.nn.MaxPool3d(2))
    with pytest.raises(SegXAIInputError, match=r"not supported.*'encoder\.stages\.1\.0' \(MaxPool3d\)"):
        canonicalise(network)


# ---- conservation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nonlin", [torch.nn.ReLU, torch.nn.LeakyReLU])
def test_bias_free_plain_conv_unet_conserves_relevance(nonlin):
    """Bias-free convolutions, merged bias-free BatchNorms and a bias-free head: the epsilon rule
    conserves relevance through the skips and transposed convolutions. (z+ does not, by design:
    nnU-Net's transposed convolutions feed the concatenation with no ReLU after them, so their
    neurons with negative contributions only lose relevance.)"""
    network = plain_conv_unet(norm=torch.nn.BatchNorm3d, nonlin=nonlin, bias=False)
    network.decoder.seg_layers[-1].bias.data.zero_()  # nnU-Net's seg layers always have a bias
    network = bias_free_batch_norms(network).double()
    canonical = canonicalise(network)
    assert not any(type(m).__name__ == "FrozenNorm" for m in canonical.modules())  # every BatchNorm merged
    assert all(layer.bias is None or float(layer.bias.abs().max()) == 0 for layer in canonical.linear_layers())
    x = smooth_input((2, 8, 12, 8), seed=3)
    mask = torch.zeros(8, 12, 8, dtype=torch.bool)
    mask[1:7, 2:10, 2:7] = True
    target = target_value(network, x, mask)
    for composite in EXACT_ALWAYS:
        relevance = lrp(network, x, mask, composite, epsilon=1e-12, stabilizer=1e-12)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all()
        assert_conserved(relevance, target)


# ---- zennit on the network with merged InstanceNorms ----------------------------------------------------

def merged_instance_norms(network: PlainConvUNet, x: torch.Tensor) -> PlainConvUNet:
    """A copy whose convolutions carry their InstanceNorm at the statistics of ``x`` (batch 1):
    weight ``s W``, bias ``s b + c`` with ``s = gamma / sqrt(var + eps)``, ``c = beta - s mu``;
    the norms become identities, the LeakyReLUs not in place (zennit hooks them)."""
    merged = copy.deepcopy(network)
    blocks = [m for m in merged.modules() if type(m).__name__ == "ConvDropoutNormReLU"]
    outputs: dict[int, torch.Tensor] = {}
    handles = [block.conv.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o.detach()))
               for k, block in enumerate(blocks)]
    with torch.no_grad():
        merged(x)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for k, block in enumerate(blocks):
            norm = block.norm
            var, mean = torch.var_mean(outputs[k][0], dim=(1, 2, 3), unbiased=False)
            scale = norm.weight / torch.sqrt(var + norm.eps)
            shift = norm.bias - mean * scale
            block.conv.weight.mul_(scale.view(-1, 1, 1, 1, 1))
            block.conv.bias.copy_(block.conv.bias * scale + shift)
            block.all_modules[1] = torch.nn.Identity()
            block.all_modules[2].inplace = False
    return merged.eval()


@pytest.mark.parametrize("composite", ["zplus", "epsilon", "epsilon_plus_flat", "alpha2_beta1"])
def test_equals_zennit_on_the_network_with_merged_instance_norms(demo, composite):
    """Ours on the demo's first fold (float64) equals zennit's rules on the real nnU-Net modules
    (its own ``torch.cat`` skips; zennit passes relevance through them as a gradient) with each
    InstanceNorm merged into its convolution at this input's statistics."""
    zennit = import_zennit()
    from zennit import rules
    from zennit.attribution import Gradient
    from zennit.core import Composite

    network = copy.deepcopy(demo.networks[0]).double().eval()
    x = smooth_input((1, *PATCH), seed=6)
    merged = merged_instance_norms(network, x)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), network(x))
    mask = torch.zeros(PATCH, dtype=torch.bool)
    mask[3:12, 4:18, 6:20] = True
    weights = torch.zeros(1, 3, *PATCH, dtype=torch.float64)
    weights[0, 1][mask] = 1.0
    first, hidden, head = ZENNIT_EQUIVALENTS[composite]
    first_layer = merged.encoder.stages[0][0].convs[0].conv
    head_layer = merged.decoder.seg_layers[-1]

    def make(name):
        return rules.AlphaBeta(2.0, 1.0) if name == "AlphaBeta" else getattr(rules, name)()

    def module_map(ctx, name, module):
        if module is first_layer and first is not None:
            return make(first)
        if module is head_layer:
            return make(head)
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            return make(hidden)
        if isinstance(module, torch.nn.LeakyReLU):
            return rules.Pass()
        return None

    assert zennit is not None
    with Gradient(model=merged, composite=Composite(module_map=module_map)) as attributor:
        _, expected = attributor(x.clone(), lambda output: output * weights)
    ours = lrp(network, x, mask, composite)
    scale = float(expected.abs().max())
    assert scale > 0
    # float64 throughout; the frozen statistics are computed apart from the merged copy's: ~1e-12
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * scale)


# ---- fold ensembles and mirror flips -----------------------------------------------------------------------

def _flip(t: torch.Tensor, flips: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(t, [axis + 2 for axis in flips]) if flips else t


@pytest.mark.parametrize("max_graph_windows", [16, 1])
def test_ensemble_with_mirroring_is_the_mean_of_each_pass_relevance(demo, max_graph_windows):
    """2 folds x 8 flips on one window: the ensemble's relevance (whole graph, or pass by pass)
    equals the mean over members k and flips s of flip_s(LRP_k(flip_s(x)) started at member k's
    own logits times flip_s(dT/dL)), computed here with each member's canonical copy alone."""
    card = demo.card
    assert len(demo.networks) == 2 and len(mirror_combinations(card.mirror_axes)) == 8
    x = smooth_input((1, *PATCH), seed=8).float()
    mask = torch.zeros(PATCH, dtype=torch.bool)
    mask[4:12, 5:19, 3:15] = True
    target = ClassTarget(2, mask)
    forward = SegmentationForward(demo.networks[0], card, PATCH, target, networks=demo.networks,
                                  max_graph_windows=max_graph_windows)
    assert len(forward.windowed.windows) == 1
    for composite in ("zplus", "epsilon_plus_flat"):
        ours = LRP(forward).attribute(x, composite=composite)
        # by hand: dT/dL of the averaged logits, then every member x flip on its own
        with torch.no_grad():
            logits = forward.logits(x)
        logits.requires_grad_(True)
        (upstream,) = torch.autograd.grad(target(logits).sum(), logits)
        expected = torch.zeros_like(x)
        passes = 0
        for network in demo.networks:
            member = canonicalise(network)
            for flips in mirror_combinations(card.mirror_axes):
                leaf = _flip(x, flips).detach().requires_grad_(True)
                with lrp_rules(member, composite), torch.enable_grad():
                    (relevance,) = torch.autograd.grad((member(leaf) * _flip(upstream, flips)).sum(), leaf)
                expected += _flip(relevance, flips)
                passes += 1
        expected /= passes
        scale = float(expected.abs().max())
        assert scale > 0
        # float32: the same rules in another order of summation (the mean before or after the
        # backward); rounding ~1e-7 relative per layer through ~10 layers, cancelling in sums
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * scale)


def test_ensemble_over_overlapping_windows_is_the_mean_of_the_members(demo):
    """Without flips, over a volume of several overlapping windows (Gaussian blend, nnU-Net's zero
    padding): the ensemble's relevance is the mean of each fold's own LRP through the same windows."""
    card = dataclasses.replace(demo.card, inference={**demo.card.inference, "mirror_axes": []})
    shape = (20, 30, 22)
    x = smooth_input((1, *shape), seed=9).float()
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:17, 4:26, 2:20] = True
    target = ClassTarget(1, mask)
    forward = SegmentationForward(demo.networks[0], card, shape, target, networks=demo.networks)
    assert len(forward.windowed.windows_for(mask)) > 1 and forward.windowed.passes == 2
    ours = LRP(forward).attribute(x, composite="epsilon_plus")
    members = [LRP(SegmentationForward(network, card, shape, target)).attribute(x, composite="epsilon_plus")
               for network in demo.networks]
    expected = (members[0] + members[1]) / 2
    scale = float(expected.abs().max())
    assert scale > 0 and not torch.allclose(members[0], members[1], atol=1e-3 * scale)  # the folds differ
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * scale)
    ratio = relevance_sum_ratio(forward, x, ours)
    assert ratio == ratio and abs(ratio) < 1e3  # finite (biases and InstanceNorm absorb relevance)
