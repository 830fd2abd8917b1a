"""LRP on nnU-Net's residual networks (``ResidualEncoderUNet``; ``ResidualUNet``, its residual
decoder twin): the canonical copy computes the network (all three skip kinds of a residual block:
identity, AvgPool alone, AvgPool or nothing + 1x1 projection); LRP-0 (the epsilon rule, epsilon
-> 0) equals gradient x input of the real dynamic_network_architectures modules (their in-place
``out += residual``, ``AvgPool3d`` and ``torch.cat``) at frozen InstanceNorm statistics, biases
included; conservation on bias-free copies; the variants without a rule are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("dynamic_network_architectures",
                    reason="nnU-Net v2 is not installed (pip install 'SegXAILib[nnunet]')")

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet, ResidualUNet  # noqa: E402
from dynamic_network_architectures.building_blocks.residual import BottleneckD, StackedResidualBlocks  # noqa: E402
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder  # noqa: E402
from test_lrp import (  # noqa: E402
    EXACT_ALWAYS,
    assert_conserved,
    bias_free_batch_norms,
    lrp,
    smooth_input,
    target_value,
)

from SegXAILib.attribution.canonical import Add, Residual, canonicalise, input_layers  # noqa: E402
from SegXAILib.attribution.lrp import COMPOSITES  # noqa: E402
from SegXAILib.image import SegXAIInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is as fast

SHAPE = (8, 12, 8)  # divisible by the total stride 4
NORM_KWARGS = {"eps": 1e-5, "affine": True}

#: variant -> (network class, extra settings). features (4, 8, 8) with strides (1, 2, 2): stage 1's
#: first block strides and widens (AvgPool + 1x1 projection), stage 2's strides only (AvgPool alone),
#: the rest are identity skips; "bottleneck" has a narrower stem, so stage 0's first block has a
#: projection without a pool, as do the residual decoder's blocks (concatenation 2C -> C)
VARIANTS = {
    "basic": (ResidualEncoderUNet, {}),
    "bottleneck": (ResidualEncoderUNet, {"block": BottleneckD, "bottleneck_channels": (2, 4, 4), "stem_channels": 3}),
    "residual_decoder": (ResidualUNet, {}),
}


def residual_unet(variant: str = "basic", norm=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU, bias: bool = True,
                  **kwargs) -> torch.nn.Module:
    """A small 3-stage network built as nnU-Net builds it (InstanceNorm, LeakyReLU), random weights."""
    kind, extra = VARIANTS[variant]
    torch.manual_seed(0)
    settings = dict(
        input_channels=2, n_stages=3, features_per_stage=(4, 8, 8), conv_op=torch.nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2), n_blocks_per_stage=(1, 2, 2), num_classes=2, n_conv_per_stage_decoder=1, conv_bias=bias,
        norm_op=norm, norm_op_kwargs=NORM_KWARGS, nonlin=nonlin, nonlin_kwargs={"inplace": True}, **extra,
    )
    settings.update(kwargs)
    network = kind(**settings)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random affine norms (default weight 1, bias 0 would hide mistakes)
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 2.0 - 1.0)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
    return network.eval()


def skip_kinds(network: torch.nn.Module) -> set[str]:
    """The skips of the network's residual blocks, read off the nnU-Net modules."""
    kinds = set()
    for module in network.modules():
        if isinstance(module, StackedResidualBlocks):
            for block in module.blocks:
                if not isinstance(block.skip, torch.nn.Module):
                    kinds.add("identity")
                else:
                    parts = ("pool" if isinstance(m, torch.nn.AvgPool3d) else "projection" for m in block.skip)
                    kinds.add("+".join(parts))
    return kinds


class FrozenStatisticsInstanceNorm(torch.nn.Module):
    """InstanceNorm with its mean and variance detached: the affine map LRP's canonical form
    differentiates (written out here from the definition, apart from SegXAI's code)."""

    def __init__(self, norm: torch.nn.InstanceNorm3d) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(z.detach(), dim=(2, 3, 4), keepdim=True, unbiased=False)
        view = (1, -1, 1, 1, 1)
        return (z - mean) / torch.sqrt(var + self.norm.eps) * self.norm.weight.view(view) + self.norm.bias.view(view)


def frozen_statistics(network: torch.nn.Module) -> torch.nn.Module:
    """A copy with every InstanceNorm3d replaced by :class:`FrozenStatisticsInstanceNorm`."""
    frozen = copy.deepcopy(network)
    swaps = [(parent, name, child) for parent in frozen.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.InstanceNorm3d)]
    assert swaps
    for parent, name, child in swaps:
        setattr(parent, name, FrozenStatisticsInstanceNorm(child))
    return frozen.eval()


def gradient_times_input(network: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * dT/dx`` for ``T`` the class-1 logits summed over ``mask`` (the target of :func:`lrp`)."""
    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(network(leaf)[0, 1][mask].sum(), leaf)
    return x * gradient


# ---- the canonical copy --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_canonical_copy_computes_the_network_and_leaves_it_untouched(variant):
    network = residual_unet(variant)
    # a projection alone: the bottleneck's narrower stem, the residual decoder's 2C -> C blocks
    expected_skips = {"identity", "pool", "pool+projection"} | ({"projection"} if variant != "basic" else set())
    assert skip_kinds(network) == expected_skips  # every kind of skip is exercised
    x = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(2))
    state = copy.deepcopy(network.state_dict())
    with torch.no_grad():
        before = network(x)
    canonical = canonicalise(network)
    blocks = [m for m in network.modules() if type(m).__name__ in ("BasicBlockD", "BottleneckD")]
    adds = [m for m in canonical.modules() if isinstance(m, Add)]
    assert len(adds) == len(blocks) and len([m for m in canonical.modules() if isinstance(m, Residual)]) == len(blocks)
    kinds = [type(m).__name__ for m in canonical.modules()]
    assert kinds.count("Concat") == 2 and kinds.count("Skip") == 2
    pools = [layer for layer in canonical.linear_layers() if layer.source.endswith("skip.0") and layer.groups > 1]
    assert len(pools) == 2  # the two strided first blocks of the encoder (the decoder's blocks do not stride)
    with torch.no_grad():
        # float32: the canonical norms compute their statistics separately (rounding ~1e-7 relative
        # per layer, amplified by the division by the standard deviation); the samples stay independent
        torch.testing.assert_close(canonical(x), before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    heads = [layer.source for layer in canonical.linear_layers() if layer.is_head]
    assert heads == ["decoder.seg_layers.1"]  # the full-resolution head; the deep-supervision one is unused
    first = {layer.source.split("+")[0] for layer in input_layers(canonical, x)}
    assert first == {"encoder.stem.convs.0.all_modules.0"}  # the stem reads the input, then stage 0
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[2:6, 3:9, 1:7] = True
    for composite in COMPOSITES:
        relevance = lrp(network, x[:1], mask, composite)
        assert torch.isfinite(relevance).all() and float(relevance.abs().max()) > 0, composite
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(network(x), before)


# ---- LRP-0 is gradient x input ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lrp_0_equals_gradient_times_input_at_frozen_statistics(variant):
    """With every linear layer affine (norms at frozen statistics) and LeakyReLU positively
    homogeneous, the epsilon rule at epsilon -> 0 hands each layer's input the relevance
    ``x * dT/dx`` (the bias cancels: ``R_j / z_j`` with ``R_j = z_j dT/dz_j``), the addition rule
    ``a * dT/dy`` and the average pool its transposed map: LRP-0 is gradient x input, biases and
    InstanceNorm shifts included. The oracle is autograd through nnU-Net's own modules."""
    network = residual_unet(variant).double()
    x = smooth_input((2, *SHAPE), seed=3)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[1:7, 2:10, 2:7] = True
    frozen = frozen_statistics(network)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), network(x), rtol=1e-12, atol=1e-12)  # the same forward
    expected = gradient_times_input(frozen, x, mask)
    ours = lrp(network, x, mask, "epsilon", epsilon=1e-12, stabilizer=1e-12)
    scale = float(expected.abs().max())
    assert scale > 0
    # float64; each division by stab(z) = z + 1e-12 sign(z) is off by 1e-12 / |z| relative, and the
    # frozen statistics are computed apart from the oracle's (~1e-15 relative)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8 * scale)
    # the biases absorb relevance: gradient x input does not sum to the target (conservation is
    # not what makes the equality hold)
    assert abs(float(expected.sum()) - target_value(network, x, mask)) > 1e-3 * abs(target_value(network, x, mask))


# ---- conservation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nonlin", [torch.nn.ReLU, torch.nn.LeakyReLU])
@pytest.mark.parametrize("variant", ["basic", "bottleneck"])
def test_bias_free_residual_encoder_unet_conserves_relevance(variant, nonlin):
    """Bias-free convolutions (the skip projections always are), merged bias-free BatchNorms and a
    bias-free head: the epsilon rule conserves relevance through the residual additions, the
    average pools, the skips and the transposed convolutions; and with BatchNorm (constant in eval
    mode) LRP-0 is the network's own gradient x input."""
    network = residual_unet(variant, norm=torch.nn.BatchNorm3d, nonlin=nonlin, bias=False)
    network.decoder.seg_layers[-1].bias.data.zero_()  # nnU-Net's seg layers always have a bias
    network = bias_free_batch_norms(network).double()
    canonical = canonicalise(network)
    assert not any(type(m).__name__ == "FrozenNorm" for m in canonical.modules())  # every BatchNorm merged
    assert all(layer.bias is None or float(layer.bias.abs().max()) == 0 for layer in canonical.linear_layers())
    x = smooth_input((2, *SHAPE), seed=4)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[1:7, 2:10, 2:7] = True
    target = target_value(network, x, mask)
    for composite in EXACT_ALWAYS:
        relevance = lrp(network, x, mask, composite, epsilon=1e-12, stabilizer=1e-12)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all()
        assert_conserved(relevance, target)
        expected = gradient_times_input(network, x, mask)
        torch.testing.assert_close(relevance, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))


# ---- refused variants -------------------------------------------------------------------------------------

def test_deep_supervision_squeeze_excitation_and_pooling_encoders_are_refused():
    network = residual_unet(deep_supervision=True)
    # said even though the network's average pools are no layers with a rule of their own
    with pytest.raises(SegXAIInputError, match=r"lrp: not supported.*ResidualEncoderUNet.*deep supervision"):
        canonicalise(network)
    network.decoder.deep_supervision = False
    canonicalise(network)  # switching it off is enough

    se = copy.deepcopy(network)  # squeeze-and-excitation gates: a sigmoid of the channel means multiplies them
    se.encoder.stages[1] = StackedResidualBlocks(
        2, torch.nn.Conv3d, 4, 8, 3, 2, True, torch.nn.InstanceNorm3d, NORM_KWARGS, None, None, torch.nn.LeakyReLU,
        {"inplace": True}, squeeze_excitation=True,
    ).eval()
    with torch.no_grad():
        se(torch.randn(1, 2, *SHAPE))  # the network still runs
    with pytest.raises(SegXAIInputError, match=r"patternnet: not supported.*'encoder\.stages\.1\.blocks\.0\."
                                               r"squeeze_excitation.*supported: .*ResidualEncoderUNet"):
        canonicalise(se, "patternnet")

    # an encoder that max-pools before each stage instead of striding (nnU-Net adds a pool of 1 to stage 0;
    # the first layer without a rule in forward order is named)
    pooled = copy.deepcopy(network)
    pooled.encoder = ResidualEncoder(
        2, 3, (4, 8, 8), torch.nn.Conv3d, 3, (1, 2, 2), (1, 2, 2), True, torch.nn.InstanceNorm3d, NORM_KWARGS,
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True, pool_type="max",
    ).eval()
    with torch.no_grad():
        pooled(torch.randn(1, 2, *SHAPE))
    with pytest.raises(SegXAIInputError, match=r"not supported.*'encoder\.stages\.0\.0' \(MaxPool3d\)"):
        canonicalise(pooled)

    ceil = copy.deepcopy(network)  # a pool rounding its output size up averages fewer voxels at the border
    ceil.encoder.stages[1].blocks[0].skip[0].ceil_mode = True
    with pytest.raises(SegXAIInputError, match=r"not supported.*'encoder\.stages\.1\.blocks\.0\.skip\.0' "
                                               r"\(AvgPool3d\).*ceil_mode"):
        canonicalise(ceil)
